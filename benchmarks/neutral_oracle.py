"""What the neutral check's "closer than the input" can reward: oracle edits of
the expression regions (eye/brow and mouth boxes, feathered) of each expressive
photo, scored exactly like a render, against the same person's *other* real
neutral photos (people with at least two; the source photo is left out):

- the regions of one of the person's own real neutral photos (intensity matched):
  a perfect, person-specific local neutralisation;
- the regions of another person's neutral photo: a generic neutral face;
- the input's own regions blurred (Gaussian, sigma 2): no neutralisation at all.

If the first is no better than the others, the measure cannot tell a neutralising
edit from none at this data's pose and lighting differences.

`--geometry` adds a measure that pixels' pose and lighting do not sway: MTCNN's
five points found again on each aligned crop, as mouth width, mouth height below
the eyes and below the nose (in eye distances); an edit (or the shipped model's
neutral render) counts as closer when its geometry is nearer the mean of the
person's other neutral photos' than the input's is. Same photos, same oracles.

    .venv/bin/python benchmarks/neutral_oracle.py [--split test|val] [--geometry]
"""
from __future__ import annotations

import argparse
import random
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from model import faces as facelib
from model.images import load_image
from model.serving.analyzer import Analyzer, ImageRequest
from model.training import neutral_check as nc

REPO = Path(__file__).resolve().parents[1]


def geometry(detector: facelib.FaceDetector, crops: list[np.ndarray]) -> list[np.ndarray | None]:
    """Per aligned crop: mouth width, mouth-corner midpoint below the eyes and below
    the nose, in eye distances, from MTCNN's points found on the crop (None: no face)."""
    out = []
    for faces in detector.detect([np.clip(c, 0, 255).astype(np.uint8) for c in crops]):
        if not faces:
            out.append(None)
            continue
        left_eye, right_eye, nose, left_mouth, right_mouth = facelib.largest_face(faces).landmarks
        eyes = np.linalg.norm(right_eye - left_eye)
        mouth = (left_mouth + right_mouth) / 2
        out.append(np.array([np.linalg.norm(right_mouth - left_mouth), mouth[1] - (left_eye[1] + right_eye[1]) / 2,
                             mouth[1] - nose[1]]) / eyes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder holding data/muxspace")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--geometry", action="store_true", help="also the five-point geometry measure, with renders")
    args = ap.parse_args()
    root = args.shared / "data" / "muxspace"
    analyzer = Analyzer.load(device="cpu")
    people = nc.people_with_both(nc.MANIFEST, args.split)

    crops: dict[str, np.ndarray] = {}   # the crops the renderer edits, aligned the same way
    renders: dict[str, np.ndarray] = {}  # the shipped model's neutral renders (--geometry)
    for v in people.values():
        paths = v["neutral"] + v["expressive"]
        results = analyzer.analyze([ImageRequest(load_image(root / p), max_faces=1) for p in paths]).images
        for p, r in zip(paths, results):
            if r.faces:
                crops[p] = analyzer._large(r.faces[0].state).astype(np.float64)
        if args.geometry:
            done = [(p, r.faces[0].state) for p, r in zip(paths, results) if p in v["expressive"] and r.faces]
            if done:
                for (p, _), img in zip(done, analyzer._render([st for _, st in done])[0]):
                    renders[p] = img.astype(np.float64)
    size = next(iter(crops.values())).shape[0]
    regions = facelib.expression_regions(size)
    weight = cv2.GaussianBlur(regions.astype(np.float64), (0, 0), 2)
    refs = {person: [crops[p] for p in v["neutral"] if p in crops] for person, v in people.items()}
    others = [person for person in people if refs[person]]

    def matched(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        a, b = src[regions], dst[regions]
        return (src - a.mean()) / (a.std() + 1e-6) * b.std() + b.mean()

    detector = facelib.FaceDetector(min_face_size=40)
    rng = random.Random(args.seed)
    closer, nearer, unmeasured = defaultdict(list), defaultdict(list), 0
    for person, v in people.items():
        own = refs[person]
        if len(own) < 2:
            continue
        for p in (p for p in v["expressive"] if p in crops):
            inp = crops[p]
            j = rng.randrange(len(own))
            evaluation = [r for i, r in enumerate(own) if i != j]
            c_in = np.mean([nc.correlation(inp, r) for r in evaluation])
            other = rng.choice(refs[rng.choice([q for q in others if q != person])])
            sources = {"the person's own neutral photo": matched(own[j], inp),
                       "another person's neutral photo": matched(other, inp),
                       "the input blurred (no neutralisation)": cv2.GaussianBlur(inp, (0, 0), 2)}
            edits = {name: inp * (1 - weight) + src * weight for name, src in sources.items()}
            for name, edit in edits.items():
                closer[name].append(np.mean([nc.correlation(edit, r) for r in evaluation]) > c_in)
            if not args.geometry:
                continue
            edits["(the shipped model's neutral render)"] = renders[p]
            names = list(edits)
            shapes = geometry(detector, [inp, *edits.values(), *evaluation])
            g_in, g_edits, g_refs = shapes[0], shapes[1:1 + len(names)], [g for g in shapes[1 + len(names):] if g is not None]
            if g_in is None or not g_refs or any(g is None for g in g_edits):
                unmeasured += 1
                continue
            target = np.mean(g_refs, axis=0)
            for name, g in zip(names, g_edits):
                nearer[name].append(np.linalg.norm(g - target) < np.linalg.norm(g_in - target))
    n = len(next(iter(closer.values())))
    print(f"muxspace {args.split}: {n} expressive photos of people with 2+ neutral photos; "
          f"expression regions {regions.mean():.1%} of the {size} px crop")
    for name, v in closer.items():
        print(f"regions replaced by {name:40s} closer than the input: {np.mean(v):.1%}")
    if args.geometry:
        print(f"five-point geometry ({len(next(iter(nearer.values())))} photos; {unmeasured} left out: no face "
              f"found on the input or an edit, or on none of the person's other neutral photos): nearer the "
              f"person's neutral geometry than the input's")
        for name, v in nearer.items():
            print(f"  {name:48s} {np.mean(v):.1%}")


if __name__ == "__main__":
    main()
