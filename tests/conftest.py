import os
from pathlib import Path

import pytest


# --- research data: tests that need it carry the `data` marker ---------------------------
# The data sets (FER2013, CK+, muxspace) and dlib's golden vectors are not in the
# repository. Without them those tests skip, with one summary line; in CI (where
# the data is present) a skip is a failure (pytest_runtest_makereport below).

DATA_HINT = ("set IPDFER_DATA to the folder holding fer2013/, ckplus48/ and muxspace/ "
             "(its parent holds testvectors/; IPDFER_SHARED names that parent instead)")


def research_data() -> Path:
    """The data sets folder: env IPDFER_DATA, else data/ of env IPDFER_SHARED, else
    ../shared/data beside the repository."""
    if os.environ.get("IPDFER_DATA"):
        return Path(os.environ["IPDFER_DATA"])
    shared = os.environ.get("IPDFER_SHARED") or Path(__file__).resolve().parents[1].parent / "shared"
    return Path(shared) / "data"


def have_research_data() -> bool:
    return (research_data() / "fer2013").is_dir()


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder holding data/ (the data sets) and testvectors/ (dlib's golden
    vectors, beside the data folder); its users are data tests."""
    if not have_research_data():
        pytest.skip(f"needs the research data sets: {DATA_HINT}")
    data = research_data().resolve()
    if data.name == "data":
        return data.parent
    view = tmp_path_factory.mktemp("shared")   # another folder name: link it as data/
    (view / "data").symlink_to(data)
    if (data.parent / "testvectors").is_dir():
        (view / "testvectors").symlink_to(data.parent / "testvectors")
    return view


def pytest_configure(config):
    config.addinivalue_line("markers", "data: needs the research data sets (IPDFER_DATA); "
                                       "skipped without them, required in CI")


def pytest_collection_modifyitems(config, items):
    """Every test that reads the data (through the shared_dir fixture, directly or
    not) is a data test; without the data it is skipped before it starts."""
    missing = not have_research_data()
    for item in items:
        if "shared_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)
        if missing and item.get_closest_marker("data"):
            item.add_marker(pytest.mark.skip(reason=f"data test: {DATA_HINT}"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "data test:" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} data tests skipped: no research data sets here ({DATA_HINT})")


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


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count must not change which runtime the
    next test exercises (MTCNN's runtime choice reads it): restore it after each."""
    import torch
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
