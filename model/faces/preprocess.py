"""The one preprocessing path: how a face becomes model input, the same in data
preparation, training, evaluation and serving.

    locate   face crops (training images, `aligned=true` uploads): `CropLocator`,
             MTCNN as `ipdfer prepare` ran it, else the fallback landmarks
    cut      the aligned grey face (model input), dlib's grey identity chip and,
             for the editing renderer, a larger crop, all from the same 5 points
    scale    uint8 faces -> float tensors in [-1, 1] (`to_model_input`), back
             (`to_uint8`), chips -> the identity encoder's input (`identity_input`)

    faces = FacePipeline().process([image])[0]      # list[Face], [] = no face
    x = to_model_input([f.aligned for f in faces])   # (N, 1, S, S) float in [-1, 1]
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from model.faces.align import CANONICAL_LANDMARKS, align_face, as_rgb, identity_chip
from model.faces.detect import Detection, FaceDetector, Nets, largest_face


def center_landmarks(shape: tuple[int, ...], margin: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Pseudo-landmarks: the canonical template laid over the image's central square,
    shrunk by `margin` on every side (negative grows it) and moved down by `dy`,
    both fractions of the short side."""
    h, w = shape[:2]
    short = min(h, w)
    side = short * (1 - 2 * margin)
    origin = np.array([(w - side) / 2, (h - side) / 2 + dy * short])
    return CANONICAL_LANDMARKS * side + origin - 0.5


def fallback_landmarks(shape: tuple[int, ...]) -> np.ndarray:
    """Where a crop's face is taken to be when MTCNN finds none: the template over
    the central square, no margin. Every cached training face and the shipped
    weights were made with this one (docs/design.md: "Fallback crop")."""
    return center_landmarks(shape)


