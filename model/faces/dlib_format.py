"""Reader for dlib's DNN serialization (the format of `*.dat` network files).

dlib's format is not self-describing: the C++ network type says what comes next.
This reader decodes the building blocks and walks the nesting that every dlib
network shares, and returns the layers input first. Layer wrappers write
`version, subnetwork, details`, so a file is a run of version numbers (outermost
first) down to the input layer, then each layer's details (innermost first):

- `add_loss_layer`   v1: loss details, subnetwork
- `add_layer`        v2: subnetwork, details, 3 bools, 3 tensors
- bottom `add_layer` v2/v3: input layer, details, 3 bools, 3 tensors (+ v3: int)
- `add_tag_layer` / `add_skip_layer` v1: subnetwork (identical bytes, so a file
  cannot tell them apart: both come back as kind "tag_or_skip")

Primitives (dlib/serialize.h, dlib/dnn/tensor.h): an integer is a control byte
(low 4 bits: byte count, 0x80: negative) then little-endian bytes; a string is
an integer length then bytes; a bool is the character '0' or '1'; a float is two
integers, mantissa and base-2 exponent; a tensor is version 2, four integer
dimensions, then little-endian float32 values; an alias tensor is version 1 and
four integer dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Layer:
    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc, tag_or_skip
    settings: dict[str, int] = field(default_factory=dict)
    # con: (weight (filters, in, rows, cols), bias (filters,)); affine: (gamma, beta);
    # fc: (weight (inputs, outputs),) plus bias (outputs,) when it has one.
    params: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class DlibNet:
    input_mean: tuple[float, float, float]  # RGB pixel subtracted before /256
    input_size: tuple[int, int]  # rows, cols
    layers: list[Layer]  # input first
    loss: str
    loss_settings: dict[str, float]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"dlib file truncated: need {n} bytes at offset {self.pos}")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def int(self) -> int:
        ctrl = self.take(1)[0]
        size = ctrl & 0x0F
        if size > 8 or ctrl & 0x70:
            raise ValueError(f"bad integer control byte 0x{ctrl:02x} at offset {self.pos - 1}")
        value = int.from_bytes(self.take(size), "little")
        return -value if ctrl & 0x80 else value

    def str(self) -> str:
        n = self.int()
        if not 0 <= n <= 256:  # layer names are short; a bigger length means misalignment
            raise ValueError(f"implausible string length {n} at offset {self.pos}")
        return self.take(n).decode("ascii", errors="replace")

    def bool(self) -> bool:
        ch = self.take(1)
        if ch not in (b"0", b"1"):
            raise ValueError(f"bad bool {ch!r} at offset {self.pos - 1}")
        return ch == b"1"

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        return math.ldexp(mantissa, exponent)

    def version(self, expected: tuple[int, ...], what: str) -> int:
        v = self.int()
        if v not in expected:
            raise ValueError(f"unexpected {what} version {v} at offset {self.pos}")
        return v

    def shape(self) -> tuple[int, int, int, int]:
        dims = tuple(self.int() for _ in range(4))
        if min(dims) < 0:
            raise ValueError(f"negative tensor dimension {dims} at offset {self.pos}")
        return dims  # type: ignore[return-value]

    def tensor(self) -> np.ndarray:
        self.version((2,), "tensor")
        dims = self.shape()
        count = math.prod(dims)
        return np.frombuffer(self.take(4 * count), dtype="<f4").reshape(dims).astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        self.version((1,), "alias_tensor")
        return self.shape()

    def peek_input_layer(self) -> bool:
        """True when an input layer's name string starts here."""
        pos = self.pos
        try:
            return self.str().startswith("input")
        except ValueError:
            return False
        finally:
            self.pos = pos


