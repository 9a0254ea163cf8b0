"""Grammar compilation is bounded and fails closed, with the bundled SmolLM2's tokenizer.

Every GrammarLimits cap compiles a spec exactly at it and refuses one over it, naming the flag; the
specs that crashed the server (deep `$ref` chains, long rule chains) are refused in a subprocess,
so a regression fails a test instead of killing pytest; specs that match nothing are refused
instead of decoding unconstrained; and GrammarCompilePool times out, drops, dedupes, refuses when
full, closes, and leaves the event loop responsive while it compiles.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from heron.models.loader import LoadedModel, load_model
from heron.sampling_params import StructuredOutputsParams
from heron.structured import (
    GrammarBusyError,
    GrammarCompilePool,
    GrammarCompiler,
    GrammarError,
    GrammarLimitError,
    GrammarLimits,
    GrammarPoolClosed,
    GrammarTimeoutError,
)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(None, progress=False)


def make_compiler(loaded: LoadedModel, **limits) -> GrammarCompiler:
    return GrammarCompiler(loaded.tokenizer, loaded.arch_config.vocab_size, loaded.eos_token_ids, limits=GrammarLimits(**limits))


@pytest.fixture(scope="module")
def compiler(loaded) -> GrammarCompiler:
    return make_compiler(loaded)


def ref_chain(depth: int) -> dict:
    """A schema `depth` levels deep, made only of `$ref` hops: root -> d0 -> d1 -> ... -> integer."""
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(depth - 2)}
    defs[f"d{depth - 2}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def nested_items(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


def wide(num_properties: int, tag: str, per_object: int = 400) -> StructuredOutputsParams:
    """An object schema slow enough to compile (3,500 properties: ~0.35 s) that tests can race it:
    its properties in nested objects of `per_object`, under the cap on one object's properties."""
    groups = {
        f"{tag}g{start}": {
            "type": "object",
            "properties": {f"{tag}{i}": {"type": "string"} for i in range(start, min(num_properties, start + per_object))},
        }
        for start in range(0, num_properties, per_object)
    }
    return StructuredOutputsParams(json={"type": "object", "properties": groups})


def lark_chain(length: int) -> str:
    """start -> r0 -> ... -> r{length-1}: a rule-reference chain `length` deep."""
    return "start: r0\n" + "".join(f'r{i}: "a" r{i + 1}\n' for i in range(length - 1)) + f'r{length - 1}: "b"\n'


def gbnf_chain(length: int) -> str:
    return "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1}\n' for i in range(length - 1)) + f'r{length - 1} ::= "b"\n'


def lark_rules(count: int) -> str:
    return "start: " + " | ".join(f"r{i}" for i in range(count - 1)) + "\n" + "".join(f'r{i}: "w{i}"\n' for i in range(count - 1))


def properties(count: int) -> dict:
    # Objects: the root, its `properties` map, and one per property.
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(count - 2)}}


