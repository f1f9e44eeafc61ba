"""Load test of POST /predict: throughput and p50/p99 latency at 1, 4, 16 and 64
concurrent clients, with dynamic batching and with max_batch_size=1, in one run.

Bounded and loopback only: it starts the service itself on 127.0.0.1 (in-process
mode by default, or `--mode redis`: its own redis-server + API + workers), sends a
fixed number of requests per level (closed loop: each client sends its next
request when the previous one is answered), stops everything and prints a table.
`--url` targets an already running service instead (loopback addresses only).
Nothing here is CPU- or CUDA-specific: the service picks its device.

    .venv/bin/python benchmarks/load.py                      # ~3-4 min on 2 CPU cores
    .venv/bin/python benchmarks/load.py --mode redis --workers 2
    .venv/bin/python benchmarks/load.py --clients 1,16 --batch-sizes 32,1 --json out.json
    .venv/bin/python benchmarks/load.py --clients 1,16 --batch-sizes 16,1 --requests 96 --rounds 4
    .venv/bin/python benchmarks/load.py --clients 1,16 --batch-sizes 16,1 --requests 96 --rounds 2 \
        --baseline-env IPDFER_RUNTIME=torch,IPDFER_MIN_FACE_SIZE=20
    git worktree add /tmp/before <commit> && .venv/bin/python benchmarks/load.py --clients 1,16 \
        --batch-sizes 16 --requests 96 --rounds 2 --baseline-root /tmp/before   # code before/after
"""
from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "muxspace" / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"refusing to load-test {url}: loopback addresses only")


def load_images(folder: Path | None, n: int) -> list[bytes]:
    """JPEG bodies: photos from the folder (one face each), else skimage's astronaut."""
    files = sorted(folder.glob("*.jpg"))[:n] if folder and folder.is_dir() else []
    if files:
        return [f.read_bytes() for f in files]
    from PIL import Image
    from skimage import data
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((256, 256)).save(buf, format="JPEG")
    return [buf.getvalue()]


# --- starting the service -----------------------------------------------------------


