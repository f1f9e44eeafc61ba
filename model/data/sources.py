"""Dataset sources: public folder layouts -> manifest rows (`model.data.manifests`;
no face work), and the pixels of a manifest path back (`ImageReader`).

Supported layouts (`LOADERS`; `load_dataset(kind, root)` picks one):
    fer2013    <root>/{train,test}/<emotion>/{Training,PublicTest,PrivateTest}_*.jpg
               or <root>/fer2013.csv (columns emotion, pixels, Usage)
    ckplus     <root>/<emotion>/S###_###_########.png
    muxspace   <root>/images/*.jpg + <root>/legend.csv (user.id, image, emotion)
    rafdb      <root>[/basic]/EmoLabel/list_patition_label.txt + Image/{aligned,original}/
    affectnet  <root>/{training,validation}.csv (subDirectory_filePath, expression)
               + <root>/Manually_Annotated_Images/<subDirectory_filePath>
    generic    <root>/<label>/*.{jpg,jpeg,png,bmp}, or <root>/{train,val,test}/<label>/...
"""
from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from model.data.manifests import SEED, SPLITS, Drop, Manifest, Row, finish, holdout_val, split_groups
from model.fileio import sha256_bytes, sha256_file
from model.images import load_image
from model.labels import canonical

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


# ---------------------------------------------------------------------------
# 1. Labels, subjects
# ---------------------------------------------------------------------------

def _label(name: str) -> tuple[str, bool] | None:
    """Dataset spelling -> (canonical label or "", contempt flag); None = unknown."""
    if name.strip().lower() == "contempt":
        return "", True
    c = canonical(name)
    return (c, False) if c is not None else None


_TRAILING_ID = re.compile(r"[_-]+[^_-]*\d[^_-]*$")


def subject_from_name(file_name: str) -> str:
    """Person id from a file name: the stem without its trailing numbered token.

    `George_W_Bush_0002.jpg` -> `George_W_Bush`, `HrithikRoshan_12.jpg` ->
    `HrithikRoshan`, `facial-expressions_2868588k.jpg` -> `facial-expressions`.
    """
    stem = Path(file_name).stem
    base = _TRAILING_ID.sub("", stem)
    return base or stem



def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _progress(items, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, unit="img", leave=False, mininterval=1.0)
    except ImportError:  # pragma: no cover
        return items



# ---------------------------------------------------------------------------
# 2. Loaders
# ---------------------------------------------------------------------------

