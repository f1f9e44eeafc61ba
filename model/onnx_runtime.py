"""What the ONNX Runtime parts share: the runtime names (`IPDFER_RUNTIME`) and
how a graph is opened on the CPU (model/encoders_onnx.py, model/faces/mtcnn_onnx.py)."""
from __future__ import annotations

from pathlib import Path

from model.fileio import require_sha256

RUNTIMES = ("auto", "torch", "onnxruntime")


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")


REEXPORT = ": re-export it (ipdfer export-onnx) or set IPDFER_RUNTIME=torch"


def cpu_session(path: Path, sha256: str, threads: int, fix: str = REEXPORT):
    """An ONNX Runtime CPU session of the graph at `path`, refused (with `fix`, what
    to do about it) unless its sha256 is the recorded one."""
    import onnxruntime as ort
    require_sha256(path, sha256, fix)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # idle pool threads would spin on cores that detection and other batching
    # loops need; with one thread there is no pool
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
