"""Faces per second of the exported encoders (E_exp + E_pose, the per-request
path, as the weights are served: with the mirror-image pass, or in one pass for a
distilled student, `flip_tta` in their config) and of the neutral
render (E_id + encoders + G; the editor renders render_size²), at batch 1 and 32,
for each numeric precision in one run (ratios are comparable; absolute figures
depend on what else the machine runs).

    .venv/bin/python benchmarks/encoder_speed.py [--weights weights] [--device cpu] [--precisions fp32,bf16]

On the CPU it also times the served encoders in ONNX Runtime (weights/encoders.onnx,
`IPDFER_RUNTIME`; fp32, as served; renders always run in PyTorch) and their int8
graph (weights/encoders.int8.onnx, `IPDFER_PRECISION=int8`), then both graphs as
`ipdfer serve` runs them in process on the CPU: one batch loop per core (up to 4),
each with its own one-thread session, all running at once (`served loops`: faces/s
summed over the loops).
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from model.encoders_int8 import int8_entry, load_int8_encoders
from model.encoders_onnx import load_onnx_encoders, onnx_entry
from model.faces.identity import load_identity_encoder
from model.inference import autocast_for, inference_form
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


def concurrent_rate(sessions: list, batch: int, s: int, seconds: float) -> float:
    """Faces/s summed over `sessions` running at once, each in its own thread (ONNX
    Runtime releases the GIL), as the service's batch loops run them."""
    rates = [0.0] * len(sessions)

    def loop(i: int) -> None:
        x = torch.randn(batch, 1, s, s)
        rates[i] = rate(lambda: sessions[i](x), batch, seconds)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--seconds", type=float, default=3.0, help="per figure")
    args = ap.parse_args()
    device = torch.device(args.device)
    # the form the service runs: BatchNorm folded, channels-last encoders, joint mirror pass
    weights = load_weights(args.weights)
    model = inference_form(weights.model).to(device)
    identity = load_identity_encoder(device=args.device)
    s = model.cfg.image_size
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, image {s}x{s}, "
          f"served {'with' if model.cfg.flip_tta else 'without'} the mirror pass")
    print(f"{'precision':>9} {'batch':>5} {'encoders faces/s':>17} {'(no mirror pass)':>17} "
          f"{'neutral render faces/s':>23}")
    for precision in args.precisions.split(","):
        for batch in (1, 32):
            x = torch.randn(batch, 1, s, s, device=device)
            chips = torch.rand(batch, 3, 150, 150, device=device) * 255
            r = model.cfg.render_size if model.edits_input else s   # the editor renders a larger crop
            large = torch.rand(batch, 1, r, r, device=device) * 2 - 1
            with torch.inference_mode(), autocast_for(device, precision):
                served = lambda: model.encode(x, flip_tta=model.cfg.flip_tta)  # noqa: E731
                plain = lambda: model.encode(x)  # noqa: E731
                render = lambda: model.render(identity(chips), model.encode(x)["pose_feat"],  # noqa: E731
                                              face=x, target=large if model.edits_input else None)
                print(f"{precision:>9} {batch:>5} {rate(served, batch, args.seconds):>17.1f} "
                      f"{rate(plain, batch, args.seconds):>17.1f} {rate(render, batch, args.seconds):>23.1f}",
                      flush=True)
    if device.type == "cpu" and onnx_entry(weights) is not None:
        graphs = {"onnxrt": load_onnx_encoders(weights, threads=torch.get_num_threads())}
        if int8_entry(weights) is not None:  # IPDFER_PRECISION=int8
            graphs["int8"] = load_int8_encoders(weights, threads=torch.get_num_threads())
        for batch in (1, 32):
            x = torch.randn(batch, 1, s, s)
            for name, graph in graphs.items():
                print(f"{name:>9} {batch:>5} {rate(lambda: graph(x), batch, args.seconds):>17.1f} "  # noqa: B023
                      f"{'-':>17} {'-':>23}", flush=True)
        from service.settings import Settings
        loops, _ = Settings().inprocess_plan(cuda=False)
        loaders = {"onnxrt": load_onnx_encoders, "int8": load_int8_encoders}
        print(f"served loops: {loops} batch loops x 1 thread, at once (ipdfer serve in process on this CPU), "
              "faces/s summed")
        for batch in (1, 32):
            for name in graphs:
                sessions = [loaders[name](weights, threads=1) for _ in range(loops)]
                print(f"{name:>9} {batch:>5} {concurrent_rate(sessions, batch, s, args.seconds):>17.1f} "
                      f"{'-':>17} {'-':>23}", flush=True)


if __name__ == "__main__":
    main()
