"""The web page at / in a real browser (Debian's Chromium through Playwright) against a live server with
the real model. Every wait is on a DOM condition, never a sleep standing in for work.

Screenshots go to test-artifacts/. Without Chromium these tests skip (install it with
`apt-get install chromium`); with CI=true a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from serving import live_server

pytestmark = pytest.mark.model

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               # without these, Chromium's own background connections make it refuse ours
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 180_000  # a busy 2-core machine runs the model slowly: generous, and only ever an upper bound
LONG_ANSWER = json.dumps({"logit_bias": {"0": -100, "2": -100}})  # no end-of-generation token: runs until stopped
PAYLOAD = ('<img src=x onerror="window.xssRan=1"> <script>window.xssRan=2</script> '
           '[click](javascript:window.xssRan=3) <a href="javascript:window.xssRan=4">a</a> '
           '<svg onload="window.xssRan=5"></svg> **bold** `<b>code</b>`')
NOT_RUN = "window.xssRan === undefined"


def _chromium() -> str | None:
    for candidate in (os.environ.get("PARALLAMA_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI must run the browser tests")
    pytest.skip(f"{reason}; install it with `apt-get install chromium` (Debian/Ubuntu) to run the browser tests")


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        _missing("no Chromium found at /usr/bin/chromium or on PATH")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    with live_server(parallel=2, ctx_size=2048) as srv:
        yield srv


@pytest.fixture
def page(browser, server):
    """A fresh browser profile (empty localStorage) on the page. Uncaught page errors fail the test.
    bypass_csp: Playwright's waits evaluate strings, which the page's CSP forbids; the XSS tests then
    check the page's own escaping, not the CSP fence behind it."""
    context = browser.new_context(viewport={"width": 1400, "height": 860}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(server.base_url + "/")
    page.wait_for_function("document.getElementById('model-id').textContent.length > 0")
    yield page
    context.close()
    assert not errors, errors


def configure(page, **fields: str) -> None:
    """Fill the settings panel as a person would (names are the input ids without 'set-')."""
    page.click("#open-settings")
    for name, value in fields.items():
        page.fill(f"#set-{name.replace('_', '-')}", value)
    page.click("#save-settings")
    page.wait_for_selector("#settings-dialog", state="hidden")


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_done(page) -> None:
    page.wait_for_function("document.body.dataset.streaming === 'false' && !document.querySelector('.status')")


def answers(page) -> list[str]:
    return page.locator(".msg.assistant .content").all_inner_texts()


def shot(page, name: str, selector: str | None = None) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    target = page.locator(selector) if selector else page
    target.screenshot(path=str(ARTIFACTS / name))


def test_an_answer_streams_in_and_stop_keeps_what_arrived(page):
    configure(page, max_tokens="1900", extra=LONG_ANSWER)
    send(page, "Tell me a long story about a lighthouse keeper and the sea.")
    # Text is on the page while the answer is still streaming, and the live view shows the sequence.
    page.wait_for_function("document.body.dataset.streaming === 'true' && "
                           "document.querySelector('.msg.assistant .content').textContent.length > 80")
    page.wait_for_selector("#slots li[data-state=generating]")
    # The rate shows once two polls saw the sequence grow (the answer cannot end by itself: no hurry).
    page.wait_for_function("parseFloat(document.getElementById('tps-now').textContent) > 0 && "
                           "document.querySelector('.msg.assistant .content').textContent.length > 400")
    shot(page, "chat-streaming.png")
    shot(page, "live-view.png", ".live")
    assert page.is_visible("#stop")
    page.keyboard.press("Escape")
    wait_done(page)
    assert page.is_visible(".msg.assistant .stopped")
    assert len(answers(page)[0]) > 80  # what arrived stays
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    # The server let the sequence go: the live view returns to idle.
    page.wait_for_function("[...document.querySelectorAll('#slots li')].every(li => li.dataset.state === 'idle')")
    assert page.locator("#slots li").count() == 2


def test_regenerate_and_edit_the_last_message(page):
    configure(page, max_tokens="24")
    send(page, "Name three colors.")
    wait_done(page)
    assert answers(page)[0].strip()
    assert "tokens" in page.inner_text(".msg.assistant .info")
    with page.expect_request("**/v1/chat/completions") as request:
        page.click(".msg.assistant .regenerate")
    body = request.value.post_data_json
    assert [m["role"] for m in body["messages"]] == ["user"]  # the old answer is not sent back
    assert body["max_tokens"] == 24 and body["stream"] is True
    wait_done(page)
    assert len(answers(page)) == 1 and answers(page)[0].strip()

    page.click(".msg.user .edit")
    assert page.input_value("#input") == "Name three colors."
    assert page.locator(".msg").count() == 0
    page.fill("#input", "Name two animals.")
    page.click("#send")
    wait_done(page)
    assert page.locator(".msg.user .content").all_inner_texts() == ["Name two animals."]
    assert len(answers(page)) == 1
    assert page.inner_text("#conversation-list li.selected .title") == "Name two animals."  # titled anew
    page.wait_for_function("[...document.querySelectorAll('#slots li')].every(li => li.dataset.state === 'idle')")
    shot(page, "chat.png")


def test_conversations_survive_a_reload_with_rename(page, server):
    configure(page, max_tokens="8")
    send(page, "First conversation here.")
    wait_done(page)
    page.click("#new-conversation")
    send(page, "Second conversation here.")
    wait_done(page)
    # Rename the second one in place.
    page.click("#conversation-list li.selected button[title=Rename]")
    page.fill("#conversation-list input.rename", "Renamed chat")
    page.press("#conversation-list input.rename", "Enter")

    page.reload()
    page.wait_for_selector("#conversation-list li >> nth=1")
    titles = page.locator("#conversation-list li .title").all_inner_texts()
    assert titles == ["Renamed chat", "First conversation here."]
    assert page.inner_text(".msg.user .content") == "Second conversation here."
    page.click("#conversation-list li .title >> text=First conversation here.")
    assert page.inner_text(".msg.user .content") == "First conversation here."
    assert len(answers(page)) == 1
    # Delete one: the other is left.
    page.click("#conversation-list li.selected button[title=Delete]")
    page.wait_for_function("document.querySelectorAll('#conversation-list li').length === 1")
    assert page.inner_text(".msg.user .content") == "Second conversation here."


def test_html_from_the_user_and_the_model_never_runs(page, server, tmp_path):
    # From the user, through the whole round trip.
    configure(page, max_tokens="16")
    send(page, PAYLOAD)
    wait_done(page)
    assert page.inner_text(".msg.user .content").startswith('<img src=x onerror="window.xssRan=1"> <script>')
    # From the model: an assistant message carrying the payload, imported as an exported conversation...
    exported = tmp_path / "evil.json"
    breakout = "\n```\n</code></pre><img src=x onerror=window.xssRan=7>\n```"  # out of a code block?
    exported.write_text(json.dumps({"title": "<img src=x onerror=window.xssRan=6>", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": PAYLOAD + breakout}]}))
    page.set_input_files("#import-file", str(exported))
    page.wait_for_selector("#notice.info")
    assert "<img" in page.inner_text("#conversation-list li.selected .title")
    _assert_inert(page)
    # ...and one written straight into localStorage, then reloaded.
    page.evaluate("""payload => localStorage.setItem('parallama.conversations', JSON.stringify([{id: 'x',
        title: 'stored', messages: [{role: 'assistant', content: payload}, {role: 'user', content: payload}]}]))""",
                  PAYLOAD)
    page.reload()
    page.wait_for_selector(".msg.assistant")
    _assert_inert(page)
    assert page.inner_text(".msg.assistant strong") == "bold"  # Markdown still works around it


def _assert_inert(page) -> None:
    messages = page.locator("#messages")
    for tag in ("img", "script", "svg", "iframe", "a[href^=javascript]"):
        assert messages.locator(tag).count() == 0, tag
    assert "onerror" in messages.inner_text()  # shown as text
    assert page.evaluate(NOT_RUN)


def test_the_markdown_renderer_only_makes_its_own_tags(page):
    nasty = [PAYLOAD, "[x](javascript:alert(1))", "[x](JAVASCRIPT:alert(1))", '[x](http://a.example/"onmouseover="x)',
             "[x](data:text/html,<script>x</script>)", "`<img src=x onerror=x>`", "**<i onclick=x>b</i>**",
             "```\n<script>x</script>\n", "# <h1>head</h1>\n- <li>item</li>", "\u0000<img src=x>\u0000",
             "_<u>x</u>_ *<em>y</em>* [ok](https://example.com/a_b*c*?q=1&r=<2>)"]
    result = page.evaluate("""inputs => inputs.map(text => {
        const box = document.createElement('template');
        box.innerHTML = renderMarkdown(text);
        return [...box.content.querySelectorAll('*')].map(n => [n.tagName.toLowerCase(),
            [...n.attributes].map(a => [a.name, a.value])]);
    })""", nasty)
    allowed = {"p", "br", "pre", "code", "strong", "em", "h3", "h4", "h5", "ul", "ol", "li", "a"}
    for text, elements in zip(nasty, result):
        for tag, attributes in elements:
            assert tag in allowed, (text, tag)
            for name, value in attributes:
                assert name in {"href", "target", "rel", "data-lang"}, (text, name)
                if name == "href":
                    assert value.startswith(("http://", "https://")) and '"' not in value and "<" not in value
    assert page.evaluate(NOT_RUN)


def test_a_prompt_too_long_for_the_context_is_explained(page):
    configure(page, max_tokens="100000")
    send(page, "hello")
    notice = page.wait_for_selector("#notice.error")
    assert "context" in notice.inner_text() and any(ch.isdigit() for ch in notice.inner_text())
    assert page.locator(".msg.assistant").count() == 0  # no empty answer left behind


def test_a_busy_server_is_retried_after_retry_after(page):
    """A 503 (queue full) is answered for the first try only; the page waits and tries again."""
    tries = []

    def busy_once(route):
        tries.append(route.request.url)
        if len(tries) == 1:
            route.fulfill(status=503, headers={"Retry-After": "1", "Content-Type": "application/json"},
                          body=json.dumps({"error": {"message": "busy", "type": "server_error", "param": None,
                                                     "code": "server_is_overloaded"}}))
        else:
            route.continue_()

    page.route("**/v1/chat/completions", busy_once)
    configure(page, max_tokens="8")
    send(page, "hi")
    page.wait_for_selector(".msg.assistant .status >> text=server is busy")
    wait_done(page)
    assert len(tries) == 2 and answers(page)[0].strip()
    assert page.is_hidden("#notice")


SET_VISIBILITY = """state => { Object.defineProperty(document, 'visibilityState', {value: state, configurable: true});
                               document.dispatchEvent(new Event('visibilitychange')); }"""
STATUS_FETCHES = "performance.getEntriesByType('resource').filter(e => e.name.endsWith('/status'))"


def test_the_live_view_stops_polling_in_a_hidden_tab(page):
    page.wait_for_selector("#slots li")
    polls = []
    page.on("request", lambda r: polls.append(r.url) if r.url.endswith("/status") else None)
    page.wait_for_function("document.getElementById('live-state').textContent === '● live'")
    page.evaluate(SET_VISIBILITY, "hidden")
    seen = len(polls)
    page.wait_for_timeout(2500)  # the absence of polls can only be seen over time: 2.5 periods
    assert len(polls) <= seen + 1  # at most one already under way
    before = page.evaluate(f"{STATUS_FETCHES}.length")
    page.evaluate(SET_VISIBILITY, "visible")
    page.wait_for_function(f"n => {STATUS_FETCHES}.length > n", arg=before)  # polling resumes


# --- a server started with an API key ---------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed():
    with live_server(parallel=1, ctx_size=512, api_key="page-key") as srv:
        yield srv


def test_a_keyed_server_asks_for_the_key_and_works_once_given(browser, keyed):
    assert httpx.get(keyed.base_url + "/").status_code == 200  # the page loads without the key
    assert httpx.get(keyed.base_url + "/status").status_code == 401  # the API does not
    context = browser.new_context(viewport={"width": 1400, "height": 860}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(keyed.base_url + "/")
    page.wait_for_selector("#key-dialog[open]")  # asked at once: /v1/models and /status said 401
    assert "started with an API key" in page.inner_text("#key-reason")
    page.click("#key-dialog button[value=cancel]")
    configure(page, max_tokens="8")
    send(page, "hi")
    page.wait_for_selector("#key-dialog[open]")  # the answer got 401: asked again, the message kept
    assert "needs an API key" in page.inner_text("#notice")
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 0
    page.fill("#key-input", "wrong")
    page.click("#save-key")
    page.wait_for_selector("#key-reason >> text=refused")  # the wrong key is refused
    shot(page, "key-prompt.png")
    page.fill("#key-input", "page-key")
    page.click("#save-key")  # and the answer that was refused is asked for again
    wait_done(page)
    page.wait_for_function("document.querySelector('.msg.assistant .content')?.textContent.trim().length > 0")
    page.wait_for_function("document.getElementById('live-state').textContent === '● live'")
    assert page.inner_text("#model-id")
    context.close()
