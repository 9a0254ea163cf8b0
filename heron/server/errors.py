"""Errors on the wire: `APIError` and the mapping of every failure onto OpenAI's error envelope.

Every non-2xx body Heron sends is `{"error": {"message", "type", "param", "code"}}`. Route code raises
`APIError` (or a helper below); `validation_error()` turns a pydantic ValidationError into the 400
OpenAI would send for the same mistake, with OpenAI's wording and `param` as a dotted path into the
caller's own JSON (`messages[0].content`), never pydantic's internal location.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from heron.server.protocol import ErrorDetail, ErrorResponse

# OpenAI's error `type` for each status we send.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
}


# Messages and params can quote what the caller sent (a model name, a field name, a value): a
# 10 MB model name must not come back as a 10 MB error body.
MAX_MESSAGE_CHARS = 2000
MAX_PARAM_CHARS = 256


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, marked when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class APIError(Exception):
    """An error answered with OpenAI's envelope and a real HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        message = shorten(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else shorten(param, MAX_PARAM_CHARS)
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=self.detail()).model_dump()

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: str) -> APIError:
    return APIError(
        404,
        f"The model `{shorten(name, 256)}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


# ---------------------------------------------------------------------------------------------
# pydantic ValidationError -> OpenAI 400
# ---------------------------------------------------------------------------------------------

_JSON_TYPE_NAMES = {
    "float_type": "a decimal",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "a boolean",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "string_or_array_type": "a string or an array",
    "prompt_type": "a string, an array of strings, an array of tokens or an array of token arrays",
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _param_path(loc: tuple[Any, ...], body: Any, keep_last: bool) -> str | None:
    """pydantic's loc -> OpenAI's `param`, keeping only steps that exist in the caller's JSON.

    pydantic puts union tags ('user', 'array', 'tokens') and '[key]' markers into the location; they
    are not keys of the caller's data, so walking the data alongside the loc drops them. A missing
    field is not in the data either, so `keep_last` keeps the final step for those.
    """
    parts: list[str] = []
    node = body
    for i, step in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(step, int) and isinstance(node, list) and 0 <= step < len(node):
            parts.append(f"[{step}]")
            node = node[step]
        elif isinstance(step, str) and isinstance(node, dict) and (step in node or (last and keep_last)):
            parts.append(f".{step}" if parts else step)
            node = node.get(step)
        # anything else is a tag or marker ('user', 'array', '[key]'): skip it
    return "".join(parts) or None


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _describe(error: dict[str, Any], param: str | None) -> tuple[str, str | None]:
    """(message, code) in OpenAI's wording for one pydantic error."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    name = param or "body"
    if kind == "missing":
        return f"Missing required parameter: '{name}'.", "missing_required_parameter"
    if kind in _JSON_TYPE_NAMES:
        return (
            f"Invalid type for '{name}': expected {_JSON_TYPE_NAMES[kind]}, but got {_json_type(value)} instead.",
            "invalid_type",
        )
    if kind == "finite_number":
        return f"Invalid '{name}': expected a finite number, but got {value!r} instead.", "invalid_value"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        # Worded by the parameter's type (a float bound), not by how the caller wrote the number.
        bound_value = next((ctx[k] for k in ("ge", "gt", "le", "lt") if k in ctx), None)
        numeric = "decimal" if isinstance(bound_value, float) else "integer"
        if kind.startswith("greater"):
            bound, sign, side = ctx.get("ge", ctx.get("gt")), (">=" if "ge" in ctx else ">"), "below minimum"
        else:
            bound, sign, side = ctx.get("le", ctx.get("lt")), ("<=" if "le" in ctx else "<"), "above maximum"
        code = f"{numeric}_{side.split()[0]}_{side.split()[1][:3]}_value"
        return (
            f"Invalid '{name}': {numeric} {side} value. Expected a value {sign} {_number(bound)}, "
            f"but got {_number(value)} instead.",
            code,
        )
    if kind == "too_short":
        minimum = ctx.get("min_length", 1)
        if ctx.get("actual_length") == 0:
            return (
                f"Invalid '{name}': empty array. Expected an array with minimum length {minimum}, "
                "but got an empty array instead.",
                "empty_array",
            )
        return (
            f"Invalid '{name}': array too short. Expected an array with minimum length {minimum}, "
            f"but got an array with length {ctx.get('actual_length')} instead.",
            "array_below_min_length",
        )
    if kind == "too_long" and isinstance(value, dict):
        return (
            f"Invalid '{name}': too many entries. Expected an object with at most {ctx.get('max_length')} "
            # pydantic leaves actual_length empty for a dict: count the entries ourselves.
            f"entries, but got {ctx.get('actual_length') or len(value)} instead.",
            "object_above_max_entries",
        )
    if kind == "too_long":
        return (
            f"Invalid '{name}': array too long. Expected an array with maximum length {ctx.get('max_length')}, "
            f"but got an array with length {ctx.get('actual_length')} instead.",
            "array_above_max_length",
        )
    if kind in ("literal_error", "enum"):
        return f"Invalid value: {value!r}. Supported values are: {ctx.get('expected')}.", "invalid_value"
    if kind == "union_tag_invalid":
        return (
            f"Invalid value: '{ctx.get('tag')}'. Supported values are: {ctx.get('expected_tags')}.",
            "invalid_value",
        )
    if kind == "union_tag_not_found":
        return f"Missing required parameter: '{name}'.", "missing_required_parameter"
    if kind == "string_pattern_mismatch":
        return (
            f"Invalid '{name}': string does not match pattern. Expected a string that matches the pattern "
            f"'{ctx.get('pattern')}'.",
            "invalid_value",
        )
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {name}", None
    if kind in ("invalid_request", "value_error", "assertion_error"):
        return str(error["msg"]).removeprefix("Value error, "), None
    return f"Invalid '{name}': {error['msg']}.", "invalid_value"


def validation_error(exc: ValidationError, body: Any) -> APIError:
    """The first error pydantic found, as OpenAI words it (OpenAI also reports one at a time)."""
    errors = exc.errors(include_url=False)
    # A type error in one union branch is reported beside the others; prefer the most specific one.
    error = max(errors, key=lambda e: len(e["loc"]))
    if error["type"] == "invalid_request":
        param = (error.get("ctx") or {}).get("param")
    else:
        param = _param_path(tuple(error["loc"]), body, keep_last=error["type"] == "missing")
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            # The fault is the discriminating field itself (`messages[0].role`), not its object.
            discriminator = str((error.get("ctx") or {}).get("discriminator", "")).strip("'")
            if discriminator.isidentifier():
                param = f"{param}.{discriminator}" if param else discriminator
    message, code = _describe(error, param)
    if code is None and error["type"] == "invalid_request":
        code = (error.get("ctx") or {}).get("code")
    return APIError(400, message, param=param, code=code)


def unknown_fields_error(fields: list[str]) -> APIError:
    # OpenAI's own wording for an argument it does not know.
    return APIError(400, f"Unrecognized request argument supplied: {fields[0]}", param=fields[0])
