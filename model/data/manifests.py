"""Manifests: the rows every dataset becomes, the split and dedup rules, the files.

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
"""
from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from model.fileio import atomic_write_text
from model.labels import EXPRESSIONS

MANIFEST_FIELDS = ("dataset", "path", "label", "contempt", "subject", "sha256", "split")
SPLITS = ("train", "val", "test")
SEED = 20240613                       # every seeded split in this module
SUBJECT_FRACTIONS = (0.70, 0.15, 0.15)  # train / val / test share of the images
HOLDOUT_VAL = 0.10                    # val carved from train where a set has none
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
# 1. Splits and duplicates
# ---------------------------------------------------------------------------

def hash_key(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def split_groups(sizes: dict[str, int], fractions: tuple[float, float, float] = SUBJECT_FRACTIONS,
                 seed: int = SEED) -> dict[str, str]:
    """Assign whole groups (subjects) to train/val/test so that ~`fractions` of the
    images land in each. Groups are ordered by a seeded hash of their name (stable
    whatever the platform) and cut where the running image count crosses the
    fractions (a group goes where its middle image falls)."""
    order = sorted(sizes, key=lambda g: (hash_key(seed, g), g))
    total = sum(sizes.values()) or 1
    bounds = np.cumsum(fractions)
    out, seen = {}, 0
    for g in order:
        mid = (seen + sizes[g] / 2) / total
        out[g] = SPLITS[min(int(np.searchsorted(bounds, mid, side="right")), 2)]
        seen += sizes[g]
    return out


def holdout_val(rows: list[Row], fraction: float = HOLDOUT_VAL, seed: int = SEED) -> list[Row]:
    """Move a seeded `fraction` of train rows to val (by subject when known, else by
    content hash, so copies move together)."""
    out = []
    for r in rows:
        key = r.subject or r.sha256
        if r.split == "train" and hash_key(seed, key) % 10_000 < fraction * 10_000:
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


def finish(rows: list[Row], dropped: Iterable[Drop] = ()) -> Manifest:
    """Deduplicate `rows`; the drops a loader already made come first."""
    m = dedup(rows)
    m.dropped = sorted([*dropped, *m.dropped], key=lambda d: (d.path, d.reason))
    return m


# ---------------------------------------------------------------------------
# 3. Manifest files, and the cache order
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
    atomic_write_text(path, text)
    return True


def read_manifest(path: Path) -> list[Row]:
    with open(path, newline="") as fh:
        return [Row(r["dataset"], r["path"], r["label"], r["contempt"] == "1", r["subject"],
                    r["sha256"], r["split"]) for r in csv.DictReader(fh)]


def label_index(row: Row) -> int:
    """0..6 in EXPRESSIONS order, -1 for contempt / unlabeled."""
    return EXPRESSIONS.index(row.label) if row.label else -1


def manifest_digest(rows: list[Row]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update("\t".join(r.as_csv().values()).encode() + b"\n")
    return h.hexdigest()


def ordered(rows: list[Row]) -> list[Row]:
    """Cache order: split by split (train, val, test), by path inside a split."""
    rank = {s: i for i, s in enumerate(SPLITS)}
    return sorted(rows, key=lambda r: (rank[r.split], r.path))
