"""Issue 11: schemathesis over the server's own OpenAPI document, every operation, with and
without the API key: no 5xx for anything a client can send, every status documented, every
response body matching its schema. Bounded examples keep it under a minute on the tiny model."""

from __future__ import annotations

import os

import pytest
from test_server_support import ServerThread

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    response_schema_conformance,
    status_code_conformance,
)

from cosyvoice_lite.engine import Engine  # noqa: E402
from cosyvoice_lite.serving import Settings, create_app  # noqa: E402

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))  # per operation and key setting
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


@pytest.fixture(scope="module", params=["open", "keyed"])
def server(request, v1_dir, tmp_path_factory):
    # short texts keep the syntheses that do succeed quick
    settings = Settings(
        max_text_chars=24,
        max_instruct_chars=24,
        max_queue=4,
        request_timeout=30,
        api_key=KEY if request.param == "keyed" else None,
        docs_public=True,
        voices_dir=tmp_path_factory.mktemp("fuzz-voices"),
    )
    # no traced graphs: tracing beside hypothesis parsing its strategies' source in the test's
    # thread hit CPython 3.11's "AST constructor recursion depth mismatch" (two parsers at once)
    engine = Engine.load(v1_dir, capture_graphs=False)
    with engine, ServerThread(create_app(engine, settings)) as running:
        running.key = settings.api_key
        yield running


def test_every_operation_answers_within_its_contract(server):
    """Every operation, ``EXAMPLES`` generated cases each (derandomized: the same run every
    time), with every check; failures are collected and reported together."""
    api = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    auth = {"Authorization": f"Bearer {server.key}"} if server.key else None
    counts = {"operations": 0, "cases": 0}
    failures: list[str] = []
    for result in api.get_all_operations():
        operation = result.ok()
        counts["operations"] += 1
        # valid cases and cases that break the schema on purpose (wrong types, ranges, fields)
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | (
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        )

        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case) -> None:
            counts["cases"] += 1
            # with a key set, every other case goes without it: its 401 must conform too
            headers = auth if counts["cases"] % 2 else None
            try:
                case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)
            except Exception as exc:  # noqa: BLE001 - collected, reported below
                failures.append(f"{case.method} {case.path}: {exc}"[:2000])

        run()
    print(
        f"schemathesis ({'keyed' if server.key else 'open'}): {counts['operations']} "
        f"operations, {counts['cases']} cases, {len(failures)} failures"
    )
    assert counts["operations"] >= 10
    assert not failures, "\n\n".join(failures[:5])


def test_schema_documents_statuses_limits_and_ranges(server):
    import httpx

    headers = {"Authorization": f"Bearer {server.key}"} if server.key else {}
    doc = httpx.get(f"{server.url}/openapi.json", headers=headers).json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"413", "500", "503"} <= set(responses), (method, path)
            # 401 where the key is asked for: a key is configured and the path is not public
            keyed = bool(server.key) and path not in ("/health", "/ready", "/info")
            assert ("401" in responses) == keyed, (method, path)
            assert (operation.get("security") == []) == (bool(server.key) and not keyed)
            if "422" in responses:  # our error body, not FastAPI's HTTPValidationError
                schema = responses["422"]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path)
    tts = doc["components"]["schemas"]["TTSRequest"]["properties"]
    assert tts["text"]["maxLength"] == 24 and tts["speed"]["minimum"] == 0.5
    assert tts["speed"]["maximum"] == 2.0
    assert {"409", "429", "504", "507"} <= set(doc["paths"]["/voices"]["post"]["responses"])
    if server.key:  # /docs gets an Authorize button, generated clients send the key
        assert doc["security"] == [{"bearerAuth": []}]
        scheme = doc["components"]["securitySchemes"]["bearerAuth"]
        assert scheme == {"type": "http", "scheme": "bearer"}
    # an audio route's 200 lists what it sends: every format, and never FastAPI's JSON
    for path, method in [("/tts", "post"), ("/tts/upload", "post"), ("/v1/audio/speech", "post")]:
        kinds = set(doc["paths"][path][method]["responses"]["200"]["content"])
        assert {"audio/wav", "audio/mpeg", "audio/flac", "audio/pcm"} <= kinds, path
        assert "application/json" not in kinds, path
    recording = doc["paths"]["/voices/{name}/audio"]["get"]["responses"]["200"]["content"]
    assert set(recording) == {"audio/wav"}
