"""MTCNN's three networks (facenet-pytorch's P-, R- and O-Net, its own weights) as
ONNX graphs run by ONNX Runtime on the CPU; the stages around them
(model/faces/mtcnn.py) stay as they are: a FaceDetector built with
`nets=OnnxNets.factory(...)` runs them (the serving plan decides, plan.py).

Why: at the small shapes MTCNN runs (a 67 px pyramid level, a few dozen 24 px
crops) PyTorch takes its unblocked fallback convolution and pays per-operator
overhead; the networks were most of a detection. Same outputs to float rounding
(~1e-6; checked at export). Measured on an AVX2 CPU (AMD EPYC), one thread, 224 px
photos: alone 27.6 -> 19.4 ms an image (11.6 -> 10.0 when the same VM ran twice
as fast), in batches of 8 3-14% slower, at 64 10% slower; with two threads
ONNX Runtime was slower at every batch size (FER2013 crops, batches of 64: 8.7 vs
10.3 ms). The service, whose batch loops run one thread and small, varying
batches, served 1.09-1.22x the requests at 16 clients and 1.11-1.16x for a lone
client (benchmarks/load.py against both commits side by side). So "auto" takes it
only where torch runs one thread (plan.resolve_detector_runtime).

The graphs are exported once, offline (`ipdfer export-onnx`, which needs the
`export` extra), into weights/mtcnn/ (the Analyzer looks first in the `mtcnn/`
folder of the weights it serves: an installed image keeps them there), whose
manifest records each graph's sha256 and the sha256 of the facenet-pytorch weight
file it came from: a graph is used only while the installed facenet-pytorch holds
that same file. Serving needs only `onnxruntime`."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from model.fileio import atomic_write_text, sha256_file
from model.serving.onnx import cpu_session, export_verified, graph_record
from model.paths import WEIGHTS_DIR

SUBFOLDER = "mtcnn"
FOLDER = WEIGHTS_DIR / SUBFOLDER   # the shipped graphs
MANIFEST = "manifest.json"
NETS = ("pnet", "rnet", "onet")
INPUT = "pixels"


def source_file(net: str) -> Path:
    """facenet-pytorch's weights of one network (what its PNet/RNet/ONet load)."""
    import facenet_pytorch
    return Path(facenet_pytorch.__file__).parent / "data" / f"{net}.pt"


@functools.cache
def _installed_sha256(net: str) -> str:
    """Hashed once a process: an Analyzer builds up to three detectors."""
    return sha256_file(source_file(net))


def read_manifest(folder: Path = FOLDER) -> dict | None:
    """The folder's record of its graphs when every graph is there and was exported
    from the installed facenet-pytorch's weights; else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for net in NETS:
        entry = manifest.get(net)
        if (not entry or not (folder / entry["file"]).is_file()
                or _installed_sha256(net) != entry["source_sha256"]):
            return None
    return manifest


class OnnxNets:
    """`nets(name, pixels)`: the network's outputs (NumPy arrays) for (K, h, w, 3)
    float32 pixels, normalised as MTCNN wants them, channels last as
    `AreaResampler` gives them (the graphs take that layout)."""

    runtime = "onnxruntime"

    def __init__(self, manifest: dict, folder: Path = FOLDER, threads: int = 1) -> None:
        self.sessions = {net: cpu_session(folder / manifest[net]["file"], manifest[net]["sha256"], threads)
                         for net in NETS}

    def __call__(self, net: str, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.sessions[net].run(None, {INPUT: pixels}))


class _PReLUAsConvolutions(torch.nn.Module):
    """PReLU on feature maps as a·z + (1 − a)·relu(z), the two products as 1x1 depthwise
    convolutions. ONNX Runtime has no blocked-layout (NCHWc) PReLU: each one cost a
    layout round trip and a slow broadcast, 30-40% of a network's time; this form stays
    blocked and the sum fuses into the second convolution. On one thread (AMX Xeon):
    P-Net on an 81 px level 0.57 -> 0.35 ms, R-Net on 13 crops 1.11 -> 0.60 ms, O-Net
    on 4 crops 1.81 -> 0.96 ms; a lone 224 px photo's detection 7.0 -> 5.7 ms
    (benchmarks/detection_speed.py --graphs). Outputs move by ~1e-7 (a·z + (1 − a)·z
    is not exactly z in float32): on the 7,178 FER2013 test crops the same faces as
    facenet-pytorch's own detector, landmarks within 2.5e-5 px, as before. The exact
    rewrites (relu(z) + a·min(z, 0) and two others) were 1.2-1.4x slower."""

    def __init__(self, prelu: torch.nn.PReLU) -> None:
        super().__init__()
        a = prelu.weight.detach().reshape(-1, 1, 1, 1)
        self.register_buffer("negative", a.clone())
        self.register_buffer("positive", 1 - a)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        groups = self.negative.shape[0]
        return (torch.nn.functional.conv2d(z, self.negative, groups=groups)
                + torch.nn.functional.conv2d(torch.relu(z), self.positive, groups=groups))


def _blocked_prelus(net: torch.nn.Module, feature_maps: list[str]) -> torch.nn.Module:
    """A copy of `net` whose PReLUs named in `feature_maps` (those on 4-D maps: the others
    follow a dense layer) are `_PReLUAsConvolutions`."""
    import copy
    net = copy.deepcopy(net)
    for name in feature_maps:
        setattr(net, name, _PReLUAsConvolutions(getattr(net, name)))
    return net


class _ChannelsLastInput(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor):
        return self.net(pixels.permute(0, 3, 1, 2))


def export_mtcnn_onnx(folder: Path = FOLDER, opset: int = 18) -> dict:
    """Write the three graphs and their manifest into `folder`; returns the manifest.
    Each graph is checked against PyTorch before it is kept."""
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    manifest: dict = {"opset": opset, "torch": torch.__version__}
    for net, cls, shapes, maps in (("pnet", PNet, [(1, 67, 67), (3, 34, 47)], ["prelu1", "prelu2", "prelu3"]),
                                   ("rnet", RNet, [(1, 24, 24), (37, 24, 24)], ["prelu1", "prelu2", "prelu3"]),
                                   ("onet", ONet, [(1, 48, 48), (9, 48, 48)], ["prelu1", "prelu2", "prelu3", "prelu4"])):
        module = _ChannelsLastInput(cls()).eval()   # facenet-pytorch's network: the reference
        exported = _ChannelsLastInput(_blocked_prelus(module.net, maps)).eval()
        dims = {0: torch.export.Dim("batch", min=1, max=65536)}
        if net == "pnet":  # the pyramid: any size from MTCNN's 12 px up
            dims.update({1: torch.export.Dim("height", min=12, max=8192),
                         2: torch.export.Dim("width", min=12, max=8192)})
        checks = [torch.rand(n, h, w, 3, generator=generator) * 2 - 1 for n, h, w in shapes]
        path, worst = export_verified(exported, torch.zeros(2, *shapes[0][1:], 3), checks, folder / f"{net}.onnx",
                                      opset=opset, input_name=INPUT, dynamic_shapes=dims, tolerance=1e-4,
                                      reference=module)
        manifest[net] = graph_record(path, source=f"facenet_pytorch/data/{net}.pt",
                                     source_sha256=_installed_sha256(net), max_abs_diff=worst,
                                     prelu="feature-map PReLUs as two 1x1 depthwise convolutions "
                                           "(_PReLUAsConvolutions)")
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