def _split(params: np.ndarray, *shapes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Cut a flat parameter tensor into consecutive pieces of the given shapes."""
    flat = params.ravel()
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != flat.size:
        raise ValueError(f"parameter tensor of {flat.size} values does not hold {shapes}")
    bounds = np.cumsum([0, *sizes])
    return tuple(flat[a:b].reshape(s) for a, b, s in zip(bounds, bounds[1:], shapes))


def _lr_multipliers(r: _Reader) -> None:
    for _ in range(4):  # learning-rate and weight-decay multipliers: training only
        r.float()


def _con(r: _Reader) -> Layer:
    params = r.tensor()
    keys = ("filters", "rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")
    s = {k: r.int() for k in keys}
    filters, biases = r.alias(), r.alias()
    _lr_multipliers(r)
    if filters[0] != s["filters"] or filters[2:] != (s["rows"], s["cols"]):
        raise ValueError(f"con_4 filter shape {filters} disagrees with its settings {s}")
    weight, bias = _split(params, filters, (math.prod(biases),))
    return Layer("con", s, (weight, bias))


def _affine(r: _Reader) -> Layer:
    params = r.tensor()
    gamma, beta = r.alias(), r.alias()
    mode = r.int()
    if mode != 0:  # 0 = CONV_MODE: one gamma/beta per channel
        raise ValueError(f"affine_ mode {mode} is not supported")
    return Layer("affine", {"channels": gamma[1]}, _split(params, (gamma[1],), (beta[1],)))


def _fc(r: _Reader) -> Layer:
    outputs, inputs = r.int(), r.int()
    params = r.tensor()
    r.alias(), r.alias()
    has_bias = r.int() == 0  # 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS
    _lr_multipliers(r)
    shapes = [(inputs, outputs)] + ([(outputs,)] if has_bias else [])
    return Layer("fc", {"outputs": outputs, "inputs": inputs}, _split(params, *shapes))


def _pool(kind: str) -> Callable[[_Reader], Layer]:
    def read(r: _Reader) -> Layer:
        keys = ("rows", "cols", "stride_y", "stride_x", "pad_y", "pad_x")
        return Layer(kind, {k: r.int() for k in keys})  # rows = cols = 0: whole image

    return read


_DETAILS: dict[str, Callable[[_Reader], Layer]] = {
    "con_4": _con,
    "affine_": _affine,
    "fc_2": _fc,
    "relu_": lambda r: Layer("relu"),
    "add_prev_": lambda r: Layer("add_prev"),
    "max_pool_2": _pool("max_pool"),
    "avg_pool_2": _pool("avg_pool"),
}


def _details(r: _Reader) -> Layer:
    name = r.str()
    if name not in _DETAILS:
        raise ValueError(f"unsupported dlib layer {name!r} at offset {r.pos}")
    return _DETAILS[name](r)


def _add_layer_tail(r: _Reader) -> None:
    for _ in range(3):  # setup-called, gradient-stale, output-disabled flags
        r.bool()
    for _ in range(3):  # gradient / output caches, empty in a saved model
        r.tensor()


def parse_dlib_net(data: bytes) -> DlibNet:
    """Decode a dlib network file made of the layer kinds in `_DETAILS`."""
    r = _Reader(data)
    r.version((1,), "add_loss_layer")
    loss = r.str()
    if loss != "loss_metric_2":
        raise ValueError(f"unsupported loss layer {loss!r}")
    loss_settings = {"margin": r.float(), "distance_threshold": r.float()}

    wrappers: list[int] = []  # versions, outermost layer first
    while True:
        version = r.int()
        if r.peek_input_layer():
            break
        if version not in (1, 2):
            raise ValueError(f"unexpected layer version {version} at offset {r.pos}")
        wrappers.append(version)
    if version not in (2, 3):
        raise ValueError(f"unexpected input add_layer version {version}")

    if r.str() != "input_rgb_image_sized":
        raise ValueError("only input_rgb_image_sized is supported")
    mean = (r.float(), r.float(), r.float())
    size = (r.int(), r.int())
    layers = [_details(r)]
    _add_layer_tail(r)
    if version == 3:
        r.int()  # sample expansion factor, 1 for image inputs

    for v in reversed(wrappers):
        if v == 1:
            layers.append(Layer("tag_or_skip"))
        else:
            layers.append(_details(r))
            _add_layer_tail(r)
    if r.pos != len(data):
        raise ValueError(f"{len(data) - r.pos} unexpected bytes after the network")
    return DlibNet(mean, size, layers, loss, loss_settings)


def load_dlib_net(path: str | Path) -> DlibNet:
    return parse_dlib_net(Path(path).read_bytes())
