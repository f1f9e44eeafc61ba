"""Dataset loaders: public folder layouts -> manifest rows (no pixels, no face work).

A manifest is a CSV committed under `model/manifests/<dataset>.csv`, one row per image:

    dataset, path, label, contempt, subject, sha256, split

- `path` is relative to the dataset's root folder (never absolute, never the image).
  FER2013 given as the Kaggle CSV has virtual paths `fer2013.csv#<row>`.
- `label` is one of `model.labels.EXPRESSIONS` or "" (contempt / unlabeled).
- `contempt` is 1 for contempt (kept as a flag, excluded from the 7-class tasks).
- `subject` is the person where the dataset tells it (CK+ `S010`, LFW `George_W_Bush`).
- `sha256` is the file's content hash (FER2013 CSV: the 48*48 pixel bytes).
- `split` is train / val / test.

Rules, applied to every dataset (`dedup`): one content hash is in one split only.
Exact duplicates keep one file (train first, then test, then val, then the first path)
and groups whose copies carry different labels are dropped entirely; every drop is
returned with its reason. Subject-labelled sets (CK+, muxspace) are split by subject,
70/15/15 of the images, with a fixed seed (`split_groups`). Rows are sorted by path,
so two runs on the same files give byte-identical manifests.

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
import hashlib
import io
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from model.labels import EXPRESSIONS, canonical

__all__ = [
    "MANIFEST_FIELDS", "SPLITS", "SEED", "Row", "Drop", "Manifest",
    "sha256_file", "sha256_bytes", "dedup", "split_groups", "subject_from_name",
    "load_fer2013", "load_fer2013_folders", "load_fer2013_csv", "load_ckplus",
    "load_muxspace", "load_rafdb", "load_affectnet", "load_generic",
    "LOADERS", "DATASETS", "find_root", "load_dataset",
    "write_manifest", "read_manifest", "write_drops", "ImageReader",
]

MANIFEST_FIELDS = ("dataset", "path", "label", "contempt", "subject", "sha256", "split")
SPLITS = ("train", "val", "test")
SEED = 20240613                       # every seeded split in this module
SUBJECT_FRACTIONS = (0.70, 0.15, 0.15)  # train / val / test share of the images
HOLDOUT_VAL = 0.10                    # val carved from train where a set has none
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
DEDUP_PRIORITY = ("train", "test", "val")  # which copy of a duplicate survives


@dataclass(frozen=True, order=True)
class Row:
    dataset: str
    path: str          # relative to the dataset root
    label: str         # canonical 7-class name or ""
    contempt: bool
    subject: str       # person id or ""
    sha256: str
    split: str

    def as_csv(self) -> dict[str, str]:
        return {"dataset": self.dataset, "path": self.path, "label": self.label,
                "contempt": "1" if self.contempt else "0", "subject": self.subject,
                "sha256": self.sha256, "split": self.split}


@dataclass(frozen=True)
class Drop:
    path: str
    sha256: str
    split: str
    reason: str        # duplicate / duplicate_of_<split> / conflicting_labels / ...
    kept: str = ""     # the path that survived, for duplicates


@dataclass
class Manifest:
    rows: list[Row]
    dropped: list[Drop] = field(default_factory=list)

    def drop_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(d.reason for d in self.dropped).items()))

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {label or 'contempt' or 'unlabeled': n}}"""
        out: dict[str, Counter] = defaultdict(Counter)
        for r in self.rows:
            out[r.split][r.label or ("contempt" if r.contempt else "unlabeled")] += 1
        return {s: dict(sorted(out[s].items())) for s in SPLITS if s in out}


# ---------------------------------------------------------------------------
# 1. Hashing, labels, subjects
# ---------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(Path(path).read_bytes())


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


