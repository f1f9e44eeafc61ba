"""5-point similarity alignment: the canonical template, the aligned grey face the
model sees, and dlib's chip the identity encoder sees, cut from the same points.

Coordinates are pixels of the image as loaded (after EXIF orientation), x right,
y down, pixel centres at integer positions (OpenCV's convention). Templates live
in the unit square, whose edges are the pixel edges: u -> u * size - 0.5.
"""
from __future__ import annotations

import cv2
import numpy as np


def as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB or (H, W) grey image, got {image.shape}")
    return image

# ArcFace's 112x112 five-point template (insightface), in the unit square: where
# left eye, right eye, nose, left and right mouth corner land in an aligned face.
CANONICAL_LANDMARKS = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
    [41.5493, 92.3655], [70.7299, 92.2041]]) / 112.0


def expression_regions(size: int) -> np.ndarray:
    """bool (size, size): eye + brow boxes and the mouth box around the canonical points
    of an aligned face: where an expression shows (residue check, paired-neutral loss)."""
    pts = CANONICAL_LANDMARKS * size
    mask = np.zeros((size, size), bool)
    for ex, ey in pts[:2]:  # eyes and the brows above them
        mask[int(ey - 0.17 * size):int(ey + 0.07 * size), int(ex - 0.12 * size):int(ex + 0.12 * size)] = True
    (lx, ly), (rx, ry) = pts[3], pts[4]
    my = (ly + ry) / 2
    mask[int(my - 0.10 * size):int(my + 0.10 * size), int(lx - 0.06 * size):int(rx + 0.06 * size)] = True
    return mask


# Where the MTCNN points sit in dlib's get_face_chip(size, padding), in dlib's
# unit face square (chip pixel = (padding + u) / (2 padding + 1) * size - 0.5).
# Analytic guess from dlib's 68-point mean face (interpolation.h): eyes = mean of
# points 36-41 / 42-47 (0.2255 / 0.7548, 0.2160), nose = 30 (0.4901, 0.5156),
# mouth = 48 / 54 (0.2541 / 0.7261, 0.7802). Calibrated instead on the 10 chips in
# testvectors/dlib_resnet (cut by dlib from known landmarks): MTCNN on the source
# images, mapped into each chip, averaged, mirrored about dlib's face axis x=0.490127.
# Eye height and nose agree with the analytic values to <0.5 px; MTCNN's eyes sit
# 7% wider apart, and its mouth corners 9 px lower and expression dependent.
DLIB_CHIP_LANDMARKS = np.array([
    [0.207482, 0.215424], [0.772772, 0.215424], [0.490127, 0.511290],
    [0.243408, 0.841593], [0.736846, 0.841593]])
# dlib cuts chips from eye corners + nose base only; fitting eyes + nose alone
# follows it and keeps the identity chip independent of the mouth's expression
# (leave-one-out on the test vectors: 3.3 px mean chip misplacement vs 6.5 px
# for the analytic template on all 5 points).
_CHIP_FIT_POINTS = [0, 1, 2]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix M (rotation, uniform scale, translation; no reflection) minimising
    sum |M [src; 1] - dst|^2: in 2-D, linear least squares for dst = z * src + t with
    complex z = a + ib (Umeyama 1991's answer, to 1e-13, without its SVD: 3x faster)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    norm = (s * s).sum()
    a = (s * d).sum() / norm
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / norm
    rot = np.array([[a, -b], [b, a]])
    return np.hstack([rot, (mu_d - rot @ mu_s)[:, None]])


def _warp(image: np.ndarray, m: np.ndarray, size: int, border: int) -> np.ndarray:
    """cv2.warpAffine with area-averaging quality when M shrinks a lot.

    Bilinear sampling at scale < 0.5 skips pixels (aliasing), so the source
    region is first cropped and shrunk with INTER_AREA to ~the output scale.
    """
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    if scale < 0.5:
        corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
        inv = cv2.invertAffineTransform(m)
        src = corners @ inv[:, :2].T + inv[:, 2]
        h, w = image.shape[:2]
        x0, y0 = np.clip(np.floor(src.min(0)).astype(int) - 2, 0, [w, h])
        x1, y1 = np.clip(np.ceil(src.max(0)).astype(int) + 3, 0, [w, h])
        if x1 - x0 >= 2 and y1 - y0 >= 2:
            cw, ch = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
            small = cv2.resize(image[y0:y1, x0:x1], (cw, ch), interpolation=cv2.INTER_AREA)
            fx, fy = cw / (x1 - x0), ch / (y1 - y0)
            # source pixel of a `small` pixel r: (r + 0.5) / f - 0.5 + offset
            a = np.array([[1 / fx, 0, 0.5 / fx - 0.5 + x0],
                          [0, 1 / fy, 0.5 / fy - 0.5 + y0],
                          [0, 0, 1]])
            image, m = small, m @ a
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=border)


def _grey(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def align_face(image_rgb: np.ndarray, landmarks: np.ndarray, size: int = 64) -> np.ndarray:
    """Grey uint8 (size, size) face with the 5 points moved onto CANONICAL_LANDMARKS."""
    m = similarity_transform(landmarks, CANONICAL_LANDMARKS * size - 0.5)
    return _grey(_warp(np.asarray(image_rgb), m, size, cv2.BORDER_REPLICATE))


def dlib_chip_transform(landmarks: np.ndarray, size: int = 150,
                        padding: float = 0.25) -> np.ndarray:
    """2x3 matrix from image pixels to the pixels of dlib's get_face_chip(size, padding)."""
    dst = (padding + DLIB_CHIP_LANDMARKS) / (2 * padding + 1) * size - 0.5
    return similarity_transform(np.asarray(landmarks)[_CHIP_FIT_POINTS], dst[_CHIP_FIT_POINTS])


def dlib_chip(image_rgb: np.ndarray, landmarks: np.ndarray, size: int = 150,
              padding: float = 0.25) -> np.ndarray:
    """RGB uint8 (size, size, 3) chip for dlib's face-recognition ResNet, cut like
    dlib's get_face_chip(size, padding) but from the MTCNN 5 points."""
    m = dlib_chip_transform(landmarks, size, padding)
    return _warp(as_rgb(image_rgb), m, size, cv2.BORDER_CONSTANT)  # dlib pads black


def identity_chip(image_rgb: np.ndarray, landmarks: np.ndarray, size: int = 150,
                  padding: float = 0.25) -> np.ndarray:
    """The identity encoder's input everywhere in this project (prepare, training's
    identity loss, serving): dlib's chip in grey, uint8 (size, size). The model sees
    no colour, and training data is grey, so colour photos are made grey before E_id
    too. For a grey image (equal RGB channels) it equals a channel of `dlib_chip`."""
    return _grey(dlib_chip(image_rgb, landmarks, size, padding))
