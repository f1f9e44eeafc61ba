"""Face detection as served (MTCNN channels-last after its first layer) against
facenet-pytorch's layout (NCHW throughout), in one run on the same images:
faces found, largest landmark difference, seconds. FER2013 test crops by default
(48 px, enlarged 3x before detection as the service does).

    IPDFER_DATA=/path/to/data .venv/bin/python benchmarks/detection_speed.py [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model.faces.detect import FaceDetector
from model.images import load_image
from model.paths import require_data_root


def nchw(detector: FaceDetector) -> FaceDetector:
    """The same detector with facenet-pytorch's own NCHW pooling put back."""
    for net in (detector.mtcnn.pnet, detector.mtcnn.rnet, detector.mtcnn.onet):
        p = net.pool1
        net.pool1 = torch.nn.MaxPool2d(p.kernel_size, p.stride, p.padding, p.dilation, p.return_indices,
                                       p.ceil_mode)
    return detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", help="datasets folder (default: env IPDFER_DATA)")
    ap.add_argument("--folder", default="fer2013/test", help="images under the data root")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted((require_data_root(args.data_root) / args.folder).rglob("*.jpg"))
    images = [load_image(f) for f in files]
    print(f"{len(images)} images under {args.folder}, {args.threads} threads, batches of {args.batch}")

    found = {}
    for name, detector in (("served (channels-last)", FaceDetector()), ("NCHW", nchw(FaceDetector()))):
        t0, out = time.perf_counter(), []
        for s in range(0, len(images), args.batch):
            out += detector.detect(images[s:s + args.batch])
        seconds = time.perf_counter() - t0
        found[name] = out
        n = sum(1 for faces in out if faces)
        print(f"{name:24s} face found {n}/{len(images)} ({n / len(images):.2%})  {seconds:.1f} s "
              f"({1000 * seconds / len(images):.1f} ms an image)")
    a, b = found.values()
    same = sum(bool(x) == bool(y) for x, y in zip(a, b))
    diff = max((np.abs(np.asarray(x[0].landmarks) - np.asarray(y[0].landmarks)).max()
                for x, y in zip(a, b) if x and y), default=0.0)
    print(f"same found / not found: {same}/{len(images)}; largest landmark difference {diff:.1e} px")


if __name__ == "__main__":
    main()
