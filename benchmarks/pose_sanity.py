"""Sanity of the pose pseudo-labels (model/faces/pose.py) on real images.

    .venv/bin/python benchmarks/pose_sanity.py [--data-root ../shared/data] [--n 400] [--json out.json]

For each data set, every sampled image and its left-right mirror image go through
the same detection as `ipdfer prepare` (model.faces.preprocess.CropLocator); where
both are detected:
- mirror consistency: yaw and roll should change sign and pitch stay, so report
  mean |yaw + yaw_mirrored|, mean |pitch - pitch_mirrored|, mean |roll + roll_mirrored|
  (these measure landmark noise: the estimator itself is exactly mirror-symmetric,
  shown by the `geometry` column: mirrored landmarks, no re-detection);
- frontal check: median |yaw| (CK+ are posed frontal portraits: should be small).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model.images import load_image  # noqa: E402
from model.faces.pose import estimate_pose, flip_landmarks  # noqa: E402
from model.faces.preprocess import CropLocator  # noqa: E402
from model.faces.preprocess import SOURCE_FALLBACK  # noqa: E402

SETS = {"ckplus": "ckplus48/*/*.png", "muxspace": "muxspace/images/*.jpg", "fer2013": "fer2013/test/*/*.jpg"}


def detector() -> CropLocator:
    return CropLocator(batch_size=64)   # detection only: no identity network


def measure(files: list[Path], worker: CropLocator) -> dict:
    images = [load_image(f) for f in files]
    wh = np.array([[im.shape[1], im.shape[0]] for im in images])
    a = worker.locate(images)
    b = worker.locate([np.ascontiguousarray(im[:, ::-1]) for im in images])
    ok = np.array([x["source"] != SOURCE_FALLBACK and y["source"] != SOURCE_FALLBACK for x, y in zip(a, b)])
    lm = np.stack([x["landmarks"] for x in a])[ok]
    lm_f = np.stack([y["landmarks"] for y in b])[ok]
    pose, pose_f = estimate_pose(lm, wh[ok]), estimate_pose(lm_f, wh[ok])
    geo = estimate_pose(np.stack([flip_landmarks(p, w) for p, (w, _) in zip(lm, wh[ok])]), wh[ok])
    r = lambda v: round(float(v), 2)  # noqa: E731
    return {
        "images": len(files), "both_detected": int(ok.sum()),
        "yaw_plus_yaw_mirrored_mean_abs": r(np.abs(pose[:, 0] + pose_f[:, 0]).mean()),
        "pitch_minus_pitch_mirrored_mean_abs": r(np.abs(pose[:, 1] - pose_f[:, 1]).mean()),
        "roll_plus_roll_mirrored_mean_abs": r(np.abs(pose[:, 2] + pose_f[:, 2]).mean()),
        "geometry_only_max_abs_error": r(np.abs(geo - pose * np.array([-1, 1, -1])).max()),
        "median_abs_yaw": r(np.median(np.abs(pose[:, 0]))),
        "p90_abs_yaw": r(np.percentile(np.abs(pose[:, 0]), 90)),
        "median_pitch": r(np.median(pose[:, 1])),
        "median_abs_roll": r(np.median(np.abs(pose[:, 2]))),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--n", type=int, default=400, help="images sampled per data set (seeded)")
    p.add_argument("--datasets", default="ckplus,muxspace,fer2013")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(1)  # MTCNN's tiny ops: 1 thread is cheaper on a busy 2-core machine
    worker, out = detector(), {}
    for name in args.datasets.split(","):
        files = sorted(args.data_root.glob(SETS[name]))
        random.Random(0).shuffle(files)
        t0 = time.time()
        out[name] = measure(sorted(files[:args.n]), worker)
        out[name]["seconds"] = round(time.time() - t0, 1)
        print(name, json.dumps(out[name]), flush=True)
    print()
    cols = ["both_detected", "yaw_plus_yaw_mirrored_mean_abs", "pitch_minus_pitch_mirrored_mean_abs",
            "roll_plus_roll_mirrored_mean_abs", "geometry_only_max_abs_error", "median_abs_yaw", "p90_abs_yaw"]
    print("| data set | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, v in out.items():
        print(f"| {name} | " + " | ".join(str(v[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
