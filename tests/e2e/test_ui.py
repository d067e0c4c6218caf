"""The built-in chat page (`GET /`, server/ui/), driven by Playwright on Debian's Chromium.

The browser is the system `chromium` (`executable_path`; never `playwright install`). Without
it, or without the playwright package, the browser tests skip with the reason; the HTTP checks
of the page's routes run either way.

Two kinds of page test:
- against a live server on the tiny random model (real streaming, real aborts, real usage),
  whose engine waits a little before each step so that a stream lasts long enough to watch;
- with `page.route` answering /v1/chat/completions from the test, where the test must choose
  the model's words (HTML payloads in model output, speculation stats the server does not send
  yet, regenerate).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
import time
import urllib.error
import urllib.request

import pytest

from server.protocol import dumps, loads
from tests.e2e.conftest import LiveServer, make_config, parse_metrics

UI_MODEL = "tiny-ui"
KEY_MODEL = "tiny-ui-key"
API_KEY = "ui-test-key"
STEP_DELAY_S = 0.02
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
XSS_IMG = '<img src=x onerror="window.__xss = 1">'


def http(method: str, url: str, body=None) -> tuple[int, dict, bytes]:
    """Blocking HTTP with urllib: Playwright's sync API keeps an event loop running on this
    thread, so conftest's asyncio-based helper cannot be used here."""
    request = urllib.request.Request(url, method=method, data=None if body is None else
                                     dumps(body), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def scrape(server: LiveServer) -> dict[str, float]:
    status, _, body = http("GET", server.base_url + "/metrics")
    assert status == 200
    return parse_metrics(body.decode())


class PacedEngine:
    """The real engine, but `step()` first sleeps `delay_s`: a stream of a few dozen tokens
    then lasts long enough for a browser to paint several updates and for Stop to land
    mid-answer. Every other attribute is the engine's own."""

    def __init__(self, engine, delay_s: float):
        self._engine = engine
        self._delay_s = delay_s

    def step(self):
        time.sleep(self._delay_s)
        return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _paced_server(config) -> LiveServer:
    from specdec.engine import Engine
    return LiveServer(config, engine=PacedEngine(Engine.from_config(config), STEP_DELAY_S))


@pytest.fixture(scope="module")
def ui_server(tiny_llama_dir, tiny_draft_dir):
    config = make_config(tiny_llama_dir,
                         spec={"method": "draft", "draft_model": tiny_draft_dir,
                               "num_speculative_tokens": 3},
                         server={"served_model_name": UI_MODEL})
    server = _paced_server(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key_server(tiny_llama_dir):
    config = make_config(tiny_llama_dir, server={"served_model_name": KEY_MODEL,
                                                 "api_key": API_KEY})
    server = _paced_server(config).start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------ browser

def _chromium() -> str | None:
    path = os.environ.get("SPECDEC_CHROMIUM") or shutil.which("chromium")
    return path if path and os.access(path, os.X_OK) else None


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        pytest.skip("no Chromium: install Debian's (apt-get install -y chromium, or "
                    ".ci/install_browser.sh) or set SPECDEC_CHROMIUM; the chat-page browser "
                    "tests need it")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A fresh browser context and page, with console errors and page errors recorded."""

    def __init__(self, browser, **context_args):
        self.context = browser.new_context(**context_args)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(
            f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def open(self, server: LiveServer, **settings) -> "Page":
        self.page.goto(server.base_url + "/")
        self.page.locator("#model option").first.wait_for(state="attached")
        self.settings(**settings)
        return self

    def settings(self, **values) -> None:
        page = self.page
        if not page.locator("#settings").evaluate("d => d.open"):
            page.locator("#settings summary").click()
        for name, value in values.items():
            field = page.locator(f"#{name.replace('_', '-')}")
            if isinstance(value, bool):
                field.set_checked(value)
            else:
                field.fill(str(value))
                field.dispatch_event("change")

    def send(self, text: str) -> None:
        self.page.locator("#input").fill(text)
        self.page.locator("#input").press("Enter")

    def wait_done(self, timeout_ms: int = 60_000):
        """The last answer has finished: its stats line is there and Send is back."""
        self.page.locator(".msg.assistant").last.locator(".stats [data-stat=ttft]").wait_for(
            timeout=timeout_ms)
        self.page.locator("#send").wait_for(state="visible")

    def stat(self, name: str) -> str:
        return self.page.locator(".msg.assistant").last.locator(
            f".stats [data-stat={name}]").inner_text()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def ui(browser):
    page = Page(browser)
    yield page
    page.close()


def _watch_answer_updates(page) -> None:
    """Record every distinct text of the newest assistant answer as the page paints it."""
    page.evaluate("""() => {
        window.__updates = [];
        new MutationObserver(() => {
            const bodies = document.querySelectorAll('.msg.assistant .body');
            const text = bodies.length ? bodies[bodies.length - 1].textContent : '';
            const last = window.__updates[window.__updates.length - 1];
            if (text && text !== last) window.__updates.push(text);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true});
    }""")


def _sse(chunks: list[dict]) -> str:
    return "".join(f"data: {dumps(c).decode()}\n\n" for c in chunks) + "data: [DONE]\n\n"


def _canned_answer(text: str, usage: dict | None = None) -> str:
    """An SSE body in our server's shape: role chunk, content in pieces, finish, usage."""
    base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0,
            "model": UI_MODEL}
    chunks = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}])]
    for i in range(0, len(text), 7):
        chunks.append(dict(base, choices=[{"index": 0, "delta": {"content": text[i:i + 7]},
                                           "finish_reason": None}]))
    chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    chunks.append(dict(base, choices=[], usage=usage or {
        "prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}))
    return _sse(chunks)


class CannedChat:
    """Answers /v1/chat/completions from the test; records each request body."""

    def __init__(self, page, answers: list[tuple[str, dict | None]]):
        self.answers = list(answers)
        self.bodies: list[dict] = []
        page.route("**/v1/chat/completions", self._handle)

    def _handle(self, route):
        self.bodies.append(loads(route.request.post_data))
        text, usage = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        route.fulfill(status=200, content_type="text/event-stream",
                      body=_canned_answer(text, usage))


# --------------------------------------------------------------------- live-server tests

def test_answer_streams_with_stats_and_persists(ui, ui_server):
    ui.open(ui_server, max_tokens=40, extra_json='{"ignore_eos": true, "seed": 3}')
    _watch_answer_updates(ui.page)
    ui.send("Tell me about the quick brown fox.")
    ui.wait_done()
    updates = ui.page.evaluate("window.__updates")
    assert len(updates) >= 3, f"the answer arrived in {len(updates)} visible updates: {updates}"
    # Markdown may re-flow earlier text (an opening `*` pairs later), so no prefix check.
    assert len(updates[-1]) > len(updates[0]), updates
    final = ui.page.locator(".msg.assistant .body").last.text_content()
    assert final == updates[-1] and final

    assert re.fullmatch(r"TTFT \d+\.\d\d s", ui.stat("ttft")), ui.stat("ttft")
    assert re.fullmatch(r"\d+\.\d tok/s", ui.stat("tps")), ui.stat("tps")
    assert ui.stat("tokens") == "40 tokens"  # ignore_eos: exactly max_tokens, from usage
    # Acceptance comes from usage.spec_decode_stats: a number once the server sends it.
    status, _, raw = http("POST", ui_server.base_url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": True})
    assert status == 200
    if "spec_decode_stats" in loads(raw)["usage"]:
        assert re.fullmatch(r"acceptance \d+\.\d\d tok/step.*", ui.stat("acceptance"))
    else:
        assert ui.stat("acceptance") == "acceptance n/a"

    ui.page.reload()  # the conversation lives in localStorage
    ui.page.locator(".msg.assistant .body").last.wait_for()
    assert ui.page.locator(".msg.user .body").inner_text() == (
        "Tell me about the quick brown fox.")
    assert ui.page.locator(".msg.assistant .body").last.text_content() == final
    assert ui.page.locator("#conversations li").count() == 1
    assert ui.errors == []


def test_stop_aborts_the_request_on_the_server(ui, ui_server):
    before = scrape(ui_server)
    ui.open(ui_server, max_tokens=400, extra_json='{"ignore_eos": true}')
    ui.send("Count to one thousand.")
    stop = ui.page.get_by_role("button", name="Stop")
    stop.wait_for(state="visible")
    ui.page.wait_for_function(
        "() => { const b = document.querySelectorAll('.msg.assistant .body');"
        " return b.length && b[b.length - 1].textContent.length > 0; }")
    stop.click()
    ui.wait_done()
    assert ui.page.locator(".stats .stopped").count() == 1
    partial = ui.page.locator(".msg.assistant .body").last.text_content()
    assert partial, "the partial answer is kept"

    abort = 'specdec:request_success_total{finished_reason="abort",model_name="%s"}' % UI_MODEL
    length = abort.replace('"abort"', '"length"')
    deadline = time.monotonic() + 30
    while True:
        after = scrape(ui_server)
        if after[abort] > before[abort] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after[abort] == before[abort] + 1, "the server did not abort the stopped request"
    assert after[length] == before[length], "the request ran to max_tokens instead"
    assert after["specdec:num_requests_running"] == 0
    assert ui.page.locator("#send").is_visible() and not ui.page.locator("#stop").is_visible()
    assert ui.errors == []


def test_user_html_is_text_and_never_runs(ui, ui_server):
    ui.open(ui_server, max_tokens=8)
    ui.send(f"look {XSS_IMG} here")
    ui.wait_done()
    user = ui.page.locator(".msg.user .body")
    assert user.text_content() == f"look {XSS_IMG} here"
    assert ui.page.locator("#messages img, #messages script").count() == 0
    assert ui.page.evaluate("window.__xss") is None
    ui.page.reload()  # and again when rendered from localStorage
    ui.page.locator(".msg.user .body").wait_for()
    assert ui.page.locator(".msg.user .body").text_content() == f"look {XSS_IMG} here"
    assert ui.page.locator("#messages img").count() == 0
    assert ui.page.evaluate("window.__xss") is None
    assert ui.errors == []


def test_api_key_field(browser, key_server):
    ui = Page(browser)
    try:
        ui.page.goto(key_server.base_url + "/")
        ui.page.locator("#api-key-notice").wait_for(state="visible")
        assert ui.page.locator("#api-key").is_visible()
        assert ui.page.locator("#model option").count() == 0
        ui.settings(api_key="wrong-key")
        ui.page.wait_for_function(
            "() => document.getElementById('server-status').textContent === 'API key rejected'")
        ui.settings(api_key=API_KEY)
        ui.page.locator("#model option").first.wait_for(state="attached")
        assert ui.page.locator("#model").input_value() == KEY_MODEL
        assert not ui.page.locator("#api-key-notice").is_visible()
        ui.settings(max_tokens=6, extra_json='{"ignore_eos": true}')
        ui.send("hello")
        ui.wait_done()
        assert ui.stat("tokens") == "6 tokens"
        # The one expected console error is the browser's note on the wrong key's 401.
        assert all("401" in e for e in ui.errors), ui.errors
        assert len(ui.errors) <= 1, ui.errors
    finally:
        ui.close()


def test_small_screen_and_dark_scheme_without_console_errors(browser, ui_server):
    ui = Page(browser, viewport={"width": 360, "height": 740}, color_scheme="dark")
    try:
        ui.open(ui_server, max_tokens=12)
        page = ui.page
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(13, 17, 23)", background
        assert not page.locator("#sidebar").evaluate(
            "s => s.getBoundingClientRect().right > 0")  # off-screen until asked for
        for selector in ("#input", "#send", "#toggle-sidebar"):
            box = page.locator(selector).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, (selector, box)
        ui.send("hi")
        ui.wait_done()
        page.locator("#toggle-sidebar").click()
        page.locator("#conversations li").first.wait_for()
        page.wait_for_function(
            "() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        shot = os.environ.get("SPECDEC_UI_SCREENSHOT")
        if shot:  # a screenshot to look at: SPECDEC_UI_SCREENSHOT=/tmp/x.png pytest -k small
            page.screenshot(path=shot)
        page.mouse.click(350, 400)  # beside the open sidebar: closes it
        page.wait_for_function(
            "() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
        assert page.locator("#toggle-sidebar").get_attribute("aria-expanded") == "false"
        assert ui.errors == []
    finally:
        ui.close()


# ------------------------------------------------------------ canned-answer page tests

def test_model_html_and_links_are_inert_and_code_is_highlighted(ui, ui_server):
    ui.open(ui_server)
    answer = (f"Here {XSS_IMG} and <script>window.__xss = 2</script>\n\n"
              "[click](javascript:window.__xss=3) ![pic](http://example.invalid/p.png)\n\n"
              "```python\ndef add(a, b):\n    return a + b\n```\n")
    CannedChat(ui.page, [(answer, None)])
    ui.send("show me")
    ui.wait_done()
    body = ui.page.locator(".msg.assistant .body").last
    text = body.text_content()
    assert XSS_IMG in text and "<script>window.__xss = 2</script>" in text
    assert ui.page.locator("#messages img, #messages script").count() == 0
    assert ui.page.locator("#messages a[href^='javascript']").count() == 0
    assert "![pic](http://example.invalid/p.png)" in text
    code = body.locator("pre > code.hljs")
    assert code.count() == 1
    assert code.locator("span.hljs-keyword").first.inner_text() == "def"
    assert code.text_content() == "def add(a, b):\n    return a + b\n"
    assert body.locator("pre > button.copy-code").inner_text() == "Copy"
    assert ui.page.evaluate("window.__xss") is None
    assert ui.errors == []


def test_request_body_follows_the_settings(ui, ui_server):
    ui.open(ui_server, temperature=0.3, max_tokens=77, system_prompt="Be brief.")
    chat = CannedChat(ui.page, [("one", None)])
    ui.send("first")
    ui.wait_done()
    ui.settings(speculation=False)
    ui.send("second")
    ui.wait_done()
    first, second = chat.bodies
    assert first["model"] == UI_MODEL and first["stream"] is True
    assert first["stream_options"] == {"include_usage": True}
    assert first["temperature"] == 0.3 and first["max_tokens"] == 77
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "first"}]
    assert "num_speculative_tokens" in first and first["num_speculative_tokens"] is None
    assert second["num_speculative_tokens"] == 0
    assert second["messages"][1:] == [{"role": "user", "content": "first"},
                                      {"role": "assistant", "content": "one"},
                                      {"role": "user", "content": "second"}]
    assert ui.errors == []


def test_speculation_stats_from_usage(ui, ui_server):
    ui.open(ui_server)
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    CannedChat(ui.page, [
        ("with counts", dict(usage, spec_decode_stats={
            "num_drafts": 4, "num_draft_tokens": 12, "num_accepted_tokens": 6})),
        ("with mean", dict(usage, spec_decode_stats={
            "num_drafts": 2, "num_draft_tokens": 6, "num_accepted_tokens": 3,
            "mean_acceptance_length": 3.25})),
        ("without", usage)])
    ui.send("a")
    ui.wait_done()
    assert ui.stat("acceptance") == "acceptance 2.50 tok/step (4 drafts)"
    assert ui.stat("tokens") == "9 tokens"
    ui.send("b")
    ui.wait_done()
    assert ui.stat("acceptance") == "acceptance 3.25 tok/step (2 drafts)"
    ui.send("c")
    ui.wait_done()
    assert ui.stat("acceptance") == "acceptance n/a"
    assert ui.errors == []


def test_new_chat_delete_and_regenerate(ui, ui_server):
    ui.open(ui_server)
    CannedChat(ui.page, [("first answer", None), ("second answer", None), ("other", None)])
    page = ui.page
    ui.send("question one")
    ui.wait_done()
    page.get_by_role("button", name="Regenerate").click()
    page.locator(".msg.assistant .body", has_text="second answer").wait_for()
    ui.wait_done()
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.user").count() == 1
    page.locator("#new-chat").click()
    assert page.locator(".msg").count() == 0
    ui.send("question two")
    ui.wait_done()
    titles = page.locator("#conversations .open").all_inner_texts()
    assert titles == ["question two", "question one"]
    page.get_by_role("button", name="Delete question one").click()
    assert page.locator("#conversations .open").all_inner_texts() == ["question two"]
    page.reload()
    page.locator("#conversations li").first.wait_for()
    assert page.locator("#conversations .open").all_inner_texts() == ["question two"]
    assert page.locator(".msg.assistant .body").inner_text() == "other"
    assert ui.errors == []


def test_sse_parser_in_the_page(ui, ui_server):
    """SD.SSEParser: events split anywhere (even inside a CRLF), comments, multi-line data."""
    ui.open(ui_server)
    out = ui.page.evaluate("""() => {
        const feed = (pieces) => {
            const p = new SD.SSEParser();
            return pieces.flatMap((x) => p.push(x));
        };
        const stream = 'data: {"a":1}\\r\\n\\r\\n: keep-alive\\n\\ndata: x\\ndata: y\\n\\ndata: [DONE]\\n\\n';
        const whole = feed([stream]);
        const bytewise = feed(stream.split(''));
        const crlfSplit = feed(['data: 1\\r', '\\n\\r', '\\ndata: 2\\n', '\\n', 'data: 3']);
        return {whole, bytewise, crlfSplit};
    }""")
    assert out["whole"] == ['{"a":1}', "x\ny", "[DONE]"]
    assert out["bytewise"] == out["whole"]
    assert out["crlfSplit"] == ["1", "2"]  # "data: 3" has no blank line yet: not an event
    assert ui.errors == []


# ---------------------------------------------------------------- HTTP (no browser)

def test_page_routes_and_headers(ui_server):
    status, headers, body = http("GET", ui_server.base_url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<script src="ui/app.js" defer></script>' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name, ctype in (("app.js", "text/javascript"), ("vendor/purify.min.js",
                        "text/javascript"), ("style.css", "text/css"),
                        ("vendor/LICENSE.marked.txt", "text/plain")):
        status, headers, _ = http("GET", f"{ui_server.base_url}/ui/{name}")
        assert status == 200 and headers["Content-Type"].startswith(ctype), name
    status, _, body = http("GET", ui_server.base_url + "/ui/config.json")
    assert status == 200 and loads(body) == {"api_key_required": False}
    for path in ("/ui/../setup.py", "/ui/%2e%2e/server/app.py", "/ui/nope.js", "/ui/index.html"):
        status, _, body = http("GET", ui_server.base_url + path)
        assert status == 404, path


def test_page_needs_no_key_but_says_one_is_needed(key_server):
    status, _, _ = http("GET", key_server.base_url + "/")
    assert status == 200
    status, _, body = http("GET", key_server.base_url + "/ui/config.json")
    assert status == 200 and loads(body) == {"api_key_required": True}
    status, _, _ = http("GET", key_server.base_url + "/v1/models")
    assert status == 401


def test_ui_off_serves_no_page():
    from aiohttp.test_utils import TestClient, TestServer

    from server.app import OpenAIServer
    from specdec.core.config import from_dict

    async def get(ui: bool) -> int:
        app = OpenAIServer(from_dict({"server": {"ui": ui}})).app
        async with TestClient(TestServer(app)) as client:
            return (await client.get("/")).status, (await client.get("/ui/app.js")).status

    def run(ui: bool):  # on a thread of its own: Playwright may hold this thread's loop
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, get(ui)).result()

    assert run(False) == (404, 404)
    assert run(True) == (200, 200)


def test_package_ships_every_ui_file(tmp_path):
    """setup.py's package_data covers every file of server/ui/ (an install has the page)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)],
                   cwd=root, check=True, capture_output=True)
    on_disk = {p.relative_to(root / "server").as_posix()
               for p in (root / "server" / "ui").rglob("*") if p.is_file()}
    built = {p.relative_to(tmp_path / "server").as_posix()
             for p in (tmp_path / "server" / "ui").rglob("*") if p.is_file()}
    assert "ui/index.html" in on_disk and built == on_disk, on_disk ^ built
