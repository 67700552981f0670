"""The chat page (gptlab/serve/static/chat.html) in headless Chromium, driven by Playwright.

The browser is Debian's ``chromium`` package (``make install`` installs it; Playwright's own download
is never used). The page comes from the real app; replies stream from the real server, except where a
test needs a reply the random tiny model cannot be made to write: there Playwright answers the
chat-completions request itself with a fixed SSE stream.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from serving import running_server

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip(
        "no chromium on PATH: the chat page tests need Debian's chromium package (make install adds it as root)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the chat page tests need playwright (the test extra)")
expect = sync_api.expect

API_KEY = "sesame"
MAX_NEW_TOKENS = 24  # the server's limit; the page's default max_tokens (256) is over it
BROWSER_TIMEOUT_MS = 60_000  # a loaded 2-core machine; a hang still fails


@pytest.fixture(scope="module")
def base_url(tiny_model: Path) -> Iterator[str]:
    with running_server({"tiny": tiny_model}, api_key=API_KEY, max_new_tokens=MAX_NEW_TOKENS) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    expect.set_options(timeout=BROWSER_TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, base_url: str) -> Iterator:
    """The chat page with no key typed in yet; any script error on it fails the test."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(base_url + "/")
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def unlock(page, temperature: str = "0", max_tokens: str = "16") -> None:
    """Open the settings, type the key (the model list loads with it) and choose greedy sampling."""
    page.click("summary")
    page.fill("#api_key", API_KEY)
    page.press("#api_key", "Tab")  # the key counts once committed, as a user leaving the field
    expect(page.locator("#model option")).to_have_text(["tiny"])
    page.fill("#temperature", temperature)
    page.fill("#max_tokens", max_tokens)


def send(page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def last_reply(page):
    """The newest assistant bubble, once its reply has finished streaming."""
    expect(page.locator(".assistant.streaming")).to_have_count(0)
    return page.locator(".assistant").last


def greedy_reply(base_url: str, messages: list[dict], max_tokens: int) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def test_a_message_gets_its_reply_streamed_and_the_next_turn_carries_the_history(page, base_url):
    unlock(page)
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)

    send(page, "alpha beta")
    first = last_reply(page)
    expected = greedy_reply(base_url, [{"role": "user", "content": "alpha beta"}], 16)
    assert expected and first.text_content() == expected
    # Each SSE chunk became its own text node as it came: the reply was shown while it streamed.
    assert first.evaluate("bubble => bubble.childNodes.length") > 1

    send(page, "gamma")
    history = [
        {"role": "user", "content": "alpha beta"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "gamma"},
    ]
    assert last_reply(page).text_content() == greedy_reply(base_url, history, 16)
    assert page.locator(".user").all_text_contents() == ["alpha beta", "gamma"]
    assert sent[-1]["messages"] == history
    assert (sent[-1]["stream"], sent[-1]["temperature"], sent[-1]["max_tokens"]) == (True, 0, 16)


HOSTILE = ['<script>window.ran = "script"</script>', " <img src=x onerror=\"window.ran = 'img'\">", " <b>bold</b>"]


def sse(pieces: list[str]) -> str:
    chunks = [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def test_a_reply_written_in_html_is_shown_as_text_and_runs_nothing(page):
    unlock(page)
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=sse(HOSTILE)),
    )
    send(page, "say something nasty")
    reply = last_reply(page)
    # An image of the same broken source has failed to load by the time this resolves, so an injected
    # one would have run its onerror too.
    page.evaluate("new Promise(done => { const probe = new Image(); probe.onerror = done; probe.src = 'x'; })")
    assert page.evaluate("window.ran") is None
    assert reply.text_content() == "".join(HOSTILE)
    assert reply.evaluate("bubble => bubble.children.length") == 0  # no element was made from the reply


def test_errors_are_shown_in_the_servers_words(page, base_url):
    expect(page.locator("#error")).to_contain_text("could not list the models: 401")  # no key typed yet
    unlock(page, max_tokens=str(MAX_NEW_TOKENS + 1))
    expect(page.locator("#error")).to_be_empty()  # the key brought the models

    send(page, "alpha")
    expect(page.locator("#error")).to_contain_text("400: ")
    expect(page.locator("#error")).to_contain_text("max_tokens")
    # The failed turn is taken back: no bubbles, the message back in the box, ready to send again.
    assert page.locator(".message").count() == 0
    assert page.input_value("#message") == "alpha"
    assert page.is_enabled("#send") and page.is_disabled("#stop")


def test_stop_ends_a_reply_that_has_not_come(page):
    unlock(page)
    page.route("**/v1/chat/completions", lambda route: None)  # the request stays unanswered
    send(page, "alpha")
    expect(page.locator(".assistant.streaming")).to_have_count(1)
    page.click("#stop")
    expect(page.locator(".message")).to_have_count(0)
    assert page.input_value("#message") == "alpha"
    assert page.text_content("#error") == ""  # stopping is not an error
    assert page.is_enabled("#send") and page.is_disabled("#stop")
