"""Neutral renders of real photos against the same people's real neutral photos
(identity rank-1 and impostor rate, closer-than-input, sharpness, judged neutral,
residue energy in the expression regions, render speed), each with its control.
The measure itself is model/training/neutral_check.py (also `ipdfer evaluate --neutral-photos`).

    .venv/bin/python benchmarks/neutral_render.py --judge weights/judge --out weights/report
"""
from __future__ import annotations

import argparse
from pathlib import Path

from model.inference import Analyzer
from model.training.neutral_check import neutral_photo_check
from model.weights import DEFAULT_WEIGHTS_DIR, load_weights

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    ap.add_argument("--judge", type=Path, required=True,
                    help="weights of a separately trained expression classifier (e.g. weights/judge)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                    help="folder holding data/muxspace")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, help="write neutral_photos.json and a picture grid here")
    args = ap.parse_args()
    judge = load_weights(args.judge)
    print(f"judge: {judge.manifest['name']} {judge.manifest['version']} ({args.judge})")
    neutral_photo_check(Analyzer.load(args.weights, device="cpu"), judge.model.eval(),
                        args.shared / "data" / "muxspace", split=args.split, out=args.out)


if __name__ == "__main__":
    main()
