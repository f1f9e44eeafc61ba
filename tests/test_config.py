"""Strict, layered configs: unknown keys and wrong types are refused with the key's
name, `base` chains resolve, `--set` overrides any field typed by its dataclass."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import (ConfigError, ModelConfig, TrainConfig, apply_overrides, from_dict,
                          load_train_config, resolve_config_file, to_dict)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "model" / "configs"


def test_shipped_configs_resolve_to_the_recorded_full_configs():
    """The configs were full dumps; rewritten as `base` + a few keys, each resolves
    to exactly what it resolved to before (tests/golden/configs.json)."""
    recorded = json.loads((Path(__file__).parent / "golden" / "configs.json").read_text())
    assert sorted(recorded) == sorted(p.name for p in CONFIGS.glob("*.json"))
    for name, full in recorded.items():
        assert json.loads(json.dumps(to_dict(load_train_config(CONFIGS / name)))) == full, name


@pytest.mark.parametrize("data, key", [
    ({"epoch": 3}, "epoch"),
    ({"model": {"image_sise": 112}}, "model.image_sise"),
    ({"loss": {"adversaral": 0.1}}, "loss.adversaral"),
    ({"epochs": "3"}, "epochs"),
    ({"epochs": 3.5}, "epochs"),
    ({"amp": 1}, "amp"),
    ({"lr": True}, "lr"),
    ({"train_sets": "fer2013:train"}, "train_sets"),
    ({"model": {"exp_widths": [32, "64"]}}, "model.exp_widths[1]"),
    ({"model": 3}, "model"),
])
def test_unknown_keys_and_wrong_types_are_refused_with_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, data)
    assert str(info.value).startswith(key + ":")


def test_types_are_coerced_only_where_lossless():
    cfg = from_dict(TrainConfig, {"lr": 1, "model": {"exp_widths": [8, 16]}, "max_steps": None,
                                  "data_on_device": True})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.model.exp_widths == (8, 16)
    assert from_dict(ModelConfig, to_dict(ModelConfig())) == ModelConfig()


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"epochs": 5, "loss": {"adversarial": 0.1, "pose": 2.0}}))
    (tmp_path / "b.json").write_text(json.dumps({"base": "a.json", "loss": {"pose": 3.0}, "lr": 0.01}))
    cfg = load_train_config(tmp_path / "b.json")
    assert (cfg.epochs, cfg.loss.adversarial, cfg.loss.pose, cfg.lr) == (5, 0.1, 3.0, 0.01)
    cfg = load_train_config(tmp_path / "b.json", ["loss.adversarial=0.05", "model.image_size=112",
                                                   "train_sets=fer2013:train,ckplus:train",
                                                   "max_steps=null", "freeze_encoders=true",
                                                   "model.renderer=editor"])
    assert cfg.loss.adversarial == 0.05 and cfg.model.image_size == 112
    assert cfg.train_sets == ("fer2013:train", "ckplus:train") and cfg.max_steps is None
    assert cfg.freeze_encoders is True and cfg.model.renderer == "editor"
    (tmp_path / "c.json").write_text(json.dumps({"base": "c.json"}))
    with pytest.raises(ConfigError, match="includes itself"):
        resolve_config_file(tmp_path / "c.json")
    for bad, key in (("loss.adversaral=0.1", "loss.adversaral"), ("epochs=ten", "epochs"),
                     ("lr.x=1", "lr.x"), ("epochs", "epochs")):
        with pytest.raises(ConfigError) as info:
            from_dict(TrainConfig, apply_overrides({}, [bad]))
        assert str(info.value).startswith(key)


def test_train_cli_refuses_an_unknown_key_before_loading_data(tmp_path):
    (tmp_path / "typo.json").write_text(json.dumps({"base": str(CONFIGS / "cpu64.json"),
                                                    "loss": {"adversaral": 0.05}}))
    env = {**os.environ, "IPDFER_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    for argv in ([str(tmp_path / "typo.json")], [str(CONFIGS / "cpu64.json"), "--set", "model.image_sise=112"]):
        proc = subprocess.run([sys.executable, "-m", "service.cli", "train", *argv, "--run-dir",
                               str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "config error" in proc.stderr and ("loss.adversaral" in proc.stderr
                                                  or "model.image_sise" in proc.stderr), proc.stderr
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_gpu_recipe_trains_the_shipped_architecture():
    """The one-run GPU recipe builds what weights/ holds (it once trained the retired
    painting decoder): its model section resolves to the manifest's model config."""
    shipped = json.loads((REPO / "weights" / "manifest.json").read_text())["model_config"]
    built = json.loads(json.dumps(to_dict(load_train_config(CONFIGS / "gpu_recipe.json").model)))
    for config in (shipped, built):
        config.pop("flip_tta", None)   # how predictions are served, not the architecture
    assert built == shipped


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path):
    env = {**os.environ, "IPDFER_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "service.cli", "train", str(CONFIGS / "cpu_mnv2_render.json"),
                           "--set", "loss.adversarial=0.07", "--epochs", "2", "--print-config",
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    want = load_train_config(CONFIGS / "cpu_mnv2_render.json", ["loss.adversarial=0.07"])
    want.epochs = 2
    assert printed == json.loads(json.dumps(to_dict(want)))
    assert printed["loss"]["adversarial"] == 0.07 and printed["model"]["exp_backbone"] == "mobilenet_v2"
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
