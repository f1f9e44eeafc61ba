"""`ipdfer detect IMAGE...`: faces found by the shared pipeline, one JSON object
per image (JSON lines). An unreadable image gets an error object, not a crash."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.faces.detect import FaceDetector
from model.images import PHOTO_MIN_FACE_SIZE, ImageError, load_image


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--min-score", type=float, default=0.9, help="detection score threshold")
    p.add_argument("--min-face-size", type=int, default=PHOTO_MIN_FACE_SIZE,
                   help=f"smallest face looked for, px (default {PHOTO_MIN_FACE_SIZE}, as the service; 20 finds "
                        "smaller faces, slower)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    detector = FaceDetector(device=args.device, min_score=args.min_score, min_face_size=args.min_face_size)
    failed = 0
    for path in args.images:
        try:
            image = load_image(path)
            faces = [d.to_dict() for d in detector.detect([image])[0]]
            record = {"file": str(path), "width": image.shape[1], "height": image.shape[0], "faces": faces}
        except (ImageError, OSError) as exc:
            failed += 1
            record = {"file": str(path), "error": str(exc)}
        print(json.dumps(record), flush=True)
    return 1 if failed == len(args.images) else 0
