"""Re-record tests/golden/predictions.json (and with --prepare, prepare.json) from
the current code, for an intended change only (say which in tests/test_golden.py's
docstring and the commit):

    .venv/bin/python -m tests.golden.record_predictions [--prepare] [--shared ../shared]

Same images, same fields, same conditions as the tests (fp32, one thread)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.serving.analyzer import Analyzer, ImageRequest
from tests.test_golden import GOLDEN, REPO, _images, block_means, neutral_blocks


def record(weights: str, images: list[tuple[str, bool, str]], data: Path) -> dict:
    analyzer = Analyzer.load(REPO / weights, device="cpu", precision="fp32")
    arrays = [np.asarray(Image.open(data / rel).convert("RGB")) for _, _, rel in images]
    results = analyzer.analyze([ImageRequest(array, aligned=a, neutral=True)
                                for array, (_, a, _) in zip(arrays, images)]).images
    out = {}
    for (key, _, _), result in zip(images, results):
        entries = []
        for face in result.faces:
            entries.append({**face.to_dict(), "neutral_8x8": neutral_blocks(face).tolist()})
        out[key] = {"detected": result.detected, "faces": entries}
    return out


def record_prepare(data: Path) -> None:
    from model.data import sources as ds
    from model.data.features import FaceWorker, align_all
    path = GOLDEN.parent / "prepare.json"
    golden = json.loads(path.read_text())
    reader = ds.ImageReader(data / "fer2013")
    images = [reader(p) for p in golden["paths"]]
    f = FaceWorker().features(images)
    golden.update({k: np.asarray(f[k]).tolist() for k in ("source", "landmarks", "pose", "identity")})
    golden["faces64_8x8"] = [np.round(block_means(x), 3).tolist() for x in align_all(images, f["landmarks"], 64)]
    path.write_text(json.dumps(golden) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("IPDFER_SHARED", REPO.parent / "shared")))
    ap.add_argument("--prepare", action="store_true", help="also re-record prepare.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.prepare:
        record_prepare(args.shared / "data")
    golden = json.loads(GOLDEN.read_text())
    for weights in ("weights", "weights/judge"):
        golden[weights] = record(weights, _images(golden[weights]), args.shared / "data")
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
