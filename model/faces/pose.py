"""Head-pose pseudo-labels (yaw, pitch, roll in degrees) from the 5 MTCNN landmarks.

No data set here has pose labels, so pose targets are *estimated*: the five
detected points are fitted with a rigid 3D face template by Perspective-n-Point
(OpenCV `solvePnP`, Levenberg-Marquardt from a frontal start, focal length = image
width, principal point = image centre, no distortion).

Template (`FACE_TEMPLATE_MM`): five points of the mean 68-point Multi-PIE face
(the generic 3D face model shipped with the ETH-XGaze / MPIIGaze gaze-estimation
code; its outer eye corners are 90 mm apart): eye centre = mean of the six eye
contour points (36-41, 42-47), nose tip = point 30, mouth corners = points 48, 54.
Values in mm, in a head frame that coincides with the camera frame for a face
looking straight into the camera: x to the image right, y down, z away from the
camera; origin at the nose tip. Inter-ocular distance 64.8 mm, mouth width 56.9 mm.

Sign convention (all angles in degrees, head relative to the camera):
    yaw   > 0: the nose points to the image right (the person turns to their left)
    pitch > 0: the person looks up
    roll  > 0: the face turns clockwise in the image (the person's left eye, on the
               image right, lower: head tilted toward their left shoulder)
Mirroring an image left-right negates yaw and roll and keeps pitch.

The angles are the intrinsic yaw -> pitch -> roll decomposition of the fitted
rotation R (head frame -> camera frame): yaw and pitch describe where the facing
direction R @ (0, 0, -1) points, roll is the remaining rotation about it.

Known limits (they are pseudo-labels, not measurements):
- 5 points for 6 unknowns leaves 4 residual degrees of freedom; pitch rests on the
  nose tip's height between the eyes and the mouth, which also varies with face
  shape and expression (an open mouth moves the mouth corners down and reads as a
  pitch change). Expect yaw and roll to be usable, pitch to be biased and noisy.
- One rigid template for everyone: individual proportions become pose offsets.
- MTCNN landmarks on 48x48 crops (FER2013, CK+) are a few pixels noisy; beyond
  ~60 degrees yaw MTCNN rarely finds the face at all, so large poses are missing.
- Faces cut by the centre-crop fallback get the pose of the canonical template
  laid over the crop (near frontal by construction) and carry the fallback flag.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["FACE_TEMPLATE_MM", "estimate_pose", "pose_from_rotation", "rotation_from_pose",
           "project", "flip_landmarks"]

# left eye, right eye, nose tip, left mouth corner, right mouth corner ("left" =
# image left, the MTCNN order) in mm; see the module docstring for the source.
FACE_TEMPLATE_MM = np.array([
    [-32.42, -32.78, 35.31],
    [32.42, -32.78, 35.31],
    [0.00, 0.00, 0.00],
    [-28.47, 33.32, 36.68],
    [28.47, 33.32, 36.68],
], dtype=np.float64)

_FLIP_ORDER = [1, 0, 2, 4, 3]  # swap left/right points when mirroring


def _rx(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rotation_from_pose(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head-to-camera rotation for angles in degrees (the inverse of pose_from_rotation)."""
    y, p, r = np.radians([yaw, pitch, roll])
    # facing (0,0,-1): Ry(-yaw) moves it to +x for yaw > 0, Rx(-pitch) to -y (up) for pitch > 0.
    return _ry(-y) @ _rx(-p) @ _rz(r)


def pose_from_rotation(rot: np.ndarray) -> np.ndarray:
    """(3,) yaw, pitch, roll in degrees of a head-to-camera rotation matrix."""
    f = rot @ np.array([0.0, 0.0, -1.0])              # facing direction in the camera frame
    yaw = np.arctan2(f[0], -f[2])
    pitch = np.arctan2(-f[1], np.hypot(f[0], f[2]))
    rest = (_ry(-yaw) @ _rx(-pitch)).T @ rot          # a rotation about z only
    roll = np.arctan2(rest[1, 0], rest[0, 0])
    return np.degrees([yaw, pitch, roll])


def _camera(width: float, height: float) -> np.ndarray:
    return np.array([[width, 0, (width - 1) / 2], [0, width, (height - 1) / 2], [0, 0, 1]], np.float64)


def project(yaw: float, pitch: float, roll: float, image_size: tuple[int, int] = (200, 200),
            distance_mm: float = 600.0, template: np.ndarray = FACE_TEMPLATE_MM) -> np.ndarray:
    """(5, 2) image points of the template at a pose: synthetic landmarks for tests."""
    w, h = image_size
    rvec, _ = cv2.Rodrigues(rotation_from_pose(yaw, pitch, roll))
    tvec = np.array([0.0, 0.0, distance_mm])
    pts, _ = cv2.projectPoints(template, rvec, tvec, _camera(w, h), None)
    return pts.reshape(5, 2)


def flip_landmarks(landmarks: np.ndarray, width: float) -> np.ndarray:
    """Landmarks (..., 5, 2) of the left-right mirrored image (pixel centres at
    integers: x -> width - 1 - x), left/right points swapped."""
    lm = np.array(landmarks, dtype=np.float64)[..., _FLIP_ORDER, :]
    lm[..., 0] = width - 1 - lm[..., 0]
    return lm


def _sizes(image_size, n: int) -> np.ndarray:
    """image_size: int (square), (W, H), or an (N, 2) array of (W, H) -> (N, 2)."""
    a = np.asarray(image_size, dtype=np.float64)
    if a.ndim == 0:
        a = np.array([a, a])
    return np.broadcast_to(a, (n, 2)) if a.ndim == 1 else a


def estimate_pose(landmarks: np.ndarray, image_size) -> np.ndarray:
    """(N, 5, 2) landmarks in image pixels -> (N, 3) float32 yaw, pitch, roll (degrees).

    image_size: the image's (width, height), an int for square images, or an (N, 2)
    array when the images differ. Rows with non-finite landmarks give NaN.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim == 2:
        lm = lm[None]
    if lm.shape[1:] != (5, 2):
        raise ValueError(f"expected (N, 5, 2) landmarks, got {lm.shape}")
    sizes = _sizes(image_size, len(lm))
    out = np.full((len(lm), 3), np.nan, dtype=np.float32)
    eye_mm = np.linalg.norm(FACE_TEMPLATE_MM[1] - FACE_TEMPLATE_MM[0])
    for i, (pts, (w, h)) in enumerate(zip(lm, sizes)):
        if not np.isfinite(pts).all():
            continue
        cam = _camera(w, h)
        # Start frontal, at the distance where the eyes are as far apart as observed.
        eye_px = max(np.linalg.norm(pts[1] - pts[0]), 1e-3)
        z = w * eye_mm / eye_px
        centre = (pts.mean(0) - cam[:2, 2]) * z / w
        rvec = np.zeros((3, 1))
        tvec = np.array([[centre[0]], [centre[1]], [z]])
        ok, rvec, tvec = cv2.solvePnP(FACE_TEMPLATE_MM, pts.reshape(5, 1, 2), cam, None,
                                      rvec, tvec, useExtrinsicGuess=True,
                                      flags=cv2.SOLVEPNP_ITERATIVE)
        if ok:
            out[i] = pose_from_rotation(cv2.Rodrigues(rvec)[0])
    return out
