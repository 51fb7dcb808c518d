"""docs/openapi.yaml is a valid OpenAPI 3 document and describes what the service answers
(in process here; through real Envoy in tests/e2e/test_hostile_input_e2e.py)."""

from __future__ import annotations

import pytest
import yaml

from extproc.framework.config import default_config_text
from extproc.framework.testing import GatewayHarness

from ..conftest import IN_CI, ROOT

OPENAPI = ROOT / "docs" / "openapi.yaml"

try:
    import jsonschema
    from openapi_spec_validator import validate
except ImportError:  # pragma: no cover - the `test` extra installs them
    if IN_CI:
        raise
    pytest.skip("openapi-spec-validator is not installed (pip install -e '.[test]')", allow_module_level=True)


def spec() -> dict:
    return yaml.safe_load(OPENAPI.read_text())


def schema_of(name: str) -> dict:
    """A component schema with its references resolvable (OpenAPI 3.0 ``nullable`` aside)."""
    doc = spec()
    return {**doc["components"]["schemas"][name], "components": doc["components"]}


def check(instance, name: str) -> None:
    jsonschema.validate(instance, _nullable_to_json_schema(schema_of(name)))


def _nullable_to_json_schema(node):
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema (``type`` or ``oneOf`` plus null)."""
    if isinstance(node, dict):
        node = {k: _nullable_to_json_schema(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable_to_json_schema(v) for v in node]
    return node


def test_openapi_document_is_valid():
    validate(spec())
    doc = spec()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(doc["paths"])


def config():
    cfg = yaml.safe_load(default_config_text())
    cfg["plugins"] = [{"name": "model_tiers"}]
    return cfg


async def test_answers_and_errors_match_the_document():
    async with GatewayHarness(config=config()) as gw:
        chat = await gw.chat("hi", model="small")
        check(chat.json(), "ChatCompletion")
        done = await gw.send({"model": "small", "prompt": "hi"}, path="/v1/completions")
        check(done.json(), "Completion")
        models = await gw.send(b"", path="/v1/models", method="GET")
        check(models.json(), "ModelList")
        for bad in (await gw.send(b"{", path="/v1/chat/completions"),
                    await gw.send({"model": "small"}, path="/v1/chat/completions"),
                    await gw.send({"model": "nope", "messages": [{"role": "user", "content": "x"}]})):
            assert 400 <= bad.status < 500
            check(bad.json(), "Error")
