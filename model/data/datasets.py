"""What training and evaluation read: the face cache written by `ipdfer prepare`.

    faces = load_split("fer2013", "train", size=64)     # FaceSet, images memory-mapped
    ds = FaceDataset(faces, augment=True)                # torch Dataset of dicts
    item = ds[0]  # image (1,S,S) float in [-1,1], label int64 (-1 = none), pose (3,)
                  # degrees, identity (128,), pose_valid (1.0 detected, 0.0 fallback)

Pose of a fallback (centre-crop) face is the pose of the canonical template laid
over the crop (near frontal), never NaN; `pose_valid` / `FaceSet.fallback` say
which targets are real estimates.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from model.faces.preprocess import to_model_input
from model.paths import default_cache_dir

__all__ = ["FaceSet", "load_split", "FaceDataset", "NeutralPairs", "flip_pose", "smoke_dataset"]


@dataclass
class FaceSet:
    dataset: str
    split: str
    images: np.ndarray     # uint8 (N, S, S), memory-mapped from faces_<S>.npy
    labels: np.ndarray     # int64 (N,), index into EXPRESSIONS, -1 = unlabeled / contempt
    pose: np.ndarray       # float32 (N, 3) yaw, pitch, roll in degrees (model/faces/pose.py)
    identity: np.ndarray   # float32 (N, 128) frozen E_id descriptors
    subjects: list[str]    # person id or ""
    paths: list[str]       # relative to the dataset root (manifest `path`)
    fallback: np.ndarray   # bool (N,): no face detected, centre crop

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


def load_split(dataset: str, split: str, size: int = 64, cache_dir: str | Path | None = None) -> FaceSet:
    """One split of a prepared dataset ("train", "val", "test" or "all")."""
    folder = Path(cache_dir or default_cache_dir()).expanduser() / dataset
    index_path = folder / "index.json"
    faces_path = folder / f"faces_{size}.npy"
    if not index_path.is_file() or not faces_path.is_file():
        raise FileNotFoundError(f"no {size}px cache for {dataset!r} in {folder}: run "
                                f"`ipdfer prepare --datasets {dataset} --size {size}`")
    index = json.loads(index_path.read_text())
    if split == "all":
        a, b = 0, index["n"]
    elif split in index["splits"]:
        a, b = index["splits"][split]
    else:
        raise ValueError(f"unknown split {split!r}; have {list(index['splits'])} or 'all'")
    _check_manifest(dataset, index)
    meta = np.load(folder / "meta.npz")
    images = np.load(faces_path, mmap_mode="r")
    identity = np.load(folder / "identity.npy", mmap_mode="r")
    if len(images) != index["n"]:
        raise RuntimeError(f"{faces_path} holds {len(images)} faces, index.json says {index['n']}")
    return FaceSet(
        dataset=dataset, split=split, images=images[a:b],
        labels=meta["label"][a:b].astype(np.int64),
        pose=meta["pose"][a:b].astype(np.float32),
        identity=np.ascontiguousarray(identity[a:b], dtype=np.float32),
        subjects=meta["subject"][a:b].tolist(), paths=meta["path"][a:b].tolist(),
        fallback=meta["fallback"][a:b].astype(bool))


def _check_manifest(dataset: str, index: dict) -> None:
    """Warn when the committed manifest no longer matches what the cache was built from."""
    from model.data.manifests import manifest_digest, ordered, read_manifest
    from model.paths import MANIFEST_DIR
    path = Path(index.get("manifest") or MANIFEST_DIR / f"{dataset}.csv")
    if path.is_file() and manifest_digest(ordered(read_manifest(path))) != index.get("manifest_sha256"):
        warnings.warn(f"{path} differs from the manifest the {dataset} cache was built from; "
                      "run `ipdfer prepare` again", stacklevel=3)


def flip_pose(pose: np.ndarray) -> np.ndarray:
    """Pose of the left-right mirrored face: yaw and roll change sign, pitch stays."""
    return np.asarray(pose) * np.array([-1.0, 1.0, -1.0], dtype=np.float32)


class FaceDataset(Dataset):
    """FaceSet -> dicts of tensors, with optional augmentation.

    augment: random horizontal flip (negates yaw and roll of the pose target),
    rotation by up to `max_rotate` degrees (added to roll: a face turned clockwise
    in the image has a larger roll), scale 1 +- `max_scale`, shift up to `max_shift`
    of the side; borders replicate (like the alignment's).
    """

    def __init__(self, faces: FaceSet, augment: bool = False, flip_p: float = 0.5,
                 max_rotate: float = 10.0, max_scale: float = 0.08, max_shift: float = 0.06,
                 seed: int | None = None):
        self.faces = faces
        self.augment = augment
        self.flip_p, self.max_rotate, self.max_scale, self.max_shift = flip_p, max_rotate, max_scale, max_shift
        self.seed = seed
        self._rng, self._rng_pid = None, None

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        f = self.faces
        img = np.array(f.images[i])  # (S, S) uint8, copied out of the memmap
        pose = f.pose[i].astype(np.float32).copy()
        if self.augment:
            img, pose = self._augment(img, pose)
        return {
            "image": to_model_input(np.ascontiguousarray(img)[None])[0],  # (1, S, S) in [-1, 1]
            "label": torch.tensor(int(f.labels[i]), dtype=torch.int64),
            "pose": torch.from_numpy(pose),                                          # (3,)
            "identity": torch.from_numpy(np.asarray(f.identity[i], dtype=np.float32).copy()),  # (128,)
            "pose_valid": torch.tensor(0.0 if f.fallback[i] else 1.0),
        }

    @property
    def rng(self) -> np.random.Generator:
        """Per process: DataLoader workers each draw their own augmentations (seeded
        from torch's per-worker seed, so a seeded run repeats)."""
        if self._rng_pid != os.getpid():
            worker = torch.utils.data.get_worker_info() is not None
            seed = torch.initial_seed() % 2**63 if worker or self.seed is None else self.seed
            self._rng, self._rng_pid = np.random.default_rng(seed), os.getpid()
        return self._rng

    def _augment(self, img: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        if rng.random() < self.flip_p:
            img, pose = img[:, ::-1], flip_pose(pose)
        s = img.shape[0]
        angle = rng.uniform(-self.max_rotate, self.max_rotate)  # OpenCV: > 0 = counter-clockwise
        scale = 1.0 + rng.uniform(-self.max_scale, self.max_scale)
        m = cv2.getRotationMatrix2D(((s - 1) / 2, (s - 1) / 2), angle, scale)
        m[:, 2] += rng.uniform(-self.max_shift, self.max_shift, 2) * s
        img = cv2.warpAffine(np.ascontiguousarray(img), m, (s, s), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
        pose = pose.copy()
        pose[2] -= angle  # counter-clockwise image rotation lowers roll
        return img, pose


class NeutralPairs:
    """(expressive face, the same person's real neutral face) pairs from FaceSets with
    subject ids: the paired target of the editor's neutral render. Both faces are
    aligned to the same template, so pixels correspond up to the person's pose and
    lighting in each photo; a pair is mirrored together."""

    def __init__(self, faces: list[FaceSet], seed: int = 0):
        from model.labels import NEUTRAL
        self.sets, self.expressive, self.neutral_of = faces, [], {}
        for k, f in enumerate(faces):
            neutral: dict[str, list[int]] = {}
            for i, (subject, label) in enumerate(zip(f.subjects, f.labels)):
                if subject and label == NEUTRAL:
                    neutral.setdefault(subject, []).append(i)
            for i, (subject, label) in enumerate(zip(f.subjects, f.labels)):
                if subject in neutral and label >= 0 and label != NEUTRAL:
                    self.expressive.append((k, i))
            self.neutral_of.update({(k, s): v for s, v in neutral.items()})
        if not self.expressive:
            raise ValueError("no person has both a neutral and an expressive face in the pair sets")
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.expressive)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """image, target (n,1,S,S) in [-1,1], identity (n,128) of the expressive face."""
        images, targets, ids = [], [], []
        for j in self.rng.integers(len(self.expressive), size=n):
            k, i = self.expressive[j]
            f = self.sets[k]
            choices = self.neutral_of[(k, f.subjects[i])]
            pair = np.stack([f.images[i], f.images[choices[self.rng.integers(len(choices))]]])
            if self.rng.random() < 0.5:
                pair = pair[:, :, ::-1]
            images.append(pair[0]), targets.append(pair[1]), ids.append(f.identity[i])
        return {"pair_image": to_model_input(np.stack(images)), "pair_target": to_model_input(np.stack(targets)),
                "pair_identity": torch.from_numpy(np.stack(ids).astype(np.float32))}


def smoke_dataset(size: int = 64, data_dir: str | Path | None = None, n: int = 64) -> FaceDataset:
    """A small real FaceDataset built on the fly (no cache needed): `n` CK+ and
    FER2013 images from the data folder (`data_dir`, else env IPDFER_DATA) through the same face work as
    `ipdfer prepare`. For smoke tests of the training loop."""
    from model.data import sources as ds
    from model.faces.align import align_face
    from model.labels import EXPRESSIONS, canonical
    from model.data.features import FaceWorker
    from model.faces.preprocess import SOURCE_FALLBACK
    from model.paths import require_data_root
    data = require_data_root(data_dir)
    data = data / "data" if (data / "data").is_dir() else data  # a folder holding data/ works too
    picks: list[tuple[Path, str]] = []
    for sub in ("ckplus48", "fer2013/train"):
        root = data / sub
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            picks += [(f, folder.name) for f in sorted(folder.iterdir())[: max(1, n // 14)]]
    if not picks:
        raise FileNotFoundError(f"no CK+ / FER2013 folders under {data}")
    picks = picks[:n]
    reader = ds.ImageReader(data)
    images = [reader(str(p.relative_to(data))) for p, _ in picks]
    feats = FaceWorker().features(images)
    names = [canonical(lab) for _, lab in picks]
    labels = np.array([EXPRESSIONS.index(c) if c else -1 for c in names], np.int64)
    faces = FaceSet(
        dataset="smoke", split="train",
        images=np.stack([align_face(im, lm, size) for im, lm in zip(images, feats["landmarks"])]),
        labels=labels, pose=feats["pose"], identity=feats["identity"],
        subjects=[""] * len(picks), paths=[str(p.relative_to(data)) for p, _ in picks],
        fallback=feats["source"] == SOURCE_FALLBACK)
    return FaceDataset(faces, augment=True)
