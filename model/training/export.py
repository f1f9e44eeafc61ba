"""`ipdfer export`: turn a training checkpoint (its EMA model) into weights/
with a manifest. `--untrained` exports a seeded random model so the service's
real code path runs before trained weights exist."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model.config import ModelConfig, TrainConfig, from_dict
from model.nets.networks import IPDFER
from model.weights import DEFAULT_WEIGHTS_DIR, save_weights


TEST_SPLITS = ("fer2013:test", "ckplus:test", "muxspace:test")


def split_hashes(names: list[str]) -> dict[str, dict]:
    """sha256 of each "dataset:split"'s rows in the committed manifest (path,
    label, subject, image sha256, split), so a manifest says exactly which
    images trained and tested the weights. Unknown data sets are skipped."""
    from model.data import manifests as mf
    from model.data.manifests import manifest_digest, ordered
    from model.paths import MANIFEST_DIR
    out, manifests = {}, {}
    for name in dict.fromkeys(names):
        dataset, split = name.split(":")
        path = MANIFEST_DIR / f"{dataset}.csv"
        if not path.is_file():
            continue
        if dataset not in manifests:  # each manifest read and hashed once
            rows = ordered(mf.read_manifest(path))
            manifests[dataset] = rows, manifest_digest(rows)
        rows, digest = manifests[dataset]
        part = [r for r in rows if split == "all" or r.split == split]
        out[name] = {"images": len(part), "sha256": manifest_digest(part), "manifest_sha256": digest}
    return out


def logit_adjust(model: IPDFER, cfg: TrainConfig, val_split: str, cache_dir: Path | None) -> dict:
    import numpy as np

    from model.training import calibrate
    from model.data import datasets as datalib
    size = cfg.model.image_size
    train_labels = np.concatenate([datalib.load_split(*s.split(":"), size=size, cache_dir=cache_dir).labels
                                   for s in cfg.train_sets])
    val = datalib.load_split(*val_split.split(":"), size=size, cache_dir=cache_dir)
    return {"split": val_split, **calibrate.fit(model, np.asarray(val.images), val.labels, train_labels)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="checkpoint .pt written by ipdfer train")
    src.add_argument("--untrained", action="store_true", help="export a seeded, untrained model")
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_DIR, help="weights folder")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--metrics", type=Path, help="metrics.json from ipdfer evaluate to record")
    p.add_argument("--logit-adjust", metavar="DATASET:SPLIT",
                   help="fit post-hoc logit adjustment on this validation split (e.g. fer2013:val) "
                        "against the prior of the checkpoint's training sets; see model/training/calibrate.py")
    p.add_argument("--data-cache", type=Path, help="prepared data cache (for --logit-adjust)")
    p.add_argument("--source", choices=("ema", "model"), default="ema",
                   help="which weights of the checkpoint to ship: the EMA copy (default) or the raw model")


def run(args: argparse.Namespace) -> int:
    extra: dict = {}
    if args.untrained:
        torch.manual_seed(0)
        model, trained = IPDFER(ModelConfig()), False
        extra["training"] = None
    else:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        cfg = from_dict(TrainConfig, ckpt["train_config"])
        model = IPDFER(cfg.model)
        model.load_state_dict(ckpt[args.source])  # normally the EMA copy
        trained = True
        extra["training"] = {"config": ckpt["train_config"], "step": ckpt["step"], "epoch": ckpt["epoch"],
                             "data": ckpt.get("data"), "weights_source": args.source,
                             "split_hashes": split_hashes([*cfg.train_sets, *cfg.val_sets, *TEST_SPLITS])}
        if args.logit_adjust:
            extra["logit_adjustment"] = logit_adjust(model, cfg, args.logit_adjust, args.data_cache)
            chosen = extra["logit_adjustment"]["chosen"]
            print(f"logit adjustment on {args.logit_adjust}: tau {chosen['tau']}, accuracy "
                  f"{chosen['accuracy']:.4f}, mean class accuracy {chosen['mean_class_accuracy']:.4f}")
    if args.metrics:
        extra["metrics"] = json.loads(args.metrics.read_text())
    manifest = save_weights(model.eval(), args.out, version=args.version, trained=trained, extra=extra)
    print(json.dumps({k: manifest[k] for k in ("file", "sha256", "size_bytes", "trained")}))
    try:  # the CPU runtime's graph of these weights (the old one no longer matches)
        from model.serving.encoders_onnx import export_onnx
        print(json.dumps({"onnx": export_onnx(args.out)}))
    except ImportError as exc:
        print(f"encoders.onnx not exported ({exc}): pip install -e '.[export]', then ipdfer export-onnx")
    return 0
