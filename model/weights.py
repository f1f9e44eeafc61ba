"""The weights/ folder: one state_dict file plus manifest.json (sha256, config,
training data, metrics, code commit). Loading verifies the hash and never
unpickles code (torch.load(weights_only=True))."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from model.fileio import atomic_write, atomic_write_text, require_sha256, sha256_file
from model.paths import WEIGHTS_DIR
from model.config import ModelConfig, from_dict, to_dict
from model.nets.networks import IPDFER

DEFAULT_WEIGHTS_DIR = WEIGHTS_DIR
MANIFEST = "manifest.json"


@dataclass
class LoadedWeights:
    model: IPDFER
    config: ModelConfig
    manifest: dict
    directory: Path | None = None   # the weights folder (files beside the .pt: encoders.onnx)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def save_weights(model: IPDFER, out_dir: Path, *, name: str = "ipdfer", version: str,
                 trained: bool, extra: dict | None = None) -> dict:
    """Write `<name>.pt` (state_dict + model config) and the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    file = out_dir / f"{name}.pt"
    # Stored in fp16 to halve the repo's growth; loading casts back to fp32.
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    atomic_write(file, lambda tmp: torch.save({"model_config": to_dict(model.cfg), "state_dict": state}, tmp))
    manifest = {
        "name": name, "version": version, "file": file.name, "sha256": sha256_file(file),
        "size_bytes": file.stat().st_size, "trained": trained,
        "model_config": to_dict(model.cfg), "git_commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_weights(weights_dir: Path = DEFAULT_WEIGHTS_DIR) -> LoadedWeights:
    manifest_path = weights_dir / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {weights_dir}: export weights first (ipdfer export)")
    manifest = json.loads(manifest_path.read_text())
    file = weights_dir / manifest["file"]
    require_sha256(file, manifest["sha256"])
    blob = torch.load(file, map_location="cpu", weights_only=True)
    cfg = from_dict(ModelConfig, blob["model_config"])
    model = IPDFER(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    state.setdefault("class_bias", torch.zeros(cfg.num_classes))  # weights <= 0.3.0 had no logit adjustment
    model.load_state_dict(state)
    return LoadedWeights(model=model.eval(), config=cfg, manifest=manifest, directory=weights_dir)
