"""The SOC review page (``/`` on the admin listener) in a real headless Chromium.

A real node with ``[admin]`` in front of the real Postfix (the set-up of
test_admin_api.py), blocked SMTP sessions from smtplib, and Debian's
Chromium driven by Playwright: the list of blocked sessions and its filters,
one session's story, unban, allow (and taking the entry out again) and label
clicked on the page and checked in the node (its bans, its journal, its allow
list, a new SMTP connection), and the list paged with "Load older".

Playwright's sync API is bound to the thread that started it, and the node
runs in the test's Trio thread: :class:`Chrome` keeps the browser in a thread
of its own and the test hands it one step at a time (``await tab.run(step)``),
so the node keeps serving while the page talks to it.

``MAILMOAT_SCREENSHOTS=1`` also writes docs/img/review-list.png,
docs/img/review-detail.png, docs/img/review-older.png and
docs/img/review-allow.png.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from playwright.sync_api import Browser, Dialog, Page, Playwright, expect, sync_playwright

from conftest import MailmoatTLS, RunningNode, StartNode
from mailmoat.demo.postfix import PostfixInstance
from mailmoat.events import EventSink
from test_admin_api import (
    TOKEN,
    api,
    denied_session,
    ehlo,
    rules_dir,  # noqa: F401 - a fixture, used by name
    start,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("rules_dir")]

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = os.environ.get("MAILMOAT_SCREENSHOTS") == "1"
XSS_USER = "<img src=x onerror=window.__xss=1>"
XSS_LINE = "<script>window.__xss=2</script>"
XSS_COMMENT = "<img src=x onerror=window.__xss=3> & co"
NOT_LISTED = "127.0.0.1 is not on the allow list (trusted_networks)."
#: a reference to anything not served by the node itself
EXTERNAL = r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\("


# --------------------------------------------------------------------------- the browser


class Chrome:
    """Chromium under Playwright's sync API, every call made in one thread of its own."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="chromium")
        self._playwright: Playwright | None = None
        self.browser: Browser | None = None
        self.call(self._launch)

    def _launch(self) -> None:
        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )

    def call(self, fn: Callable[[], T]) -> T:
        return self._pool.submit(fn).result()

    def close(self) -> None:
        def stop() -> None:
            if self.browser is not None:
                self.browser.close()
            if self._playwright is not None:
                self._playwright.stop()

        try:
            self.call(stop)
        finally:
            self._pool.shutdown()


@pytest.fixture(scope="session")
def chrome() -> Iterator[Chrome]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium (as .ci/run does)")
    c = Chrome()
    try:
        yield c
    finally:
        c.close()


class Tab:
    """One page in a fresh browser context (its own sessionStorage), with what it logged."""

    def __init__(self, chrome: Chrome) -> None:
        self.chrome = chrome
        self.console: list[str] = []
        self.errors: list[str] = []

        def open_page() -> Page:
            assert chrome.browser is not None
            context = chrome.browser.new_context(viewport={"width": 1280, "height": 800})
            context.set_default_timeout(15_000)
            page = context.new_page()
            page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: self.errors.append(str(e)))
            return page

        self.page = chrome.call(open_page)

    async def run(self, step: Callable[[Page], T]) -> T:
        """Run ``step(page)`` in the browser's thread while this (Trio) thread serves."""
        return await trio.to_thread.run_sync(lambda: self.chrome.call(lambda: step(self.page)))

    def check_clean(self) -> None:
        """No script error and nothing the Content-Security-Policy refused."""
        assert self.errors == []
        assert not [m for m in self.console if "Content Security Policy" in m], self.console

    def close(self) -> None:
        self.chrome.call(self.page.context.close)


@pytest.fixture
def tab(chrome: Chrome) -> Iterator[Tab]:
    t = Tab(chrome)
    try:
        yield t
    finally:
        t.close()


# --------------------------------------------------------------------------- helpers


def base_url(rn: RunningNode) -> str:
    assert rn.node.admin_address is not None
    host, port = rn.node.admin_address
    return f"http://{host}:{port}/"


def rows(page: Page) -> list[str]:
    """The session ids of the list's rows, top to bottom, once loaded."""
    expect(page.locator("#list-status")).not_to_have_text("Loading\u2026")
    ids = page.locator("#sessions tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.session)"
    )
    return [str(i) for i in ids]


