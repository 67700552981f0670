"""The arena page (gptlab/serve/static/arena.html) and the leaderboard page in headless Chromium,
driven by Playwright, as tests/test_serve_page.py drives the chat page: Debian's ``chromium``, never
Playwright's own download. Battles stream from the real server over two twin tiny models; where a
test needs answers the random models cannot be made to write (HTML) or a stream cut short,
Playwright answers the battle request itself with a fixed event stream.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptlab.arena import ratings
from gptlab.arena.battles import Battle
from gptlab.arena.store import ArenaStore
from gptlab.serve import create_app
from serving import paused, serving, twin_models

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip(
        "no chromium on PATH: the arena page tests need Debian's chromium package (make install adds it as root)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the arena page tests need playwright (the test extra)")
expect = sync_api.expect

API_KEY = "sesame"
NAMES = ["quokka", "narwhal"]  # words the tiny models' answers cannot hold: found in the page only once revealed
MAX_NEW_TOKENS = 24  # the server's limit; the page's default max_tokens (256) is over it
BROWSER_TIMEOUT_MS = 60_000  # a loaded 2-core machine; a hang still fails
VOTES = ["#vote-a", "#vote-b", "#vote-tie", "#vote-bothbad"]


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arena_page") / "arena.db"


@pytest.fixture(scope="module")
def app(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, db: Path):
    models = twin_models(tiny_model, tmp_path_factory.mktemp("arena_page_models"), NAMES)
    return create_app({}, arena=models, arena_db=db, api_key=API_KEY, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def base_url(app) -> Iterator[str]:
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator:
    expect.set_options(timeout=BROWSER_TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def open_page(browser, url: str) -> Iterator:
    """A page at ``url``; any script error on it fails the test."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(url)
    yield page
    context.close()
    assert not errors, f"script errors on the page: {errors}"


@pytest.fixture
def page(browser, base_url: str) -> Iterator:
    """The arena page, no key typed in yet."""
    yield from open_page(browser, base_url + "/arena")


@pytest.fixture
def board_page(browser, base_url: str) -> Iterator:
    """The leaderboard page, no key typed in yet."""
    yield from open_page(browser, base_url + "/leaderboard")


def stored(db: Path) -> list[Battle]:
    with ArenaStore(db) as store:
        return store.battles()


def unlock(page, max_tokens: str = "12") -> None:
    """Open the settings, type the key and choose greedy answers."""
    page.click("summary")
    page.fill("#api_key", API_KEY)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", max_tokens)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def assert_votes_closed(page) -> None:
    for button in VOTES:
        expect(page.locator(button)).to_be_disabled()


def assert_anonymous(page) -> None:
    html = page.content()
    assert not any(name in html for name in NAMES)
    expect(page.locator("#name-a")).to_have_text("Model A")
    expect(page.locator("#name-b")).to_have_text("Model B")


def test_a_round_votes_once_both_answers_end_then_names_the_models_and_stores_what_was_shown(page, app, db):
    unlock(page)
    before = {b.battle_id for b in stored(db)}
    with paused(app, NAMES[1:]) as resume:  # one model waits: its answer hangs while the other's ends
        send(page, "alpha beta")
        expect(page.locator(".answer.streaming")).to_have_count(1)
        assert_votes_closed(page)
        resume()
        expect(page.locator(".answer.streaming")).to_have_count(0)
    for button in VOTES:
        expect(page.locator(button)).to_be_enabled()
    assert_anonymous(page)  # the answers are complete, and still nothing on the page names a model
    shown = [page.text_content("#answer-a"), page.text_content("#answer-b")]
    expect(page.locator("#prompt-shown")).to_have_text("alpha beta")

    page.click("#vote-a")
    expect(page.locator("#name-a")).to_have_text(re.compile(f"^Model A: ({'|'.join(NAMES)})$"))
    model_a = page.text_content("#name-a").removeprefix("Model A: ")
    model_b = page.text_content("#name-b").removeprefix("Model B: ")
    assert {model_a, model_b} == set(NAMES)
    expect(page.locator("#verdict")).to_contain_text("A is better")
    assert_votes_closed(page)
    (record,) = [b for b in stored(db) if b.battle_id not in before]
    assert (record.model_a, record.model_b, record.winner, record.judge) == (model_a, model_b, "model_a", "human")
    assert [record.answer_a, record.answer_b] == shown

    # A second vote on the same battle (its button forced open, as a replaying script would): refused, and shown.
    page.evaluate("document.getElementById('vote-b').disabled = false")
    page.click("#vote-b")
    expect(page.locator("#error")).to_contain_text("409: this battle has its vote already")
    assert [b.winner for b in stored(db) if b.battle_id == record.battle_id] == ["model_a"]

    page.click("#new-round")
    assert_anonymous(page)
    assert_votes_closed(page)
    assert page.text_content("#answer-a") == page.text_content("#answer-b") == page.text_content("#error") == ""
    assert page.is_enabled("#send")


