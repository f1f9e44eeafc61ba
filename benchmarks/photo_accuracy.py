"""Expression accuracy on labelled photos as a user runs them: every file through
the real CLI, `ipdfer predict` (MTCNN detection, alignment, the served encoders),
the largest face's top label against the photo's label. Prints accuracy, mean
class accuracy, per-class recall, the confusion matrix, photos with no face, and
a constant-prediction control (the majority class).

    .venv/bin/python benchmarks/photo_accuracy.py FOLDER             # FOLDER/<label>/*.jpg
    .venv/bin/python benchmarks/photo_accuracy.py --split muxspace:test   # the committed manifest's rows

Folder labels are any spelling `model/labels.py` knows (angry, anger, happiness,
...); unknown folders are skipped with a line. --split reads the data sets from
--data (default env IPDFER_DATA). Mean class accuracy counts classes with at
least --min-class photos (the others are shown, marked).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from model.data import manifests as mf  # noqa: E402
from model.data.sources import IMAGE_EXTS, find_root  # noqa: E402
from model.labels import EXPRESSIONS, canonical  # noqa: E402
from model.paths import MANIFEST_DIR, data_root  # noqa: E402

CLI = [sys.executable, "-m", "service.cli"]


def folder_photos(root: Path) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = canonical(sub.name)
        if label is None:
            print(f"skipped {sub.name}/: not an expression label")
            continue
        found = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        files += found
        labels += [EXPRESSIONS.index(label)] * len(found)
    return files, np.array(labels, dtype=np.int64)


def split_photos(name: str, data: Path) -> tuple[list[Path], np.ndarray]:
    dataset, split = name.split(":")
    rows = [r for r in mf.read_manifest(MANIFEST_DIR / f"{dataset}.csv") if r.split == split and r.label]
    root = find_root(dataset, data)
    return [root / r.path for r in rows], np.array([mf.label_index(r) for r in rows], dtype=np.int64)


def predict(files: list[Path], weights: Path, batch: int = 500) -> tuple[np.ndarray, float]:
    """Top label of the largest face per file (-1: no face), and the seconds spent."""
    by_file, t0 = {}, time.perf_counter()
    for a in range(0, len(files), batch):   # keeps command lines short
        out = subprocess.run([*CLI, "predict", "--weights-dir", str(weights), *map(str, files[a:a + batch])],
                             cwd=REPO, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"ipdfer predict failed ({out.returncode}):\n{out.stderr[-2000:]}")
        for line in out.stdout.splitlines():
            rec = json.loads(line)
            faces = rec.get("faces") or []
            if faces:
                big = max(faces, key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))
                by_file[rec["file"]] = EXPRESSIONS.index(big["expression"]["label"])
    return np.array([by_file.get(str(f), -1) for f in files]), time.perf_counter() - t0


def report(labels: np.ndarray, pred: np.ndarray, min_class: int) -> dict:
    counted = [k for k in range(len(EXPRESSIONS)) if (labels == k).sum() >= min_class]
    recall = {EXPRESSIONS[k]: float((pred[labels == k] == k).mean()) for k in range(len(EXPRESSIONS))
              if (labels == k).any()}
    return {"n": int(len(labels)), "accuracy": float((pred == labels).mean()),
            "mean_class_accuracy": float(np.mean([recall[EXPRESSIONS[k]] for k in counted])),
            "classes_counted": [EXPRESSIONS[k] for k in counted], "recall": recall}


def confusion(labels: np.ndarray, pred: np.ndarray) -> str:
    present = [k for k in range(len(EXPRESSIONS)) if (labels == k).any()]
    head = "true \\ predicted".ljust(18) + "".join(c[:8].rjust(9) for c in EXPRESSIONS) + "  no face"
    lines = [head]
    for k in present:
        row = pred[labels == k]
        lines.append(EXPRESSIONS[k].ljust(18) + "".join(f"{int((row == j).sum()):9d}" for j in range(len(EXPRESSIONS)))
                     + f"{int((row < 0).sum()):9d}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", nargs="?", type=Path, help="photos in <folder>/<label>/ sub-folders")
    ap.add_argument("--split", help="a data set split of the committed manifests instead, e.g. muxspace:test")
    ap.add_argument("--data", type=Path, default=data_root(), help="datasets folder for --split (env IPDFER_DATA)")
    ap.add_argument("--weights", type=Path, default=REPO / "weights")
    ap.add_argument("--min-class", type=int, default=30, help="photos a class needs to count in the mean")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if bool(args.folder) == bool(args.split):
        ap.error("give a FOLDER or --split, not both")
    if args.split and args.data is None:
        ap.error("--split reads the data sets: pass --data DIR or set IPDFER_DATA")
    files, labels = folder_photos(args.folder) if args.folder else split_photos(args.split, args.data)
    if not files:
        sys.exit("no labelled photos found")
    pred, seconds = predict(files, args.weights.resolve())
    found = pred >= 0
    rep = report(labels, pred, args.min_class)
    control = report(labels, np.full_like(labels, np.bincount(labels).argmax()), args.min_class)
    print(f"weights {args.weights}  photos {len(files)}  no face {int((~found).sum())}  "
          f"{seconds:.0f} s ({len(files) / seconds:.1f} photos/s incl. start-up)")
    print(f"accuracy {rep['accuracy']:.4f}  mean class accuracy {rep['mean_class_accuracy']:.4f} "
          f"over {', '.join(rep['classes_counted'])} (>= {args.min_class} photos)")
    print(f"control (always {EXPRESSIONS[int(np.bincount(labels).argmax())]}): accuracy {control['accuracy']:.4f}  "
          f"mean class accuracy {control['mean_class_accuracy']:.4f}")
    print("recall  " + "  ".join(f"{c} {v:.3f} ({int((labels == EXPRESSIONS.index(c)).sum())})"
                                 + ("" if c in rep["classes_counted"] else "*") for c, v in rep["recall"].items()))
    print(confusion(labels, pred))
    if args.json:
        args.json.write_text(json.dumps({"photos": rep, "control": control, "no_face": int((~found).sum())}, indent=2))


if __name__ == "__main__":
    main()