def row_cells(page: Page, sid: str) -> list[str]:
    """The text of a row's cells after the time (checked to be a UTC time)."""
    cells = page.locator(f"#sessions tr[data-session='{sid}'] td").evaluate_all(
        "tds => tds.map(td => td.textContent)"
    )
    texts = [str(c) for c in cells]
    assert re.fullmatch(r"20\d\d-\d\d-\d\d \d\d:\d\d:\d\d", texts[0]), texts
    return texts[1:]


def wait_rows(page: Page, expected: list[str]) -> None:
    """Wait until the list shows exactly the sessions ``expected``, in that order."""
    seen: list[str] = []
    for _ in range(200):
        seen = rows(page)
        if seen == expected:
            return
        page.wait_for_timeout(50)
    assert seen == expected


def log_in(page: Page, url: str, token: str = TOKEN) -> None:
    page.goto(url)
    expect(page.locator("#token")).to_be_visible()
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")


def apply_filters(page: Page, expected: list[str], **values: str) -> None:
    """Set the filters given (the others empty, ``range`` 24h), apply: ``expected`` shows."""
    page.select_option("#f-protocol", values.pop("protocol", ""))
    page.select_option("#f-range", values.pop("range", "24h"))
    for name in ("rule", "user", "ip", "country", "since", "until"):
        field = page.locator(f"#f-{name}")
        if field.is_visible():
            field.fill(values.pop(name, ""))
    assert not values, f"not a filter field, or hidden: {values}"
    page.click("#apply")
    wait_rows(page, expected)


def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(REPO / "docs" / "img" / name), full_page=True)


def emit_blocked(
    rn: RunningNode, sid: str, *, user: str, ip: str, transcript: list[str] | None = None
) -> None:
    """A blocked IMAP session as the events of a login rule would tell it."""
    emitter = rn.node.emitter
    common = {"session.protocol": "imap", "session.listener": "imap", "client.ip": ip}
    emitter.emit("session.open", {**common, "client.port": 40000}, session_id=sid)
    emitter.emit(
        "auth.attempt",
        {**common, "auth.user": user, "auth.mechanism": "PLAIN"},
        outcome="failure",
        session_id=sid,
    )
    emitter.emit(
        "rule.match",
        {
            **common,
            "client.geo.country": "NL",
            "auth.user": user,
            "rule.id": "T-XSS",
            "rule.name": "odd-user",
            "rule.severity": "medium",
            "rule.phase": "auth",
            "verdict.action": "deny",
            "verdict.evidence": {"auth.user": user},
        },
        kind="verdict",
        session_id=sid,
    )
    if transcript is not None:
        lines = [{"dir": "c" if i % 2 == 0 else "s", "line": t} for i, t in enumerate(transcript)]
        emitter.emit("session.transcript", {**common, "transcript": lines}, session_id=sid)
    emitter.emit(
        "session.close",
        {**common, "session.close_reason": "policy_deny"},
        outcome="failure",
        session_id=sid,
    )


@contextlib.contextmanager
def stamped(rn: RunningNode, when: float) -> Iterator[None]:
    """Every event the node emits meanwhile carries ``@timestamp`` ``when`` (the
    emitter's format, milliseconds): sessions that share a timestamp on purpose."""
    stamp = dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="milliseconds")
    stamp = stamp.replace("+00:00", "Z")
    emitter = rn.node.emitter
    sinks = emitter.sinks

    def restamp(sink: EventSink) -> EventSink:
        return lambda event: sink({**event, "@timestamp": stamp})

    emitter.sinks = [restamp(sink) for sink in sinks]
    try:
        yield
    finally:
        emitter.sinks = sinks


async def journal_has_blocked(rn: RunningNode, sids: set[str]) -> None:
    """Wait until ``/api/events?blocked`` has every session of ``sids`` (batched writes)."""
    with trio.fail_after(10):
        while True:
            status, body = await api(rn, "GET", "/api/events?blocked=true")
            assert status == 200
            if sids <= {e.get("session.id") for e in body["events"]}:
                return
            await trio.sleep(0.1)


async def session_has(rn: RunningNode, sid: str, action: str) -> None:
    with trio.fail_after(10):
        while True:
            status, body = await api(rn, "GET", f"/api/sessions/{sid}")
            if status == 200 and any(e["event.action"] == action for e in body["events"]):
                return
            await trio.sleep(0.1)