class Service:
    """The API (and, in redis mode, redis-server + workers) as child processes."""

    def __init__(self, mode: str, max_batch_size: int, max_wait_ms: float, workers: int, logdir: Path,
                 env: dict[str, str] | None = None, root: Path = ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode, self.workers, self.logdir, self.root = mode, workers, logdir, root
        self.env = {**os.environ, "IPDFER_MAX_BATCH_SIZE": str(max_batch_size),
                    "IPDFER_MAX_WAIT_MS": str(max_wait_ms), "IPDFER_REQUEST_TIMEOUT_S": "600",
                    "IPDFER_QUEUE_MAXLEN": "1024", "IPDFER_LOG_LEVEL": "warning",
                    "IPDFER_QUEUE_PREFIX": f"bench{self.port}", **(env or {})}
        self.env.pop("REDIS_URL", None)
        self.env.pop("IPDFER_REDIS_URL", None)
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.logdir / f"{name}-{self.port}.log", "wb")
        # `python -m` puts the working folder first on sys.path: the code of `root` runs
        self.procs.append(subprocess.Popen(args, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self, timeout: float = 600) -> dict:
        py = [sys.executable, "-m", "service.cli"]
        if self.mode == "redis":
            if not shutil.which("redis-server"):
                raise SystemExit("--mode redis needs redis-server on PATH")
            rport = free_port()
            self._spawn("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"])
            self.env["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
            for i in range(self.workers):
                self._spawn(f"worker{i}", py + ["worker", "--name", f"bench-w{i}"])
        self._spawn("api", py + ["serve", "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise SystemExit(f"the service exited during start-up; logs in {self.logdir}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                body = r.json()
                if r.status_code == 200 and len(body.get("workers", [])) >= (self.workers if self.mode == "redis" else 1):
                    return body
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        raise SystemExit(f"the service was not ready within {timeout:g} s; logs in {self.logdir}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextmanager
def running(mode: str, max_batch_size: int, max_wait_ms: float, workers: int, logdir: Path,
            env: dict[str, str] | None = None, root: Path = ROOT) -> Iterator[tuple[str, dict]]:
    svc = Service(mode, max_batch_size, max_wait_ms, workers, logdir, env, root)
    try:
        ready = svc.start()
        yield svc.url, ready
    finally:
        svc.stop()


# --- load -------------------------------------------------------------------------


async def level(url: str, images: list[bytes], clients: int, total: int) -> dict:
    """`clients` closed-loop clients share `total` requests; returns what they saw
    (`summarize` turns one or more of these into a row)."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    errors: dict[int | str, int] = {}
    counter = iter(range(total))

    async def client(c: httpx.AsyncClient) -> None:
        for k in counter:
            body = images[k % len(images)]
            t0 = time.perf_counter()
            try:
                r = await c.post("/predict", content=body, headers={"content-type": "image/jpeg"})
                status: int | str = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            latencies.append(time.perf_counter() - t0)
            if status == 200:
                body = r.json()
                batch_sizes.append(body.get("batch_size", 1))
                for k in STAGES:  # the batch's stages are shared by its requests
                    share = 1 if k in PER_REQUEST else body.get("batch_size", 1)
                    stages[k].append(body.get("timings", {}).get(f"{k}_ms", 0.0) / share)
            else:
                errors[status] = errors.get(status, 0) + 1

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(clients)])
        elapsed = time.perf_counter() - t0
    return {"clients": clients, "requests": total, "seconds": elapsed, "latencies": latencies,
            "batch_sizes": batch_sizes, "stages": stages, "errors": errors}


def summarize(runs: list[dict]) -> dict:
    """One row from runs of the same level: their requests pooled, throughput = all
    answered requests / all seconds."""
    total, elapsed = sum(r["requests"] for r in runs), sum(r["seconds"] for r in runs)
    errors: dict[int | str, int] = {}
    for r in runs:
        for k, n in r["errors"].items():
            errors[k] = errors.get(k, 0) + n
    ok = total - sum(errors.values())
    lat = sorted(x for r in runs for x in r["latencies"])
    batch_sizes = [b for r in runs for b in r["batch_sizes"]]
    stages = {k: [x for r in runs for x in r["stages"][k]] for k in STAGES}
    pct = lambda q: lat[min(len(lat) - 1, max(0, round(q * len(lat)) - 1))] * 1000  # noqa: E731
    return {"clients": runs[0]["clients"], "requests": total, "ok": ok, "errors": errors,
            "seconds": round(elapsed, 2), "throughput_rps": round(ok / elapsed, 2), "p50_ms": round(pct(0.50), 1),
            "p99_ms": round(pct(0.99), 1), "mean_batch": round(statistics.mean(batch_sizes), 2) if batch_sizes else 0,
            "stage_ms": {k: round(statistics.mean(v), 2) for k, v in stages.items() if v}}


# Where a request's time goes, from the replies' timings: queue and decode are the
# request's own, the model stages are its batch's divided by the batch size.
STAGES = ("queue", "decode", "detect", "align", "encode", "render", "total")
BASELINE = " baseline"   # suffix of the configurations run with --baseline-env
PER_REQUEST = ("queue", "decode", "total")


def requests_for(clients: int, base: int) -> int:
    return max(base, 2 * clients)


def print_table(rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: list(dict.fromkeys(x["config"] for x in rows)).index(r["config"]))
    head = f"{'config':<31} {'clients':>7} {'reqs':>5} {'ok':>5} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'batch':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        err = f"  errors {r['errors']}" if r["errors"] else ""
        print(f"{r['config']:<31} {r['clients']:>7} {r['requests']:>5} {r['ok']:>5} {r['throughput_rps']:>8.2f} "
              f"{r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['mean_batch']:>6.2f}{err}")
    print(f"\nper request, ms (model stages: the batch's time / batch size):")
    print(f"{'config':<31} {'clients':>7} " + " ".join(f"{k:>8}" for k in STAGES))
    for r in rows:
        st = r.get("stage_ms", {})
        print(f"{r['config']:<31} {r['clients']:>7} " + " ".join(f"{st.get(k, 0):>8.1f}" for k in STAGES))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    ours = [c for c in configs if not c.endswith(BASELINE)]
    pairs = [(ours[0], ours[-1])] if len(ours) >= 2 else []   # batching / batch size 1
    pairs += [(c, c + BASELINE) for c in ours if c + BASELINE in configs]
    for a, b in pairs:
        base = {r["clients"]: r for r in rows if r["config"] == b}
        print(f"\nthroughput of '{a}' / '{b}':")
        for r in rows:
            if r["config"] == a and r["clients"] in base and base[r["clients"]]["throughput_rps"]:
                print(f"  {r['clients']:>3} clients: {r['throughput_rps'] / base[r['clients']]['throughput_rps']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("inprocess", "redis"), default="inprocess")
    p.add_argument("--workers", type=int, default=1, help="redis mode: worker processes")
    p.add_argument("--url", help="target this running service (loopback) instead of starting one")
    p.add_argument("--clients", default="1,4,16,64", help="concurrency levels")
    p.add_argument("--batch-sizes", default="16,1", help="max_batch_size configurations to compare")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--requests", type=int, default=16, help="requests per level: max(this, 2 x clients)")
    p.add_argument("--baseline-env", metavar="NAME=VALUE,...",
                   help="also run every configuration with these settings (e.g. IPDFER_RUNTIME=torch,"
                        "IPDFER_MIN_FACE_SIZE=20), in the same run, and print the ratios to it")
    p.add_argument("--baseline-root", type=Path, metavar="DIR",
                   help="also run every configuration with the code of this checkout (e.g. a git worktree of an "
                        "earlier commit), in the same run, and print the ratios to it")
    p.add_argument("--rounds", type=int, default=1, help="run each level this many times, the configurations' "
                   "order reversed every other round (A B, B A, ...), and pool them")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs to send")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    clients = [int(c) for c in args.clients.split(",")]
    images = load_images(args.images, 64)
    rows: list[dict] = []
    meta: dict = {"clients": clients, "image_count": len(images), "mode": args.mode}

    def measure(targets: dict[str, str]) -> None:
        """Level by level, every configuration back to back (so a change in the
        machine's other load hits all configurations alike); with rounds, in
        alternating order (going first is not always the same configuration's luck)."""
        warm = min(16, max(clients))
        for url in targets.values():  # warm-up, not counted: also meets the batch shapes once
            asyncio.run(level(url, images, warm, 2 * warm))
        for c in clients:
            runs: dict[str, list[dict]] = {config: [] for config in targets}
            for r in range(args.rounds):
                order = list(targets.items())
                for config, url in (order if r % 2 == 0 else order[::-1]):
                    runs[config].append(asyncio.run(level(url, images, c, requests_for(c, args.requests))))
            for config in targets:
                row = {"config": config, **summarize(runs[config])}
                rows.append(row)
                print(f"  {config}: {c} clients -> {row['throughput_rps']} req/s, p50 {row['p50_ms']} ms, "
                      f"p99 {row['p99_ms']} ms, mean batch {row['mean_batch']}", file=sys.stderr, flush=True)

    if args.url:
        require_loopback(args.url)
        meta["device"] = httpx.get(f"{args.url}/readyz", timeout=5).json().get("workers", [{}])[0].get("device")
        measure({"external": args.url.rstrip("/")})
    else:
        with tempfile.TemporaryDirectory(prefix="ipdfer-bench-") as logdir, ExitStack() as stack:
            targets = {}
            variants = {"": ({}, ROOT)}
            if args.baseline_env or args.baseline_root:
                env = dict(kv.split("=", 1) for kv in args.baseline_env.split(",")) if args.baseline_env else {}
                variants[BASELINE] = (env, (args.baseline_root or ROOT).resolve())
                meta["baseline_env"] = {**env, **({"code": str(args.baseline_root)} if args.baseline_root else {})}
            for suffix, (env, root) in variants.items():
                for b in [int(x) for x in args.batch_sizes.split(",")]:
                    config = f"batch<={b}" + (f",wait={args.max_wait_ms:g}ms" if b > 1 else "") + suffix
                    print(f"starting {args.mode} service with {config} ...", file=sys.stderr, flush=True)
                    url, ready = stack.enter_context(running(args.mode, b, args.max_wait_ms, args.workers,
                                                             Path(logdir), env, root))
                    meta["device"] = ready["workers"][0].get("device")
                    targets[config] = url
            measure(targets)
    print(f"\nIPD-FER load test: mode={meta['mode']} device={meta.get('device')} "
          f"images={meta['image_count']} (JPEG, POST /predict raw body), closed loop"
          + (f"; '{BASELINE.strip()}' = {meta['baseline_env']}" if "baseline_env" in meta else "") + "\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
