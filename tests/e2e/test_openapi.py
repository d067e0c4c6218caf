"""/openapi.json describes the live API; schemathesis checks the server against it.

Every operation gets a bounded number of generated requests (valid and invalid per the schema)
against the tiny speculative server. Each response must be a 2xx or a documented 4xx JSON error
of the `Error` shape, conform to the documented schema and content type, and never be a 500.
Afterwards the server holds no running request and no KV block.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance,  # noqa: E402
                                               response_schema_conformance,
                                               status_code_conformance)

from server.openapi import document  # noqa: E402
from server.protocol import loads  # noqa: E402
from tests.e2e.conftest import http, scrape  # noqa: E402

MAX_EXAMPLES = 30  # per operation and generation mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
# NOTE: schemathesis' pytest plugin does not run under pytest 9 here ('_nodeid'), so each
# operation is driven through hypothesis directly with the schema's own strategies.
SCHEMA = schemathesis.openapi.from_dict(document("test"))
OPERATIONS = [(path, method, mode) for path, ops in document("test")["paths"].items()
              for method, op in ops.items()
              for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
              if mode == GenerationMode.POSITIVE or "requestBody" in op]


def test_openapi_document_is_3_1_and_lists_every_route(spec_server):
    status, headers, body = http("GET", spec_server.base_url + "/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    doc = loads(body)
    assert doc["openapi"].startswith("3.1")
    routes = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert {("/v1/chat/completions", "post"), ("/v1/completions", "post"),
            ("/v1/models", "get"), ("/health", "get"), ("/health/live", "get"),
            ("/metrics", "get"), ("/version", "get"), ("/tokenize", "post"),
            ("/detokenize", "post"), ("/infill", "post"), ("/ping", "get")} <= routes
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"response_format", "structured_outputs", "tools", "tool_choice",
            "parallel_tool_calls"} <= set(chat)
    assert "suffix" in doc["components"]["schemas"]["CompletionRequest"]["properties"]
    error = doc["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["required"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path,method,mode", OPERATIONS)
def test_live_server_conforms_to_its_openapi(spec_server, path, method, mode):
    operation = SCHEMA[path][method.upper()]
    seen = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(base_url=spec_server.base_url, checks=CHECKS,
                                          timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(loads(response.content)["error"]) == {"message", "type", "param",
                                                             "code"}
    run()
    assert seen
    if mode == GenerationMode.POSITIVE and "requestBody" in document("test")["paths"][path][
            method] and (path != "/infill" or spec_server.app.fim_template is not None):
        assert 200 in seen  # valid bodies do generate, not only bounce off validation


def test_nothing_leaks_after_the_fuzzing(spec_server):
    metrics = scrape(spec_server)
    assert metrics["specdec:num_requests_running"] == 0
    assert metrics["specdec:num_requests_waiting"] == 0
    assert metrics["specdec:num_blocks_free"] == metrics["specdec:num_blocks_total"]
