"""Face detection as served (model/faces/mtcnn.py: bounded work, summed-area
resampling, channels-last networks) against facenet-pytorch's own `detect_face`
with its untouched networks, in one run on the same images, both behind the same
FaceDetector (padding, enlarging, thresholds): faces found, largest landmark
difference, seconds. FER2013 test crops by default (48 px, enlarged 3x before
detection as the service does).

    IPDFER_DATA=/path/to/data .venv/bin/python benchmarks/detection_speed.py [--threads 2]

`--min-face-sizes 20,40` instead compares MTCNN's smallest face size: faces found,
time and landmark movement on FER2013 test crops and muxspace photos.

`--graphs DIR` instead compares the shipped MTCNN graphs (weights/mtcnn/) with
those in DIR (an earlier export copied aside): speed on one thread, interleaved,
faces found and landmark movement.

`--caps` instead compares two `batch_pixels` caps (padded pixels per MTCNN call)
on muxspace photos resized to 224, 448 and 640 px, sent in batches of 8, on one
thread, interleaved three times: why the default is 600,000.

    IPDFER_DATA=/path/to/data .venv/bin/python benchmarks/detection_speed.py --caps
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import cv2
import numpy as np
import torch

from model.faces.detect import FaceDetector
from model.images import load_image
from model.paths import require_data_root


@contextmanager
def facenet_reference(detector: FaceDetector):
    """`detector` running facenet-pytorch's own detect_face and untouched networks
    instead of model/faces/mtcnn.py (FaceDetector imports detect_faces per call)."""
    from facenet_pytorch import MTCNN
    from facenet_pytorch.models.utils.detect_face import detect_face

    import model.faces.mtcnn as served
    plain = MTCNN(keep_all=True, min_face_size=detector.min_face_size)

    def reference(images, _mtcnn, *_bounds):
        boxes, points = detect_face(images, plain.min_face_size, plain.pnet, plain.rnet, plain.onet,
                                    plain.thresholds, plain.factor, plain.device)
        return [(np.asarray(b, float).reshape(-1, 5), np.asarray(p, float).reshape(-1, 5, 2))
                for b, p in zip(boxes, points)]

    ours, served.detect_faces = served.detect_faces, reference
    try:
        yield detector
    finally:
        served.detect_faces = ours


def compare_caps(root, caps=(600_000, 8_000_000)) -> None:
    torch.set_num_threads(1)
    photos = [load_image(f) for f in sorted((root / "muxspace" / "images").glob("*.jpg"))[:64]]
    sets = {side: [cv2.resize(p, (side, side)) for p in photos[:n]] for side, n in ((224, 64), (448, 24), (640, 16))}
    detector = FaceDetector()
    detector.detect(photos[:8])   # warm-up
    for _ in range(3):
        for side, images in sets.items():
            row = []
            for cap in caps:
                detector.batch_pixels = cap
                t0 = time.perf_counter()
                for s in range(0, len(images), 8):
                    detector.detect(images[s:s + 8])
                row.append(f"cap {cap:,}: {1000 * (time.perf_counter() - t0) / len(images):.1f}")
            print(f"{side} px photos, batches of 8, ms an image: " + ", ".join(row), flush=True)


def detect_all(detector: FaceDetector, images: list[np.ndarray], batch: int) -> tuple[list, float]:
    """Every image's faces, sent in batches, and the seconds it took."""
    t0, out = time.perf_counter(), []
    for s in range(0, len(images), batch):
        out += detector.detect(images[s:s + batch])
    return out, time.perf_counter() - t0


def landmark_moves(a: list, b: list) -> list[float]:
    """Largest landmark difference (px) of the best face, per image found by both."""
    return [np.abs(np.asarray(x[0].landmarks) - np.asarray(y[0].landmarks)).max() for x, y in zip(a, b) if x and y]


def compare_min_face(root, folder: str, sizes: list[int], batch: int) -> None:
    """The served detector at each MTCNN min_face_size: faces found and ms an image
    on the folder (FER2013 test crops: 48 px, enlarged 3x) and on muxspace photos
    resized to 224 and 448 px; landmarks against the first size's (median, px)."""
    crops = [load_image(f) for f in sorted((root / folder).rglob("*.jpg"))]
    photos = [load_image(f) for f in sorted((root / "muxspace" / "images").glob("*.jpg"))[:200]]
    sets = {folder: crops, **{f"muxspace {side} px": [cv2.resize(p, (side, side)) for p in photos]
                              for side in (224, 448)}}
    detectors = {m: FaceDetector(min_face_size=m) for m in sizes}
    for name, images in sets.items():
        first = None
        for m, detector in detectors.items():
            detector.detect(images[:batch])  # warm-up
            out, seconds = detect_all(detector, images, batch)
            ms = 1000 * seconds / len(images)
            n = sum(1 for faces in out if faces)
            first = first or out
            moved = landmark_moves(first, out)
            print(f"{name:18s} min face {m:3d}: found {n}/{len(images)} ({n / len(images):.2%}), "
                  f"{ms:.1f} ms an image, landmarks vs min face {sizes[0]}: median "
                  f"{np.median(moved) if moved else float('nan'):.2f} px", flush=True)