def fetch(rn: RunningNode, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    assert rn.node.admin_address is not None
    conn = http.client.HTTPConnection(*rn.node.admin_address, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.msg, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- the files


async def test_page_and_assets_need_no_token_and_carry_a_strict_policy(
    postfix: PostfixInstance, start_node: StartNode
) -> None:
    rn = await start(start_node, postfix)

    status, headers, body = await trio.to_thread.run_sync(fetch, rn, "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"
    policies = headers.get_all("Content-Security-Policy") or []
    assert any("script-src 'self'" in p and "frame-ancestors 'none'" in p for p in policies)
    for policy in policies:
        assert "default-src" in policy
        assert "unsafe-inline" not in policy
        assert "unsafe-eval" not in policy
    html = body.decode()
    # no inline script, style or handler: the policy would refuse them anyway
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts == ['<script src="/review/review.js" defer>']
    assert "<style" not in html
    assert not re.search(r"\s(on[a-z]+|style)\s*=", html)
    assert 'type="password"' in html

    texts = {"html": html}
    for name, content_type in [
        ("review.js", "text/javascript; charset=utf-8"),
        ("review.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ]:
        status, headers, body = await trio.to_thread.run_sync(fetch, rn, f"/review/{name}")
        assert (status, headers["Content-Type"]) == (200, content_type), name
        assert headers["X-Content-Type-Options"] == "nosniff"
        texts[name] = body.decode()
    # nothing from elsewhere (no CDN, no web font), and event data never as markup
    for name in ("html", "review.js", "review.css"):
        assert not re.search(EXTERNAL, texts[name]), name
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in texts["review.js"]

    status, _, _ = await trio.to_thread.run_sync(fetch, rn, "/review/nope.js")
    assert status == 404
    status, _, _ = await trio.to_thread.run_sync(fetch, rn, "/api/events")
    assert status == 401  # the data stays behind the token


# --------------------------------------------------------------------------- the token


async def test_a_wrong_token_says_so_and_asks_again(
    postfix: PostfixInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tab: Tab
) -> None:
    rn = await start(start_node, postfix)
    sid = await denied_session(rn, mailmoat_tls)
    await journal_has_blocked(rn, {sid})
    url = base_url(rn)

    def wrong(page: Page) -> None:
        log_in(page, url, "not-the-token-" + "0" * 16)
        expect(page.locator("#login-error")).to_contain_text("Wrong token")
        expect(page.locator("#token")).to_be_visible()
        expect(page.locator("#token")).to_have_value("")
        expect(page.locator("#list-view")).to_be_hidden()
        assert page.evaluate("sessionStorage.length") == 0

    await tab.run(wrong)
    failure = await rn.wait_for("admin.auth_failure")
    assert failure["event.reason"] == "wrong token"

    def right_then_stale(page: Page) -> None:
        page.fill("#token", TOKEN)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#login-error")).to_be_hidden()
        wait_rows(page, [sid])
        # the token kept in the tab goes stale (rotated): the next call says so
        page.evaluate("sessionStorage.setItem('mailmoat.admin.token', 'rotated-' + '1'.repeat(20))")
        page.click("#apply")
        expect(page.locator("#login-error")).to_contain_text("Wrong token")
        expect(page.locator("#token")).to_be_visible()

    await tab.run(right_then_stale)
    tab.check_clean()


# --------------------------------------------------------------------------- the list


async def test_blocked_sessions_newest_first_filtered_and_shared_by_url(
    postfix: PostfixInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tab: Tab
) -> None:
    rn = await start(start_node, postfix)
    port = rn.port("smtp")
    assert await trio.to_thread.run_sync(ehlo, port, "good.example") == 250
    good = await rn.wait_for("session.close", session__close_reason="client_quit")
    deny = await denied_session(rn, mailmoat_tls)
    assert await trio.to_thread.run_sync(ehlo, port, "banme.example") == 554
    ban = str((await rn.wait_for("client.ban"))["session.id"])
    # the ban session's close may land after the client saw 554: wait for it, or the
    # synthetic session below is not the newest row
    await rn.wait_for("session.close", session__id=ban)
    xss = "0000feedface00000001"
    emit_blocked(rn, xss, user=XSS_USER, ip="192.0.2.66")
    await journal_has_blocked(rn, {deny, ban, xss})
    url = base_url(rn)

    def listing(page: Page) -> None:
        log_in(page, url)
        wait_rows(page, [xss, ban, deny])  # newest first, one row per session
        assert str(good["session.id"]) not in page.inner_text("#sessions")
        expect(page.locator("#list-status")).to_have_text("3 blocked sessions")
        dash = "\u2014"
        assert row_cells(page, deny) == ["smtp", "127.0.0.1", dash, dash, "T-DENY", "deny", deny]
        assert row_cells(page, ban) == ["smtp", "127.0.0.1", dash, dash, "T-BAN", "ban", ban]
        # the attacker's user name is text, not markup
        assert row_cells(page, xss) == ["imap", "192.0.2.66", "NL", XSS_USER, "T-XSS", "deny", xss]
        assert page.locator("#sessions img").count() == 0
        assert page.evaluate("window.__xss") is None
        screenshot(page, "review-list.png")

        apply_filters(page, [deny], rule="T-DENY")
        assert "rule=T-DENY" in page.evaluate("location.hash")
        apply_filters(page, [xss], ip="192.0.2.0/24")
        apply_filters(page, [ban, deny], ip="127.0.0.1")
        apply_filters(page, [xss], protocol="imap")
        apply_filters(page, [ban, deny], protocol="smtp")
        apply_filters(page, [xss], country="nl")
        apply_filters(page, [ban], range="7d", rule="T-BAN")
        apply_filters(page, [xss], user=XSS_USER)
        apply_filters(page, [], range="custom", since="2099-01-01T00:00:00Z")
        expect(page.locator("#list-status")).to_have_text(
            "No blocked sessions match these filters."
        )
        apply_filters(page, [xss, ban, deny], range="1h")
        apply_filters(page, [], range="custom", since="1h", until="2000-01-01")
        apply_filters(page, [ban, deny], protocol="smtp", range="custom", since="2000-01-01")
        apply_filters(page, [], range="custom", since="yesterday-ish")
        expect(page.locator("#list-status")).to_contain_text("since: 'yesterday-ish'")
        expect(page.locator("#list-status")).to_have_class("status error")

    await tab.run(listing)

    def shared(page: Page) -> None:
        # a view is shared as its URL: a new tab asks for the token, then shows that view
        other = page.context.new_page()
        try:
            log_in(other, url + "#" + "rule=T-BAN&protocol=smtp&range=24h")
            wait_rows(other, [ban])
            expect(other.locator("#f-rule")).to_have_value("T-BAN")
            expect(other.locator("#f-protocol")).to_have_value("smtp")
            expect(other.locator("#f-range")).to_have_value("24h")
        finally:
            other.close()

    await tab.run(shared)
    tab.check_clean()


# --------------------------------------------------------------------------- one session


async def test_session_detail_shows_verdicts_evidence_transcript_and_labels(
    postfix: PostfixInstance, start_node: StartNode, mailmoat_tls: MailmoatTLS, tab: Tab
) -> None:
    rn = await start(start_node, postfix)
    sid = await denied_session(rn, mailmoat_tls)
    await session_has(rn, sid, "session.transcript")
    xss = "0000feedface00000001"
    emit_blocked(rn, xss, user=XSS_USER, ip="192.0.2.66", transcript=["LOGIN x y", XSS_LINE])
    quiet = "0000feedface00000002"
    emit_blocked(rn, quiet, user="bob", ip="192.0.2.67")
    await journal_has_blocked(rn, {sid, xss, quiet})
    status, body = await api(rn, "GET", f"/api/sessions/{sid}")
    assert status == 200
    ja4 = body["summary"]["tls"]["ja4"]
    assert ja4.startswith("t13")
    url = base_url(rn)

    def detail(page: Page) -> None:
        log_in(page, url)
        wait_rows(page, [quiet, xss, sid])
        page.click(f"#sessions tr[data-session='{sid}'] td:nth-child(3)")
        expect(page.locator("#d-id")).to_have_text(sid)
        assert f"session={sid}" in page.evaluate("location.hash")
        body = page.locator("#d-body")
        expect(body).to_contain_text("T-DENY deny-bad-helo")
        verdict = page.locator(".verdict")
        expect(verdict).to_have_count(1)
        expect(verdict.locator(".meta")).to_contain_text("action deny")
        expect(verdict.locator(".meta")).to_contain_text("severity high")
        expect(verdict.locator(".meta")).to_contain_text("at helo")
        assert verdict.locator(".kv th").all_inner_texts() == ["smtp.helo"]
        assert verdict.locator(".kv td").all_inner_texts() == ["bad.example"]
        text = body.inner_text()
        for expected in ("127.0.0.1", "TLSv1.3", ja4, "policy_deny", "YES"):
            assert expected in text, expected
        transcript = page.locator("pre.transcript").inner_text()
        assert re.search(r"^S: 220 ", transcript, re.M), transcript
        assert re.search(r"^C: (?i:ehlo) bad\.example$", transcript, re.M), transcript
        assert re.search(r"^S: 554 ", transcript, re.M), transcript
        expect(page.locator("#d-labels")).to_contain_text("no labels")

        page.fill("#label-note", "our own <b>relay</b>")
        page.click("#label-fp")
        status = page.locator("#action-status")
        expect(status).to_have_class("status ok")
        expect(status).to_contain_text("Labelled false_positive")
        expect(page.locator("#d-labels li")).to_have_count(1)
        expect(page.locator("#d-labels li")).to_contain_text("false_positive by 127.0.0.1 at 20")
        expect(page.locator("#d-labels li")).to_contain_text("our own <b>relay</b>")
        screenshot(page, "review-detail.png")
        page.click("#label-confirmed")
        expect(status).to_contain_text("Labelled confirmed.")
        expect(page.locator("#d-labels li")).to_have_count(2)

    await tab.run(detail)
    labels = rn.events.find("session.label")
    assert [(e["session.id"], e["label.value"], e["label.note"]) for e in labels] == [
        (sid, "false_positive", "our own <b>relay</b>"),
        (sid, "confirmed", ""),
    ]
    assert {e["admin.client"] for e in labels} == {"127.0.0.1"}
    await session_has(rn, sid, "session.label")  # in the journal, beside the session

    def attacker_data(page: Page) -> None:
        page.click("#back")
        wait_rows(page, [quiet, xss, sid])
        page.click(f"#sessions tr[data-session='{xss}'] a")
        expect(page.locator("#d-id")).to_have_text(xss)
        body = page.locator("#d-body")
        expect(body).to_contain_text(XSS_USER)
        expect(page.locator("pre.transcript")).to_have_text(f"C: LOGIN x y\nS: {XSS_LINE}")
        assert body.locator("img, script, b").count() == 0
        assert page.evaluate("window.__xss") is None
        expect(page.locator(".verdict .kv td")).to_have_text(XSS_USER)

        page.evaluate(f"location.hash = '#session={quiet}'")
        expect(page.locator("#d-id")).to_have_text(quiet)
        expect(page.locator("#d-body")).to_contain_text("no transcript")
        expect(page.locator("#d-body")).to_contain_text("192.0.2.67")

        page.evaluate("location.hash = '#session=0000deadbeef00000000'")
        expect(page.locator("#d-status")).to_contain_text(
            "Cannot show this session (404): no session '0000deadbeef00000000'"
        )
        expect(page.locator("#d-actions")).to_be_hidden()

    await tab.run(attacker_data)
    tab.check_clean()


# --------------------------------------------------------------------------- unban and allow


async def test_unban_and_allow_from_the_page_end_to_end(
    postfix: PostfixInstance, start_node: StartNode, tmp_path: Path, tab: Tab
) -> None:
    rn = await start(start_node, postfix)
    port = rn.port("smtp")
    assert await trio.to_thread.run_sync(ehlo, port, "banme.example") == 554
    ban = str((await rn.wait_for("client.ban"))["session.id"])
    await journal_has_blocked(rn, {ban})
    status, body = await api(rn, "GET", "/api/bans")
    assert status == 200
    assert [b["ip"] for b in body["bans"]] == ["127.0.0.1"]
    assert await trio.to_thread.run_sync(ehlo, port, "fine.example") == 554  # still banned
    url = base_url(rn)

    def unban(page: Page) -> None:
        log_in(page, url)
        page.click(f"#sessions tr[data-session='{ban}'] td:nth-child(6)")
        expect(page.locator("#d-id")).to_have_text(ban)
        expect(page.locator(".verdict .rule-id").first).to_have_text("T-BAN ban-on-helo")
        expect(page.locator("#unban")).to_have_text("Unban 127.0.0.1")
        page.click("#unban")
        status = page.locator("#action-status")
        expect(status).to_have_text("Unbanned 127.0.0.1.")
        expect(status).to_have_class("status ok")

    await tab.run(unban)
    status, body = await api(rn, "GET", "/api/bans")
    assert (status, body["bans"]) == (200, [])
    event = await rn.wait_for("client.unban")
    assert (event["client.ip"], event["admin.client"]) == ("127.0.0.1", "127.0.0.1")
    assert await trio.to_thread.run_sync(ehlo, port, "fine.example") == 250  # accepted again

    def unban_again(page: Page) -> None:
        page.click("#unban")
        status = page.locator("#action-status")
        expect(status).to_have_text("Unban failed (404): 127.0.0.1 is not banned")
        expect(status).to_have_class("status error")

    await tab.run(unban_again)

    list_file = tmp_path / "rules" / "lists" / "trusted_networks.txt"  # of rules_dir
    shipped = list_file.read_text()
    asked: list[str] = []

    def allow_cancelled(page: Page) -> None:
        def no(dialog: Dialog) -> None:
            asked.append(dialog.message)
            dialog.dismiss()

        page.once("dialog", no)
        page.click("#allow")
        expect(page.locator("#action-status")).to_have_text("Allow-listing 127.0.0.1 cancelled.")

    await tab.run(allow_cancelled)
    assert asked
    assert asked[0].startswith("Allow-list 127.0.0.1?")
    assert list_file.read_text() == shipped
    assert not rn.events.find("allowlist.add")
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 554  # not trusted

    def allow_confirmed(page: Page) -> None:
        def yes(dialog: Dialog) -> None:
            asked.append(dialog.message)
            dialog.accept()

        page.once("dialog", yes)
        page.click("#allow")
        status = page.locator("#action-status")
        expect(status).to_contain_text("Added 127.0.0.1 to trusted_networks")
        expect(status).to_have_class("status ok")

    await tab.run(allow_confirmed)
    assert len(asked) == 2
    added = list_file.read_text()[len(shipped) :]
    assert added.startswith("127.0.0.1  # added by 127.0.0.1 at ")
    assert added.endswith(f": review page, session {ban}\n")
    audit = await rn.wait_for("allowlist.add")
    assert (audit["allowlist.kind"], audit["allowlist.value"]) == ("ip", "127.0.0.1")
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 250  # trusted now
    tab.check_clean()


async def test_allow_list_entry_taken_out_again_from_the_page(
    postfix: PostfixInstance,
    start_node: StartNode,
    mailmoat_tls: MailmoatTLS,
    tmp_path: Path,
    tab: Tab,
) -> None:
    rn = await start(start_node, postfix)
    port = rn.port("smtp")
    sid = await denied_session(rn, mailmoat_tls)
    await journal_has_blocked(rn, {sid})
    list_file = tmp_path / "rules" / "lists" / "trusted_networks.txt"  # of rules_dir
    shipped = list_file.read_text()
    url = base_url(rn)

    def allow(page: Page) -> None:
        log_in(page, url)
        wait_rows(page, [sid])
        page.click(f"#sessions tr[data-session='{sid}'] a")
        expect(page.locator("#d-id")).to_have_text(sid)
        expect(page.locator("#allow")).to_have_text("Allow-list 127.0.0.1")
        expect(page.locator("#allow-state")).to_have_text(NOT_LISTED)  # the page asked
        expect(page.locator("#allow-remove")).to_be_hidden()  # nothing to take out yet
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#allow")
        status = page.locator("#action-status")
        expect(status).to_contain_text("Added 127.0.0.1 to trusted_networks")
        expect(status).to_have_class("status ok")
        remove = page.locator("#allow-remove")
        expect(remove).to_be_visible()
        expect(remove).to_have_text("Remove 127.0.0.1 from trusted_networks")
        expect(page.locator("#allow-state")).to_have_text(
            f"127.0.0.1 is allow-listed by 127.0.0.1 (review page, session {sid}) "
            "in trusted_networks."
        )
        screenshot(page, "review-allow.png")

    await tab.run(allow)
    assert list_file.read_text().startswith(shipped + "127.0.0.1  # added by 127.0.0.1 at ")
    await rn.wait_for("allowlist.add", event__outcome="success")
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 250  # trusted now

    def remove_by_keyboard(page: Page) -> None:
        page.focus("#allow-remove")
        page.keyboard.press("Enter")
        status = page.locator("#action-status")
        expect(status).to_have_text(
            re.compile(
                r"^Removed 127\.0\.0\.1 from trusted_networks \(\S+trusted_networks\.txt\); "
                r"the rules were reloaded\.$"
            )
        )
        expect(status).to_have_class("status ok")
        expect(page.locator("#allow-remove")).to_be_hidden()
        expect(page.locator("#allow")).to_be_focused()  # the keyboard is not sent to the top
        expect(page.locator("#allow-state")).to_have_text(NOT_LISTED)

    await tab.run(remove_by_keyboard)
    assert list_file.read_text() == shipped
    audit = await rn.wait_for("allowlist.remove", event__outcome="success")
    assert (audit["allowlist.value"], audit["admin.client"]) == ("127.0.0.1", "127.0.0.1")
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 554  # refused again

    # listed by someone else (the CLI): the page asks the list when the session opens
    status, body = await api(
        rn, "POST", "/api/allow", {"kind": "ip", "value": "127.0.0.1", "comment": "by the CLI"}
    )
    assert (status, body["added"]) == (200, True)
    listed = list_file.read_text()

    def already_listed(page: Page) -> None:
        page.reload()
        expect(page.locator("#d-id")).to_have_text(sid)
        expect(page.locator("#allow")).to_be_visible()
        # straight away, without Allow-list clicked
        expect(page.locator("#allow-remove")).to_have_text("Remove 127.0.0.1 from trusted_networks")
        expect(page.locator("#allow-remove")).to_be_visible()
        expect(page.locator("#allow-state")).to_have_text(
            "127.0.0.1 is allow-listed by 127.0.0.1 (by the CLI) in trusted_networks."
        )
        # Allow-list still says where it is listed
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#allow")
        status = page.locator("#action-status")
        expect(status).to_have_text(
            "127.0.0.1 is already in the list 'trusted_networks' as 127.0.0.1"
        )
        expect(page.locator("#allow-remove")).to_have_text("Remove 127.0.0.1 from trusted_networks")

    await tab.run(already_listed)
    assert list_file.read_text() == listed

    # the rules do not reload: the error shows and the entry (still in force) can be retried
    broken = tmp_path / "rules" / "70-broken.toml"
    broken.write_text("[[rule]]\nid = 'X'\n")

    def remove_fails(page: Page) -> None:
        page.click("#allow-remove")
        status = page.locator("#action-status")
        expect(status).to_contain_text(
            "Removing 127.0.0.1 from trusted_networks failed (422): the rules did not reload, "
            "so the change was taken out again"
        )
        expect(status).to_have_class("status error")
        expect(page.locator("#allow-remove")).to_be_visible()
        expect(page.locator("#allow-remove")).to_be_enabled()

    await tab.run(remove_fails)
    assert list_file.read_text() == listed
    failed = await rn.wait_for("allowlist.remove", event__outcome="failure")
    assert failed["allowlist.value"] == "127.0.0.1"
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 250  # still trusted
    broken.unlink()

    # taken out behind the page's back: the page says nothing was removed
    status, body = await api(rn, "POST", "/api/allow/remove", {"kind": "ip", "value": "127.0.0.1"})
    assert (status, body["removed"]) == (200, True)

    def gone_already(page: Page) -> None:
        page.click("#allow-remove")
        status = page.locator("#action-status")
        expect(status).to_have_text(
            "Nothing removed: 127.0.0.1 is not an entry of the list 'trusted_networks'"
        )
        expect(status).to_have_class("status error")
        expect(page.locator("#allow-remove")).to_be_hidden()
        expect(page.locator("#allow-state")).to_have_text(NOT_LISTED)

    await tab.run(gone_already)
    assert list_file.read_text() == shipped
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 554

    # listed before the page was opened, with a comment that is markup: after a reload
    # the page says so (as text) and Remove works without Allow-list clicked first
    status, body = await api(
        rn, "POST", "/api/allow", {"kind": "ip", "value": "127.0.0.1", "comment": XSS_COMMENT}
    )
    assert (status, body["added"]) == (200, True)
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 250  # trusted

    def remove_after_reload(page: Page) -> None:
        page.reload()
        expect(page.locator("#d-id")).to_have_text(sid)
        state = page.locator("#allow-state")
        expect(state).to_have_text(
            f"127.0.0.1 is allow-listed by 127.0.0.1 ({XSS_COMMENT}) in trusted_networks."
        )
        assert page.locator("#d-actions img").count() == 0
        assert page.evaluate("window.__xss") is None
        remove = page.locator("#allow-remove")
        expect(remove).to_be_visible()
        expect(remove).to_be_enabled()
        remove.click()
        status = page.locator("#action-status")
        expect(status).to_have_text(
            re.compile(r"^Removed 127\.0\.0\.1 from trusted_networks \(\S+\); the rules were")
        )
        expect(status).to_have_class("status ok")
        expect(remove).to_be_hidden()
        expect(state).to_have_text(NOT_LISTED)

    await tab.run(remove_after_reload)
    assert list_file.read_text() == shipped
    assert len(rn.events.find("allowlist.remove", event__outcome="success")) == 3
    assert await trio.to_thread.run_sync(ehlo, port, "bad.example") == 554  # refused again

    # covered only by a network: said so, and no Remove (it would not take the network out)
    status, body = await api(
        rn, "POST", "/api/allow", {"kind": "cidr", "value": "127.0.0.0/8", "comment": "loopback"}
    )
    assert (status, body["added"]) == (200, True)

    def covered_by_a_network(page: Page) -> None:
        page.reload()
        expect(page.locator("#d-id")).to_have_text(sid)
        expect(page.locator("#allow-state")).to_have_text(
            "127.0.0.1 is allow-listed by 127.0.0.0/8 (loopback) in trusted_networks."
        )
        expect(page.locator("#allow")).to_be_enabled()
        expect(page.locator("#allow-remove")).to_be_hidden()

    await tab.run(covered_by_a_network)
    tab.check_clean()


# --------------------------------------------------------------------------- paging


async def test_load_older_pages_show_every_session_once_newest_first(
    postfix: PostfixInstance, start_node: StartNode, tab: Tab
) -> None:
    rn = await start(start_node, postfix)
    # 7 sessions, 2 blocked events each (the rule.match, the close): 14 events; s3 to s6
    # share one millisecond, so pages of 5 events end inside that tie, and s5 is cut in
    # two (its close on the first page, its rule.match on the second)
    sids = [f"0000feedface000000{i:02d}" for i in range(1, 8)]
    t0 = time.time() - 600
    when = [t0, t0 + 1, t0 + 2, t0 + 2, t0 + 2, t0 + 2, t0 + 3]
    for i, (sid, at) in enumerate(zip(sids, when, strict=True), 1):
        with stamped(rn, at):
            emit_blocked(rn, sid, user=XSS_USER if i == 1 else f"user{i}", ip=f"192.0.2.{10 + i}")
    await journal_has_blocked(rn, set(sids))
    newest = sids[::-1]
    s5 = sids[4]
    url = base_url(rn)
    dash = "\u2014"

    def pages_of_five(page: Page) -> None:
        log_in(page, url + "#range=24h&limit=5")
        status = page.locator("#list-status")
        older = page.locator("#load-older")
        wait_rows(page, newest[:3])
        expect(status).to_have_text(
            "3 blocked sessions (the newest 5 events only: Load older for more, "
            "or narrow the filters)"
        )
        expect(older).to_be_visible()
        # only its close so far
        assert row_cells(page, s5) == ["imap", "192.0.2.15", dash, dash, dash, "policy_deny", s5]

        older.focus()
        page.keyboard.press("Enter")
        wait_rows(page, newest[:5])
        expect(status).to_have_text(
            "5 blocked sessions (the newest 10 events only: Load older for more, "
            "or narrow the filters)"
        )
        # the rest of s5 came with the second page: one row, now whole
        assert row_cells(page, s5) == ["imap", "192.0.2.15", "NL", "user5", "T-XSS", "deny", s5]
        expect(older).to_be_focused()
        screenshot(page, "review-older.png")

        page.keyboard.press("Enter")
        wait_rows(page, newest)
        expect(status).to_have_text("7 blocked sessions")
        expect(older).to_be_hidden()  # nothing older
        # the keyboard goes on to the first row the last page brought
        expect(page.locator(f"#sessions tr[data-session='{sids[1]}'] a")).to_be_focused()
        assert row_cells(page, sids[0])[3] == XSS_USER  # appended rows are text too
        assert page.locator("#sessions img").count() == 0
        assert page.evaluate("window.__xss") is None

        # Apply starts again from the newest page, with the page size of the URL
        apply_filters(page, newest[:3])
        assert "limit=5" in page.evaluate("location.hash")
        expect(older).to_be_visible()
        # the filters hold for the older pages too: .12 to .15 are s2 to s5
        apply_filters(page, [s5, sids[3], sids[2]], ip="192.0.2.12/30")
        page.click("#load-older")
        wait_rows(page, [s5, sids[3], sids[2], sids[1]])
        expect(older).to_be_hidden()
        expect(status).to_have_text("4 blocked sessions")

    await tab.run(pages_of_five)

    def pages_of_seven(page: Page) -> None:
        # 14 events in pages of 7: the second page is full too, so only the third
        # (with nothing new) tells that there is nothing older
        page.evaluate("location.hash = '#range=24h&limit=7'")
        status = page.locator("#list-status")
        older = page.locator("#load-older")
        wait_rows(page, newest[:4])
        expect(status).to_contain_text("(the newest 7 events only: Load older")
        older.focus()
        page.keyboard.press("Enter")
        wait_rows(page, newest)
        expect(status).to_contain_text("(the newest 14 events only: Load older")
        expect(older).to_be_focused()
        page.keyboard.press("Enter")
        expect(older).to_be_hidden()
        expect(status).to_have_text("7 blocked sessions")
        wait_rows(page, newest)
        expect(page.locator(f"#sessions tr[data-session='{sids[0]}'] a")).to_be_focused()

    await tab.run(pages_of_seven)
    tab.check_clean()
