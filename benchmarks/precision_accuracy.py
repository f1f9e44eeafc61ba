"""Does a numeric precision (or skipping the mirror pass) change predictions?
FER2013 PrivateTest through the service's own path for face crops (`Analyzer`,
aligned=True, as `ipdfer predict --aligned` runs it), once per variant, in one
run: accuracy, agreement of the top label with the first variant, largest
probability difference, and encoder time. A variant is a precision, with
`-noflip` for `flip_tta=False` (IPDFER_FLIP_TTA=false; not with int8, whose graph
is the encoders as served). int8 runs on the CPU whatever the device.

    .venv/bin/python benchmarks/precision_accuracy.py [--data ../shared/data] [--weights weights] [--precisions fp32,bf16,int8,fp32-noflip]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from model.images import load_image
from model.inference import Analyzer
from model.labels import EXPRESSIONS, canonical

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("IPDFER_DATA", REPO.parent / "shared" / "data")),
                    help="folder holding fer2013/test/<emotion>/PrivateTest_*.jpg")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16, int8, each but int8 optionally -noflip")
    ap.add_argument("--weights", type=Path, help="weights folder (default: the package's weights/)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, help="at most N images")
    args = ap.parse_args()
    files = sorted((args.data / "fer2013" / "test").glob("*/PrivateTest_*.jpg"))[:args.limit]
    if not files:
        raise SystemExit(f"no FER2013 PrivateTest images under {args.data}")
    labels = np.array([EXPRESSIONS.index(canonical(f.parent.name)) for f in files])
    images = [load_image(f) for f in files]
    probs, poses, seconds = {}, {}, {}
    for precision in args.precisions.split(","):
        name = precision.removesuffix("-noflip")
        analyzer = Analyzer.load(args.weights, device="cpu" if name == "int8" else None, precision=name,
                                 flip_tta=False if precision.endswith("-noflip") else None)
        analyzer.warmup()
        out, pose, t = [], [], 0.0
        for s in range(0, len(images), args.batch):
            chunk = images[s:s + args.batch]
            faces = analyzer.analyze(chunk, aligned=[True] * len(chunk), max_faces=[1] * len(chunk),
                                     neutral=[False] * len(chunk))
            t += analyzer.last_timings["encode_s"]
            out += [[face[0].probabilities[c] for c in EXPRESSIONS] for face in faces]
            pose += [list(face[0].pose.values()) for face in faces]
        probs[precision], poses[precision], seconds[precision] = np.array(out), np.array(pose), t
    print(f"FER2013 PrivateTest, {len(files)} images, aligned=True, batches of {args.batch}")
    base = next(iter(probs))
    for precision, p in probs.items():
        top = p.argmax(1)
        print(f"{precision:>5}: accuracy {np.mean(top == labels):.2%}, top label = {base}'s {np.mean(top == probs[base].argmax(1)):.2%}, "
              f"max |p - p_{base}| {np.abs(p - probs[base]).max():.4f}, "
              f"pose |Δ| mean {np.abs(poses[precision] - poses[base]).mean():.2f}° max {np.abs(poses[precision] - poses[base]).max():.2f}°, "
              f"encoders {seconds[precision]:.1f} s")


if __name__ == "__main__":
    main()
