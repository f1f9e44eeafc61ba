"""The encoders' int8 graph (weights/encoders.int8.onnx, IPDFER_PRECISION=int8):
made from the committed weights' fp32 graph, close to it on real faces but
really quantized, never used for other weights or a re-exported fp32 graph, and
refused where it cannot run. Its accuracy on all of FER2013 PrivateTest:
benchmarks/precision_accuracy.py --precisions fp32,int8."""
import json
import shutil

import numpy as np
import onnx
import pytest

from model.serving import encoders_int8
from model.serving.encoders_int8 import INT8_FILE, export_int8, float_nodes, int8_entry
from model.serving.encoders_onnx import ONNX_FILE, onnx_entry
from model.fileio import sha256_file
from model.images import load_image
from model.serving.analyzer import Analyzer, ImageRequest
from model.serving.plan import resolve_encoder_runtime, resolve_precision
from model.weights import DEFAULT_WEIGHTS_DIR, MANIFEST, load_weights


def copy_weights(to, names=("ipdfer.pt", MANIFEST, ONNX_FILE, INT8_FILE)):
    for name in names:
        shutil.copy(DEFAULT_WEIGHTS_DIR / name, to / name)


def test_the_committed_int8_graph_was_made_from_the_committed_fp32_graph():
    weights = load_weights(DEFAULT_WEIGHTS_DIR)
    entry = int8_entry(weights)
    assert entry is not None, weights.manifest.get("onnx_int8")
    assert entry["float_graph_sha256"] == onnx_entry(weights)["sha256"]
    assert sha256_file(DEFAULT_WEIGHTS_DIR / INT8_FILE) == entry["sha256"]
    assert entry["check"]["top_label_agreement"] >= encoders_int8.MIN_AGREEMENT
    assert resolve_precision("cpu") == "fp32"   # int8 is asked for, never the default


def test_int8_stays_close_to_fp32_on_real_faces_and_is_really_quantized(shared_dir):
    files = sorted((shared_dir / "data" / "fer2013" / "test" / "happy").glob("PrivateTest_*.jpg"))[:48]
    assert len(files) == 48, shared_dir
    images = [load_image(f) for f in files]
    int8 = Analyzer.load(device="cpu", precision="int8")
    fp32 = Analyzer.load(device="cpu", precision="fp32")
    assert int8.info["precision"] == "int8" and int8.info["runtime"] == "onnxruntime"
    requests = [ImageRequest(image, aligned=True, max_faces=1) for image in images]
    a = [r.faces[0] for r in int8.analyze(requests).images]
    b = [r.faces[0] for r in fp32.analyze(requests).images]
    same = np.mean([fa.label == fb.label for fa, fb in zip(a, b)])
    dp = np.array([[fa.probabilities[k] - fb.probabilities[k] for k in fa.probabilities] for fa, fb in zip(a, b)])
    dpose = np.array([[fa.pose[k] - fb.pose[k] for k in fa.pose] for fa, fb in zip(a, b)])
    assert same >= 0.9, same
    assert np.abs(dp).max() < 0.3 and np.abs(dpose).mean() < 1.0, (np.abs(dp).max(), np.abs(dpose).mean())
    assert np.abs(dp).max() > 1e-3   # not the fp32 graph under another name


def test_int8_renders_start_from_fp32_codes(shared_dir):
    """/predict?neutral=true and /neutralize render the same face under int8, the
    face fp32 renders (int8 codes moved it by up to 3 grey levels)."""
    files = sorted((shared_dir / "data" / "fer2013" / "test" / "sad").glob("PrivateTest_*.jpg"))[:6]
    images = [load_image(f) for f in files]
    int8 = Analyzer.load(device="cpu", precision="int8")
    fp32 = Analyzer.load(device="cpu", precision="fp32", runtime="torch")
    requests = [ImageRequest(image, aligned=True, max_faces=1, neutral=True) for image in images]
    a = [r.faces[0] for r in int8.analyze(requests).images]
    b = [r.faces[0] for r in fp32.analyze(requests).images]
    assert [f.neutral_png for f in a] == int8.render([f.state for f in a])
    assert [f.neutral_png for f in a] == [f.neutral_png for f in b]