HOSTILE = ['<script>window.ran = "script"</script>', " <img src=x onerror=\"window.ran = 'img'\">", " <b>x</b>"]


def battle_stream(battle_id: str, pieces: list[str], end_b: bool = True, done: bool = True) -> str:
    """A battle's event stream as the server writes it: both sides get ``pieces``."""
    chunks = [{"battle_id": battle_id}]
    chunks += [{"side": side, "text": piece} for piece in pieces for side in "ab"]
    chunks += [{"side": "a", "finish_reason": "stop"}] + ([{"side": "b", "finish_reason": "stop"}] if end_b else [])
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + ("data: [DONE]\n\n" if done else "")


def answer_with(page, body: str) -> None:
    page.route(
        "**/arena/api/battles",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )


def test_answers_written_in_html_are_shown_as_text_and_run_nothing_and_a_forged_id_is_refused(page, db):
    unlock(page)
    answer_with(page, battle_stream("f" * 32, HOSTILE))  # an id the server never gave
    send(page, "say something nasty")
    expect(page.locator("#vote-tie")).to_be_enabled()
    # An image of the same broken source has failed to load by the time this resolves, so an injected
    # one would have run its onerror too.
    page.evaluate("new Promise(done => { const probe = new Image(); probe.onerror = done; probe.src = 'x'; })")
    assert page.evaluate("window.ran") is None
    for side in "ab":
        answer = page.locator(f"#answer-{side}")
        assert answer.text_content() == "".join(HOSTILE)
        assert answer.evaluate("box => box.children.length") == 0  # no element was made from the answer
    before = len(stored(db))
    page.click("#vote-tie")
    expect(page.locator("#error")).to_contain_text("404: no battle waiting for a vote has this id")
    assert_anonymous(page)
    assert len(stored(db)) == before


def test_a_stream_cut_before_both_answers_end_leaves_the_votes_closed(page):
    unlock(page)
    answer_with(page, battle_stream("e" * 32, ["half an answer"], end_b=False, done=False))
    send(page, "alpha")
    expect(page.locator("#error")).to_contain_text("did not come to their end")
    assert_votes_closed(page)
    assert page.is_enabled("#new-round")
    assert page.input_value("#prompt") == "alpha"  # back in the box, to send again


def test_errors_are_shown_in_the_servers_words(page):
    send(page, "alpha")  # no key typed yet
    expect(page.locator("#error")).to_contain_text("401: a valid API key is required")
    page.click("#new-round")
    unlock(page, max_tokens=str(MAX_NEW_TOKENS + 1))
    page.fill("#prompt", "")
    send(page, "alpha")
    expect(page.locator("#error")).to_contain_text("400: max_tokens")
    assert not any(name in page.content() for name in NAMES)
    assert_votes_closed(page)


def test_the_leaderboard_shows_the_stores_ratings_as_text(board_page, db):
    hostile = '<img src=x onerror="window.ran = 1">'  # a name from an imported file is text too
    battles = [
        Battle([{"role": "user", "content": "q"}], a, b, "x", "y", winner, "human", tstamp=1.0 + i)
        for i, (a, b, winner) in enumerate([(NAMES[0], hostile, "model_a"), (hostile, NAMES[1], "tie")] * 3)
    ]
    with ArenaStore(db) as store:
        store.add_many(battles)
    page = board_page
    expect(page.locator("#error")).to_contain_text("401")  # the board's JSON needs the key
    page.click("summary")
    page.fill("#api_key", API_KEY)
    page.press("#api_key", "Tab")
    board = ratings.leaderboard(stored(db))
    rows = page.locator("#board tbody tr")
    expect(rows).to_have_count(len(board))
    headers = page.locator("#board th").all_text_contents()
    assert headers == ["model", "bt", "elo", "95% interval", "rank_ub", "battles", "wins", "ties"]
    for row, expected in zip(rows.all(), board):
        cells = row.locator("td").all_text_contents()
        assert cells[0] == expected["model"] and cells[1] == f"{expected['bt']:.1f}"
        assert cells[3] == f"{expected['ci_low']:.1f} to {expected['ci_high']:.1f}"
        assert cells[4:] == [str(expected[key]) for key in ("rank_ub", "battles", "wins", "ties")]
    assert page.locator("#board img").count() == 0 and page.evaluate("window.ran") is None
    expect(page.locator("#summary")).to_have_text(f"{len(stored(db))} battles")
