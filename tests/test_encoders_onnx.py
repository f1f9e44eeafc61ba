"""The encoders in ONNX Runtime (weights/encoders.onnx) predict what PyTorch
predicts, belong to the weights they sit beside, and are never used for others."""
import json
import shutil

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.serving.encoders_onnx import FORM, ONNX_FILE, export_onnx, load_onnx_encoders, onnx_entry
from model.fileio import sha256_file
from model.images import load_image
from model.nets.serving import inference_form
from model.serving.analyzer import Analyzer, ImageRequest
from model.serving.plan import resolve_encoder_runtime
from model.nets.networks import IPDFER
from model.weights import DEFAULT_WEIGHTS_DIR, MANIFEST, load_weights, save_weights
from tests.data_samples import astronaut_jpegs


@pytest.fixture(scope="module")
def analyzers():
    onnx = Analyzer.load(device="cpu", precision="fp32", runtime="onnxruntime")
    torch_ = Analyzer.load(device="cpu", precision="fp32", runtime="torch")
    torch_.pipeline = onnx.pipeline   # the same faces (MTCNN's runtime follows the setting too): the encoders differ
    return onnx, torch_


def test_the_committed_graph_was_exported_from_the_committed_weights():
    weights = load_weights(DEFAULT_WEIGHTS_DIR)
    entry = onnx_entry(weights)
    assert entry is not None, weights.manifest.get("onnx")
    assert entry["source_sha256"] == weights.manifest["sha256"]
    assert sha256_file(DEFAULT_WEIGHTS_DIR / entry["file"]) == entry["sha256"]
    # the service's default on the CPU
    assert Analyzer.load(device="cpu").plan.encoder_runtime == "onnxruntime"


def test_onnx_runtime_predicts_what_pytorch_predicts_on_real_faces(analyzers):
    onnx, torch_ = analyzers
    images = [load_image(jpg) for jpg in astronaut_jpegs(12)]   # 12 photos of one real face
    # 1 face, then 12: the mirror pass runs for some of them (test_mirror.py)
    for batch in (images[:1], images):
        a = onnx.analyze([ImageRequest(image) for image in batch]).images
        b = torch_.analyze([ImageRequest(image) for image in batch]).images
        assert [len(r.faces) for r in a] == [len(r.faces) for r in b]
        pairs = [(fa, fb) for xa, xb in zip(a, b) for fa, fb in zip(xa.faces, xb.faces)]
        assert len(pairs) >= len(batch)
        for fa, fb in pairs:
            assert fa.label == fb.label
            for k in fa.probabilities:
                assert abs(fa.probabilities[k] - fb.probabilities[k]) <= 1e-4, k
            for k in fa.pose:
                assert abs(fa.pose[k] - fb.pose[k]) <= 0.02, k


def test_the_committed_graph_computes_what_todays_code_computes():
    """A later change to encode() or the heads (not to the weights) would leave the
    graph computing the old thing: compared here on random faces, no data needed."""
    weights = load_weights(DEFAULT_WEIGHTS_DIR)
    assert onnx_entry(weights)["form"] == FORM == "one-pass"
    onnx = load_onnx_encoders(weights, threads=1)
    served = inference_form(weights.model)
    x = torch.rand(5, 1, weights.config.image_size, weights.config.image_size,
                   generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.inference_mode():
        want = served.encode(x)   # one pass: the mirror pass is a second run (model/nets/mirror.py)
    got = onnx(x)
    for key in ("probs", "logits", "pose", "exp", "pose_feat"):
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4, msg=key)


def test_the_graph_of_other_weights_is_never_used(tmp_path):
    for name in ("ipdfer.pt", MANIFEST, ONNX_FILE):
        shutil.copy(DEFAULT_WEIGHTS_DIR / name, tmp_path / name)
    assert Analyzer.load(tmp_path, device="cpu").plan.encoder_runtime == "onnxruntime"
    # other weights in the folder, the old graph's record kept: it no longer matches them
    entry = json.loads((tmp_path / MANIFEST).read_text())["onnx"]
    torch.manual_seed(1)
    save_weights(IPDFER(ModelConfig()).eval(), tmp_path, version="0.0.1", trained=False, extra={"onnx": entry})
    assert json.loads((tmp_path / MANIFEST).read_text())["onnx"]["source_sha256"] == entry["source_sha256"]
    assert Analyzer.load(tmp_path, device="cpu").plan.encoder_runtime == "torch"
    with pytest.raises(FileNotFoundError, match="ipdfer export-onnx"):
        Analyzer.load(tmp_path, device="cpu", runtime="onnxruntime")


