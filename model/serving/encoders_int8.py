"""The served encoders' graph (model/serving/encoders_onnx.py) with int8 weights and
activations, for CPUs: `IPDFER_PRECISION=int8`, run by ONNX Runtime.

How it is made (`ipdfer export-onnx --int8-calibration <folder of face crops>`):
ONNX Runtime's static quantization in QDQ form; weights per output channel in a
7-bit range (`reduce_range`: CPUs without AVX-512 VNNI compute u8 x s8 through
16-bit sums that the full range can saturate); each activation's range is the
99.999th percentile of its values over 512 faces (min-max ranges moved 1.6x as
many top labels). The input stage (upsampling), MobileNetV2's stem
and its first inverted-residual block stay fp32: with them quantized, ~12% of
FER2013 validation top labels moved; quantized alone, the stem moved 7.8% and the
first block 2.3%, every later block 1.3% or less.

Measured on an AVX-512 VNNI Xeon, 2026-12-03 (docs/benchmarks.md), from the
joint graph then served: FER2013 PrivateTest 67.68% vs 67.82% in fp32, same top
label for 97.8% of faces; faces/s 1.6x / 1.7x the fp32 graph's at batch 1 / 32 on
one thread (1.2x / 1.4x on two). Remade from the one-pass graph (AMX Xeon,
2026-12-07): 67.76% with the served mirror margin (fp32: 67.73%), same top label
as fp32 with every face mirrored for 98.1%.

The graph is checked against the fp32 graph on 256 faces not used to calibrate and
kept only when their top labels agree for >= 95%; the manifest records it
(`onnx_int8`) with the sha256 of the weights and of the fp32 graph it came from."""
from __future__ import annotations

import ast
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from model.serving.encoders_onnx import INPUT, OnnxEncoders, onnx_entry
from model.fileio import atomic_write, atomic_write_text, sha256_file
from model.weights import MANIFEST, LoadedWeights, load_weights

INT8_FILE = "encoders.int8.onnx"
# modules (torch names, as the exporter records them) left in fp32, by E_exp backbone:
# the first layers, where int8 costs the most agreement (FaceRes of weights 0.6.0:
# stem + first pair kept in fp32, 94.9% top-label agreement; + second pair, 96.1%)
FLOAT_MODULES = {
    "mobilenet_v2": ("model.exp_encoder.features.0", "model.exp_encoder.features.1", "model.exp_encoder.features.2"),
    "faceres": tuple(f"model.exp_encoder.layers.{i}" for i in range(5)),
}
CALIBRATION_FACES, CHECK_FACES = 512, 256
PERCENTILE = 99.999
MIN_AGREEMENT = 0.95
REMAKE = "ipdfer export-onnx --int8-calibration <folder of face crops>"


def int8_status(weights: LoadedWeights) -> tuple[dict | None, str]:
    """(the manifest's record of the int8 graph, "") when it was made from these
    weights' fp32 graph as it is now and its file is there, else (None, why not and
    what to run)."""
    entry, source = weights.manifest.get("onnx_int8"), onnx_entry(weights)
    if source is None:
        return None, f"these weights have no fp32 encoders graph to quantize: run ipdfer export-onnx, then {REMAKE}"
    if not entry:
        return None, f"no int8 graph was made from these weights: run {REMAKE}"
    if entry.get("source_sha256") != weights.manifest["sha256"]:
        return None, f"the int8 graph was made from other weights: run {REMAKE}"
    if entry.get("float_graph_sha256") != source["sha256"]:
        return None, f"the int8 graph was made from an earlier export of the fp32 graph: run {REMAKE}"
    if not (weights.directory / entry["file"]).is_file():
        return None, f"{entry['file']} is missing beside the weights: run {REMAKE}"
    return entry, ""


def int8_entry(weights: LoadedWeights) -> dict | None:
    return int8_status(weights)[0]


def load_int8_encoders(weights: LoadedWeights, threads: int) -> OnnxEncoders:
    entry, why = int8_status(weights)
    if entry is None:
        raise FileNotFoundError(f"IPDFER_PRECISION=int8: {why}; or use IPDFER_PRECISION=fp32")
    return OnnxEncoders(weights.directory / entry["file"], entry["sha256"], threads,
                        fix=f": remake it ({REMAKE}) or use IPDFER_PRECISION=fp32")


