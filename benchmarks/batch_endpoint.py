"""POST /predict/batch against single POST /predict requests, in one run: N
images (default 32) sent as one batch request, as N sequential requests and as
N concurrent requests; each way `--rounds` times, interleaved, on the same
service (started here on 127.0.0.1, in-process or `--mode redis --workers 2`).
Prints the wall time of each way (median over rounds) and the batch's speed-up
over the sequential requests, plus the broken-image case (one truncated JPEG
among the N: its own 400, every other image 200).

    .venv/bin/python benchmarks/batch_endpoint.py                   # ~1-2 min on 2 CPU cores
    .venv/bin/python benchmarks/batch_endpoint.py --mode redis --workers 2
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import DEFAULT_IMAGES, load_images, running  # noqa: E402


async def as_batch(c: httpx.AsyncClient, images: list[bytes]) -> list[int]:
    r = await c.post("/predict/batch", files=[("files", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(images)])
    r.raise_for_status()
    return [item["status"] for item in r.json()["results"]]


async def sequential(c: httpx.AsyncClient, images: list[bytes]) -> list[int]:
    return [(await c.post("/predict", content=b, headers={"content-type": "image/jpeg"})).status_code for b in images]


async def concurrent(c: httpx.AsyncClient, images: list[bytes]) -> list[int]:
    rs = await asyncio.gather(*(c.post("/predict", content=b, headers={"content-type": "image/jpeg"})
                                for b in images))
    return [r.status_code for r in rs]


async def measure(url: str, images: list[bytes], rounds: int) -> dict[str, list[float]]:
    ways = {"one batch request": as_batch, "sequential single requests": sequential,
            "concurrent single requests": concurrent}
    times: dict[str, list[float]] = {name: [] for name in ways}
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await as_batch(c, images[:4])   # warm-up
        for _ in range(rounds):
            for name, way in ways.items():
                t0 = time.perf_counter()
                statuses = await way(c, images)
                times[name].append(time.perf_counter() - t0)
                if statuses != [200] * len(images):
                    raise SystemExit(f"{name}: statuses {statuses}")
        broken = list(images)
        broken[len(broken) // 2] = broken[0][:len(broken[0]) // 2]
        statuses = await as_batch(c, broken)
        expected = [200] * len(images)
        expected[len(images) // 2] = 400
        print(f"broken image at position {len(images) // 2}: statuses as expected: {statuses == expected}")
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of .jpg photos (else the astronaut)")
    ap.add_argument("-n", type=int, default=32, help="images per batch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", choices=("inprocess", "redis"), default="inprocess")
    ap.add_argument("--workers", type=int, default=2, help="redis mode: worker processes")
    args = ap.parse_args(argv)
    images = load_images(args.images, args.n)
    images = (images * args.n)[:args.n]
    with tempfile.TemporaryDirectory() as logs, \
            running(args.mode, 16, 10.0, args.workers, Path(logs)) as (url, ready):
        print(f"{args.mode} mode, {len(ready['workers'])} worker(s), {args.n} images, {args.rounds} rounds")
        times = asyncio.run(measure(url, images, args.rounds))
    base = statistics.median(times["sequential single requests"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:28s} median {med:6.2f} s  ({args.n / med:5.1f} images/s)  x{base / med:4.2f} vs sequential")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