def compare_graphs(root, other: Path, folder: str, rounds: int = 3) -> None:
    """The shipped MTCNN graphs (weights/mtcnn/) against those in `other` (e.g. an
    earlier export, copied aside first), one thread, interleaved: ms an image for
    muxspace photos at 224 px alone and in batches of 8; then faces found and the
    largest landmark difference on the folder's images and those photos."""
    import json

    from model.serving.mtcnn_onnx import FOLDER, MANIFEST, OnnxNets
    torch.set_num_threads(1)
    photos = [cv2.resize(load_image(f), (224, 224)) for f in sorted((root / "muxspace" / "images").glob("*.jpg"))[:64]]
    detectors = {}
    for name, graphs in (("shipped", FOLDER), (str(other), other)):
        detectors[name] = FaceDetector(min_face_size=40)
        detectors[name].nets = OnnxNets(json.loads((graphs / MANIFEST).read_text()), graphs)
        for batch in (1, 8):   # warm-up, both batch shapes
            detect_all(detectors[name], photos[:16], batch)
    for _ in range(rounds):
        row = [f"{name} {batch}: {1000 * detect_all(d, photos, batch)[1] / len(photos):.2f}"
               for batch in (1, 8) for name, d in detectors.items()]
        print("224 px photos, ms an image (batch size): " + ", ".join(row), flush=True)
    crops = [load_image(f) for f in sorted((root / folder).rglob("*.jpg"))]
    for label, images in ((folder, crops), ("muxspace 224 px", photos)):
        a, b = (detect_all(d, images, 64)[0] for d in detectors.values())
        n = [sum(1 for faces in out if faces) for out in (a, b)]
        print(f"{label}: faces found {n[0]} vs {n[1]} of {len(images)}, same count in "
              f"{sum(len(x) == len(y) for x, y in zip(a, b))}; largest landmark difference "
              f"{max(landmark_moves(a, b), default=0.0):.1e} px", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", help="datasets folder (default: env IPDFER_DATA)")
    ap.add_argument("--folder", default="fer2013/test", help="images under the data root")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--caps", action="store_true", help="compare batch_pixels caps instead (one thread)")
    ap.add_argument("--min-face-sizes", help="compare MTCNN min_face_size values instead, e.g. 20,40")
    ap.add_argument("--graphs", type=Path, help="compare the shipped MTCNN graphs with those in this folder instead")
    args = ap.parse_args()
    if args.graphs:
        return compare_graphs(require_data_root(args.data_root), args.graphs, args.folder)
    if args.caps:
        return compare_caps(require_data_root(args.data_root))
    torch.set_num_threads(args.threads)
    if args.min_face_sizes:
        return compare_min_face(require_data_root(args.data_root), args.folder,
                                [int(m) for m in args.min_face_sizes.split(",")], args.batch)
    files = sorted((require_data_root(args.data_root) / args.folder).rglob("*.jpg"))
    images = [load_image(f) for f in files]
    print(f"{len(images)} images under {args.folder}, {args.threads} threads, batches of {args.batch}")

    found = {}
    for name in ("served", "facenet-pytorch"):
        with (facenet_reference(FaceDetector()) if name == "facenet-pytorch" else nullcontext(FaceDetector())) as detector:
            detector.detect(images[:args.batch])  # warm-up
            out, seconds = detect_all(detector, images, args.batch)
        found[name] = out
        n = sum(1 for faces in out if faces)
        label = f"served ({detector.nets.runtime})" if name == "served" else name  # MTCNN's runtime: by threads
        print(f"{label:24s} face found {n}/{len(images)} ({n / len(images):.2%})  {seconds:.1f} s "
              f"({1000 * seconds / len(images):.1f} ms an image)")
    a, b = found.values()
    same = sum(bool(x) == bool(y) for x, y in zip(a, b))
    diff = max(landmark_moves(a, b), default=0.0)
    print(f"same found / not found: {same}/{len(images)}; largest landmark difference {diff:.1e} px")


if __name__ == "__main__":
    main()
