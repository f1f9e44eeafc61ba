"""MTCNN's networks in ONNX Runtime (weights/mtcnn/): the committed graphs belong to
the installed facenet-pytorch weights, are the detector's default on the CPU, and
are never used for other weights or when changed. That they detect what
facenet-pytorch detects: tests/test_face.py::test_bounded_mtcnn_equals_facenet_pytorch_below_its_bounds."""
import json
import shutil

import numpy as np
import pytest
import torch

from model.faces.detect import FaceDetector
from model.faces.mtcnn import TorchNets
from model.fileio import sha256_file
from model.serving.mtcnn_onnx import FOLDER, MANIFEST, NETS, OnnxNets, export_mtcnn_onnx, read_manifest
from model.serving.plan import resolve_detector_runtime


def test_the_committed_graphs_were_exported_from_the_installed_facenet_weights():
    manifest = read_manifest()
    assert manifest is not None, (FOLDER / MANIFEST).read_text()
    for net in NETS:
        assert sha256_file(FOLDER / manifest[net]["file"]) == manifest[net]["sha256"]
    # "auto": ONNX Runtime where torch runs one thread (each batch loop of the service)
    assert resolve_detector_runtime("cpu", 1, FOLDER) == "onnxruntime"
    assert resolve_detector_runtime("cpu", 1, FOLDER, "torch") == "torch"
    assert resolve_detector_runtime("cpu", 2, FOLDER) == "torch"
    assert resolve_detector_runtime("cpu", 2, FOLDER, "onnxruntime") == "onnxruntime"
    assert resolve_detector_runtime("cuda", 1, FOLDER) == "torch"
    with pytest.raises(ValueError, match="unknown runtime"):
        resolve_detector_runtime("cpu", 1, FOLDER, "tensorrt")


def test_graphs_of_other_facenet_weights_are_never_used(tmp_path):
    shutil.copytree(FOLDER, tmp_path / "mtcnn")
    manifest = json.loads((tmp_path / "mtcnn" / MANIFEST).read_text())
    manifest["onet"]["source_sha256"] = "0" * 64   # exported from other O-Net weights
    (tmp_path / "mtcnn" / MANIFEST).write_text(json.dumps(manifest))
    assert resolve_detector_runtime("cpu", 1, tmp_path / "mtcnn") == "torch"
    with pytest.raises(FileNotFoundError, match="ipdfer export-onnx"):
        resolve_detector_runtime("cpu", 1, tmp_path / "mtcnn", "onnxruntime")


def test_a_changed_graph_file_is_refused(tmp_path):
    shutil.copytree(FOLDER, tmp_path / "mtcnn")
    with open(tmp_path / "mtcnn" / "rnet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="does not match"):
        OnnxNets(read_manifest(tmp_path / "mtcnn"), tmp_path / "mtcnn")


def test_export_writes_graphs_that_compute_what_pytorch_computes(tmp_path):
    manifest = export_mtcnn_onnx(tmp_path)
    assert read_manifest(tmp_path) == json.loads((tmp_path / MANIFEST).read_text()) == manifest
    mtcnn = FaceDetector().mtcnn
    nets, reference = OnnxNets(manifest, tmp_path), TorchNets(mtcnn)
    rng = np.random.default_rng(0)
    for net, shape in (("pnet", (2, 53, 40)), ("rnet", (17, 24, 24)), ("onet", (5, 48, 48))):
        assert manifest[net]["max_abs_diff"] < 1e-5
        pixels = rng.uniform(-1, 1, (*shape, 3)).astype(np.float32)
        with torch.inference_mode():
            want = reference(net, pixels)
        for got, expected in zip(nets(net, pixels), want, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_feature_map_prelus_are_exported_as_convolutions():
    """ONNX Runtime runs PReLU outside its blocked layout (30-40% of each network's
    time): the shipped graphs keep PReLU only after the dense layers."""
    import onnx
    for net, dense_prelus in (("pnet", 0), ("rnet", 1), ("onet", 1)):
        ops = [n.op_type for n in onnx.load(str(FOLDER / f"{net}.onnx")).graph.node]
        assert ops.count("PRelu") == dense_prelus, (net, ops.count("PRelu"))
        assert ops.count("Conv") > 3


def test_the_analyzer_takes_the_graphs_beside_its_weights_else_the_shipped_ones(tmp_path):
    from model.serving.analyzer import Analyzer
    from model.serving.plan import mtcnn_folder
    from model.weights import DEFAULT_WEIGHTS_DIR, load_weights
    for name in ("ipdfer.pt", "manifest.json", "encoders.onnx"):
        shutil.copy(DEFAULT_WEIGHTS_DIR / name, tmp_path / name)
    assert mtcnn_folder(load_weights(tmp_path)) == FOLDER   # the shipped weights/mtcnn/
    shutil.copytree(FOLDER, tmp_path / "mtcnn")            # as an installed image holds them
    assert mtcnn_folder(load_weights(tmp_path)) == tmp_path / "mtcnn"
    analyzer = Analyzer.load(tmp_path, device="cpu", runtime="onnxruntime")
    assert analyzer.plan.mtcnn_folder == tmp_path / "mtcnn" and analyzer.plan.detector_runtime == "onnxruntime"
    pipeline = analyzer.pipeline
    assert isinstance(pipeline.detector.nets, OnnxNets)
    # the detectors that locate aligned=true crops run MTCNN as the pipeline's does: the same sessions
    for located_by in (pipeline.crops.small, pipeline.crops.large):
        assert located_by.nets is pipeline.detector.nets
    assert isinstance(Analyzer.load(tmp_path, device="cpu", runtime="torch").pipeline.detector.nets, TorchNets)
