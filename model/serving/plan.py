"""The serving plan: what runs what, decided once from the settings and the
machine, logged at start-up and shown in /readyz.

    device            cuda when available, else cpu (or as asked)
    precision         the encoders' numbers: fp32, bf16, fp16 (CUDA) or int8 (a graph)
    encoder_runtime   torch or onnxruntime (the weights' exported graph)
    detector_runtime  torch or onnxruntime (MTCNN's graphs in weights/mtcnn/)
    threads           torch's (and ONNX Runtime's) threads for this model copy
    mirror_margin     faces below this one-pass margin get the mirror pass (0: none)

This module imports torch only inside its functions: the service's settings
validate precision and runtime names against it before any model loads."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.weights import LoadedWeights

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
RUNTIMES = ("auto", "torch", "onnxruntime")


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 / AMX), as oneDNN sees
    it: bf16 training autocast and `IPDFER_PRECISION=bf16` need it."""
    import torch
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(device: str, precision: str = "auto") -> str:
    """"auto": fp16 on CUDA, fp32 on the CPU. bf16 is a switch for CPUs that compute
    it natively (AVX-512 BF16 / AMX). Measured with the folded, channels-last
    encoders (benchmarks/load.py, 2 loops x 1 thread): bf16 was slower for a lone
    client (27 vs 30 req/s, encode 10.0 vs 8.3 ms) and 11% faster at 16 clients
    (65 vs 59 req/s), and it moves probabilities by up to 0.04 (same top label for
    99% of FER2013 test faces); fp32 serves exactly the evaluated model. int8 is
    the encoders' quantized graph in ONNX Runtime on the CPU (encoders_int8.py)."""
    kind = device.split(":")[0]
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if kind == "cuda" else "fp32"
    if precision == "int8" and kind != "cpu":
        raise ValueError("int8 runs the encoders' quantized graph in ONNX Runtime on the CPU only "
                         "(IPDFER_DEVICE=cpu), not on " + kind)
    if precision == "bf16" and kind == "cpu" and not cpu_has_native_bf16():
        raise ValueError("bf16 asked for, but this CPU has no native bf16 (AVX-512 BF16 / AMX)")
    return precision


def resolve_encoder_runtime(weights: LoadedWeights, device: str, precision: str, runtime: str = "auto") -> str:
    """What runs the per-request encoders. "auto": ONNX Runtime on the CPU in fp32
    when the weights come with their exported one-pass graph (encoders_onnx.py:
    2.7x the faces/s of PyTorch at batch 1 on an AVX2 CPU), else PyTorch;
    "onnxruntime" insists. int8 exists only as a graph: ONNX Runtime, or refused.
    The mirror pass is a second run of whichever runs (mirror.py)."""
    check_runtime(runtime)
    if precision == "int8":
        if runtime == "torch":
            raise ValueError("int8 is the encoders' graph in ONNX Runtime: not with runtime torch")
        return "onnxruntime"
    if runtime == "torch":
        return runtime
    from model.serving.encoders_onnx import onnx_entry
    usable = device.split(":")[0] == "cpu" and precision == "fp32"
    if runtime == "onnxruntime" and not usable:
        raise ValueError(f"runtime onnxruntime runs the encoders in fp32 on the CPU; asked: {precision} on {device}")
    if runtime == "auto":
        return "onnxruntime" if usable and onnx_entry(weights) is not None else "torch"
    return runtime


def resolve_detector_runtime(device: str, threads: int, folder: Path | None, runtime: str = "auto") -> str:
    """What runs MTCNN's networks: "auto" = ONNX Runtime on the CPU with one thread
    (the service's batch loops) when `folder` holds the graphs of the installed
    facenet-pytorch weights, else PyTorch; "onnxruntime" insists. With two threads
    ONNX Runtime was slower at every batch size (mtcnn_onnx.py)."""
    from model.serving.mtcnn_onnx import read_manifest
    check_runtime(runtime)
    on_cpu = device.split(":")[0] == "cpu"
    if runtime == "torch" or (runtime == "auto" and not (on_cpu and threads == 1)):
        return "torch"
    if on_cpu and folder is not None and read_manifest(folder) is not None:
        return "onnxruntime"
    if runtime == "onnxruntime":
        raise FileNotFoundError(f"runtime onnxruntime: no MTCNN graphs of the installed facenet-pytorch in {folder}"
                                + ("" if on_cpu else " (and it runs on the CPU only)") + ": run ipdfer export-onnx")
    return "torch"


def mtcnn_folder(weights: LoadedWeights) -> Path:
    """MTCNN's graphs: beside the served weights when that folder has them (an
    installed image keeps its weights outside the package), else the shipped ones."""
    from model.serving.mtcnn_onnx import FOLDER, MANIFEST, SUBFOLDER
    folder = weights.directory / SUBFOLDER if weights.directory else None
    return folder if folder and (folder / MANIFEST).is_file() else FOLDER


@dataclass(frozen=True)
class ServingPlan:
    device: str
    precision: str
    encoder_runtime: str
    detector_runtime: str
    threads: int
    mirror_margin: float
    mtcnn_folder: Path

    @classmethod
    def resolve(cls, weights: LoadedWeights, *, device: str | None = None, precision: str = "auto",
                runtime: str = "auto", flip_tta: bool | None = None, mirror_margin: float = 0.3,
                threads: int | None = None) -> ServingPlan:
        """The plan for serving `weights` on this machine. `runtime` applies to the
        encoders and MTCNN alike, each part chosen on its own; `flip_tta` None: as
        the weights are served; `threads` None: torch's count now."""
        import torch

        from model.nets.mirror import check_margin
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = threads or torch.get_num_threads()
        precision = resolve_precision(device, precision)
        mirrored = weights.config.flip_tta if flip_tta is None else flip_tta
        folder = mtcnn_folder(weights)
        return cls(device=str(torch.device(device)), precision=precision,
                   encoder_runtime=resolve_encoder_runtime(weights, device, precision, runtime),
                   detector_runtime=resolve_detector_runtime(device, threads, folder, runtime),
                   threads=threads, mirror_margin=check_margin(mirror_margin) if mirrored else 0.0,
                   mtcnn_folder=folder)

    def __str__(self) -> str:
        return (f"{self.device}, encoders {self.encoder_runtime} {self.precision}, MTCNN {self.detector_runtime}, "
                f"{self.threads} thread(s), mirror margin {self.mirror_margin:g}")


def autocast_for(device: str, precision: str):
    """The autocast context of a resolved precision (fp32, int8: none; what PyTorch
    runs beside the int8 graph, the renders, stays fp32)."""
    from contextlib import nullcontext

    import torch
    if precision in ("fp32", "int8"):
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype)
