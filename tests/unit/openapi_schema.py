"""Test helper: validate JSON instances against a component schema of OpenAI's OpenAPI spec.

The spec (openai-openapi.yaml, OpenAPI 3.0 with some 3.1 `type: "null"` already mixed in) is loaded
once per test session. OpenAPI 3.0's `nullable: true` means nothing to a JSON-Schema validator, so it
is rewritten as a `null` union, and 3.0's boolean `exclusiveMinimum`/`exclusiveMaximum` as the
numeric 2020-12 form. `$ref`s are resolved by jsonschema through a `referencing` registry holding
the converted document. Formats are not checked (the spec uses private ones such as `unixtime`).

Where the spec lives: $HERON_OPENAI_SPEC, else /work/shared/openai-openapi.yaml.
"""

from __future__ import annotations

import copy
import functools
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(os.environ.get("HERON_OPENAI_SPEC", "/work/shared/openai-openapi.yaml"))
_BASE_URI = "urn:openai-openapi"
# Keys whose values are data, not schemas: never rewrite inside them.
_DATA_KEYS = frozenset({"example", "examples", "default", "enum", "const"})


def spec_available() -> bool:
    return SPEC_PATH.is_file()


def convert_nullable(node: Any) -> Any:
    """Return a copy of an OpenAPI 3.0 schema tree rewritten for a JSON-Schema 2020-12 validator."""
    if isinstance(node, list):
        return [convert_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: value if key in _DATA_KEYS or key.startswith("x-") else convert_nullable(value)
        for key, value in node.items()
    }
    # 3.0 writes `minimum: 0, exclusiveMinimum: true`; 2020-12 writes `exclusiveMinimum: 0`.
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(exclusive), bool):
            if out.pop(exclusive) and bound in out:
                out[exclusive] = out.pop(bound)
    # `is True`: inside a `properties` map a property could itself be named "nullable".
    nullable = out.get("nullable") is True
    if isinstance(out.get("nullable"), bool):
        del out["nullable"]
    if not nullable:
        return out
    simple_type = isinstance(out.get("type"), str) and not any(k in out for k in ("$ref", "oneOf", "anyOf", "allOf"))
    if simple_type:
        out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        return out
    # A $ref, a oneOf/anyOf/allOf or an untyped schema: widen it from outside.
    return {"anyOf": [out, {"type": "null"}]}


@functools.cache
def _converted_spec() -> dict[str, Any]:
    with SPEC_PATH.open("rb") as f:
        raw = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {"components": {"schemas": convert_nullable(raw["components"]["schemas"])}}


@functools.cache
def _registry() -> Registry:
    resource = Resource.from_contents(_converted_spec(), default_specification=DRAFT202012)
    return Registry().with_resource(_BASE_URI, resource)


def component(name: str) -> dict[str, Any]:
    """A deep copy of one converted component schema, free for a test to patch."""
    return copy.deepcopy(_converted_spec()["components"]["schemas"][name])


def _absolute_refs(node: Any) -> Any:
    """Point a detached schema's `#/components/...` refs at the registered spec document."""
    if isinstance(node, list):
        return [_absolute_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _absolute_refs(value) for key, value in node.items()}
    if isinstance(out.get("$ref"), str) and out["$ref"].startswith("#/"):
        out["$ref"] = _BASE_URI + out["$ref"]
    return out


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(_absolute_refs(schema), registry=_registry())


@functools.cache
def _component_validator(name: str) -> Draft202012Validator:
    if name not in _converted_spec()["components"]["schemas"]:
        raise KeyError(f"no component schema named {name!r} in {SPEC_PATH}")
    return Draft202012Validator({"$ref": f"{_BASE_URI}#/components/schemas/{name}"}, registry=_registry())


def _leaf_errors(error: ValidationError) -> Iterator[ValidationError]:
    """Descend anyOf/oneOf failures into the branch the instance got furthest in.

    Without this, a bad item deep inside a nullable object is reported only as "not valid under
    any of the given schemas" at the object; with it, the error names the item.
    """
    if not error.context:
        yield error
        return
    by_branch: dict[Any, list[ValidationError]] = defaultdict(list)
    for sub in error.context:
        by_branch[sub.relative_schema_path[0]].append(sub)
    deepest = max(by_branch.values(), key=lambda subs: max(len(sub.absolute_path) for sub in subs))
    for sub in deepest:
        yield from _leaf_errors(sub)


def schema_errors(instance: Any, name: str | None = None, *, schema: dict[str, Any] | None = None) -> list[str]:
    """Every violation of component `name` (or of an explicit `schema`), as sorted "path: message" lines."""
    validator = _component_validator(name) if schema is None else _validator(schema)
    lines = {
        f"{'/'.join(map(str, leaf.absolute_path)) or '<root>'}: {leaf.message}"
        for error in validator.iter_errors(instance)
        for leaf in _leaf_errors(error)
    }
    return sorted(lines)


def assert_matches(instance: Any, name: str) -> None:
    """Fail with every violation listed if `instance` does not match component `name`."""
    errors = schema_errors(instance, name)
    assert not errors, f"instance does not match {name}:\n" + "\n".join(errors)
