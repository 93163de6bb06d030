"""Property tests of the admin API against its own ``/openapi.json`` (schemathesis): no server
error, no answer outside the schema, whatever the requests. A daemon with the in-memory spool
and broker is the server, over real HTTP; the examples per operation are bounded
(``PAYLER_SCHEMATHESIS_EXAMPLES``, 10 by default) so that CI stays fast."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    positive_data_acceptance,
    unsupported_method,
)

from tests.conftest import free_port
from tests.integration.conftest import START_TIMEOUT_S

EXAMPLES = int(os.environ.get("PAYLER_SCHEMATHESIS_EXAMPLES", "10"))


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    workdir: Path = tmp_path_factory.mktemp("schemathesis")
    port = free_port()
    config = workdir / "configuration.yaml"
    config.write_text(
        "workflows:\n"
        "  - callable: client.process_queue\n"
        '    options: {broker_url: "memory://st", storage_url: "memory://st"}\n'
        "  - callable: client.watch_storage\n"
        '    options: {broker_url: "memory://st", storage_url: "memory://st"}\n'
        f"http: {{port: {port}, max_request_bytes: 65536}}\n"
    )
    log = (workdir / "payler.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "payler", "--config-file", str(config), "--log-level", "WARNING"],
        cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail((workdir / "payler.log").read_text())
            time.sleep(0.05)  # a port that refuses at once: a short pause, not a wait for work
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()
        assert process.returncode == 0, (workdir / "payler.log").read_text()


@pytest.fixture(scope="module")
def api_schema(api_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_api_keeps_to_its_schema(case: schemathesis.Case) -> None:
    # Every check but one: a request the schema allows may still be refused with 400 for what
    # the schema cannot say (a due time past the workflow's maximum delay, both or neither of
    # delay_ms and deliver_at): a documented answer, not a failure.
    # Nor are methods a route does not declare checked (unsupported_method,
    # allow_header_conformance): an entry id may hold "/", so "/v1/scheduled/x/deliver" with
    # PATCH is the entry "x/deliver" (404), not an undeclared method (405).
    case.call_and_validate(
        excluded_checks=[positive_data_acceptance, unsupported_method, allow_header_conformance]
    )
