"""The web playground (heron/server/static, shown at / to browsers) in a real headless Chromium.

Black-box like the rest of tests/server: real `heron serve` processes, and Debian's chromium driven
through its chromedriver by selenium (both at their /usr/bin paths, named explicitly, with
SE_OFFLINE so that Selenium Manager never tries to download a browser or driver). `make
install-test` installs chromium + chromium-driver as root with apt-get; without them these tests
skip (the HTTP-only checks of / still run).

- the session `server` (same origin): the model picker, a streamed answer (text growing in the DOM
  before it finishes; screenshots mid-answer and after it, the mid-answer one at
  $HERON_PLAYGROUND_SCREENSHOT if set, else in the test's tmp dir), TTFT and tokens/s, the
  conversation surviving a reload and "New chat" clearing it, an error envelope shown, Stop;
- a server with `--api-key` (and `--request-timeout`): the page asks for the key, refuses a wrong
  one, keeps the right one; an error frame sent mid-stream is shown;
- a server with the default CORS settings (no --allowed-origins) and the page served from another
  origin by `python -m http.server`, pointed at the API with `?api=`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_helpers import DEFAULT_MODEL, Server, start_server, stop_server

from heron.server.routes.service import STATIC_DIR, prefers_html

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
API_KEY = "sk-playground"
REQUEST_TIMEOUT_S = 3  # the key server's --request-timeout: what cuts the long answer mid-stream
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
# At temperature 0 the bundled model writes this for far longer than any test waits.
LONG_PROMPT = "Write a very long story about a dragon, with many chapters."


# ---------------------------------------------------------------------------------------------
# Content negotiation at / (plain HTTP, no browser)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "accept, html",
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("application/json;q=0.5, text/html", True),
        ("*/*", False),
        ("", False),
        ("application/json", False),
        ("application/json, text/html", False),
        ("text/html;q=0.5, application/json", False),
        ("text/*;q=0.9, application/*", False),
    ],
)
def test_root_prefers_html_only_when_the_accept_header_does(accept, html):
    assert prefers_html(accept) is html


def test_root_serves_the_playground_to_browsers_and_json_to_clients(server):
    page = httpx.get(f"{server.base_url}/", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "accept" in page.headers.get("vary", "").lower()
    assert '<base href="/playground/">' in page.text and "app.js" in page.text
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"}):
        index = httpx.get(f"{server.base_url}/", headers=headers)
        assert index.headers["content-type"].startswith("application/json"), headers
        assert index.json()["name"] == "heron"
    for asset, kind in (("", "text/html"), ("app.js", "javascript"), ("style.css", "text/css")):
        served = httpx.get(f"{server.base_url}/playground/{asset}")
        assert served.status_code == 200 and kind in served.headers["content-type"], asset
        assert served.text == (STATIC_DIR / (asset or "index.html")).read_text(encoding="utf-8")


def test_the_playground_names_nothing_outside_its_own_folder():
    # No CDN, fonts or images from elsewhere: assets are relative, the stylesheet imports nothing.
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    for target in re.findall(r'\b(?:src|href)="([^"]*)"', html):
        assert "/" not in target and ":" not in target, f"index.html names {target!r}"
    css = (STATIC_DIR / "style.css").read_text(encoding="utf-8")
    assert "url(" not in css and "@import" not in css


# ---------------------------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------------------------


def _browser_missing() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        return (
            f"{' and '.join(missing)} not found: the playground browser tests need Debian's chromium and "
            "chromium-driver (`make install-test` installs them when run as root with apt-get)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",  # a fresh localStorage per test
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _console(driver) -> str:
    try:
        return "\n".join(f"{e['level']}: {e['message']}" for e in driver.get_log("browser"))
    except Exception as exc:  # the log is only a diagnostic
        return f"(no browser log: {exc})"


def wait_for(driver, condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n--- browser console ---\n{_console(driver)}")
        time.sleep(0.05)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def model_options(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)")


def wait_for_models(driver) -> list[str]:
    wait_for(driver, lambda: DEFAULT_MODEL in model_options(driver), 30, f"{DEFAULT_MODEL} in the model picker")
    return model_options(driver)


def fill(driver, element_id: str, value: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


LAST_ANSWER_JS = """
const answers = document.querySelectorAll('#messages .msg.assistant');
const m = answers[answers.length - 1];
if (!m) return null;
const part = (cls) => { const node = m.querySelector(cls); return node ? node.textContent : ''; };
return {state: m.dataset.state, text: part('.content'), stats: part('.stats'), error: part('.error')};
"""


def last_answer(driver) -> dict[str, str] | None:
    return driver.execute_script(LAST_ANSWER_JS)


def answers_count(driver) -> int:
    return driver.execute_script("return document.querySelectorAll('#messages .msg.assistant').length")


def ask(driver, text: str, *, temperature: str = "0", max_tokens: str) -> None:
    """Set the sampling controls, type `text` and send it (Enter in the message box)."""
    from selenium.webdriver.common.keys import Keys

    fill(driver, "temperature", temperature)
    fill(driver, "max-tokens", max_tokens)
    before = answers_count(driver)
    prompt = by_id(driver, "prompt")
    prompt.send_keys(text)
    prompt.send_keys(Keys.ENTER)
    wait_for(driver, lambda: answers_count(driver) > before, 5, "the answer to appear")


def wait_until_answered(driver, timeout: float = 45) -> dict[str, str]:
    return wait_for(
        driver, lambda: (a := last_answer(driver)) and a["state"] != "streaming" and a, timeout, "the answer to end"
    )


def assert_timing_line(answer: dict[str, str]) -> None:
    assert re.search(r"TTFT \d+ ms", answer["stats"]), answer
    assert re.search(r"\d+(\.\d+)? tokens/s", answer["stats"]), answer


def loaded_urls(driver) -> list[str]:
    return driver.execute_script("return [location.href, ...performance.getEntries().map(e => e.name)]")


def assert_only_these_origins(driver, *origins: str) -> None:
    for url in loaded_urls(driver):
        if url.startswith(("http://", "https://")):
            assert url.startswith(tuple(o + "/" for o in origins)), f"the page loaded {url} (allowed: {origins})"


def screenshot_paths(tmp_path: Path) -> tuple[Path, Path]:
    configured = os.environ.get("HERON_PLAYGROUND_SCREENSHOT")
    mid = Path(configured) if configured else tmp_path / "playground-mid-answer.png"
    mid.parent.mkdir(parents=True, exist_ok=True)
    return mid, mid.with_name(f"{mid.stem}-after{mid.suffix or '.png'}")


# ---------------------------------------------------------------------------------------------
# Same origin: the session server
# ---------------------------------------------------------------------------------------------


def test_playground_streams_an_answer_with_timings(server: Server, browser, tmp_path: Path):
    browser.get(f"{server.base_url}/")
    assert browser.title == "Heron playground"
    models = wait_for_models(browser)
    assert EMBEDDING_MODEL not in models, f"the embedding model is offered for chat: {models}"

    # Every mutation of the answer is recorded, so the growth is seen however fast it streams.
    browser.execute_script(
        """
        window.__seen = [];
        const box = document.getElementById('messages');
        new MutationObserver(() => {
          const answers = box.querySelectorAll('.msg.assistant');
          const m = answers[answers.length - 1];
          if (m) window.__seen.push([m.dataset.state, m.querySelector('.content').textContent]);
        }).observe(box, {childList: true, subtree: true, characterData: true});
        """
    )
    ask(browser, "Write a short poem about the sea.", max_tokens="128")

    mid_path, after_path = screenshot_paths(tmp_path)
    polled: list[str] = []
    mid_shot = False
    deadline = time.monotonic() + 45
    while (answer := last_answer(browser))["state"] == "streaming":
        assert time.monotonic() < deadline, f"the answer never ended; last seen {answer}"
        if answer["text"]:
            polled.append(answer["text"])
            if not mid_shot:
                browser.save_screenshot(str(mid_path))
                # Taken mid-answer only if the answer was still streaming once the capture returned.
                mid_shot = last_answer(browser)["state"] == "streaming"
        time.sleep(0.02)
    assert answer["state"] == "done", answer
    browser.save_screenshot(str(after_path))
    assert mid_shot, "the answer ended before a screenshot could be taken mid-answer"
    assert mid_path.stat().st_size > 0 and after_path.stat().st_size > 0

    final = answer["text"]
    assert final.strip(), answer
    streaming = [text for state, text in browser.execute_script("return window.__seen") if state == "streaming" and text]
    assert len(set(streaming)) >= 2, f"the answer did not grow while streaming: {streaming}"
    assert len(set(polled)) >= 1, "no partial answer was seen by polling the page"
    assert all(len(text) <= len(final) for text in streaming)
    assert_timing_line(answer)
    tokens = int(re.search(r"(\d+) tokens\b(?!/)", answer["stats"]).group(1))
    assert 0 < tokens <= 128, answer  # the max tokens control reached the request
    assert_only_these_origins(browser, server.base_url)

    # The conversation lives in localStorage: a reload keeps it, "New chat" clears it.
    browser.refresh()
    wait_for_models(browser)
    kept = last_answer(browser)
    assert kept and kept["text"] == final and kept["state"] == "done", kept
    by_id(browser, "new-chat").click()
    assert answers_count(browser) == 0
    browser.refresh()
    wait_for_models(browser)
    assert answers_count(browser) == 0

    # An error in OpenAI's envelope (here a 400 before streaming) is shown in the chat.
    ask(browser, "Hello again.", max_tokens="100000")
    failed = wait_until_answered(browser, 15)
    assert failed["state"] == "error" and "context length" in failed["error"], failed


RECORD_CHAT_BODIES_JS = """
window.__bodies = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (String(url).endsWith('/v1/chat/completions')) window.__bodies.push(JSON.parse(init.body));
  return realFetch(url, init);
};
"""


def test_playground_sends_its_controls_and_the_conversation(server: Server, browser):
    browser.get(f"{server.base_url}/")
    wait_for_models(browser)
    browser.execute_script(RECORD_CHAT_BODIES_JS)
    fill(browser, "system", "You answer in JSON.")
    by_id(browser, "json-mode").click()
    ask(browser, "Name a colour.", max_tokens="24")
    first = wait_until_answered(browser)
    assert first["state"] == "done" and first["text"].lstrip().startswith("{"), first  # json_object held
    fill(browser, "top-p", "0.5")
    ask(browser, "And another one.", max_tokens="24")
    assert wait_until_answered(browser)["state"] == "done"

    one, two = browser.execute_script("return window.__bodies")
    assert one["model"] == DEFAULT_MODEL
    assert one["stream"] is True and one["stream_options"] == {"include_usage": True}
    assert one["temperature"] == 0 and one["max_tokens"] == 24
    assert "top_p" not in one, "an empty control must be left out (the server's default)"
    assert one["response_format"] == {"type": "json_object"}
    assert one["messages"] == [
        {"role": "system", "content": "You answer in JSON."},
        {"role": "user", "content": "Name a colour."},
    ]
    assert two["top_p"] == 0.5
    assert [m["role"] for m in two["messages"]] == ["system", "user", "assistant", "user"]
    assert two["messages"][2]["content"].lstrip().startswith("{")


MARKDOWN_SAMPLE = """# A title
Some **bold**, *italic*, `code <b>not bold</b>` and [a link](https://example.com/docs) and [bad](javascript:alert(1)).
<img src=x onerror="window.__xss = 1"><script>window.__xss = 2</script>

- one
- two

3. three
4. four

```python
print("<script>")
```"""


def test_playground_renders_markdown_safely(server: Server, browser):
    browser.get(f"{server.base_url}/")
    wait_for_models(browser)
    result = browser.execute_script(
        """
        const box = document.createElement('div');
        box.append(renderMarkdown(arguments[0]));
        document.body.append(box);
        const all = (sel) => [...box.querySelectorAll(sel)];
        return {
          h1: all('h1').map(e => e.textContent),
          strong: all('strong').map(e => e.textContent),
          em: all('em').map(e => e.textContent),
          code: all('p code').map(e => e.textContent),
          links: all('a').map(e => [e.textContent, e.getAttribute('href'), e.rel]),
          ul: all('ul > li').map(e => e.textContent),
          ol: all('ol > li').map(e => e.textContent),
          olStart: all('ol').map(e => e.start),
          lang: all('.codeblock .lang').map(e => e.textContent),
          block: all('.codeblock pre code').map(e => e.textContent),
          injected: all('img, script, b').length,
          text: box.textContent,
          xss: window.__xss ?? null,
        };
        """,
        MARKDOWN_SAMPLE,
    )
    assert result["h1"] == ["A title"]
    assert result["strong"] == ["bold"] and result["em"] == ["italic"]
    assert result["code"] == ["code <b>not bold</b>"]
    assert result["links"] == [["a link", "https://example.com/docs", "noopener noreferrer"]]
    assert "bad (javascript:alert(1))" in result["text"]  # not a link
    assert result["ul"] == ["one", "two"] and result["ol"] == ["three", "four"] and result["olStart"] == [3]
    assert result["lang"] == ["python"] and result["block"] == ['print("<script>")']
    assert result["injected"] == 0 and result["xss"] is None
    assert '<img src=x onerror="window.__xss = 1">' in result["text"]  # shown as text


def test_playground_stop_aborts_the_answer(server: Server, browser):
    browser.get(f"{server.base_url}/")
    wait_for_models(browser)
    ask(browser, LONG_PROMPT, max_tokens="900")
    wait_for(browser, lambda: len(last_answer(browser)["text"]) > 20, 30, "the answer to start streaming")
    assert by_id(browser, "send").get_attribute("disabled") is not None
    by_id(browser, "stop").click()
    stopped = wait_until_answered(browser, 10)
    assert stopped["state"] == "stopped", stopped
    assert stopped["stats"].startswith("stopped") and "TTFT" in stopped["stats"], stopped
    time.sleep(0.5)
    assert last_answer(browser)["text"] == stopped["text"], "text kept arriving after Stop"
    assert by_id(browser, "send").get_attribute("disabled") is None
    # Aborting the fetch closed the connection, which aborts the generation on the server.
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{server.base_url}/health").json())["running"]:
        assert time.monotonic() < deadline, f"the engine still runs the stopped request: {health}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# --api-key
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_server(tmp_path_factory) -> Iterator[Server]:
    srv = start_server(
        "playground-key",
        tmp_path_factory.mktemp("heron-playground-key"),
        ["--api-key", API_KEY, "--request-timeout", str(REQUEST_TIMEOUT_S)],
        env={},
        api_key=API_KEY,
    )
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


def enter_key(driver, key: str) -> None:
    wait_for(driver, lambda: by_id(driver, "key-form").is_displayed(), 15, "the page to ask for the API key")
    fill(driver, "api-key", key)
    by_id(driver, "key-save").click()


def test_playground_asks_for_the_api_key(key_server: Server, browser):
    browser.get(f"{key_server.base_url}/")
    enter_key(browser, "not-the-key")
    # Refused: asked again, with the server's message.
    wait_for(
        browser,
        lambda: by_id(browser, "key-form").is_displayed() and "Incorrect API key" in by_id(browser, "key-message").text,
        15,
        "the wrong key to be refused",
    )
    assert by_id(browser, "api-key").get_attribute("type") == "password"
    assert DEFAULT_MODEL not in model_options(browser)
    enter_key(browser, API_KEY)
    wait_for_models(browser)
    assert not by_id(browser, "key-form").is_displayed()
    stored = browser.execute_script("return localStorage.getItem('heron.playground.key:' + location.origin)")
    assert stored == API_KEY

    ask(browser, "Say hello.", max_tokens="16")
    answer = wait_until_answered(browser)
    assert answer["state"] == "done" and answer["text"].strip(), answer
    assert_timing_line(answer)

    # The key is remembered: a reload lists the models without asking.
    browser.refresh()
    wait_for_models(browser)
    assert not by_id(browser, "key-form").is_displayed()


def test_playground_shows_an_error_sent_mid_stream(key_server: Server, browser):
    browser.get(f"{key_server.base_url}/")
    enter_key(browser, API_KEY)
    wait_for_models(browser)
    ask(browser, LONG_PROMPT, max_tokens="2000")
    # --request-timeout cuts the answer after its first tokens: an error frame in the SSE stream.
    answer = wait_until_answered(browser, REQUEST_TIMEOUT_S + 30)
    assert answer["state"] == "error", answer
    assert "time limit" in answer["error"], answer
    assert answer["text"].strip(), "no text streamed before the error"


# ---------------------------------------------------------------------------------------------
# Another origin: CORS, on by default for every origin
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory) -> Iterator[Server]:
    # No --allowed-origins: the default (every origin) is what this checks.
    srv = start_server("playground-cors", tmp_path_factory.mktemp("heron-playground-cors"), [], env={})
    yield srv
    problem = stop_server(srv)
    assert problem is None, f"{problem}\n--- log tail ---\n{srv.log_tail()}"


@pytest.fixture(scope="module")
def static_origin() -> Iterator[str]:
    """heron/server/static served by `python -m http.server` on another port: another origin."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(STATIC_DIR)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    origin = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"{origin}/index.html", timeout=1.0).raise_for_status()
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "python -m http.server did not start"
                time.sleep(0.1)
        yield origin
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_playground_from_another_origin_talks_to_the_api(cors_server: Server, static_origin: str, browser):
    browser.get(f"{static_origin}/index.html?api={cors_server.base_url}")
    assert browser.execute_script("return location.origin") == static_origin != cors_server.base_url
    assert by_id(browser, "api-base").text == cors_server.base_url
    models = wait_for_models(browser)
    assert EMBEDDING_MODEL not in models
    ask(browser, "Say hello.", max_tokens="16")
    answer = wait_until_answered(browser)
    assert answer["state"] == "done" and answer["text"].strip(), answer
    assert_timing_line(answer)
    assert_only_these_origins(browser, static_origin, cors_server.base_url)