FER_PREFIX_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FER_CSV_LABELS = ("anger", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # 0..6


def load_fer2013_folders(root: Path, name: str = "fer2013") -> Manifest:
    """Kaggle layout: {train,test}/<emotion>/<Prefix>_<n>.jpg. The file prefix gives
    the official split (PublicTest = val); without a known prefix the folder does."""
    root = Path(root)
    rows, dropped = [], []
    files = [(top, emo, f) for top in ("train", "test") if (root / top).is_dir()
             for emo in sorted(p for p in (root / top).iterdir() if p.is_dir())
             for f in _images(emo)]
    for top, emo, f in _progress(files, f"hash {name}"):
        rel = f.relative_to(root).as_posix()
        lab = _label(emo.name)
        split = FER_PREFIX_SPLIT.get(f.name.split("_", 1)[0], "train" if top == "train" else "test")
        if lab is None:
            dropped.append(Drop(rel, "", split, f"unknown_label:{emo.name}"))
            continue
        rows.append(Row(name, rel, lab[0], lab[1], "", sha256_file(f), split))
    return finish(rows, dropped)


def load_fer2013_csv(csv_path: Path, name: str = "fer2013") -> Manifest:
    """The original Kaggle CSV. Row i becomes the virtual path `<file>#<i>`; the hash
    is over the 48*48 uint8 pixel bytes."""
    csv_path = Path(csv_path)
    rows = []
    with open(csv_path, newline="") as fh:
        for i, rec in enumerate(csv.DictReader(fh)):
            pixels = np.array(rec["pixels"].split(), dtype=np.uint8)
            split = FER_PREFIX_SPLIT[rec["Usage"].strip()]
            label = FER_CSV_LABELS[int(rec["emotion"])]
            rows.append(Row(name, f"{csv_path.name}#{i}", label, False, "",
                            sha256_bytes(pixels.tobytes()), split))
    return finish(rows)


def load_fer2013(root: Path, name: str = "fer2013") -> Manifest:
    """Folders if present, else the first *.csv in `root` (or `root` itself if a file)."""
    root = Path(root)
    if root.is_file():
        return load_fer2013_csv(root, name)
    if (root / "train").is_dir() or (root / "test").is_dir():
        return load_fer2013_folders(root, name)
    csvs = sorted(root.glob("*.csv"))
    if not csvs:
        raise FileNotFoundError(f"{root}: neither train/ test/ folders nor a fer2013 CSV")
    return load_fer2013_csv(csvs[0], name)


def load_ckplus(root: Path, name: str = "ckplus", seed: int = SEED) -> Manifest:
    """<emotion>/S010_004_00000017.png; subject = S010; split by subject."""
    root = Path(root)
    rows, dropped = [], []
    files = [f for emo in sorted(p for p in root.iterdir() if p.is_dir()) for f in _images(emo)]
    for f in _progress(files, f"hash {name}"):
        rel = f.relative_to(root).as_posix()
        lab = _label(f.parent.name)
        if lab is None:
            dropped.append(Drop(rel, "", "", f"unknown_label:{f.parent.name}"))
            continue
        m = re.match(r"(S\d+)", f.name)
        rows.append(Row(name, rel, lab[0], lab[1], m.group(1) if m else "", sha256_file(f), ""))
    return finish(_split_by_subject(rows, seed), dropped)


def _split_by_subject(rows: list[Row], seed: int) -> list[Row]:
    sizes = Counter(r.subject or r.sha256 for r in rows)
    where = split_groups(sizes, seed=seed)
    return [replace(r, split=where[r.subject or r.sha256]) for r in rows]


def load_muxspace(root: Path, name: str = "muxspace", seed: int = SEED) -> Manifest:
    """images/ + legend.csv (user.id = the labeller, image, emotion in any case).

    The legend may name a file with another extension than the one on disk (matched
    by stem). A file listed twice keeps one row; twice with different labels, none.
    Identity = file name without its number (`subject_from_name`); split by identity.
    """
    root = Path(root)
    on_disk = {p.stem: p for p in _images(root / "images")}
    labels: dict[str, set[str]] = defaultdict(set)
    with open(root / "legend.csv", newline="") as fh:
        for rec in csv.DictReader(fh):
            labels[Path(rec["image"].strip()).stem].add(rec["emotion"].strip().lower())
    rows, dropped = [], []
    for stem in _progress(sorted(labels), f"hash {name}"):
        f = on_disk.get(stem)
        if f is None:
            dropped.append(Drop(f"images/{stem}", "", "", "missing_file"))
            continue
        rel = f.relative_to(root).as_posix()
        if len(labels[stem]) > 1:
            dropped.append(Drop(rel, "", "", "conflicting_labels"))
            continue
        (emotion,) = labels[stem]
        lab = _label(emotion)
        if lab is None:
            dropped.append(Drop(rel, "", "", f"unknown_label:{emotion}"))
            continue
        rows.append(Row(name, rel, lab[0], lab[1], subject_from_name(f.name), sha256_file(f), ""))
    return finish(_split_by_subject(rows, seed), dropped)


RAFDB_LABELS = ("surprise", "fear", "disgust", "happy", "sad", "anger", "neutral")  # 1..7


def load_rafdb(root: Path, name: str = "rafdb", seed: int = SEED) -> Manifest:
    """RAF-DB basic: EmoLabel/list_patition_label.txt lines `train_00001.jpg 5`
    (1..7 = surprise, fear, disgust, happiness, sadness, anger, neutral), images in
    Image/aligned/<stem>_aligned.jpg (preferred) or Image/original/<name>.
    train_ / test_ give the split; val = a seeded 10% of train (RAF-DB has none)."""
    root = Path(root)
    if not (root / "EmoLabel").is_dir() and (root / "basic" / "EmoLabel").is_dir():
        root_prefix, base = "basic/", root / "basic"
    else:
        root_prefix, base = "", root
    rows, dropped = [], []
    lines = (base / "EmoLabel" / "list_patition_label.txt").read_text().split("\n")
    for line in _progress([ln for ln in lines if ln.strip()], f"hash {name}"):
        fname, code = line.split()[:2]
        stem = Path(fname).stem
        split = "train" if fname.startswith("train") else "test"
        for cand in (f"Image/aligned/{stem}_aligned.jpg", f"Image/original/{fname}"):
            if (base / cand).is_file():
                rel = root_prefix + cand
                break
        else:
            dropped.append(Drop(root_prefix + f"Image/original/{fname}", "", split, "missing_file"))
            continue
        rows.append(Row(name, rel, RAFDB_LABELS[int(code) - 1], False, "",
                        sha256_file(base / rel[len(root_prefix):]), split))
    return finish(holdout_val(rows, seed=seed), dropped)


AFFECTNET_LABELS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")  # 0..6, 7 = contempt
AFFECTNET_CSVS = {"training.csv": "train", "validation.csv": "test"}


def load_affectnet(root: Path, name: str = "affectnet", seed: int = SEED) -> Manifest:
    """AffectNet (manually annotated): training.csv / validation.csv with columns
    subDirectory_filePath and expression (0..7 = neutral, happy, sad, surprise,
    fear, disgust, anger, contempt; 8..10 = none / uncertain / no face: dropped).
    The official validation set is the test split; val = a seeded 10% of train.
    Images under Manually_Annotated_Images/ if that folder exists, else under root."""
    root = Path(root)
    img_dir = "Manually_Annotated_Images/" if (root / "Manually_Annotated_Images").is_dir() else ""
    rows, dropped = [], []
    for csv_name, split in AFFECTNET_CSVS.items():
        if not (root / csv_name).is_file():
            continue
        with open(root / csv_name, newline="") as fh:
            recs = list(csv.DictReader(fh))
        for rec in _progress(recs, f"hash {name} {split}"):
            rel = img_dir + rec["subDirectory_filePath"].strip()
            code = int(rec["expression"])
            if code > 7:
                dropped.append(Drop(rel, "", split, f"no_expression:{code}"))
                continue
            if not (root / rel).is_file():
                dropped.append(Drop(rel, "", split, "missing_file"))
                continue
            label, contempt = ("", True) if code == 7 else (AFFECTNET_LABELS[code], False)
            rows.append(Row(name, rel, label, contempt, "", sha256_file(root / rel), split))
    if not rows and not dropped:
        raise FileNotFoundError(f"{root}: no training.csv / validation.csv")
    return finish(holdout_val(rows, seed=seed), dropped)


def load_generic(root: Path, name: str = "generic", seed: int = SEED) -> Manifest:
    """<root>/<label>/*.jpg (seeded 70/15/15 by content hash), or the same under
    <root>/{train,val,test}/ (those splits kept). Unknown label folders are skipped."""
    root = Path(root)
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    tops = [(root / s, s) for s in split_dirs] if split_dirs else [(root, "")]
    rows, dropped = [], []
    for top, split in tops:
        for folder in sorted(p for p in top.iterdir() if p.is_dir()):
            lab = _label(folder.name)
            for f in _images(folder):
                rel = f.relative_to(root).as_posix()
                if lab is None:
                    dropped.append(Drop(rel, "", split, f"unknown_label:{folder.name}"))
                    continue
                rows.append(Row(name, rel, lab[0], lab[1], "", sha256_file(f), split))
    if not split_dirs:
        rows = _split_by_subject(rows, seed)  # no subjects: groups are content hashes
    return finish(rows, dropped)


LOADERS: dict[str, Callable[..., Manifest]] = {
    "fer2013": load_fer2013, "ckplus": load_ckplus, "muxspace": load_muxspace,
    "rafdb": load_rafdb, "affectnet": load_affectnet, "generic": load_generic,
}

# Dataset name -> (loader kind, folder names tried under the data root).
DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fer2013": ("fer2013", ("fer2013", "FER2013", "fer2013.csv")),
    "ckplus": ("ckplus", ("ckplus48", "ckplus", "CK+48", "CK+")),
    "muxspace": ("muxspace", ("muxspace", "facial_expressions")),
    "rafdb": ("rafdb", ("rafdb", "RAF-DB", "raf-db", "RAF_DB")),
    "affectnet": ("affectnet", ("affectnet", "AffectNet")),
}


