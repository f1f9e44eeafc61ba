"""`ipdfer export-onnx`: the ONNX graphs the service runs on the CPU, written
beside the weights they came from: the served encoders in fp32
(model/serving/encoders_onnx.py) and MTCNN's networks (model/serving/mtcnn_onnx.py); with
--int8-calibration, instead, the encoders' int8 graph (model/serving/encoders_int8.py).
Needs the `export` extra (onnx, onnxscript)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from model.serving.encoders_int8 import export_int8, int8_status
from model.serving.encoders_onnx import export_onnx
from model.serving.mtcnn_onnx import SUBFOLDER, export_mtcnn_onnx
from model.weights import DEFAULT_WEIGHTS_DIR, load_weights


def add_arguments(p) -> None:
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR, help="weights folder")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--int8-calibration", type=Path, metavar="DIR",
                   help="instead: make the int8 graph (IPDFER_PRECISION=int8) from the fp32 graph already there, "
                        "its activation ranges taken over face crops drawn from DIR (e.g. FER2013's training images)")
    p.add_argument("--int8-faces", type=int, default=512, help="face crops to calibrate on (~12 MB of memory each)")


def run(args) -> int:
    if args.int8_calibration:
        print(json.dumps({"int8": export_int8(args.weights, args.int8_calibration, args.int8_faces)}))
        return 0
    print(json.dumps(export_onnx(args.weights, opset=args.opset)))
    print(json.dumps({"mtcnn": export_mtcnn_onnx(args.weights / SUBFOLDER, opset=args.opset)}))
    weights = load_weights(args.weights)
    entry, why = int8_status(weights)
    if "onnx_int8" in weights.manifest and entry is None:
        print(f"note: IPDFER_PRECISION=int8 is no longer usable: {why}", file=sys.stderr)
    return 0
