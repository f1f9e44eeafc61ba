"""Training loop smoke tests on real images: a few steps, resume, export, and
the exported weights load into the inference path. The images: crops of the
astronaut portrait scikit-image ships, in the data sets' layouts (no research
data needed)."""
import json

import numpy as np
import pytest
import torch

from model.weights import load_weights
from service.cli import main
from tests.data_samples import make_astronaut_layout


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """What --smoke reads (ckplus48/, fer2013/train/): 56 crops of a real face."""
    return make_astronaut_layout(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_root):
    run_dir = tmp_path_factory.mktemp("run")
    assert main(["train", "--smoke", "--run-dir", str(run_dir), "--data-root", str(data_root)]) == 0
    return run_dir


def test_smoke_run_writes_config_log_and_checkpoint(smoke_run):
    cfg = json.loads((smoke_run / "train_config.json").read_text())
    assert cfg["model"]["image_size"] == 64
    rows = (smoke_run / "log.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    for term in ("expression", "pose", "reconstruction", "residue_class", "neutral_class",
                 "neutral_identity", "adversarial", "disc"):
        assert term in header
    # terms computed only on some steps (identity every 2nd step in --smoke) still reach the log
    col = header.index("neutral_identity")
    assert any(r.split(",")[col] for r in rows[1:]), "identity loss never logged"
    ckpt = torch.load(smoke_run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3
    losses = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert all(np.isfinite(losses))


def test_resume_continues_from_checkpoint(smoke_run, data_root, capsys):
    before = torch.load(smoke_run / "last.pt", map_location="cpu", weights_only=True)
    assert main(["train", "--smoke", "--max-steps", "5", "--run-dir", str(smoke_run),
                 "--data-root", str(data_root)]) == 0
    assert f"resumed from {smoke_run / 'last.pt'} at step 3" in capsys.readouterr().out
    after = torch.load(smoke_run / "last.pt", map_location="cpu", weights_only=True)
    assert after["step"] == 5
    changed = [k for k in before["model"] if before["model"][k].is_floating_point()
               and not torch.equal(before["model"][k], after["model"][k])]
    assert changed, "resumed steps did not update the model"


def test_export_then_load_for_inference(smoke_run, tmp_path):
    out = tmp_path / "weights"
    assert main(["export", "--checkpoint", str(smoke_run / "last.pt"), "--out", str(out)]) == 0
    loaded = load_weights(out)
    assert loaded.manifest["trained"] is True and loaded.manifest["training"]["step"] >= 3
    # which images trained and test the weights: per-split hashes of the committed manifests
    hashes = loaded.manifest["training"]["split_hashes"]
    assert {"fer2013:train", "ckplus:train", "fer2013:test", "muxspace:test"} <= set(hashes)
    assert hashes["fer2013:test"]["images"] == 3293 and len(hashes["fer2013:test"]["sha256"]) == 64
    assert hashes["fer2013:test"]["sha256"] != hashes["fer2013:train"]["sha256"]
    assert hashes["fer2013:test"]["manifest_sha256"] == hashes["fer2013:train"]["manifest_sha256"]
    assert (out / "ipdfer.pt").stat().st_size < 50 * 2**20
    x = torch.zeros(2, 1, 64, 64)
    probs = loaded.model.encode(x)["logits"].softmax(1)
    assert torch.allclose(probs.sum(1), torch.ones(2))


def test_tampered_weights_are_refused(smoke_run, tmp_path):
    out = tmp_path / "weights"
    main(["export", "--checkpoint", str(smoke_run / "last.pt"), "--out", str(out)])
    with open(out / "ipdfer.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="does not match the manifest"):
        load_weights(out)


def test_ema_warms_up_so_short_runs_are_not_mostly_initialisation():
    from model.training.train import EMA
    model = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.999)
    torch.nn.init.ones_(model.weight)
    for _ in range(100):
        ema.update(model)
    # a fixed 0.999 would leave 0.999**100 = 90% of the zero initialisation
    assert ema.model.weight.min() > 0.9


def test_init_starts_a_new_run_from_exported_weights(smoke_run, data_root, tmp_path):
    parent = tmp_path / "parent"
    assert main(["export", "--checkpoint", str(smoke_run / "last.pt"), "--out", str(parent),
                 "--version", "9.9.9"]) == 0
    run_dir = tmp_path / "child"
    assert main(["train", "--smoke", "--max-steps", "1", "--init", str(parent), "--run-dir", str(run_dir),
                 "--data-root", str(data_root)]) == 0
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["data"]["init"]["version"] == "9.9.9"
    assert ckpt["data"]["init"]["sha256"] == load_weights(parent).manifest["sha256"]
    # one step from the parent stays near it; a random start would be far away
    start = load_weights(parent).model.state_dict()
    w = "exp_encoder.stages.0.conv1.weight"
    assert (ckpt["model"][w] - start[w]).abs().max() < 0.05 * start[w].abs().max()


def test_init_refuses_weights_of_another_architecture(smoke_run, data_root, tmp_path):
    parent = tmp_path / "parent"
    main(["export", "--checkpoint", str(smoke_run / "last.pt"), "--out", str(parent)])
    with pytest.raises(ValueError, match="different architecture"):
        main(["train", "--smoke", "--max-steps", "1", "--image-size", "32", "--init", str(parent),
              "--run-dir", str(tmp_path / "child"), "--data-root", str(data_root)])


def test_mixed_precision_dtype_follows_the_device():
    from model.training.train import autocast_dtype
    assert autocast_dtype(torch.device("cuda")) == torch.float16
    cpu = autocast_dtype(torch.device("cpu"))
    assert cpu == (torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None)


def test_freeze_encoders_trains_the_renderer_and_leaves_predictions_alone(smoke_run, data_root, tmp_path):
    from model.config import TrainConfig, to_dict
    parent = tmp_path / "parent"
    assert main(["export", "--checkpoint", str(smoke_run / "last.pt"), "--out", str(parent)]) == 0
    cfg = to_dict(TrainConfig())
    cfg["freeze_encoders"] = True
    (tmp_path / "polish.json").write_text(json.dumps(cfg))
    run_dir = tmp_path / "polish"
    with pytest.raises(ValueError, match="--init"):
        main(["train", str(tmp_path / "polish.json"), "--smoke", "--run-dir", str(run_dir),
              "--data-root", str(data_root)])
    assert main(["train", str(tmp_path / "polish.json"), "--smoke", "--max-steps", "2", "--init", str(parent),
                 "--run-dir", str(run_dir), "--data-root", str(data_root)]) == 0
    start = load_weights(parent).model.state_dict()
    after = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    for k in start:
        if k.startswith(("exp_encoder.", "exp_head.", "pose_encoder.", "pose_head.")):
            assert torch.equal(after[k].to(start[k].dtype), start[k]), f"{k} changed"  # BN statistics too
    assert not torch.equal(after["decoder.fc.weight"], start["decoder.fc.weight"])


def test_distillation_trains_a_one_pass_expression_encoder_and_nothing_else(smoke_run, data_root, tmp_path):
    from model.config import TrainConfig, to_dict
    parent = tmp_path / "parent"
    assert main(["export", "--checkpoint", str(smoke_run / "last.pt"), "--out", str(parent)]) == 0
    cfg = to_dict(TrainConfig())
    cfg["model"]["flip_tta"] = False
    cfg["loss"].update(expression=0.0, pose=0.0, distill=1.0)
    cfg["ablation"] = True
    (tmp_path / "distill.json").write_text(json.dumps(cfg))
    run_dir = tmp_path / "distill"
    args = ["train", str(tmp_path / "distill.json"), "--smoke", "--max-steps", "2", "--run-dir", str(run_dir),
            "--data-root", str(data_root)]
    with pytest.raises(ValueError, match="--init"):
        main(args)
    assert main([*args, "--init", str(parent)]) == 0
    start = load_weights(parent).model.state_dict()
    after = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    for k in start:   # pose untouched, E_exp keeps its BatchNorm statistics, G as loaded
        if k.startswith(("pose_encoder.", "pose_head.", "decoder.")) or "running_" in k:
            assert torch.equal(after[k].to(start[k].dtype), start[k]), f"{k} changed"
    w = "exp_encoder.stem.0.weight"
    assert not torch.equal(after[w].to(start[w].dtype), start[w])
    log = (run_dir / "log.csv").read_text().splitlines()
    distill = [float(row.split(",")[log[0].split(",").index("distill")]) for row in log[1:]]
    # a KL divergence: never below 0 but for float rounding (the first step's student is
    # its teacher, whose mirror average can be all but its one pass), and it moves
    assert distill and all(d > -1e-6 for d in distill) and max(distill) > 1e-4, distill
    # the export answers in one pass; its parent with the mirror pass
    assert main(["export", "--checkpoint", str(run_dir / "last.pt"), "--out", str(tmp_path / "student")]) == 0
    assert load_weights(tmp_path / "student").config.flip_tta is False
    assert load_weights(parent).config.flip_tta is True


def _torchrun(args: list[str], tmp_path) -> "subprocess.CompletedProcess":
    import subprocess
    import sys
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", "-m", "service.cli", "train", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra", [[], ["--ablation", "--batches", "device"]],
                         ids=["full-dataloader", "ablation-device-batches"])