def identity_input(chips: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """Grey uint8 chips (N, 150, 150) -> float (N, 3, 150, 150) in 0..255, E_id's input."""
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(chips) if isinstance(chips, list) else chips))
    return batch.float().unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def to_model_input(aligned: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 (N, S, S) (or a list of (S, S)) -> float32 (N, 1, S, S) in [-1, 1]."""
    batch = np.stack(aligned) if isinstance(aligned, (list, tuple)) else np.asarray(aligned)
    if batch.dtype != np.uint8 or batch.ndim != 3:
        raise ValueError(f"expected uint8 (N, S, S), got {batch.dtype} {batch.shape}")
    return torch.from_numpy(np.ascontiguousarray(batch)).unsqueeze(1).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Inverse of `to_model_input`: (N, 1, S, S) in [-1, 1] -> uint8 (N, S, S)."""
    pixels = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return pixels.to(torch.uint8).squeeze(1).numpy()


# Faces in face crops: how training crops are located, and `aligned=true` input

CROP_SMALL_SIDE = 96      # crops below this are detected 3x upscaled ...
CROP_SMALL_MIN_FACE = 40  # ... with this MTCNN min_face_size (faces fill these crops)
CROP_RETRY_PAD = 8        # px of replicated border for a second try on small crops
SOURCE_DETECTED, SOURCE_PADDED, SOURCE_FALLBACK = 0, 1, 2


class CropLocator:
    """Landmarks of the one face in each face crop, found exactly as `ipdfer prepare`
    found them for every training image: MTCNN (small crops 3x upscaled, min face 40;
    a second try with an 8 px replicated border), the largest face; when nothing is
    found, the fallback (`fallback_landmarks`)."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 16,
                 small: FaceDetector | None = None, large: FaceDetector | None = None,
                 nets: Nets | None = None) -> None:
        self.small = small or FaceDetector(device=device, min_face_size=CROP_SMALL_MIN_FACE,
                                           batch_size=batch_size, nets=nets)
        self.large = large or FaceDetector(device=device, batch_size=batch_size, nets=nets)
        self.last_seconds = 0.0

    def locate(self, images: list[np.ndarray]) -> list[dict]:
        """Per image: landmarks (5,2), box (4,), score, source (SOURCE_*).
        `last_seconds`: the time this call spent in MTCNN (the service's detect_ms)."""
        started = time.perf_counter()
        small = [i for i, im in enumerate(images) if min(im.shape[:2]) < CROP_SMALL_SIDE]
        large = [i for i, im in enumerate(images) if min(im.shape[:2]) >= CROP_SMALL_SIDE]
        found: dict[int, tuple] = {}
        for idx, det in ((small, self.small), (large, self.large)):
            for i, dets in zip(idx, det.detect([images[i] for i in idx]) if idx else []):
                if dets:
                    found[i] = (largest_face(dets), 0.0, SOURCE_DETECTED)
        retry = [i for i in small if i not in found]
        if retry:
            p = CROP_RETRY_PAD
            padded = [cv2.copyMakeBorder(images[i], p, p, p, p, cv2.BORDER_REPLICATE) for i in retry]
            for i, dets in zip(retry, self.small.detect(padded)):
                if dets:
                    found[i] = (largest_face(dets), float(p), SOURCE_PADDED)
        self.last_seconds = time.perf_counter() - started
        out = []
        for i, im in enumerate(images):
            if i in found:
                d, pad, source = found[i]
                out.append({"landmarks": np.asarray(d.landmarks) - pad, "box": np.asarray(d.box) - pad,
                            "score": d.score, "source": source})
            else:
                out.append({"landmarks": fallback_landmarks(im.shape), "box": np.full(4, np.nan),
                            "score": 0.0, "source": SOURCE_FALLBACK})
        return out


class Faces(list):
    """The faces of one image, best detection first; `detected` counts every face
    found, also those a cap left out (their crops are never cut)."""

    def __init__(self, faces=(), detected: int = 0) -> None:
        super().__init__(faces)
        self.detected = detected


@dataclass
class Face:
    detection: Detection | None  # None: input given as aligned, or the fallback crop
    aligned: np.ndarray          # (size, size) uint8 grey, model input
    chip: np.ndarray             # (chip_size, chip_size) uint8 grey, identity-encoder input (identity_chip)
    fallback: bool = False       # True: no face detected, the centre crop was used
    large: np.ndarray | None = None  # (render_size,)*2 uint8 grey: the same alignment, larger, for renders


class FacePipeline:
    """detect -> align, for batches of RGB images.

    fallback_to_center: when nothing is detected, return one Face cut at the
    fallback landmarks (`fallback=True`) instead of none, as preparation does for
    its crops; serving does not (no face is an answer there).
    """

    def __init__(self, detector: FaceDetector | None = None, size: int = 64,
                 device: str | torch.device = "cpu", fallback_to_center: bool = False,
                 chip_size: int = 150, chip_padding: float = 0.25, render_size: int = 0) -> None:
        self.detector = detector if detector is not None else FaceDetector(device=device)
        self.device = device
        self.size = size
        self.fallback_to_center = fallback_to_center
        self.chip_size = chip_size
        self.chip_padding = chip_padding
        self.render_size = render_size   # > 0: also cut Face.large, the crop neutral renders edit
        self._crops: CropLocator | None = None  # built on the first aligned=True batch

    @property
    def crops(self) -> CropLocator:
        if self._crops is None:  # its own detectors, as `ipdfer prepare` located training crops,
            # with the pipeline's detector's networks (one set of weights or sessions)
            self._crops = CropLocator(device=self.device, nets=self.detector.nets)
        return self._crops

    def _face(self, image: np.ndarray, landmarks: np.ndarray,
              detection: Detection | None, fallback: bool) -> Face:
        return Face(detection=detection,
                    aligned=align_face(image, landmarks, self.size),
                    chip=identity_chip(image, landmarks, self.chip_size, self.chip_padding),
                    fallback=fallback,
                    large=align_face(image, landmarks, self.render_size) if self.render_size else None)

    def process(self, images: list[np.ndarray], aligned: bool = False,
                max_faces: int | None | list[int | None] = None, largest: list[bool] | None = None) -> list[Faces]:
        """One list of Faces per image, best detection first (`largest[i]`: only
        the largest face of image i).

        aligned=True: each image is a crop of one face (FER2013-style, any size). Its
        landmarks are found the way training crops' were (`CropLocator`), so the
        model sees it aligned as it saw its training data; `fallback` marks a crop
        where no face was found and the central square was used.
        """
        images = [as_rgb(im) for im in images]
        caps = max_faces if isinstance(max_faces, list) else [max_faces] * len(images)
        largest = largest or [False] * len(images)
        if aligned:
            return [Faces([self._face(im, loc["landmarks"], None, loc["source"] == SOURCE_FALLBACK)], 1)
                    for im, loc in zip(images, self.crops.locate(images))]
        out = []
        for image, dets, cap, one in zip(images, self.detector.detect(images), caps, largest):
            kept = [largest_face(dets)] if one and dets else dets[:cap]
            faces = [self._face(image, d.landmarks, d, False) for d in kept]
            if not faces and self.fallback_to_center:
                landmarks = fallback_landmarks(image.shape)
                faces = [self._face(image, landmarks, None, True)]
            out.append(Faces(faces, max(len(dets), len(faces))))
        return out
