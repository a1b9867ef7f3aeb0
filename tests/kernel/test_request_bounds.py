"""Bounded work per request: JSON size and depth, text a database can store, the body cap in front
of Django under ASGI, and a middleware chain that stays asynchronous (so long polls hold no thread)."""

import json

import pytest
from django.conf import settings
from django.test import AsyncClient
from django.utils.module_loading import import_string

from marketplace.kernel.asgi import body_limit
from tests.conftest import problem_of, run_async

ENROL = "/api/agent/v1/enrol"
OFFERS = "/api/v1/offers"


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def raw_post(client, path: str, body: str | bytes):
    return client.post(path, body, content_type="application/json")


class TestJson:
    @pytest.mark.parametrize("levels", [33, 950, 100_000])
    def test_json_nested_too_deep_is_a_400_problem_even_unauthenticated(self, client, db, levels):
        body = problem_of(raw_post(client, ENROL, nested(levels)), 400)

        assert "nested deeper than 32 levels" in body["detail"]

    def test_json_as_deep_as_allowed_reaches_the_serializer(self, client, db):
        document = json.dumps({"token": "shs_enrol_x", "hostname": json.loads(nested(30))})

        assert problem_of(raw_post(client, ENROL, document), 400)["errors"]["hostname"]

    @pytest.mark.parametrize(
        "document",
        ['{"token": "a\\u0000b"}', '{"tok\\u0000en": "x"}', '{"token": "\\ud800"}', '{"token": ["\\u0000"]}'],
    )
    def test_a_nul_or_a_lone_surrogate_anywhere_in_json_is_a_400(self, client, db, document):
        assert "NUL" in problem_of(raw_post(client, ENROL, document), 400)["detail"]

    @pytest.mark.parametrize("body", [b'{"token": "\xff"}', b"NaN", b'{"token": Infinity}'])
    def test_invalid_utf8_and_non_json_numbers_are_a_400(self, client, db, body):
        problem_of(raw_post(client, ENROL, body), 400)

    def test_a_body_over_the_limit_is_a_413_problem(self, client, db, settings):
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

        body = problem_of(raw_post(client, ENROL, json.dumps({"token": "x" * 2000})), 413)

        assert body["type"] == "/problems/payload-too-large" and "1000 bytes" in body["detail"]

    def test_a_body_over_the_limit_read_by_a_plain_view_is_a_413_problem_too(self, client, db, settings):
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

        problem_of(client.post("/api/stripe/webhook", "x" * 2000, content_type="application/json"), 413)


class TestText:
    @pytest.mark.parametrize(
        "path",
        [f"{OFFERS}?unit=a%00b", f"{OFFERS}?cursor=%00", f"{OFFERS}?q=unit%3D%00", f"{OFFERS}?a%00=1",
         f"{OFFERS}?unit=%FF", "/api/v1/jobs/%00/logs", "/portal/units/%00/", "/api/v1/jobs%FF"],
    )  # fmt: skip
    def test_a_nul_or_invalid_utf8_in_the_path_or_query_is_a_400_problem(self, renter_api, path):
        body = problem_of(renter_api.get(path), 400)

        assert body["type"] == "/problems/invalid-text"

    def test_ordinary_text_passes(self, renter_api):
        assert renter_api.get(f"{OFFERS}?unit=caf%C3%A9").status_code == 200


class TestAsgiBodyLimit:
    """The ASGI application refuses a large body before Django reads (and spools) it."""

    @staticmethod
    def call(headers, chunks):
        reached, sent = [], []

        async def inner(scope, receive, send):
            while True:
                message = await receive()
                reached.append(message)
                if not message.get("more_body"):
                    break
            await send({"type": "http.response.start", "status": 200, "headers": []})

        async def receive():
            return chunks.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
        run_async(body_limit(inner)(scope, receive, send))
        return reached, sent

    def test_a_declared_length_over_the_limit_is_refused_unread(self, settings):
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10
        chunks = [{"type": "http.request", "body": b"x" * 11}]

        reached, sent = self.call([(b"content-length", b"11")], chunks)

        assert reached == [] and chunks  # nothing read, nothing passed on
        assert sent[0]["status"] == 413
        assert json.loads(sent[1]["body"])["type"] == "/problems/payload-too-large"

    def test_a_chunked_body_is_counted(self, settings):
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10
        chunks = [{"type": "http.request", "body": b"x" * 6, "more_body": True}] * 2

        reached, sent = self.call([], chunks)

        assert reached == [] and sent[0]["status"] == 413

    def test_a_body_within_the_limit_reaches_the_application_whole(self, settings):
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10
        chunks = [
            {"type": "http.request", "body": b"12345", "more_body": True},
            {"type": "http.request", "body": b"678"},
        ]

        reached, sent = self.call([(b"content-length", b"8")], list(chunks))

        assert reached == chunks and sent[0]["status"] == 200


def test_every_middleware_can_run_asynchronously():
    """One synchronous-only middleware would have Django call the rest of the chain, an async long
    poll included, from a thread that it then holds for the whole wait."""
    synchronous = [path for path in settings.MIDDLEWARE if not getattr(import_string(path), "async_capable", False)]

    assert synchronous == []


@pytest.mark.django_db
def test_static_files_are_served_in_the_asynchronous_chain():
    response = run_async(AsyncClient().get("/static/vendor/htmx-LICENSE.txt"))

    assert response.status_code == 200


def _unbounded_numbers(schema: dict, where: str, components: dict) -> list[str]:
    """Request fields and parameters holding a number with no minimum or maximum, or a decimal
    string with no pattern (DRF writes one from max_digits)."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    found = []
    for part in schema.get("allOf", []) + schema.get("oneOf", []) + schema.get("anyOf", []):
        found += _unbounded_numbers(part, where, components)
    if schema.get("type") in ("integer", "number") and not {"minimum", "maximum"} <= set(schema):
        found.append(where)
    if schema.get("format") == "decimal" and "pattern" not in schema:
        found.append(where)
    for name, field in schema.get("properties", {}).items():
        if not field.get("readOnly"):
            found += _unbounded_numbers(field, f"{where}.{name}", components)
    if "items" in schema:
        found += _unbounded_numbers(schema["items"], f"{where}[]", components)
    return found


def test_every_number_a_client_sends_is_bounded_in_the_schema():
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    components, found = schema["components"]["schemas"], []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                where = f"{method} {path} ?{parameter['name']}"
                found += _unbounded_numbers(parameter.get("schema", {}), where, components)
            for content in operation.get("requestBody", {}).get("content", {}).values():
                found += _unbounded_numbers(content["schema"], f"{method} {path} body", components)

    assert found == []
