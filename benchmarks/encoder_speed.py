"""Faces per second of the exported encoders (E_exp + E_pose, the per-request
path) and of the neutral render (E_id + encoders + G; the editor renders render_size²), at batch 1 and 32.

    .venv/bin/python benchmarks/encoder_speed.py [--weights weights] [--device cpu]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from model.faces.identity import load_identity_encoder
from model.weights import DEFAULT_WEIGHTS_DIR, load_weights


def rate(fn, batch: int, seconds: float = 3.0) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model = load_weights(args.weights).model.to(args.device).eval()
    identity = load_identity_encoder(device=args.device)
    s = model.cfg.image_size
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, image {s}x{s}")
    print(f"{'batch':>5} {'encoders faces/s':>17} {'neutral render faces/s':>23}")
    for batch in (1, 32):
        x = torch.randn(batch, 1, s, s, device=args.device)
        chips = torch.rand(batch, 3, 150, 150, device=args.device) * 255
        r = model.cfg.render_size if model.edits_input else s   # the editor renders a larger crop
        large = torch.rand(batch, 1, r, r, device=args.device) * 2 - 1
        with torch.inference_mode():
            enc = lambda: model.encode(x)  # noqa: E731
            render = lambda: model.render(identity(chips), model.encode(x)["pose_feat"],  # noqa: E731
                                          face=x, target=large if model.edits_input else None)
            print(f"{batch:>5} {rate(enc, batch):>17.1f} {rate(render, batch):>23.1f}")


if __name__ == "__main__":
    main()