def find_root(name: str, data_root: Path) -> Path:
    """The folder of dataset `name` under `data_root` (first of its known names)."""
    _, folders = DATASETS.get(name, ("generic", (name,)))
    for folder in folders:
        if (Path(data_root) / folder).exists():
            return Path(data_root) / folder
    raise FileNotFoundError(f"dataset {name!r}: none of {folders} under {data_root}")


def load_dataset(name: str, root: Path, kind: str | None = None) -> Manifest:
    kind = kind or DATASETS.get(name, ("generic",))[0]
    return LOADERS[kind](Path(root), name=name)


# ---------------------------------------------------------------------------
# 4. Reading the pixels back
# ---------------------------------------------------------------------------

class ImageReader:
    """RGB uint8 images of manifest paths under a dataset root (CSV rows included).

    `read(paths)` reads a FER2013-style CSV once for all its rows in `paths`,
    keeping only those rows' pixels (the file holds ~35k images as text)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __call__(self, path: str) -> np.ndarray:
        return self.read([path])[0]

    def read(self, paths: list[str]) -> list[np.ndarray]:
        rows: dict[str, dict[int, str]] = {}
        for path in paths:
            if "#" in path:
                file, row = path.rsplit("#", 1)
                rows.setdefault(file, {})[int(row)] = ""
        for file, wanted in rows.items():  # one pass over each CSV
            csv_path = self.root if self.root.is_file() else self.root / file
            with open(csv_path, newline="") as fh:
                for i, rec in enumerate(csv.DictReader(fh)):
                    if i in wanted:
                        wanted[i] = rec["pixels"]
            missing = [i for i, pixels in wanted.items() if not pixels]
            if missing:
                raise IndexError(f"{csv_path.name}: no row {missing[0]}")
        return [self._csv_image(rows[p.rsplit("#", 1)[0]][int(p.rsplit("#", 1)[1])]) if "#" in p
                else load_image(self.root / p) for p in paths]

    @staticmethod
    def _csv_image(pixels: str) -> np.ndarray:
        grey = np.array(pixels.split(), dtype=np.uint8)
        side = int(round(len(grey) ** 0.5))
        return np.repeat(grey.reshape(side, side)[:, :, None], 3, axis=2)
