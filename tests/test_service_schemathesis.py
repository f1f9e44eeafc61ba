"""Schemathesis against the service's own OpenAPI schema, bounded: generated
requests (valid and invalid) must never get a 5xx, and every answer must match the
documented status codes, content types, headers and response schemas.

The app runs in-process mode with the real model, under uvicorn on a loopback port
in a thread of this process (so its batching loop lives in uvicorn's event loop)."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_headers_conformance, response_schema_conformance,
    status_code_conformance,
)

from service.backend import InProcessBackend  # noqa: E402
from service.server import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.conftest import free_port  # noqa: E402

MAX_EXAMPLES = 25  # per operation and generation mode: bounded for CI on 2 cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_url(service_pipeline):
    import uvicorn

    s = Settings(redis_url=None, max_batch_size=8, max_wait_ms=5, max_body_bytes=2_000_000)
    app = create_app(s, backend=InProcessBackend(s, pipelines=[service_pipeline]))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(10)


# schemathesis.pytest.from_fixture does not work with pytest 9 (it reads the removed
# Function._nodeid), so each operation's strategy is driven with hypothesis directly.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_openapi_contract(api_url, mode):
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/neutralize", "/healthz", "/readyz", "/metrics"}
    tested = set()
    for op in operations:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=CHECKS, timeout=60)

        try:
            check()
        except Unsatisfiable:  # negative mode: an operation with nothing to get wrong (/healthz)
            assert mode == GenerationMode.NEGATIVE
            continue
        tested.add((op.method.upper(), op.path))
    assert {("POST", "/predict"), ("POST", "/predict/batch"), ("GET", "/neutralize"), ("POST", "/neutralize")} <= tested
