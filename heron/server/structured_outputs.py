"""Structured-output request fields -> the engine's StructuredOutputsParams, and their compilation.

In: OpenAI's `response_format` (text / json_object / json_schema) or vLLM's `structured_outputs`
(json / regex / choice / grammar / json_object), its older `guided_*` spellings, and llama.cpp's
top-level `grammar` / `json_schema`, on chat and text completions alike. Out: one StructuredOutputsParams (or None) and the request field it came
from, which `compile_constraint` compiles on a worker thread, turning a refused schema or grammar
into a 400 that names that field.
"""

from __future__ import annotations

from dataclasses import dataclass

from heron.sampling_params import StructuredOutputsParams
from heron.server.errors import APIError, bad_request
from heron.server.protocol import GenerationRequest, ResponseFormatJSONObject, ResponseFormatJSONSchema
from heron.server.registry import ServedModel
from heron.structured import CompiledGrammar, GrammarError, GrammarPoolClosed, GrammarUnavailable


@dataclass
class Constraint:
    spec: StructuredOutputsParams
    param: str  # the request field it came from, for errors
    what: str  # how errors describe it, e.g. "response_format 'person'"


def constraint_from(request: GenerationRequest) -> Constraint | None:
    """The one output constraint the request asks for; 400 if it asks for several or none valid."""
    found: list[Constraint] = []
    response_format = request.response_format
    if isinstance(response_format, ResponseFormatJSONObject):
        found.append(Constraint(StructuredOutputsParams(json_object=True), "response_format", "response_format"))
    elif isinstance(response_format, ResponseFormatJSONSchema):
        json_schema = response_format.json_schema
        if json_schema.schema_ is None:
            raise bad_request(
                "response_format of type 'json_schema' needs 'json_schema.schema'.",
                param="response_format.json_schema.schema",
            )
        found.append(
            Constraint(
                # strict: refuse what cannot be enforced; otherwise enforce what can be.
                StructuredOutputsParams(json=json_schema.schema_, strict=bool(json_schema.strict)),
                "response_format",
                f"schema for response_format '{json_schema.name}'",
            )
        )
    so = request.structured_outputs
    if so is not None:
        found.append(
            _spec(
                "structured_outputs",
                json=so.json_,
                regex=so.regex,
                choice=so.choice,
                grammar=so.grammar,
                json_object=bool(so.json_object),
            )
        )
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        value = getattr(request, name)
        if value is not None:
            found.append(_spec(name, **{name.removeprefix("guided_"): value}))
    # llama.cpp's server: top-level `grammar` (GBNF) and `json_schema`.
    if request.grammar is not None:
        found.append(_spec("grammar", grammar=request.grammar))
    if request.json_schema is not None:
        found.append(_spec("json_schema", json=request.json_schema))
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise bad_request(f"Ask for one output constraint at a time; this request sets {names}.", param=found[1].param)
    return found[0] if found else None


def _spec(param: str, **forms) -> Constraint:
    try:
        spec = StructuredOutputsParams(**forms)
    except ValueError as exc:
        raise bad_request(f"Invalid '{param}': {exc}.", param=param) from exc
    return Constraint(spec, param, f"'{param}'")


async def compile_constraint(model: ServedModel, constraint: Constraint) -> CompiledGrammar:
    try:
        return await model.engine.compile_grammar(constraint.spec)
    except GrammarError as exc:
        raise APIError(
            400, f"Invalid {constraint.what}: {exc}", param=constraint.param, code="invalid_grammar"
        ) from exc
    except GrammarPoolClosed as exc:
        raise APIError(503, str(exc), code="shutting_down") from exc
    except GrammarUnavailable as exc:
        # The compile threads are busy with other requests' grammars: the server's state, not the spec.
        raise APIError(503, str(exc), code="grammar_queue_full", headers={"Retry-After": "1"}) from exc
