"""Soak and crowd test of `ipdfer serve` (in-process mode), loopback only, bounded.

1. soak: `--requests` ordinary POST /predict (one face each) from `--clients`
   closed-loop clients; the server's RSS is read from /proc after every block of
   `--block` requests. Growth is measured from the end of the warm-up block to the
   end, so loading, first-shape allocations and allocator pools are not counted.
2. crowd: one client keeps sending a photo tiled with hundreds of small faces
   (`neutral=true`: the costliest request there is) while the same ordinary clients
   send `--crowd-requests` requests beside it; their p50/p99 latency is printed
   next to the same clients' latency without the crowd photo.

    .venv/bin/python benchmarks/soak.py                      # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/soak.py --requests 400 --crowd-requests 100   # quick
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import DEFAULT_IMAGES, Service, level, load_images  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def face_store_mb(url: str) -> float:
    """In-process face states kept for GET /neutralize (bounded by design), from /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ipdfer_face_state_bytes "):
            return float(line.split()[1]) / (1 << 20)
    return 0.0


def crowd_photo(images: list[bytes], side: int = 1280, tile: int = 44) -> bytes:
    """A JPEG tiled with (side // tile)^2 small faces, e.g. 29 x 29 = 841."""
    from PIL import Image
    faces = [Image.open(io.BytesIO(b)).convert("RGB").resize((tile, tile), Image.LANCZOS) for b in images]
    canvas = Image.new("RGB", (side, side), (128, 128, 128))
    n = side // tile
    for k in range(n * n):
        canvas.paste(faces[k % len(faces)], ((k % n) * tile, (k // n) * tile))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def crowd(url: str, ordinary: list[bytes], photo: bytes, clients: int, total: int) -> tuple[dict, dict]:
    """Ordinary clients' figures while one client keeps posting the crowd photo."""
    done = asyncio.Event()
    crowd_lat: list[float] = []
    replies: list[dict] = []

    async def crowd_client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                r = await c.post("/predict?neutral=true", content=photo, headers={"content-type": "image/jpeg"})
                crowd_lat.append(time.perf_counter() - t0)
                body = r.json()
                replies.append({"status": r.status_code, "faces": len(body.get("faces", [])),
                                "faces_skipped": body.get("faces_skipped"), "bytes": len(r.content)})

    task = asyncio.create_task(crowd_client())
    await asyncio.sleep(0.5)  # the crowd photo is in flight first
    row = await level(url, ordinary, clients, total)
    done.set()
    await task
    lat = sorted(crowd_lat)
    return row, {"requests": len(lat), "p50_ms": round(lat[len(lat) // 2] * 1000, 1),
                 "max_ms": round(lat[-1] * 1000, 1), "last_reply": replies[-1] if replies else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="soak: ordinary requests in all")
    p.add_argument("--block", type=int, default=200, help="soak: requests between RSS readings; "
                   "the first block is the warm-up")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--crowd-requests", type=int, default=200, help="crowd: ordinary requests beside it")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of one-face JPEGs")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    images = load_images(args.images, 64)
    photo = crowd_photo(images)
    out: dict = {"soak": [], "images": len(images), "clients": args.clients}
    with tempfile.TemporaryDirectory(prefix="ipdfer-soak-") as logdir:
        svc = Service("inprocess", 16, 10.0, 1, Path(logdir))
        try:
            ready = svc.start()
            pid = svc.procs[-1].pid
            out["device"] = ready["workers"][0].get("device")
            print(f"in-process service pid {pid}, RSS after start {rss_mb(pid):.0f} MB", file=sys.stderr)
            sent = 0
            while sent < args.requests:
                n = min(args.block, args.requests - sent)
                row = asyncio.run(level(svc.url, images, args.clients, n))
                sent += n
                reading = {"requests": sent, "rss_mb": round(rss_mb(pid), 1),
                           "face_store_mb": round(face_store_mb(svc.url), 1), "req_s": row["throughput_rps"],
                           "p99_ms": row["p99_ms"], "errors": row["errors"]}
                out["soak"].append(reading)
                print(f"  {sent:>5} requests: RSS {reading['rss_mb']:.0f} MB (face store {reading['face_store_mb']:.0f} MB), "
                      f"{row['throughput_rps']} req/s, "
                      f"p99 {row['p99_ms']} ms {row['errors'] or ''}", file=sys.stderr, flush=True)
            base = asyncio.run(level(svc.url, images, args.clients, args.crowd_requests))
            beside, crowd_stats = asyncio.run(crowd(svc.url, images, photo, args.clients, args.crowd_requests))
            out.update(alone=base, beside_crowd=beside, crowd=crowd_stats, rss_end_mb=round(rss_mb(pid), 1))
        finally:
            svc.stop()

    warm, last = out["soak"][0], out["soak"][-1]
    growth = 100 * (last["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"]
    errors = sum(sum(r["errors"].values()) for r in out["soak"])
    out["rss_growth_pct"] = round(growth, 2)
    # the face store is bounded by design (IPDFER_FACE_CACHE_MAX[_MB], TTL): growth net of it
    net = 100 * ((last["rss_mb"] - last["face_store_mb"]) - (warm["rss_mb"] - warm["face_store_mb"])) / warm["rss_mb"]
    out["rss_growth_net_of_face_store_pct"] = round(net, 2)
    print(f"\nIPD-FER soak: in-process, device={out['device']}, {args.clients} clients, "
          f"{len(images)} one-face JPEGs")
    print(f"soak: {last['requests']} requests, {errors} errors; RSS after warm-up ({warm['requests']} requests) "
          f"{warm['rss_mb']:.0f} MB -> {last['rss_mb']:.0f} MB at the end: {growth:+.1f}%")
    print(f"      of which face states kept for /neutralize (bounded by IPDFER_FACE_CACHE_MAX_MB): "
          f"{warm['face_store_mb']:.0f} -> {last['face_store_mb']:.0f} MB; growth net of them {net:+.1f}%")
    print("      RSS by requests: " + ", ".join(f"{r['requests']}: {r['rss_mb']:.0f}" for r in out["soak"]))
    lr = crowd_stats["last_reply"] or {}
    print(f"crowd photo ({len(photo) // 1024} KB, 1280x1280, neutral=true): {crowd_stats['requests']} sent, "
          f"p50 {crowd_stats['p50_ms']:.0f} ms, max {crowd_stats['max_ms']:.0f} ms; status {lr.get('status')}, "
          f"{lr.get('faces')} faces returned, {lr.get('faces_skipped')} skipped, {lr.get('bytes', 0) // 1024} KB reply")
    for name in ("alone", "beside_crowd"):
        r = out[name]
        print(f"ordinary clients {name.replace('_', ' '):<13}: {r['requests']} requests, {r['throughput_rps']} req/s, "
              f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, errors {r['errors'] or 0}")
    print(f"RSS at the end {out['rss_end_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
