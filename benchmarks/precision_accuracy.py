"""Does a numeric precision, or how much of the mirror pass runs, change
predictions? FER2013 crops through the service's own path for face crops
(`Analyzer`, aligned=True, as `ipdfer predict --aligned` runs it), once per
variant, in one run: accuracy, share of faces mirrored, agreement of the top
label with the first variant, largest probability difference, and encoder time.

A variant is a precision (fp32, bf16, fp16, int8), optionally with `@M`, the
mirror margin (IPDFER_MIRROR_MARGIN: 1 = every face mirrored, 0 = none; default
as served), or `-noflip` (IPDFER_FLIP_TTA=false). int8 runs on the CPU whatever
the device. --split public is FER2013 PublicTest, the validation split the
default margin was chosen on; private (default) is the test split.

    .venv/bin/python benchmarks/precision_accuracy.py [--data ../shared/data] [--weights weights] \\
        [--split private|public] [--precisions fp32@1,fp32,int8,fp32-noflip]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from model.nets import mirror
from model.images import load_image
from model.serving.analyzer import Analyzer, ImageRequest
from model.labels import EXPRESSIONS, canonical

REPO = Path(__file__).resolve().parents[1]
SPLITS = {"private": "PrivateTest", "public": "PublicTest"}


def load_variant(variant: str, weights: Path | None) -> Analyzer:
    name, _, margin = variant.partition("@")
    precision = name.removesuffix("-noflip")
    return Analyzer.load(weights, device="cpu" if precision == "int8" else None, precision=precision,
                         flip_tta=False if name.endswith("-noflip") else None,
                         mirror_margin=float(margin) if margin else mirror.DEFAULT_MARGIN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("IPDFER_DATA", REPO.parent / "shared" / "data")),
                    help="folder holding fer2013/test/<emotion>/{PrivateTest,PublicTest}_*.jpg")
    ap.add_argument("--precisions", default="fp32@1,fp32",
                    help="comma-separated variants: fp32, bf16, fp16, int8, each with @MARGIN or -noflip")
    ap.add_argument("--split", choices=SPLITS, default="private")
    ap.add_argument("--weights", type=Path, help="weights folder (default: the package's weights/)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, help="at most N images")
    args = ap.parse_args()
    split = SPLITS[args.split]
    files = sorted((args.data / "fer2013" / "test").glob(f"*/{split}_*.jpg"))[:args.limit]
    if not files:
        raise SystemExit(f"no FER2013 {split} images under {args.data}")
    labels = np.array([EXPRESSIONS.index(canonical(f.parent.name)) for f in files])
    images = [load_image(f) for f in files]
    probs, poses, seconds, mirrored = {}, {}, {}, {}
    for variant in args.precisions.split(","):
        analyzer = load_variant(variant, args.weights)
        analyzer.warmup()
        out, pose, t, m = [], [], 0.0, 0
        for s in range(0, len(images), args.batch):
            chunk = images[s:s + args.batch]
            analysis = analyzer.analyze([ImageRequest(image, aligned=True, max_faces=1) for image in chunk])
            t, m = t + analysis.timings["encode_s"], m + analysis.mirrored
            out += [[r.faces[0].probabilities[c] for c in EXPRESSIONS] for r in analysis.images]
            pose += [list(r.faces[0].pose.values()) for r in analysis.images]
        probs[variant], poses[variant], seconds[variant] = np.array(out), np.array(pose), t
        mirrored[variant] = m / len(images)
    print(f"FER2013 {split}, {len(files)} images, aligned=True, batches of {args.batch}")
    base = next(iter(probs))
    for variant, p in probs.items():
        top = p.argmax(1)
        print(f"{variant:>11}: accuracy {np.mean(top == labels):.2%}, mirrored {mirrored[variant]:.1%}, "
              f"top label = {base}'s {np.mean(top == probs[base].argmax(1)):.2%}, "
              f"max |p - p_{base}| {np.abs(p - probs[base]).max():.4f} (mean of per-face max "
              f"{np.abs(p - probs[base]).max(1).mean():.4f}), "
              f"pose |Δ| mean {np.abs(poses[variant] - poses[base]).mean():.2f}° max "
              f"{np.abs(poses[variant] - poses[base]).max():.2f}°, encoders {seconds[variant]:.1f} s")


if __name__ == "__main__":
    main()
