"""Faces per second of the encoders (E_exp + E_pose, the per-request path) and of
the neutral render (E_id + encoders + G; the editor renders render_size²), at
batch 1 and 32, for each numeric precision in one run (ratios are comparable;
absolute figures depend on what else the machine runs).

The encoders are timed as served: one pass, plus the mirror pass for the faces
whose one-pass margin is below IPDFER_MIRROR_MARGIN (model/nets/mirror.py; none for a
distilled student, `flip_tta` false in its config). How many faces that is
depends on the faces, so the inputs are real face crops (`--faces`, a seeded sample aligned
as `aligned=true` aligns them; FER2013 test crops by default), cycled through; the
columns also give the mirror pass on every face (margin 1, the full average) and
none (one pass).

    .venv/bin/python benchmarks/encoder_speed.py [--weights weights] [--device cpu] [--precisions fp32,bf16] \\
        [--faces ../shared/data/fer2013/test] [--mirror-margin 0.3]

On the CPU it also times the encoders' ONNX graph (weights/encoders.onnx,
`IPDFER_RUNTIME`; fp32; renders always run in PyTorch) and its int8 copy
(weights/encoders.int8.onnx, `IPDFER_PRECISION=int8`), then both as `ipdfer
serve` runs them in process on the CPU: one batch loop per core (up to 4), each
with its own one-thread session, all running at once (`served loops`: faces/s
summed over the loops).
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import torch

from model.nets import mirror
from model.serving.encoders_int8 import calibration_faces, int8_entry, load_int8_encoders
from model.serving.encoders_onnx import load_onnx_encoders, onnx_entry
from model.faces.identity import load_identity_encoder
from model.serving.analyzer import autocast_for, inference_form
from model.weights import DEFAULT_WEIGHTS_DIR, load_weights

REPO = Path(__file__).resolve().parents[1]


def rate(fn, inputs: list[torch.Tensor], seconds: float = 3.0) -> float:
    """Faces/s of `fn` over `inputs` (batches), cycled through for `seconds`."""
    fn(inputs[0])  # warm-up
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = inputs[i % len(inputs)]
        fn(x)
        n, i = n + x.shape[0], i + 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def concurrent_rate(fns: list, inputs: list[torch.Tensor], seconds: float) -> float:
    """Faces/s summed over `fns` running at once, each in its own thread (ONNX
    Runtime releases the GIL), as the service's batch loops run them."""
    rates = [0.0] * len(fns)

    def loop(i: int) -> None:
        rates[i] = rate(fns[i], inputs, seconds)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(fns))]
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
    ap.add_argument("--faces", type=Path, default=Path(os.environ.get("IPDFER_DATA", REPO.parent / "shared" / "data"))
                    / "fer2013" / "test", help="folder of face crops to time on")
    ap.add_argument("--count", type=int, default=512, help="face crops taken from --faces")
    ap.add_argument("--mirror-margin", type=float, default=mirror.DEFAULT_MARGIN, help="as IPDFER_MIRROR_MARGIN")
    args = ap.parse_args()
    device = torch.device(args.device)
    weights = load_weights(args.weights)
    model = inference_form(weights.model).to(device)   # the form the service runs: BatchNorm folded, channels-last
    identity = load_identity_encoder(device=args.device)
    s = model.cfg.image_size
    margin = mirror.check_margin(args.mirror_margin) if model.cfg.flip_tta else 0.0
    faces = torch.from_numpy(calibration_faces(args.faces, weights, args.count))   # a seeded sample, aligned
    batches = {b: [faces[i:i + b] for i in range(0, len(faces) - b + 1, b)] for b in (1, 32)}
    with torch.inference_mode():
        share = float(mirror.unsure(model.encode(faces)["probs"], margin).float().mean()) if margin else 0.0
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, image {s}x{s}, {len(faces)} faces "
          f"from {args.faces}; served: mirror pass below margin {margin} = {share:.1%} of these faces")
    print(f"{'precision':>9} {'batch':>5} {'served faces/s':>15} {'(mirror all)':>13} {'(one pass)':>11} "
          f"{'neutral render faces/s':>23}")
    for precision in args.precisions.split(","):
        for batch in (1, 32):
            inputs = [x.to(device) for x in batches[batch]]
            chips = torch.rand(batch, 3, 150, 150, device=device) * 255
            r = model.cfg.render_size if model.edits_input else s   # the editor renders a larger crop
            large = torch.rand(batch, 1, r, r, device=device) * 2 - 1
            with torch.inference_mode(), autocast_for(device, precision):
                served = lambda x, m=margin: mirror.encode_with_mirror(model.encode, x, m)  # noqa: E731
                render = lambda x: model.render(identity(chips), model.encode(x)["pose_feat"],  # noqa: E731
                                                face=x, target=large if model.edits_input else None)
                print(f"{precision:>9} {batch:>5} {rate(served, inputs, args.seconds):>15.1f} "
                      f"{rate(lambda x: served(x, 1.0), inputs, args.seconds):>13.1f} "
                      f"{rate(model.encode, inputs, args.seconds):>11.1f} "
                      f"{rate(render, inputs, args.seconds):>23.1f}", flush=True)
    if device.type == "cpu" and onnx_entry(weights) is not None:
        loaders = {"onnxrt": load_onnx_encoders}
        if int8_entry(weights) is not None:  # IPDFER_PRECISION=int8
            loaders["int8"] = load_int8_encoders
        for batch in (1, 32):
            for name, load in loaders.items():
                graph = load(weights, threads=torch.get_num_threads())
                served = lambda x, m=margin, g=graph: mirror.encode_with_mirror(g, x, m)  # noqa: E731
                print(f"{name:>9} {batch:>5} {rate(served, batches[batch], args.seconds):>15.1f} "
                      f"{rate(lambda x: served(x, 1.0), batches[batch], args.seconds):>13.1f} "  # noqa: B023
                      f"{rate(graph, batches[batch], args.seconds):>11.1f} {'-':>23}", flush=True)
        from service.settings import Settings
        loops, _ = Settings().inprocess_plan(cuda=False)
        print(f"served loops: {loops} batch loops x 1 thread, at once (ipdfer serve in process on this CPU), "
              "faces/s summed")
        for batch in (1, 32):
            for name, load in loaders.items():
                graphs = [load(weights, threads=1) for _ in range(loops)]
                row = [concurrent_rate([lambda x, g=g, m=m: mirror.encode_with_mirror(g, x, m) for g in graphs],
                                       batches[batch], args.seconds) for m in (margin, 1.0, 0.0)]
                print(f"{name:>9} {batch:>5} {row[0]:>15.1f} {row[1]:>13.1f} {row[2]:>11.1f} {'-':>23}", flush=True)


if __name__ == "__main__":
    main()
