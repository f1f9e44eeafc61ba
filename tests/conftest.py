import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder beside the repo (../shared); env IPDFER_SHARED overrides."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    return Path(os.environ.get("IPDFER_SHARED", default))


# --- service tests (tests/test_service_*.py) -------------------------------------------
# A private redis-server on a free port for the whole session (never the shared one
# on 6379), with stop()/start() for the "Redis went away" tests, and the model loaded
# once for every in-process service test.

import shutil as _shutil
import socket as _socket
import subprocess as _subprocess
import time as _time


def free_port() -> int:
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(proc: _subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM (graceful shutdown), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except _subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisProcess:
    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: _subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        import redis
        self.proc = _subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=_subprocess.DEVNULL, stderr=_subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = _time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if _time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                _time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server():
    """A fresh redis-server for this test session: .url, .stop(), .start()."""
    if _shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_pipeline():
    """The service's batch function over the real weights, loaded and warmed once."""
    from service.pipeline import Pipeline
    from service.settings import Settings
    return Pipeline.load(Settings(redis_url=None), worker="test")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skip is a failure: a missing tool or data set must not pass silently."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and call.when in ("setup", "call"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (treated as a failure): {report.longrepr}"