def _hash_key(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def split_groups(sizes: dict[str, int], fractions: tuple[float, float, float] = SUBJECT_FRACTIONS,
                 seed: int = SEED) -> dict[str, str]:
    """Assign whole groups (subjects) to train/val/test so that ~`fractions` of the
    images land in each. Groups are ordered by a seeded hash of their name (stable
    whatever the platform) and cut where the running image count crosses the
    fractions (a group goes where its middle image falls)."""
    order = sorted(sizes, key=lambda g: (_hash_key(seed, g), g))
    total = sum(sizes.values()) or 1
    bounds = np.cumsum(fractions)
    out, seen = {}, 0
    for g in order:
        mid = (seen + sizes[g] / 2) / total
        out[g] = SPLITS[min(int(np.searchsorted(bounds, mid, side="right")), 2)]
        seen += sizes[g]
    return out


def _holdout_val(rows: list[Row], fraction: float = HOLDOUT_VAL, seed: int = SEED) -> list[Row]:
    """Move a seeded `fraction` of train rows to val (by subject when known, else by
    content hash, so copies move together)."""
    out = []
    for r in rows:
        key = r.subject or r.sha256
        if r.split == "train" and _hash_key(seed, key) % 10_000 < fraction * 10_000:
            r = replace(r, split="val")
        out.append(r)
    return out


def dedup(rows: list[Row], priority: tuple[str, ...] = DEDUP_PRIORITY) -> Manifest:
    """One row per content hash; conflicting-label groups dropped entirely.

    A duplicate group keeps the copy in the first split of `priority` (then the
    first path). Dropped copies are reported as `duplicate` (same split as the kept
    one) or `duplicate_of_<split>` (e.g. a test image whose content is in train).
    """
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r.sha256].append(r)
    kept, dropped = [], []
    rank = {s: i for i, s in enumerate(priority)}
    for sha, group in groups.items():
        if len(group) == 1:
            kept.append(group[0])
            continue
        if len({(r.label, r.contempt) for r in group}) > 1:
            dropped += [Drop(r.path, sha, r.split, "conflicting_labels") for r in group]
            continue
        group.sort(key=lambda r: (rank.get(r.split, len(rank)), r.path))
        best = group[0]
        kept.append(best)
        for r in group[1:]:
            reason = "duplicate" if r.split == best.split else f"duplicate_of_{best.split}"
            dropped.append(Drop(r.path, sha, r.split, reason, kept=best.path))
    return Manifest(sorted(kept, key=lambda r: r.path), sorted(dropped, key=lambda d: d.path))


def _finish(rows: list[Row], dropped: Iterable[Drop] = ()) -> Manifest:
    m = dedup(rows)
    m.dropped = sorted([*dropped, *m.dropped], key=lambda d: (d.path, d.reason))
    return m


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
    return _finish(rows, dropped)


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
    return _finish(rows)


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
    return _finish(_split_by_subject(rows, seed), dropped)


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
    return _finish(_split_by_subject(rows, seed), dropped)


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
    return _finish(_holdout_val(rows, seed=seed), dropped)


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
    return _finish(_holdout_val(rows, seed=seed), dropped)


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
    return _finish(rows, dropped)


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
# 3. Manifest files
# ---------------------------------------------------------------------------

def write_manifest(path: Path, rows: list[Row]) -> bool:
    """Write rows sorted by path; returns True if the file changed."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in sorted(rows, key=lambda r: r.path):
        w.writerow(r.as_csv())
    return _write_if_changed(Path(path), buf.getvalue())


def write_drops(path: Path, dropped: list[Drop]) -> bool:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("path", "sha256", "split", "reason", "kept"))
    for d in sorted(dropped, key=lambda d: (d.path, d.reason)):
        w.writerow((d.path, d.sha256, d.split, d.reason, d.kept))
    return _write_if_changed(Path(path), buf.getvalue())


def _write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def read_manifest(path: Path) -> list[Row]:
    with open(path, newline="") as fh:
        return [Row(r["dataset"], r["path"], r["label"], r["contempt"] == "1", r["subject"],
                    r["sha256"], r["split"]) for r in csv.DictReader(fh)]


def label_index(row: Row) -> int:
    """0..6 in EXPRESSIONS order, -1 for contempt / unlabeled."""
    return EXPRESSIONS.index(row.label) if row.label else -1


# ---------------------------------------------------------------------------
# 4. Reading the pixels back
# ---------------------------------------------------------------------------

class ImageReader:
    """RGB uint8 images of manifest paths under a dataset root (CSV rows included)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._csv: dict[str, list[str]] = {}

    def __call__(self, path: str) -> np.ndarray:
        if "#" in path:
            file, row = path.rsplit("#", 1)
            if file not in self._csv:
                csv_path = self.root if self.root.is_file() else self.root / file
                with open(csv_path, newline="") as fh:
                    self._csv[file] = [r["pixels"] for r in csv.DictReader(fh)]
            grey = np.array(self._csv[file][int(row)].split(), dtype=np.uint8)
            side = int(round(len(grey) ** 0.5))
            return np.repeat(grey.reshape(side, side)[:, :, None], 3, axis=2)
        from model.face import load_image
        return load_image(self.root / path)