def test_int8_is_refused_where_it_cannot_run(tmp_path):
    weights = load_weights(DEFAULT_WEIGHTS_DIR)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_precision("cuda", "int8")
    with pytest.raises(ValueError, match="int8 is the encoders' graph"):
        resolve_encoder_runtime(weights, "cpu", "int8", "torch")
    # the graph is one pass: with or without the mirror pass, int8 runs it
    other = Analyzer.load(device="cpu", precision="int8", flip_tta=not weights.config.flip_tta)
    assert other.plan.encoder_runtime == "onnxruntime" and (other.plan.mirror_margin > 0) is not weights.config.flip_tta
    copy_weights(tmp_path, names=("ipdfer.pt", MANIFEST, ONNX_FILE))   # no int8 graph beside them
    with pytest.raises(FileNotFoundError, match="encoders.int8.onnx is missing beside the weights: run ipdfer "
                                                "export-onnx --int8-calibration"):
        Analyzer.load(tmp_path, device="cpu", precision="int8")
    assert Analyzer.load(tmp_path, device="cpu").plan.precision == "fp32"
    (tmp_path / ONNX_FILE).unlink()   # nothing to quantize: the fp32 export comes first
    with pytest.raises(FileNotFoundError, match="run ipdfer export-onnx, then"):
        Analyzer.load(tmp_path, device="cpu", precision="int8")


def test_an_int8_graph_of_an_older_fp32_graph_is_never_used(tmp_path):
    copy_weights(tmp_path)
    assert int8_entry(load_weights(tmp_path)) is not None
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["onnx_int8"]["float_graph_sha256"] = "0" * 64   # made from a graph since re-exported
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert int8_entry(load_weights(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="an earlier export of the fp32 graph"):
        Analyzer.load(tmp_path, device="cpu", precision="int8")


def test_a_changed_int8_graph_is_refused_with_the_command_that_remakes_it(tmp_path):
    copy_weights(tmp_path)
    with open(tmp_path / INT8_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="does not match.*--int8-calibration"):
        Analyzer.load(tmp_path, device="cpu", precision="int8")


def test_the_fp32_nodes_are_the_input_stage_and_the_backbones_first_modules():
    graph = onnx.load(str(DEFAULT_WEIGHTS_DIR / ONNX_FILE)).graph
    backbone = load_weights(DEFAULT_WEIGHTS_DIR).config.exp_backbone
    keep = set(float_nodes(graph, backbone))
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    # MobileNetV2's features 0, 1 and 2 hold its first six convolutions; FaceRes's
    # layers 0-4 are its stem and first two depthwise + pointwise pairs
    assert [c for c in convs if c in keep] == convs[:{"mobilenet_v2": 6, "faceres": 5}[backbone]]
    ops = {n.op_type for n in graph.node if n.name in keep}
    assert "Resize" in ops   # E_exp's upsampling of the input
    assert not any(n.op_type == "Slice" for n in graph.node)   # no mirror image (a reversed Slice) in the graph
    assert not any(n.op_type == "Gemm" and n.name in keep for n in graph.node)


def test_export_int8_calibrates_checks_and_records(tmp_path, shared_dir, monkeypatch):
    copy_weights(tmp_path, names=("ipdfer.pt", MANIFEST, ONNX_FILE))
    crops = shared_dir / "data" / "fer2013" / "train"
    # 32 calibration faces (a small, fast export): a looser bar than 512 faces meet
    monkeypatch.setattr(encoders_int8, "MIN_AGREEMENT", 0.85)
    entry = export_int8(tmp_path, crops, faces=32, check_faces=64)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["onnx_int8"] == entry and entry["calibration"]["faces"] == 32
    assert entry["sha256"] == sha256_file(tmp_path / INT8_FILE)
    assert entry["check"]["faces"] == 64 and entry["check"]["top_label_agreement"] >= 0.85
    assert Analyzer.load(tmp_path, device="cpu", precision="int8").plan.encoder_runtime == "onnxruntime"
    # a graph that fails the check never replaces the one there
    monkeypatch.setattr(encoders_int8, "MIN_AGREEMENT", 1.01)
    with pytest.raises(RuntimeError, match="not kept"):
        export_int8(tmp_path, crops, faces=32, check_faces=32)
    assert sha256_file(tmp_path / INT8_FILE) == entry["sha256"]
    with pytest.raises(ValueError, match="images"):
        export_int8(tmp_path, tmp_path, faces=32)
