"""Face verification with our own pipeline (MTCNN + 5-point chip + the dlib
ResNet port) on LFW people in the muxspace data set (`ipdfer prepare`'s data root): accuracy at dlib's
threshold 0.6 over N same-person and N different-person pairs (fixed seed).

    .venv/bin/python benchmarks/identity_verification.py [--pairs 1000]

dlib's own pipeline (HOG detector, its 5-point chips) reaches 98.6% on these
crops (measured once on this project's development machine)."""
from __future__ import annotations

import argparse
import random
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model import faces as facelib
from model.images import load_image
from model.faces.identity import IDENTITY_THRESHOLD, load_identity_encoder

LFW_NAME = re.compile(r"^(?P<person>.+)_(?P<num>\d{4})\.jpg$")


def sample_pairs(names: list[str], n: int, seed: int) -> tuple[list, list]:
    people: dict[str, list[str]] = defaultdict(list)
    for name in sorted(names):
        m = LFW_NAME.match(name)
        if m:
            people[m["person"]].append(name)
    multi = [p for p, files in people.items() if len(files) >= 2]
    rng = random.Random(seed)
    same, seen = [], set()
    while len(same) < n:
        a, b = rng.sample(people[rng.choice(multi)], 2)
        if (a, b) not in seen and (b, a) not in seen:
            seen.add((a, b)), same.append((a, b))
    everyone = sorted(people)
    diff = []
    while len(diff) < n:
        p, q = rng.sample(everyone, 2)
        diff.append((rng.choice(people[p]), rng.choice(people[q])))
    return same, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-face-size", type=int, default=40,
                    help="MTCNN's smallest face (the service's IPDFER_MIN_FACE_SIZE, default 40; 20 before)")
    args = ap.parse_args()
    image_dir = args.shared / "data" / "muxspace" / "images"
    same, diff = sample_pairs([p.name for p in image_dir.iterdir()], args.pairs, args.seed)
    files = sorted({f for pair in same + diff for f in pair})

    detector = facelib.FaceDetector(min_face_size=args.min_face_size)
    encoder = load_identity_encoder()
    t0 = time.time()
    chips, missed = {}, 0
    for name in tqdm(files, desc="detect+chip"):
        image = load_image(image_dir / name)
        dets = detector.detect([image])[0]
        if dets:
            landmarks = dets[0].landmarks
        else:  # tight crops: the centre of the image is the face
            missed += 1
            landmarks = facelib.center_landmarks(image.shape)
        chips[name] = facelib.dlib_chip(image, landmarks)
    descriptors = {}
    names = list(chips)
    with torch.inference_mode():
        for s in tqdm(range(0, len(names), 32), desc="identity"):
            batch = names[s:s + 32]
            x = torch.from_numpy(np.stack([chips[n] for n in batch])).permute(0, 3, 1, 2).float()
            for n, d in zip(batch, encoder(x).numpy()):
                descriptors[n] = d
    dist = lambda a, b: float(np.linalg.norm(descriptors[a] - descriptors[b]))  # noqa: E731
    same_d = np.array([dist(a, b) for a, b in same])
    diff_d = np.array([dist(a, b) for a, b in diff])
    tp, tn = (same_d < IDENTITY_THRESHOLD).mean(), (diff_d >= IDENTITY_THRESHOLD).mean()
    acc = (tp * len(same_d) + tn * len(diff_d)) / (len(same_d) + len(diff_d))
    print(f"images: {len(files)}  no face detected (centre-crop fallback): {missed}  "
          f"time: {time.time() - t0:.0f}s")
    print(f"same-person pairs: {len(same_d)}  accepted: {tp:.2%}  median distance {np.median(same_d):.3f}")
    print(f"different-person pairs: {len(diff_d)}  rejected: {tn:.2%}  median distance {np.median(diff_d):.3f}")
    print(f"verification accuracy at threshold {IDENTITY_THRESHOLD}: {acc:.2%}")


if __name__ == "__main__":
    main()
