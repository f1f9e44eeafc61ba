"""Per-image face work of data preparation, size-independent: detection (the
one preprocessing path's `CropLocator`, fallback included), pose pseudo-labels,
the frozen identity encoder's descriptor of the grey dlib chip; then the aligned
crop at any size. Fingerprints name everything the cached results depend on."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from model.faces.preprocess import CROP_RETRY_PAD as RETRY_PAD
from model.faces.preprocess import CROP_SMALL_MIN_FACE as SMALL_MIN_FACE
from model.faces.preprocess import CROP_SMALL_SIDE as SMALL_SIDE

FEATURE_VERSION = 1      # bump when detection / identity code changes (settings are fingerprinted)


@dataclass
class FaceWorker:
    """Detection + alignment + pose + identity for batches of RGB images."""
    device: str = "cpu"
    detect_batch: int = 64
    identity_batch: int = 64     # per-image CPU cost measured lower at 64 than at 32

    def __post_init__(self) -> None:
        import torch

        from model.faces.identity import load_identity_encoder
        from model.faces.preprocess import CropLocator
        # PyTorch's MTCNN always: "auto" picks ONNX Runtime by thread count, and the
        # cache must not depend on how many workers built it (the two differ by rounding)
        self.locator = CropLocator(device=self.device, batch_size=self.detect_batch)
        self.encoder = fused_encoder(load_identity_encoder(self.device))
        if self.device == "cpu":
            self.encoder = self.encoder.to(memory_format=torch.channels_last)  # faster on CPU

    def detect(self, images: list[np.ndarray]) -> list[dict]:
        """Per image: landmarks (5,2), box (4,), score, source (the serving path's
        `aligned=true` locates crops with the same code)."""
        return self.locator.locate(images)

    # -- everything -----------------------------------------------------------------
    def features(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Size-independent per-image arrays: landmarks, box, score, source, pose, identity, image_wh."""
        import torch

        from model.faces.preprocess import identity_chip, identity_input
        from model.faces.pose import estimate_pose
        dets = self.detect(images)
        lm = np.stack([d["landmarks"] for d in dets]).astype(np.float32)
        wh = np.array([[im.shape[1], im.shape[0]] for im in images], dtype=np.int32)
        ident = np.zeros((len(images), 128), np.float32)
        for s in range(0, len(images), self.identity_batch):
            chips = [identity_chip(images[i], lm[i]) for i in range(s, min(s + self.identity_batch, len(images)))]
            x = identity_input(chips).to(self.device)
            if self.device == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                ident[s:s + len(chips)] = self.encoder(x).float().cpu().numpy()
        return {"landmarks": lm,
                "box": np.stack([d["box"] for d in dets]).astype(np.float32),
                "score": np.array([d["score"] for d in dets], np.float32),
                "source": np.array([d["source"] for d in dets], np.int8),
                "pose": estimate_pose(lm, wh),
                "identity": ident, "image_wh": wh}


def fused_encoder(encoder):
    """A copy of the identity encoder with each affine (folded batch norm) folded into
    the convolution before it: the same function (checked: < 1e-4 on a random batch),
    fewer passes over memory. Falls back to the encoder itself if its layout is not
    the expected conv -> affine pairs."""
    import copy

    import torch
    from torch import nn
    try:
        fused = copy.deepcopy(encoder)
        pairs = [(fused, "conv", "affine")] + [(b, f"conv{k}", f"affine{k}") for b in fused.blocks for k in (1, 2)]
        with torch.no_grad():
            for owner, conv_name, affine_name in pairs:
                conv, affine = getattr(owner, conv_name), getattr(owner, affine_name)
                conv.weight.mul_(affine.gamma[:, None, None, None])
                conv.bias.copy_(conv.bias * affine.gamma + affine.beta)
                setattr(owner, affine_name, nn.Identity())
            x = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(0)) * 255
            x = x.to(next(encoder.parameters()).device)
            if (fused(x) - encoder(x)).abs().max() < 1e-4:
                return fused
    except (AttributeError, TypeError, RuntimeError):
        pass
    return encoder


def align_all(images: list[np.ndarray], landmarks: np.ndarray, size: int) -> np.ndarray:
    from model.faces.preprocess import align_face
    return np.stack([align_face(im, lm, size) for im, lm in zip(images, landmarks)]) \
        if images else np.zeros((0, size, size), np.uint8)


def feature_fingerprint() -> str:
    """Short hash of everything the cached features depend on: FEATURE_VERSION, the
    detector's settings (FaceDetector defaults + ours) and the chip geometry. Cached
    chunks carry it in their file name, so a changed face pipeline setting (e.g. a
    new detector border) makes prepare recompute instead of mixing old and new."""
    import inspect

    from model import faces as face
    defaults = {k: repr(v.default) for k, v in inspect.signature(face.FaceDetector.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}
    spec = {"version": FEATURE_VERSION, "detector_defaults": defaults,
            "ours": [SMALL_SIDE, SMALL_MIN_FACE, RETRY_PAD],
            "chip": np.round(face.DLIB_CHIP_LANDMARKS, 6).tolist()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def faces_fingerprint(size: int) -> str:
    """Aligned faces depend on the features and on the alignment template."""
    from model import faces as face
    spec = [feature_fingerprint(), size, np.round(face.CANONICAL_LANDMARKS, 6).tolist()]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:10]
