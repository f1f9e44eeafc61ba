"""Container health check of the IPD-FER images (HEALTHCHECK and docker-compose.yml).

    python /app/healthcheck.py api       GET /healthz of the local `ipdfer serve` answers 200
    python /app/healthcheck.py worker    this container's `ipdfer worker` has a fresh
                                         heartbeat in Redis (it heartbeats only after
                                         loading and warming up the weights)
    python /app/healthcheck.py           whichever of the two this container runs

Exit 0 healthy, 1 unhealthy (Docker's convention), with one line saying why. A worker
is found by its consumer name: IPDFER_WORKER_NAME if set, else `<hostname>-<pid>`
(the worker's default), so replicas of one compose service each check themselves.
Settings come from the same environment the process reads (service.settings), and
the heartbeat from the same module that writes it (service.queue): no Redis key is
spelled here.
"""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import urllib.request
from pathlib import Path


def running_command() -> str | None:
    """'serve' or 'worker': what the `ipdfer` process of this container runs."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(Path(a).name in ("ipdfer", "cli.py") or a == "service.cli" for a in argv):
            for word in ("worker", "serve"):
                if word in argv:
                    return word
    return None


def check_api() -> tuple[bool, str]:
    port = os.environ.get("IPDFER_PORT", "8000")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200, f"{url}: {r.status}"
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", with its reason
        return False, f"{url}: {e}"


def is_mine(worker: str, name: str | None, hostname: str) -> bool:
    return worker == name if name else worker.startswith(f"{hostname}-")


async def _live_workers() -> list[dict]:
    from service.queue import RedisQueue
    from service.settings import Settings

    settings = Settings()
    if not settings.redis_url:
        raise RuntimeError("no REDIS_URL: a worker needs one")
    queue = RedisQueue.from_settings(settings)
    try:
        return await asyncio.wait_for(queue.live_workers(), 5)
    finally:
        await queue.close()


def check_worker() -> tuple[bool, str]:
    name, hostname = os.environ.get("IPDFER_WORKER_NAME") or None, socket.gethostname()
    try:
        live = asyncio.run(_live_workers())
    except Exception as e:  # noqa: BLE001
        return False, f"cannot read worker heartbeats: {type(e).__name__}: {e}"
    mine = [w.get("worker", "") for w in live if is_mine(w.get("worker", ""), name, hostname)]
    if mine:
        return True, f"fresh heartbeat from {', '.join(mine)}"
    return False, f"no fresh heartbeat from {name or hostname + '-*'} ({len(live)} other live workers)"


def main(argv: list[str]) -> int:
    role = argv[0] if argv else running_command()
    if role in ("api", "serve"):
        ok, why = check_api()
    elif role == "worker":
        ok, why = check_worker()
    else:
        ok, why = False, f"unknown role {role!r}: use api or worker (no ipdfer process found)"
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
