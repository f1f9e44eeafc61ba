"""Face detection: MTCNN (facenet-pytorch, weights inside the package) behind a
batched API that returns `Detection`s in the pixels of the image as loaded.

Coordinates: x right, y down, pixel centres at integer positions (OpenCV's
convention)."""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import torch

from model.faces.align import as_rgb

# nets(name, pixels) -> outputs: MTCNN's network `name` ("pnet", "rnet", "onet") on
# (K, h, w, 3) normalised float32 pixels (model/faces/mtcnn.py's TorchNets)
Nets = Callable[[str, np.ndarray], tuple[np.ndarray, ...]]


@dataclass(frozen=True, eq=False)  # eq=False: == on the array field would be ambiguous
class Detection:
    """One face. `landmarks` rows: left eye, right eye, nose, left and right mouth
    corner, "left" meaning the image's left (the person's right), as MTCNN gives them."""
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    landmarks: np.ndarray                   # (5, 2) float64, (x, y), read-only
    score: float

    def __post_init__(self) -> None:
        landmarks = np.array(self.landmarks, dtype=np.float64).reshape(5, 2)
        landmarks.setflags(write=False)
        object.__setattr__(self, "landmarks", landmarks)

    def to_dict(self) -> dict:
        return {"box": [float(v) for v in self.box],
                "landmarks": np.asarray(self.landmarks, dtype=float).tolist(),
                "score": float(self.score)}


class FaceDetector:
    """MTCNN (facenet-pytorch, weights inside the package) behind a batched API.

    Cost grows with pixels / min_face_size**2 and with the candidates per image, so all
    are bounded (candidates: model/faces/mtcnn.py). Images are
    shrunk to `max_side` for detection, and small crops (FER2013's 48x48) are
    enlarged `upscale_factor` times first, because MTCNN rarely fires on them as is.
    A grey border of `pad_fraction` is added around every image: on tight face
    crops (all our training data) MTCNN's box runs off the image and its landmarks
    drift. Measured on the 9 LFW test-vector faces, a 10% border cut the eye error
    (vs dlib's eye-corner midpoints) from 12% to 5% of the inter-ocular distance,
    and FER2013 test detections (300 images, 3x) rose from 78% to 85%.
    """

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 min_score: float = 0.9, max_side: int = 1280,
                 upscale_small: bool = True, small_side: int = 96,
                 upscale_factor: float = 3.0, pad_fraction: float = 0.1,
                 batch_size: int = 16, batch_pixels: int = 600_000,
                 max_candidates: int = 400, max_refine: int = 100, nets: Nets | None = None) -> None:
        from facenet_pytorch import MTCNN  # imported here: decoding and alignment don't need it

        from model.faces.mtcnn import TorchNets, channels_last

        self.mtcnn = MTCNN(keep_all=True, device=device, min_face_size=min_face_size)
        channels_last(self.mtcnn)
        # what runs MTCNN's three networks: given (the serving plan's ONNX Runtime
        # graphs, or another detector's), else facenet-pytorch's own
        self.nets: Nets = nets if nets is not None else TorchNets(self.mtcnn)
        self.min_face_size = min_face_size
        self.min_score = min_score
        self.max_side = max_side
        self.upscale_small = upscale_small
        self.small_side = small_side
        self.upscale_factor = upscale_factor
        self.pad_fraction = pad_fraction
        self.batch_size = batch_size
        # padded pixels per MTCNN call (its summed-area table: int32, 12 B a pixel). Bigger calls
        # outgrow the caches: benchmarks/detection_speed.py --caps, 640 px photos in
        # batches of 8, 82 ms an image at 600,000 against 105 at 8 M; 224 px unchanged
        self.batch_pixels = batch_pixels
        # work per image: candidates into MTCNN's 2nd / 3rd stage (model/faces/mtcnn.py)
        self.max_candidates, self.max_refine = max_candidates, max_refine
        self.last_seconds = 0.0

    def _detection_scale(self, h: int, w: int) -> float:
        up = self.upscale_factor if self.upscale_small and min(h, w) < self.small_side else 1.0
        return min(up, self.max_side / max(h, w))

    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Faces per image, best score first; [] when there is none.
        `last_seconds` is the time this call took (the service reports it)."""
        from model.faces.mtcnn import detect_faces  # imports facenet-pytorch, like __init__
        started = time.perf_counter()
        results: list[list[Detection]] = [[] for _ in images]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        prepared: dict[int, np.ndarray] = {}
        mappings: dict[int, tuple[int, float, float]] = {}  # pad, x scale, y scale
        for i, image in enumerate(images):
            image = as_rgb(image)
            h, w = image.shape[:2]
            s = self._detection_scale(h, w)
            dw, dh = max(1, round(w * s)), max(1, round(h * s))
            # MTCNN's image pyramid is empty below min_face_size and it crashes.
            if min(dw, dh) < self.min_face_size:
                continue
            if (dw, dh) != (w, h):
                interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
                image = cv2.resize(image, (dw, dh), interpolation=interp)
            pad = round(self.pad_fraction * max(dw, dh))
            image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT,
                                       value=(128, 128, 128))
            prepared[i], mappings[i] = image, (pad, dw / w, dh / h)
            groups[image.shape].append(i)  # MTCNN batches same-size images only

        for (ph, pw, _), idx in groups.items():
            per_batch = max(1, min(self.batch_size, self.batch_pixels // (ph * pw)))
            for start in range(0, len(idx), per_batch):
                chunk = idx[start:start + per_batch]
                batch = np.stack([prepared[i] for i in chunk])
                with torch.inference_mode():
                    found = detect_faces(batch, self.mtcnn, self.max_candidates, self.max_refine, self.nets)
                for i, (boxes, points) in zip(chunk, found):
                    results[i] = self._detections(boxes[:, :4], boxes[:, 4], points, *mappings[i])
        self.last_seconds = time.perf_counter() - started
        return results

    def _detections(self, boxes: np.ndarray, probs: np.ndarray, points: np.ndarray,
                    pad: int, sx: float, sy: float) -> list[Detection]:
        # Back to original pixels: x = (x_det - pad + 0.5) / s - 0.5 (pixel centres).
        scale = np.array([sx, sy])
        out = []
        for box, prob, pts in zip(boxes, probs, points):
            if prob < self.min_score:
                continue
            box = (np.asarray(box, float).reshape(2, 2) - pad + 0.5) / scale - 0.5
            pts = (np.asarray(pts, float) - pad + 0.5) / scale - 0.5
            out.append(Detection(tuple(box.ravel().tolist()), pts, float(prob)))
        return sorted(out, key=lambda d: -d.score)


def largest_face(dets: list[Detection]) -> Detection:
    """The largest detected box (ties: best score): crops centre their subject."""
    def area(d: Detection) -> float:
        x1, y1, x2, y2 = d.box
        return (x2 - x1) * (y2 - y1)
    return max(dets, key=lambda d: (area(d), d.score))