def float_nodes(graph, backbone: str) -> list[str]:
    """Nodes kept in fp32: everything before the first convolution (the mirror
    image and E_exp's upsampling of the input) and the nodes of the backbone's
    FLOAT_MODULES."""
    float_modules = FLOAT_MODULES.get(backbone, ())
    keep, seen_conv = [], False
    for node in graph.node:
        seen_conv = seen_conv or node.op_type == "Conv"
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        if not seen_conv or any(s in float_modules for s in scopes):
            keep.append(node.name)
    return keep


def calibration_faces(folder: Path, weights: LoadedWeights, count: int, seed: int = 0) -> np.ndarray:
    """The encoders' input for `count` face crops drawn (seeded) from `folder`,
    aligned as the service aligns `aligned=true` crops."""
    from model import faces as facelib
    from model.images import image_files, load_image
    files = image_files(folder)
    if len(files) < count:
        raise ValueError(f"{folder} holds {len(files)} images; {count} face crops are needed")
    random.Random(seed).shuffle(files)
    pipeline = facelib.FacePipeline(facelib.FaceDetector(device="cpu"),
                                    size=weights.config.image_size, device="cpu")
    aligned: list[np.ndarray] = []
    for start in range(0, count, 64):
        images = [load_image(f) for f in files[start:min(start + 64, count)]]
        for faces in pipeline.process(images, aligned=True, max_faces=[1] * len(images)):
            aligned += [f.aligned for f in faces]
    return facelib.to_model_input(np.stack(aligned)).numpy()


def export_int8(weights_dir: Path, calibration: Path, faces: int = CALIBRATION_FACES,
                check_faces: int = CHECK_FACES) -> dict:
    """Write `encoders.int8.onnx` beside the weights (their fp32 graph must be
    there: `export_onnx`) and record it in their manifest; returns that record."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    loaded = load_weights(weights_dir)
    source = onnx_entry(loaded)
    if source is None:
        raise FileNotFoundError("the int8 graph is made from the fp32 one (encoders.onnx): run ipdfer export-onnx first")
    x = calibration_faces(calibration, loaded, faces + check_faces)
    calib, check = x[:faces], x[faces:]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict | None:
            if self.start >= len(calib):
                return None
            self.start += 32
            return {INPUT: calib[self.start - 32:self.start]}

    float_graph = loaded.directory / source["file"]
    backbone = loaded.config.exp_backbone
    keep = float_nodes(onnx.load(str(float_graph)).graph, backbone)
    agreement = {}

    def save_checked(tmp: Path) -> None:  # a graph that fails the check never replaces the old one
        with tempfile.TemporaryDirectory() as work:
            prepared = Path(work) / "prepared.onnx"
            quant_pre_process(str(float_graph), str(prepared))
            missing = set(keep) - {n.name for n in onnx.load(str(prepared)).graph.node}
            if missing:
                raise RuntimeError(f"preprocessing renamed nodes kept in fp32: {sorted(missing)[:5]}")
            quantize_static(str(prepared), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=keep,
                            extra_options={"CalibPercentile": PERCENTILE})
        want = OnnxEncoders(float_graph, source["sha256"], threads=torch.get_num_threads())
        got = OnnxEncoders(tmp, sha256_file(tmp), threads=torch.get_num_threads())
        a, b = want(torch.from_numpy(check)), got(torch.from_numpy(check))
        agreement.update(
            faces=len(check),
            top_label_agreement=round(float((a["probs"].argmax(1) == b["probs"].argmax(1)).float().mean()), 4),
            max_abs_prob_diff=round(float((a["probs"] - b["probs"]).abs().max()), 4),
            mean_abs_pose_diff_deg=round(float((a["pose"] - b["pose"]).abs().mean()), 3))
        if agreement["top_label_agreement"] < MIN_AGREEMENT:
            raise RuntimeError(f"the int8 graph agrees with fp32 on {agreement['top_label_agreement']:.1%} of "
                               f"top labels (< {MIN_AGREEMENT:.0%}): not kept")

    path = atomic_write(weights_dir / INT8_FILE, save_checked)
    entry = {"file": INT8_FILE, "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
             "source_sha256": loaded.manifest["sha256"], "float_graph_sha256": source["sha256"],
             "onnxruntime": ort.__version__,
             "calibration": {"folder": Path(calibration).name, "faces": len(calib), "percentile": PERCENTILE},
             "float_modules": list(FLOAT_MODULES.get(backbone, ())), "float_nodes": len(keep), "check": agreement}
    manifest = {**loaded.manifest, "onnx_int8": entry}
    atomic_write_text(weights_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return entry
