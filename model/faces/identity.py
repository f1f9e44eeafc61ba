"""Frozen identity encoder E_id: dlib's face-recognition ResNet, ported to PyTorch.

The weights come from `dlib_face_recognition_resnet_model_v1.dat` in the installed
`face-recognition-models` package, parsed at load time (~50 ms; nothing is
downloaded or cached). The architecture is dlib's `anet_type` from
dnn_face_recognition_ex.cpp; the file's layer sequence and every layer's settings
are checked against it before any weight is copied.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.faces.dlib_format import DlibNet, load_dlib_net

IDENTITY_THRESHOLD = 0.6  # dlib: descriptor distance below this = same person
CHIP_SIZE = 150

# (channels, downsample) per residual block, input first.
_BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3
    + ((64, True),) + ((64, False),) * 3
    + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2
    + ((256, True),)
)

# Expected dlib layer: (kind, module that receives its parameters, required settings).
_Slot = tuple[str, nn.Module | None, dict[str, int]]


def _pool_settings(size: int, stride: int) -> dict[str, int]:
    return {"rows": size, "cols": size, "stride_y": stride, "stride_x": stride, "pad_y": 0, "pad_x": 0}


def _con_slot(conv: nn.Conv2d) -> _Slot:
    (kh, kw), (sy, sx), (py, px) = conv.kernel_size, conv.stride, conv.padding
    settings = {"filters": conv.out_channels, "rows": kh, "cols": kw,
                "stride_y": sy, "stride_x": sx, "pad_y": py, "pad_x": px}  # fmt: skip
    return ("con", conv, settings)


def dlib_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the output takes the larger size in every dimension and
    each input contributes only where it exists (top-left aligned, zero elsewhere)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:]))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class Affine(nn.Module):
    """dlib's affine_: batch norm folded into a per-channel gamma * x + beta."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[:, None, None] + self.beta[:, None, None]


class ResBlock(nn.Module):
    """conv3x3, affine, ReLU, conv3x3, affine, add shortcut, ReLU.

    A down-sampling block's first conv has stride 2 and no padding (dlib's default
    for strided layers) and its shortcut is a 2x2/2 average pool of the input; the
    two sides can differ in size (8x8 input: conv gives 3x3, pool 4x4), which
    dlib_add resolves.
    """

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.affine1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.affine2 = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(dlib_add(y, shortcut))

    def dlib_layers(self) -> Iterator[_Slot]:
        yield ("tag_or_skip", None, {})  # tag1: the block input
        yield _con_slot(self.conv1)
        yield ("affine", self.affine1, {"channels": self.conv1.out_channels})
        yield ("relu", None, {})
        yield _con_slot(self.conv2)
        yield ("affine", self.affine2, {"channels": self.conv2.out_channels})
        if self.down:
            yield ("tag_or_skip", None, {})  # tag2: the block output
            yield ("tag_or_skip", None, {})  # skip1: back to the block input
            yield ("avg_pool", None, _pool_settings(2, 2))
        yield ("add_prev", None, {})
        yield ("relu", None, {})


class DlibResNet(nn.Module):
    """(N, 3, 150, 150) RGB float in 0..255 -> (N, 128) face descriptors.

    Feed 150x150 chips aligned the dlib way (get_face_chip, padding 0.25);
    grayscale faces replicated to 3 channels work too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))  # RGB, from the .dat
        self.conv = nn.Conv2d(3, 32, 7, stride=2)
        self.affine = Affine(32)
        cins = [32] + [c for c, _ in _BLOCKS[:-1]]
        self.blocks = nn.ModuleList(ResBlock(cin, c, d) for cin, (c, d) in zip(cins, _BLOCKS))
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"expected (N, 3, {CHIP_SIZE}, {CHIP_SIZE}) RGB chips, got {tuple(x.shape)}")
        x = (x - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, 2)  # (N, 32, 35, 35)
        for block in self.blocks:
            x = block(x)  # ... (N, 256, 2, 2)
        return self.fc(x.mean(dim=(2, 3)))  # (N, 128)

    def dlib_layers(self) -> Iterator[_Slot]:
        """The layers dlib's file must hold, input first."""
        yield _con_slot(self.conv)
        yield ("affine", self.affine, {"channels": 32})
        yield ("relu", None, {})
        yield ("max_pool", None, _pool_settings(3, 2))
        for block in self.blocks:
            yield from block.dlib_layers()
        yield ("avg_pool", None, _pool_settings(0, 1))  # rows = cols = 0: global
        yield ("fc", self.fc, {"inputs": 256, "outputs": 128})

    @torch.no_grad()
    def load_dlib(self, net: DlibNet) -> None:
        """Copy a parsed dlib network in, after checking it has this architecture."""
        slots = list(self.dlib_layers())
        if [k for k, _, _ in slots] != [layer.kind for layer in net.layers]:
            raise ValueError("the dlib file's layer sequence is not dlib's face-recognition ResNet")
        if net.input_size != (CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"expected a {CHIP_SIZE}x{CHIP_SIZE} input layer, got {net.input_size}")
        for i, ((kind, module, settings), layer) in enumerate(zip(slots, net.layers)):
            wrong = {k: layer.settings.get(k) for k, v in settings.items() if layer.settings.get(k) != v}
            if wrong:
                raise ValueError(f"layer {i} ({kind}): settings {wrong}, expected {settings}")
            if isinstance(module, nn.Conv2d):
                _assign(module.weight, layer.params[0])  # dlib: (filters, in, rows, cols)
                _assign(module.bias, layer.params[1])
            elif isinstance(module, Affine):
                _assign(module.gamma, layer.params[0])
                _assign(module.beta, layer.params[1])
            elif isinstance(module, nn.Linear):
                if len(layer.params) != 1:
                    raise ValueError("expected an fc layer without bias")
                _assign(module.weight, layer.params[0].T)  # dlib stores inputs x outputs
        self.mean.copy_(torch.tensor(net.input_mean).view(1, 3, 1, 1))


def _assign(param: torch.Tensor, value: np.ndarray) -> None:
    if tuple(param.shape) != value.shape:  # copy_ would broadcast silently
        raise ValueError(f"parameter shape {value.shape} does not fit {tuple(param.shape)}")
    param.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def dlib_model_path() -> Path:
    """The .dat file inside the installed face-recognition-models package.

    Found with importlib without importing the package (its __init__ needs
    pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package face-recognition-models is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "dlib_face_recognition_resnet_model_v1.dat"
    if not path.is_file():
        raise FileNotFoundError(f"dlib network file missing: {path}")
    return path


def load_identity_encoder(device: str | torch.device = "cpu", path: str | Path | None = None) -> DlibResNet:
    """dlib's ResNet in eval mode with every parameter frozen.

    Gradients still flow to the input, so E_id can serve as a loss on rendered faces."""
    model = DlibResNet()
    model.load_dlib(load_dlib_net(path or dlib_model_path()))
    return model.requires_grad_(False).eval().to(device)


def descriptor_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Euclidean distance over the last dimension; < IDENTITY_THRESHOLD = same person."""
    return torch.linalg.vector_norm(torch.as_tensor(a) - torch.as_tensor(b), dim=-1)