def test_two_process_training_keeps_ranks_identical(data_root, tmp_path, extra):
    """torchrun with 2 CPU processes (gloo): ranks see different batches and seeds, so
    only all-reduced gradients keep their parameters equal; every checkpoint checks
    that (train.assert_ranks_in_sync), and the run fails if they diverge."""
    run_dir = tmp_path / "run"
    out = _torchrun(["--smoke", "--run-dir", str(run_dir), "--data-root", str(data_root), *extra], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ranks diverged" not in out.stderr
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3


def test_rank_check_catches_diverged_parameters(tmp_path):
    """The check itself: two gloo ranks with different parameters must raise."""
    import subprocess
    import sys
    script = tmp_path / "diverge.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from model.training.train import assert_ranks_in_sync\n"
        "dist.init_process_group('gloo')\n"
        "m = torch.nn.Linear(3, 2)\n"
        "torch.manual_seed(dist.get_rank()); torch.nn.init.normal_(m.weight)\n"
        "try:\n    assert_ranks_in_sync(m)\nexcept RuntimeError as e:\n"
        # one file per rank: two ranks printing at once can interleave on the shared pipe
        f"    open(r'{tmp_path}' + f'/rank{{dist.get_rank()}}.txt', 'w').write(f'caught {{e}}')\n"
        "dist.destroy_process_group()\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith("caught ranks diverged")
