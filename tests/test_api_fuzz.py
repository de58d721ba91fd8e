"""The OpenAPI document says exactly what the live server does: schemathesis generates valid and
invalid requests from `/openapi.json` of a real `lookalike serve` on loopback and checks every
response against the document (status codes, content types, headers, bodies), with and without the
token. (schemathesis' pytest plugin does not run under pytest 9, so hypothesis drives its strategies.)"""

from __future__ import annotations

import os
import shutil
from collections import Counter

import httpx
import pytest
import schemathesis
from conftest import API_TOKEN, start_api_server, stop_server
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)


def valid_data_is_not_refused_as_invalid(ctx, response, case) -> None:
    """A request the document calls valid must not be answered 'invalid request' (415/422): other
    refusals (not an image, no such product, no token) are about the data, not its shape."""
    if case.meta is not None and case.meta.generation.mode.is_positive:
        assert response.status_code not in (415, 422), (
            f"{case.operation.label}: schema-valid request refused with {response.status_code}: {response.text[:300]}"
        )


def invalid_json_is_rejected(ctx, response, case) -> None:
    """schemathesis' negative_data_rejection, for JSON bodies and parameters. In a multipart body an
    empty array is sent as no part at all, so the 'invalid' request is a valid one on the wire; the
    multipart shape is checked by test_repeated_form_fields_are_refused instead."""
    if response.status_code == 413 or (case.media_type or "").startswith("multipart/"):
        return None  # 413 is a rejection too (schemathesis' list leaves it out)
    return negative_data_rejection(ctx, response, case)


CHECKS = [
    not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
    response_schema_conformance, invalid_json_is_rejected, ignored_auth, valid_data_is_not_refused_as_invalid,
]  # fmt: skip


@pytest.fixture(scope="module")
def live(tmp_path_factory, branded_catalog):
    target = tmp_path_factory.mktemp("fuzz") / "cat"
    shutil.copytree(branded_catalog, target)
    proc, url = start_api_server(target, target.parent / "server.log", "--max-upload-mb", "1")
    yield url, schemathesis.openapi.from_url(url + "/openapi.json")
    stop_server(proc)


@pytest.mark.parametrize("authorized", [False, True])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_live_server_conforms_to_its_openapi(live, authorized, mode):
    url, schema = live
    headers = {"Authorization": f"Bearer {API_TOKEN}"} if authorized else None
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /search", "POST /products", "DELETE /products/{product_id}",
                                               "POST /feedback"}  # fmt: skip
    seen = []
    # CI runs a fixed sample (a failure there is reproducible); LOOKALIKE_FUZZ_EXAMPLES=N explores afresh
    examples = int(os.environ.get("LOOKALIKE_FUZZ_EXAMPLES", 0)) or 25
    derandomize = "LOOKALIKE_FUZZ_EXAMPLES" not in os.environ
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=derandomize)  # fmt: skip
        def run(case):
            response = case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)
            seen.append(response.status_code)
            if response.status_code >= 400:
                assert "error" in response.json()

        try:
            run()
        except Unsatisfiable:
            # nothing in this operation's inputs can be made invalid (GET /health; any string is an id)
            assert mode == GenerationMode.NEGATIVE, operation.label
    assert len(seen) >= (2 if mode == GenerationMode.POSITIVE else 1) * len(operations)
    print(mode, authorized, sorted(Counter(seen).items()))


def test_methods_and_auth_are_as_documented(live):
    """Every method the document does not list for a path is a 405 naming the allowed ones, and an
    operation needs the token exactly when the document says it does."""
    url, _ = live
    paths = httpx.get(url + "/openapi.json", timeout=10).json()["paths"]
    for path, operations in paths.items():
        concrete = url + path.replace("{product_id}", "nope").replace("{n}", "0")
        documented = {m.upper() for m in operations}
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - documented:
            r = httpx.request(method, concrete, timeout=10)
            assert r.status_code == 405, (method, path, r.status_code)
            assert set(r.headers["allow"].replace(" ", "").split(",")) == documented, (method, path)
        for method, operation in operations.items():
            r = httpx.request(method.upper(), concrete, timeout=30)
            assert (r.status_code == 401) == bool(operation.get("security")), (method, path, r.status_code)


def test_repeated_form_fields_are_refused(live):
    url, _ = live
    png = _png()
    for field, value in (("box", "whole"), ("k", "3"), ("where", "{}")):
        r = httpx.post(url + "/search", files=[("image", ("a.png", png))], data={field: [value, value]}, timeout=30)
        assert r.status_code == 422 and "given more than once" in r.json()["error"], (field, r.text)
    r = httpx.post(url + "/search", files=[("image", ("a.png", png)), ("image", ("b.png", png))], timeout=30)
    assert r.status_code == 422 and "image" in r.json()["error"]


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    return buf.getvalue()
