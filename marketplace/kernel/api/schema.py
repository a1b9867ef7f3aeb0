"""OpenAPI post-processing: the error responses every operation can give, as problem+json.

drf-spectacular documents what a view declares; the errors that authentication, permissions,
throttling, parsing and object lookup add to every view are filled in here, so that the schema
lists every status the API answers with and a client generated from it knows their shape.
"""

PROBLEM_SCHEMA = {
    "type": "object",
    "description": "An RFC 9457 problem document.",
    "properties": {
        "type": {"type": "string", "description": "A URI reference naming the kind of problem."},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "object",
            "description": "Field errors: each field's messages (nested for nested fields).",
            "additionalProperties": True,
        },
    },
    "required": ["type", "title", "status", "detail"],
}
PROBLEM_CONTENT = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before the next request.", "schema": {"type": "integer"}}
}


def _errors_of(operation: dict) -> dict[str, dict]:
    parameters = operation.get("parameters", [])
    schemes = {name for requirement in operation.get("security", []) for name in requirement}
    errors = {}
    if operation.get("requestBody") or any(p.get("in") in ("query", "header") for p in parameters):
        errors["400"] = {"description": "The request is malformed or has invalid fields."}
    if schemes:
        errors["401"] = {"description": "No credentials, or credentials that are unknown, revoked or expired."}
        errors["403"] = {"description": "The credentials do not allow this call (for an API key: a missing scope)."}
    if any(p.get("in") == "header" and p.get("name") == "Idempotency-Key" for p in parameters):
        errors["422"] = {"description": "This Idempotency-Key was already used with a different request body."}
    if any(p.get("in") == "path" for p in parameters):
        errors["404"] = {"description": "No such object among the caller's own."}
    if "ApiKey" in schemes:
        errors["429"] = {"description": "The API key's rate limit is spent.", "headers": RETRY_AFTER}
    return errors


def problem_responses(result, generator, request, public):
    """POSTPROCESSING_HOOKS entry: adds the implicit error responses, all typed as problem+json."""
    result.setdefault("components", {}).setdefault("schemas", {}).setdefault("Problem", PROBLEM_SCHEMA)
    for methods in result.get("paths", {}).values():
        for operation in methods.values():
            responses = operation.setdefault("responses", {})
            for code, response in _errors_of(operation).items():
                responses.setdefault(code, response)
            for code, response in responses.items():
                if code[0] in "45" and "content" not in response:
                    response["content"] = PROBLEM_CONTENT
    return result
