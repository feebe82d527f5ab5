"""Property-based requests generated from the gateway's own OpenAPI schema (schemathesis),
over a real socket: nothing answers 5xx, and answers conform to the schema's content types."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.conftest import embedded_config
from tests.resilience.conftest import start_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway_schema(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[Any]:
    server = start_gateway(tmp_path_factory.mktemp("schemathesis"), embedded_config())
    try:
        yield schemathesis.openapi.from_url(server.url + "/openapi.json")
    finally:
        server.stop()


def test_no_server_errors_and_conforming_answers(gateway_schema: Any) -> None:
    # Driven through Hypothesis directly: schemathesis' pytest plugin does not run on pytest 9.
    operations = [result.ok() for result in gateway_schema.get_all_operations()]
    assert len(operations) > 15
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def run(case: Any) -> None:
            case.call_and_validate(
                # FastAPI's schema lists only 200 for routes whose errors are protocol bodies
                # (400, 404, 413, 415, 503 ...); what matters here is "never a 5xx".
                excluded_checks=[checks.status_code_conformance, checks.positive_data_acceptance],
                timeout=10,
            )

        try:
            run()
        except Exception as error:  # noqa: BLE001 - collect every operation's failure
            failures.append(f"{operation.label}: {str(error)[:1500]}")
    assert not failures, "\n\n".join(failures)
