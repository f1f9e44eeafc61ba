"""Pose pseudo-labels: PnP round trip, sign conventions, mirror symmetry on real faces."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from model.faces.pose import FACE_TEMPLATE_MM, estimate_pose, flip_landmarks, pose_from_rotation, project, \
    rotation_from_pose
from tests import data_samples as samples


def test_rotation_round_trip():
    rng = np.random.default_rng(0)
    for yaw, pitch, roll in rng.uniform([-80, -60, -60], [80, 60, 60], (50, 3)):
        np.testing.assert_allclose(pose_from_rotation(rotation_from_pose(yaw, pitch, roll)),
                                   [yaw, pitch, roll], atol=1e-9)


def test_pnp_recovers_synthetic_poses():
    rng = np.random.default_rng(1)
    truth = rng.uniform([-45, -25, -30], [45, 25, 30], (40, 3))
    lm = np.stack([project(*p, image_size=(160, 120), distance_mm=450) for p in truth])
    est = estimate_pose(lm, (160, 120))
    assert est.dtype == np.float32 and est.shape == (40, 3)
    np.testing.assert_allclose(est, truth, atol=0.05)


def test_sign_conventions():
    """yaw > 0: nose to the image right; pitch > 0: looking up; roll > 0: clockwise."""
    front = project(0, 0, 0)
    eyes_mid = lambda lm: lm[:2].mean(0)  # noqa: E731
    assert project(20, 0, 0)[2, 0] - eyes_mid(project(20, 0, 0))[0] > 3
    assert project(0, 20, 0)[2, 1] - eyes_mid(project(0, 20, 0))[1] < front[2, 1] - eyes_mid(front)[1] - 2
    right_eye_lower = project(0, 0, 15)
    assert right_eye_lower[1, 1] > right_eye_lower[0, 1] + 3
    # and the estimator reads them back with those signs
    assert estimate_pose(project(20, 0, 0)[None], 200)[0, 0] > 15
    assert estimate_pose(project(0, 20, 0)[None], 200)[0, 1] > 15
    assert estimate_pose(project(0, 0, 15)[None], 200)[0, 2] > 10
    # the template is left-right symmetric, so a frontal face is exactly 0
    assert np.allclose(FACE_TEMPLATE_MM[[1, 0, 2, 4, 3], 0], -FACE_TEMPLATE_MM[:, 0])
    np.testing.assert_allclose(estimate_pose(front[None], 200), 0, atol=1e-4)


def test_image_size_forms_and_missing_landmarks():
    lm = np.stack([project(10, 5, -3, image_size=(100, 100), distance_mm=700)] * 3)
    lm[1] = np.nan
    a = estimate_pose(lm, 100)
    b = estimate_pose(lm, (100, 100))
    c = estimate_pose(lm, np.array([[100, 100]] * 3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert np.isnan(a[1]).all() and np.isfinite(a[[0, 2]]).all()
    with pytest.raises(ValueError):
        estimate_pose(np.zeros((2, 4, 2)), 100)


def test_in_plane_rotation_changes_roll_as_the_augmentation_assumes():
    """model.data rotates images with cv2.getRotationMatrix2D(angle) (> 0 = counter-
    clockwise) and lowers roll by `angle`; check that against PnP."""
    s = 100
    lm = project(12, 4, 5, image_size=(s, s), distance_mm=700)
    before = estimate_pose(lm[None], s)[0]
    angle = 8.0
    m = cv2.getRotationMatrix2D(((s - 1) / 2, (s - 1) / 2), angle, 1.0)
    after = estimate_pose((lm @ m[:, :2].T + m[:, 2])[None], s)[0]
    assert after[2] == pytest.approx(before[2] - angle, abs=1.5)
    assert after[0] == pytest.approx(before[0], abs=2.0)


@pytest.fixture(scope="module")
def real_faces(shared_dir):
    """MTCNN landmarks of a few real images and of their mirror images."""
    from model.images import load_image
    from model.faces.preprocess import CropLocator
    src = samples.data_dir(shared_dir)
    files = [src / "muxspace/images" / f"{s}.jpg" for s in samples.MUX_PICK[:8]]
    files += sorted((src / "ckplus48/happy").iterdir())[:4]
    images = [load_image(f) for f in files]
    worker = CropLocator()  # FaceWorker's detection, without the identity network
    dets = worker.locate(images)
    flipped = worker.locate([np.ascontiguousarray(im[:, ::-1]) for im in images])
    keep = [i for i, (a, b) in enumerate(zip(dets, flipped)) if a["source"] != 2 and b["source"] != 2]
    assert len(keep) >= 10, "MTCNN should find these faces"
    wh = np.array([[im.shape[1], im.shape[0]] for im in images])[keep]
    return (np.stack([dets[i]["landmarks"] for i in keep]), np.stack([flipped[i]["landmarks"] for i in keep]), wh)


def test_mirror_symmetry_of_the_estimator_on_real_landmarks(real_faces):
    """Mirroring real landmarks (pure geometry) negates yaw and roll, keeps pitch."""
    lm, _, wh = real_faces
    pose = estimate_pose(lm, wh)
    mirrored = estimate_pose(np.stack([flip_landmarks(p, w) for p, (w, _) in zip(lm, wh)]), wh)
    np.testing.assert_allclose(mirrored, pose * np.array([-1, 1, -1]), atol=0.05)
    assert np.abs(pose[:, 0]).max() > 1.0  # not trivially all-zero


def test_detections_on_flipped_images_flip_the_pose(real_faces):
    """End to end: detect on the mirrored image; yaw and roll change sign, pitch stays."""
    lm, lm_flipped, wh = real_faces
    pose, pose_f = estimate_pose(lm, wh), estimate_pose(lm_flipped, wh)
    assert np.abs(pose[:, 0] + pose_f[:, 0]).mean() < 4.0
    assert np.abs(pose[:, 2] + pose_f[:, 2]).mean() < 2.0
    assert np.abs(pose[:, 1] - pose_f[:, 1]).mean() < 4.0
    # MTCNN's "left eye" stays on the image left after mirroring
    assert (lm_flipped[:, 0, 0] < lm_flipped[:, 1, 0]).all() and (lm[:, 0, 0] < lm[:, 1, 0]).all()