# field, its limit, flag, a spec exactly at the limit, the same shape one over
CAPS = [
    ("max_bytes", 64, "--max-grammar-bytes", StructuredOutputsParams(regex="a" * 64), StructuredOutputsParams(regex="a" * 65)),
    (
        "max_regex_bytes",
        32,
        "--max-regex-bytes",
        StructuredOutputsParams(json={"type": "string", "pattern": "b" * 32}),
        StructuredOutputsParams(json={"type": "string", "pattern": "b" * 33}),
    ),
    ("max_regex_bytes", 32, "--max-regex-bytes", StructuredOutputsParams(grammar=f"start: /{'c' * 32}/"), StructuredOutputsParams(grammar=f"start: /{'c' * 33}/")),
    (
        "max_object_properties",
        20,
        "--max-object-properties",
        StructuredOutputsParams(json={"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(20)}}),
        StructuredOutputsParams(json={"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(21)}}),
    ),
    ("max_schema_depth", 12, "--max-schema-depth", StructuredOutputsParams(json=ref_chain(12)), StructuredOutputsParams(json=ref_chain(13))),
    (
        "max_object_properties",
        20,
        "--max-object-properties",
        StructuredOutputsParams(json={"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(20)}}),
        StructuredOutputsParams(json={"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(21)}}),
    ),
    ("max_schema_depth", 12, "--max-schema-depth", StructuredOutputsParams(json=nested_items(12)), StructuredOutputsParams(json=json.dumps(nested_items(13)))),
    ("max_schema_nodes", 30, "--max-schema-nodes", StructuredOutputsParams(json=properties(30)), StructuredOutputsParams(json=properties(31))),
    ("max_grammar_rules", 10, "--max-grammar-rules", StructuredOutputsParams(grammar=lark_rules(10)), StructuredOutputsParams(grammar=lark_rules(11))),
    ("max_grammar_depth", 10, "--max-grammar-depth", StructuredOutputsParams(grammar=lark_chain(10)), StructuredOutputsParams(grammar=lark_chain(11))),
    ("max_grammar_depth", 10, "--max-grammar-depth", StructuredOutputsParams(grammar=gbnf_chain(10)), StructuredOutputsParams(grammar=gbnf_chain(11))),
    (
        "max_grammar_depth",
        10,
        "--max-grammar-depth",
        StructuredOutputsParams(grammar="start: " + "(" * 10 + '"a"' + ")" * 10),
        StructuredOutputsParams(grammar="start: " + "(" * 11 + '"a"' + ")" * 11),
    ),
    (
        "max_schema_depth",
        6,
        "--max-schema-depth",
        StructuredOutputsParams(grammar="start: %json " + json.dumps(nested_items(6))),
        StructuredOutputsParams(grammar="start: %json " + json.dumps(nested_items(7))),
    ),
]


@pytest.mark.parametrize("field, limit, flag, at_limit, over_limit", CAPS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CAPS)])
def test_each_cap_compiles_at_its_limit_and_refuses_over_it(loaded, field, limit, flag, at_limit, over_limit):
    compiler = make_compiler(loaded, **{field: limit})
    assert not compiler.compile(at_limit).matcher().is_error()
    with pytest.raises(GrammarLimitError, match=flag):
        compiler.compile(over_limit)


def test_llguidance_symbol_limit_is_a_limit_error(loaded):
    compiler = make_compiler(loaded, max_grammar_symbols=2_000)
    compiler.compile(StructuredOutputsParams(json=properties(20)))
    with pytest.raises(GrammarLimitError, match="--max-grammar-symbols"):
        compiler.compile(StructuredOutputsParams(json=properties(400)))


# Run in a child process: if a cap regresses, these overflow llguidance's native stack and the
# whole process dies with SIGSEGV.
CRASH_SCRIPT = r"""
import asyncio, json, sys
from heron.models.loader import load_model
from heron.sampling_params import StructuredOutputsParams as S
from heron.structured import GrammarCompilePool, GrammarCompiler, GrammarLimitError, GrammarLimits

def nested_ref_chain(n):
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}

m = load_model(None, progress=False)
compiler = GrammarCompiler(m.tokenizer, m.arch_config.vocab_size, m.eos_token_ids)
crashers = {
    "ref_chain_1000": S(json=nested_ref_chain(1000)),
    "gbnf_chain_6000": S(grammar="root ::= r0\n" + "".join(f'r{i} ::= "a" r{i+1}\n' for i in range(6000)) + 'r6000 ::= "b"\n'),
    "lark_chain_20000": S(grammar="start: r0\n" + "".join(f'r{i}: "a" r{i+1}\n' for i in range(20000)) + 'r20000: "b"\n'),
    "deep_json_text": S(json='{"items": ' * 5000 + '{}' + '}' * 5000),
}
result = {}
for name, spec in crashers.items():
    try:
        compiler.compile(spec)
        result[name] = "compiled"
    except GrammarLimitError as exc:
        result[name] = str(exc)
result["ref_chain_60"] = type(compiler.compile(S(json=nested_ref_chain(60)))).__name__
# Without the caps, the pool's big thread stack carries the 1,000-level chain that kills an 8 MiB one.
uncapped = GrammarCompiler(m.tokenizer, m.arch_config.vocab_size, m.eos_token_ids, limits=GrammarLimits(max_schema_depth=10**6))
pool = GrammarCompilePool(uncapped)
result["pool_ref_chain_1000"] = type(asyncio.run(pool.compile(crashers["ref_chain_1000"], timeout=60))).__name__
print(json.dumps(result))
"""


def test_specs_that_crashed_the_server_are_refused_in_time(tmp_path):
    child = subprocess.run([sys.executable, "-c", CRASH_SCRIPT], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert "--max-schema-depth" in result["ref_chain_1000"]
    assert "--max-grammar-rules" in result["gbnf_chain_6000"]
    assert "--max-grammar-bytes" in result["lark_chain_20000"]
    assert "--max-schema-depth" in result["deep_json_text"]
    assert result["ref_chain_60"] == "CompiledGrammar"  # 121 levels deep, under the default 128
    assert result["pool_ref_chain_1000"] == "CompiledGrammar"


# -- fail closed ------------------------------------------------------------------------------

MATCH_NOTHING = [
    StructuredOutputsParams(json={"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
    StructuredOutputsParams(json={"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, strict=False),
    StructuredOutputsParams(json={"$ref": "#"}),
    StructuredOutputsParams(json={"$ref": "#"}, strict=False),
    StructuredOutputsParams(json={"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
    StructuredOutputsParams(regex="[a&&b]"),
    StructuredOutputsParams(regex="x[^\\x00-\\x{10FFFF}]"),
    StructuredOutputsParams(grammar="start: /[a&&b]/"),
]


@pytest.mark.parametrize("spec", MATCH_NOTHING, ids=range(len(MATCH_NOTHING)))
def test_a_spec_matching_no_text_is_refused_not_dropped(compiler, spec):
    # These used to compile to a matcher that failed at its first mask, which the engine then
    # dropped: the request decoded unconstrained.
    with pytest.raises(GrammarError, match="matches no text"):
        compiler.compile(spec)


@pytest.mark.parametrize("regex", ["[]", "a[]b", "[^]"])
def test_an_empty_character_class_is_refused(compiler, regex):
    with pytest.raises(GrammarError, match="character class"):
        compiler.compile(StructuredOutputsParams(regex=regex))


@pytest.mark.parametrize("strict", [True, False])
def test_a_recursive_schema_compiles_to_a_real_constraint(loaded, compiler, strict):
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["children"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    }
    compiled = compiler.compile(StructuredOutputsParams(json=tree, strict=strict))
    tokenizer = loaded.tokenizer
    good = compiled.matcher()
    assert good.consume_tokens(tokenizer.encode('{"children": [{"children": []}, {"children": [{"children": []}]}]}', add_special_tokens=False))
    assert good.is_accepting()
    for bad_text in ["hello", '{"children": [1]}', '{"leaves": []}']:
        bad = compiled.matcher()
        tokens = tokenizer.encode(bad_text, add_special_tokens=False)
        assert bad.try_consume_tokens(tokens) < len(tokens), bad_text


# -- the pool ---------------------------------------------------------------------------------


async def wait_cached(compiler: GrammarCompiler, spec: StructuredOutputsParams, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = compiler.cached(spec.cache_key())
        if found is not None:
            return found
        await asyncio.sleep(0.02)
    return None


def test_timeout_answers_quickly_and_the_compile_still_lands_in_the_cache(compiler):
    async def scenario():
        pool = GrammarCompilePool(compiler)
        spec = wide(3500, "timeout")
        start = time.monotonic()
        with pytest.raises(GrammarTimeoutError, match="--grammar-compile-timeout"):
            await pool.compile(spec, timeout=0.05)
        assert time.monotonic() - start < 0.5
        compiled = await wait_cached(compiler, spec)
        assert compiled is not None
        start = time.monotonic()
        assert await pool.compile(spec, timeout=0.05) is compiled  # the retry is instant
        assert time.monotonic() - start < 0.05
        pool.close()

    asyncio.run(scenario())


def test_a_queued_compile_is_dropped_when_its_waiter_is_cancelled(compiler):
    async def scenario():
        pool = GrammarCompilePool(compiler)
        running = asyncio.create_task(pool.compile(wide(3500, "busy"), timeout=30))
        await asyncio.sleep(0.05)  # the worker has taken it
        queued_spec = wide(30, "dropped")
        queued = asyncio.create_task(pool.compile(queued_spec, timeout=30))
        await asyncio.sleep(0.01)
        assert pool.num_waiting == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert pool.num_waiting == 0
        await running
        await asyncio.sleep(0.1)
        assert compiler.cached(queued_spec.cache_key()) is None  # never compiled
        pool.close()

    asyncio.run(scenario())


def test_identical_specs_share_one_compile(loaded):
    compiler = make_compiler(loaded)
    calls = []
    # What the pool's workers call, the spec checked on the event loop already.
    compile_once = compiler.compile_checked
    compiler.compile_checked = lambda spec, schema, key: calls.append(spec) or compile_once(spec, schema, key)

    async def scenario():
        pool = GrammarCompilePool(compiler, num_workers=2)
        spec = wide(1000, "dedupe")
        results = await asyncio.gather(*(pool.compile(spec, timeout=30) for _ in range(4)))
        assert all(r is results[0] for r in results)
        pool.close()

    asyncio.run(scenario())
    assert len(calls) == 1


def test_a_full_queue_refuses_and_close_fails_the_waiters(compiler):
    async def scenario():
        pool = GrammarCompilePool(compiler, max_waiting=1)
        running = asyncio.create_task(pool.compile(wide(3500, "full"), timeout=30))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(pool.compile(wide(20, "queued"), timeout=30))
        await asyncio.sleep(0.01)
        with pytest.raises(GrammarBusyError, match="--max-grammar-queue"):
            await pool.compile(wide(21, "refused"), timeout=30)
        pool.close()
        for task in (running, queued):
            with pytest.raises(GrammarPoolClosed):
                await task
        with pytest.raises(GrammarPoolClosed):
            await pool.compile(wide(22, "after"), timeout=30)

    asyncio.run(scenario())


def test_a_spec_that_waits_out_its_timeout_in_the_queue_is_busy_not_invalid(compiler):
    async def scenario():
        pool = GrammarCompilePool(compiler)
        running = asyncio.create_task(pool.compile(wide(3500, "ahead"), timeout=30))
        await asyncio.sleep(0.05)
        with pytest.raises(GrammarBusyError, match="waited"):
            await pool.compile(wide(23, "behind"), timeout=0.05)
        assert pool.num_waiting == 0
        await running
        pool.close()

    asyncio.run(scenario())


def test_compiles_leave_the_event_loop_responsive(compiler):
    async def scenario():
        pool = GrammarCompilePool(compiler, num_workers=2)
        gaps = []
        done = False

        async def tick():
            last = time.monotonic()
            while not done:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.gather(*(pool.compile(wide(2000, f"loop{i}-"), timeout=60) for i in range(4)))
        done = True
        await ticker
        pool.close()
        assert len(gaps) > 10 and max(gaps) < 0.1, max(gaps)

    asyncio.run(scenario())


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_compile_threads_run_in_the_idle_scheduling_class_and_nothing_else_does(compiler):
    pool = GrammarCompilePool(compiler, num_workers=2)
    try:
        workers = [thread.native_id for thread in pool._threads]
        assert [os.sched_getscheduler(tid) for tid in workers] == [os.SCHED_IDLE] * 2
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller (the event loop's thread) is untouched
    finally:
        pool.close()
        assert pool.join(5.0)
