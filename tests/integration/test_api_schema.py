"""Schema-driven test of the whole HTTP API (schemathesis over the app's own OpenAPI document):
whatever a client sends, with or without a valid key, the API never answers 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from brainscan.modelrepo import ModelCard
from tests.support.api import Api, make_api
from tests.support.services import flushed_broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def schema_broker() -> Iterator[str]:
    yield from flushed_broker("redis://127.0.0.1:6379/14")


@pytest.fixture
def api(
    sqlite_url: str, schema_broker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    api = None
    for api in make_api(sqlite_url, schema_broker, tmp_path, monkeypatch, max_request_bytes=200_000):
        folder = api.settings.model_dir / "demo" / "1"
        folder.mkdir(parents=True)
        ModelCard(name="demo", version="1").write(folder)  # so /v1/models has a model to describe
        yield api


def test_no_server_errors(api: Api) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    statuses: dict[tuple[str, int], int] = {}
    for operation in operations:
        if operation.path == "/readyz":
            continue  # answers 503 by design when no worker runs (and none does here)

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:  # type: ignore[no-untyped-def]
            for headers in (api.auth(), {}):
                response = case.call(headers={**(case.headers or {}), **headers})
                key = (f"{case.method} {case.operation.path}", response.status_code)
                statuses[key] = statuses.get(key, 0) + 1
                assert response.status_code < 500, (
                    case.method,
                    case.path,
                    response.status_code,
                    response.text[:300],
                )

        check()

    # The generated requests got through auth and validation too, not only 401/422 answers.
    assert any(k[0] == "POST /v1/jobs" and k[1] == 202 for k in statuses), statuses
    assert any(k[0] == "GET /v1/models" and k[1] == 200 for k in statuses), statuses
