"""FER2013 PrivateTest as a user sends it: the deduplicated test crops (the
committed manifest's fer2013 `test` rows, 3,293 files) through the real CLI,
`ipdfer predict --aligned`, against `ipdfer evaluate` on the prepare cache for
the same weights. Prints accuracy, mean class accuracy and per-class accuracy of
both, the gap, a constant-prediction control, and the expected calibration error
of the served probabilities (--reliability PNG draws the diagram).

    .venv/bin/python benchmarks/fer2013_crops.py [--weights weights] [--data DIR] [--limit N]

--data is the folder holding `fer2013/` (default: `ipdfer prepare`'s data root, $IPDFER_DATA).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from model.data import manifests as mf
from model.labels import EXPRESSIONS  # noqa: E402
from model.paths import MANIFEST_DIR, data_root  # noqa: E402
from model.training.calibrate import expected_calibration_error, reliability_diagram  # noqa: E402

CLI = [sys.executable, "-m", "service.cli"]


def report(labels: np.ndarray, pred: np.ndarray) -> dict:
    per = {c: float((pred[labels == k] == k).mean()) for k, c in enumerate(EXPRESSIONS) if (labels == k).any()}
    return {"n": int(len(labels)), "accuracy": float((pred == labels).mean()),
            "mean_class_accuracy": float(np.mean(list(per.values()))), "per_class": per}


def predict_aligned(files: list[Path], weights: Path) -> tuple[np.ndarray, float, np.ndarray]:
    """Top label per file from `ipdfer predict --aligned` (-1: no answer), the
    seconds it took, and the served probabilities (N, 7; NaN: no answer)."""
    t0 = time.perf_counter()
    out = subprocess.run([*CLI, "predict", "--aligned", "--batch-size", "64", "--weights-dir", str(weights),
                          *map(str, files)], cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"ipdfer predict failed ({out.returncode}):\n{out.stderr[-2000:]}")
    by_file, probs = {}, {}
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        faces = rec.get("faces") or []
        by_file[rec["file"]] = EXPRESSIONS.index(faces[0]["expression"]["label"]) if faces else -1
        if faces:
            probs[rec["file"]] = [faces[0]["expression"]["probabilities"][c] for c in EXPRESSIONS]
    nan = [float("nan")] * len(EXPRESSIONS)
    return (np.array([by_file.get(str(f), -1) for f in files]), seconds,
            np.array([probs.get(str(f), nan) for f in files], dtype=np.float64))


def evaluate_cache(weights: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [*CLI, "evaluate", "--weights", str(weights), "--split", "fer2013:test", "--out", tmp]
        subprocess.run(args, cwd=REPO, check=True, capture_output=True, text=True)
        rep = json.loads((Path(tmp) / "metrics.json").read_text())["splits"]["fer2013:test"]
    return {"n": rep["n"], "accuracy": rep["accuracy"], "mean_class_accuracy": rep["mean_class_accuracy"],
            "per_class": rep["per_class_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=REPO / "weights")
    ap.add_argument("--data", type=Path, default=data_root(), help="datasets folder (default: env IPDFER_DATA)")
    ap.add_argument("--limit", type=int, help="a seeded sample of N test rows (a quick check; skips the cache comparison)")
    ap.add_argument("--reliability", type=Path, metavar="PNG", help="write a reliability diagram here")
    args = ap.parse_args()
    rows = [r for r in mf.read_manifest(MANIFEST_DIR / "fer2013.csv") if r.split == "test"]
    if args.limit:  # a seeded sample across classes
        rows = [rows[i] for i in sorted(np.random.default_rng(0).choice(len(rows), args.limit, replace=False))]
    files = [args.data / "fer2013" / r.path for r in rows]
    labels = np.array([mf.label_index(r) for r in rows])
    pred, seconds, probs = predict_aligned(files, args.weights.resolve())
    crops = report(labels, pred)
    cache = None if args.limit else evaluate_cache(args.weights.resolve())  # the cache has all 3,293
    majority = np.bincount(labels).argmax()
    control = report(labels, np.full_like(labels, majority))
    print(f"weights {args.weights}  files {len(files)}  no answer {int((pred < 0).sum())}  "
          f"predict --aligned {seconds:.0f} s ({len(files) / seconds:.0f} crops/s incl. start-up)")
    print(f"{'':28}{'accuracy':>9}{'mean class':>11}  " + " ".join(f"{c[:7]:>7}" for c in EXPRESSIONS))
    for name, r in (("ipdfer predict --aligned", crops), ("ipdfer evaluate (cache)", cache),
                    (f"constant '{EXPRESSIONS[majority]}'", control)):
        if r is None:
            continue
        print(f"{name:28}{r['accuracy']:9.4f}{r['mean_class_accuracy']:11.4f}  "
              + " ".join(f"{r['per_class'].get(c, float('nan')):7.3f}" for c in EXPRESSIONS))
    if cache:
        print(f"gap predict --aligned - evaluate: {100 * (crops['accuracy'] - cache['accuracy']):+.2f} points")
    answered = ~np.isnan(probs).any(1)
    ece = expected_calibration_error(probs[answered], labels[answered])
    print(f"expected calibration error (15 bins, served probabilities): {ece:.4f}; mean top-1 probability "
          f"{probs[answered].max(1).mean():.4f} vs accuracy {(probs[answered].argmax(1) == labels[answered]).mean():.4f}")
    if args.reliability:
        reliability_diagram(probs[answered], labels[answered], args.reliability,
                            f"FER2013 PrivateTest ({answered.sum()} crops), ipdfer predict --aligned")
        print(f"reliability diagram: {args.reliability}")


if __name__ == "__main__":
    main()
