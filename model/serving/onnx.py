"""ONNX Runtime for every graph the service runs (the encoders, their int8 form,
MTCNN's networks): how a graph is opened on the CPU, and how one is exported
from PyTorch and verified against it before it is kept. The only place outside
the export extras that imports onnxruntime is this package (tests/test_layout.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model.fileio import atomic_write, require_sha256, sha256_file

REEXPORT = ": re-export it (ipdfer export-onnx) or set IPDFER_RUNTIME=torch"


def cpu_session(path: Path, sha256: str | None, threads: int, fix: str = REEXPORT):
    """An ONNX Runtime CPU session of the graph at `path`, refused (with `fix`, what
    to do about it) unless its sha256 is the recorded one (None: a graph being
    checked before it is recorded)."""
    import onnxruntime as ort
    if sha256 is not None:
        require_sha256(path, sha256, fix)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # idle pool threads would spin on cores that detection and other batching
    # loops need; with one thread there is no pool
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_verified(module: torch.nn.Module, example: torch.Tensor, checks: Sequence[torch.Tensor], path: Path, *,
                    opset: int, input_name: str, dynamic_shapes: dict[int, Any], tolerance: float,
                    output_names: Sequence[str] | None = None,
                    reference: torch.nn.Module | None = None) -> tuple[Path, float]:
    """Export `module` (one tensor in) to `path` and keep the graph only when its
    outputs on every input of `checks` match `reference`'s (default: `module`'s)
    within `tolerance` (a graph that fails never replaces the old one). Returns
    (path, largest difference)."""
    reference = reference or module
    program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, input_names=[input_name],
                                output_names=list(output_names) if output_names else None,
                                dynamic_shapes=(dynamic_shapes,), verbose=False)
    worst = 0.0

    def save_checked(tmp: Path) -> None:
        nonlocal worst
        program.save(str(tmp))
        session = cpu_session(tmp, None, threads=torch.get_num_threads())
        for x in checks:
            with torch.inference_mode():
                want = reference(x)
            want = want if isinstance(want, (tuple, list)) else (want,)
            got = session.run(None, {input_name: x.numpy()})
            worst = max(worst, *(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)))
        if worst > tolerance:
            raise RuntimeError(f"the exported {path.stem} differs from PyTorch by {worst:.2e}: not kept")

    return atomic_write(path, save_checked), float(np.float32(worst))


def graph_record(path: Path, **extra: Any) -> dict:
    """A manifest's record of a graph file: name, sha256, size, then `extra`."""
    return {"file": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size, **extra}
