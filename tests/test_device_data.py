"""On-device batches (model/device_data.py) against the DataLoader path's conventions."""
import math

import cv2
import numpy as np
import torch

from model.data.datasets import FaceSet, smoke_dataset
from model.data.device_data import DeviceBatches, warp
from tests.data_samples import make_astronaut_layout


def _faceset(images: np.ndarray, pose: np.ndarray) -> FaceSet:
    n = len(images)
    return FaceSet(dataset="t", split="train", images=images, labels=np.arange(n) % 7, pose=pose,
                   identity=np.zeros((n, 128), np.float32), subjects=[""] * n, paths=[""] * n,
                   fallback=np.zeros(n, bool))


def _cv2_warp(img: np.ndarray, angle: float, scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    """FaceDataset's augmentation warp."""
    m = cv2.getRotationMatrix2D((31.5, 31.5), angle, scale)
    m[:, 2] += np.array(shift) * 64
    return cv2.warpAffine(img, m, (64, 64), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def test_warp_is_the_dataloaders_cv2_warp_and_the_pose_follows_it():
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 255, (64, 64), dtype=np.uint8), (7, 7), 2)
    pose = torch.tensor([[10.0, 5.0, 3.0]])
    inner = slice(8, -8)
    for angle, scale, shift in ((7.0, 1.0, (0.0, 0.0)), (-9.0, 1.07, (0.05, -0.04))):
        x, out_pose = warp(torch.from_numpy(img)[None], pose, torch.tensor([False]), torch.tensor([angle]),
                           torch.tensor([scale]), torch.tensor([shift]))
        got = ((x[0, 0] + 1) * 127.5).numpy()
        err = np.abs(got - _cv2_warp(img, angle, scale, shift))[inner, inner].mean()
        wrong = np.abs(got - _cv2_warp(img, -angle, scale, (-shift[0], -shift[1])))[inner, inner].mean()
        assert err < 1.5 and wrong > 3 * err, (angle, err, wrong)
        assert math.isclose(float(out_pose[0, 2]), 3.0 - angle, abs_tol=1e-4)   # as FaceDataset
        assert math.isclose(float(out_pose[0, 0]), 10.0, abs_tol=1e-4)


def test_flip_mirrors_the_face_and_negates_yaw_and_roll():
    img = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))[None]   # dark left, bright right
    batches = DeviceBatches([_faceset(img.repeat(64, 0), np.tile([[10.0, 5.0, 3.0]], (64, 1)).astype(np.float32))],
                            64, "cpu", max_rotate=0.0, max_scale=0.0, max_shift=0.0)
    x, pose = batches.augment(batches.images, batches.pose, torch.Generator().manual_seed(1))
    flipped = x[:, 0, :, :8].mean((1, 2)) > x[:, 0, :, -8:].mean((1, 2))
    assert 10 < int(flipped.sum()) < 54
    assert torch.allclose(pose[flipped], torch.tensor([-10.0, 5.0, -3.0]).expand(int(flipped.sum()), 3))
    assert torch.allclose(pose[~flipped], torch.tensor([10.0, 5.0, 3.0]).expand(int((~flipped).sum()), 3))


def test_epochs_cover_every_item_once_split_across_ranks(tmp_path):
    faces = smoke_dataset(64, make_astronaut_layout(tmp_path), n=28).faces   # 28 crops of a real face
    ranks = [DeviceBatches([faces], 4, "cpu", seed=3, rank=r, world_size=2) for r in (0, 1)]
    seen = []
    for b in ranks:
        b.set_epoch(1)
        for batch in b:
            assert batch["image"].shape == (4, 1, 64, 64) and batch["image"].dtype == torch.float32
            assert batch["image"].min() >= -1 and batch["image"].max() <= 1
            assert set(batch) == {"image", "label", "pose", "identity", "pose_valid"}
            seen += [tuple(v.tolist()) for v in batch["identity"][:, :4]]
    assert len(seen) == len(set(seen)) == 2 * (len(faces) // 2 // 4) * 4
    again = DeviceBatches([faces], 4, "cpu", seed=3, rank=0, world_size=2)
    again.set_epoch(1)
    first = next(iter(again))
    ranks[0].set_epoch(1)
    assert torch.equal(first["identity"], next(iter(ranks[0]))["identity"])
    ranks[0].set_epoch(2)
    assert not torch.equal(first["identity"], next(iter(ranks[0]))["identity"])
