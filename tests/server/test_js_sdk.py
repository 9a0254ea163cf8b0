"""The official JavaScript SDK (npm `openai`, pinned in js/package.json) streams a chat completion from
Heron, and its stream accumulator assembles a streamed tool call.

`make test` installs it (`npm ci --prefix tests/server/js`). A missing install fails the test rather
than skipping it: CI must run it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from server_helpers import DEFAULT_MODEL, check_schema, summarize_stream

JS_DIR = Path(__file__).resolve().parent / "js"


@pytest.mark.timeout(120)
def test_js_sdk_streams_a_chat_completion(server):
    node = shutil.which("node")
    assert node, "node is not on PATH; the JS SDK smoke test needs Node.js (>= 20)"
    assert (JS_DIR / "node_modules" / "openai" / "package.json").is_file(), (
        f"the JS SDK is not installed in {JS_DIR}: run `make install-test` "
        "(or `npm ci --prefix tests/server/js --no-audit --no-fund`)"
    )
    result = subprocess.run(
        [node, "smoke.mjs", server.base_url, DEFAULT_MODEL],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, f"smoke.mjs failed ({result.returncode}):\n{result.stderr}\n{result.stdout[-2000:]}"
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Paris" in out["text"], out["text"]
    assert out["finish_reason"] in ("stop", "length")
    # The SDK yields the chunks as parsed from the wire: check each against OpenAI's spec too.
    for chunk in out["chunks"]:
        check_schema(chunk, "CreateChatCompletionStreamResponse")
    choices, usage = summarize_stream(out["chunks"], chat=True, include_usage=True)
    assert choices[0].text == out["text"]
    assert usage["completion_tokens"] > 0
    # The SDK's accumulator rebuilt the streamed tool call: one complete call whose arguments parse.
    message = out["tool_message"]
    assert out["tool_finish_reason"] == "tool_calls"
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