def test_a_graph_of_the_older_joint_form_is_never_used(tmp_path):
    """Graphs before the one-pass form computed face + mirror together: run as
    one pass, their probabilities would already be averaged, then averaged again."""
    for name in ("ipdfer.pt", MANIFEST, ONNX_FILE):
        shutil.copy(DEFAULT_WEIGHTS_DIR / name, tmp_path / name)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["onnx"]["form"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert Analyzer.load(tmp_path, device="cpu").plan.encoder_runtime == "torch"
    with pytest.raises(FileNotFoundError, match="one-pass form: run ipdfer export-onnx"):
        Analyzer.load(tmp_path, device="cpu", runtime="onnxruntime")


def test_a_changed_graph_file_is_refused(tmp_path):
    for name in ("ipdfer.pt", MANIFEST, ONNX_FILE):
        shutil.copy(DEFAULT_WEIGHTS_DIR / name, tmp_path / name)
    with open(tmp_path / ONNX_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="does not match"):
        Analyzer.load(tmp_path, device="cpu")


def test_onnx_runtime_is_fp32_on_the_cpu_only():
    weights = load_weights(DEFAULT_WEIGHTS_DIR)
    for device, precision in (("cpu", "bf16"), ("cuda", "fp16"), ("cuda", "fp32")):
        assert resolve_encoder_runtime(weights, device, precision) == "torch"
        with pytest.raises(ValueError, match="fp32 on the CPU"):
            resolve_encoder_runtime(weights, device, precision, "onnxruntime")
    with pytest.raises(ValueError, match="unknown runtime"):
        Analyzer.load(device="cpu", runtime="tensorrt")
    # the graph is one pass: with the mirror pass or without it, it runs
    other = not weights.config.flip_tta
    assert (Analyzer.load(device="cpu").plan.mirror_margin > 0) == weights.config.flip_tta
    assert Analyzer.load(device="cpu", flip_tta=other).plan.encoder_runtime == "onnxruntime"


@pytest.mark.parametrize("flip_tta", [True, False], ids=["mirror-pass", "one-pass"])
def test_export_writes_a_graph_that_matches_and_records_it(tmp_path, flip_tta):
    torch.manual_seed(0)
    model = IPDFER(ModelConfig(flip_tta=flip_tta)).eval()
    with torch.no_grad():   # peaked probabilities, so that the mirror pass shows in them
        model.exp_head[1].weight *= 100
    save_weights(model, tmp_path, version="0.0.1", trained=False)
    entry = export_onnx(tmp_path, check_batches=(1, 3))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["onnx"] == entry
    assert entry["source_sha256"] == manifest["sha256"] and entry["max_abs_diff"] < 1e-4
    onnx = Analyzer.load(tmp_path, device="cpu", runtime="onnxruntime")
    plain = Analyzer.load(tmp_path, device="cpu", runtime="torch")
    assert (onnx.plan.mirror_margin > 0) is (plain.plan.mirror_margin > 0) is flip_tta
    faces = list(np.random.default_rng(0).integers(0, 256, (5, 64, 64), dtype=np.uint8))
    for margin in (None, 0.0, 1.0):   # as served, no mirror pass, every face mirrored
        got, want = onnx._encode(faces, margin), plain._encode(faces, margin)
        for key in ("probs", "logits", "pose", "exp", "pose_feat"):
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4, msg=key)
    # the mirror pass changes the probabilities (so the comparison above tells the two apart)
    mirrored, one_pass = plain._encode(faces, 1.0), plain._encode(faces, 0.0)
    assert (mirrored["probs"] - one_pass["probs"]).abs().max() > 1e-3
