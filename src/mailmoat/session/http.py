"""The webmail session (tier 2): rule phases and login accounting for one HTTP connection.

Contract: an :class:`HttpSession` belongs to one client connection, which
may carry many requests (keep-alive).  It holds no sockets and no clock; the
driver (:mod:`mailmoat.net.http`) parses the requests and responses and asks
the session at each step, and the session answers with commands
(:mod:`mailmoat.session.commands`, plus :class:`Respond` here):

* :meth:`start` -- the connect phase (rules, the ban list).  A refusal there
  is held until the first request arrives, since HTTP has no greeting: the
  client gets its 403/429 as the answer to that request.
* :meth:`request` -- the ``request`` phase, once per request, with the
  ``http.*`` facts (and, for the login endpoint, the form's non-secret
  fields and ``auth.user``).  No :class:`Respond` in the answer: forward.
* :meth:`login_result` / :meth:`login_checked` -- the backend answered a
  login: ``auth.attempt``, the state store's counters (:class:`CheckLogin`,
  with the password's salted fingerprint when :meth:`note_login` was given
  the form's sealed password), then the ``login`` phase.  The driver holds
  the backend's response until then, so a login refused there never hands
  the client its session cookie.
* :meth:`response` -- the ``response`` phase (status, headers).
* :meth:`finish` -- the close phase.

Verdicts become responses (docs/http.md, "Verdicts"): ``reject`` and
``deny`` answer 403 (or the rule's ``reply`` status, or the listener's
``deny_page``), ``ban`` answers 429 with ``Retry-After`` set to the ban, a
``tarpit`` answers 429 with ``Retry-After`` set to its delay instead of
holding the connection (HTTP has a native "slow down"); every refusal
closes the connection.  In ``detect`` mode nothing is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, final

from mailmoat.detect.login import LoginFacts, fingerprint_of
from mailmoat.policy import RuleHolder, Verdict
from mailmoat.protocols.http import SMUGGLING_REASONS, RequestFields, redact_query
from mailmoat.secret import Secret

from ._policy import SESSION_PHASES, Judge, PolicySession
from ._transcript import Redactable, Transcript
from .commands import BanClient, CheckLogin, ClientHelloFacts, Close, Emit

Header = tuple[bytes, bytes]

#: status lines of the responses mailmoat writes itself
REASONS: Final = {
    301: b"Moved Permanently",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    451: b"Unavailable For Legal Reasons",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

_TITLES: Final = {
    403: "Request refused",
    429: "Too many requests",
    502: "The mail server is not answering",
    503: "Service unavailable",
    504: "The mail server took too long to answer",
}


def error_page(status: int, message: str, reference: str) -> bytes:
    """A small plain HTML page; ``reference`` lets a user quote the session to support."""
    title = _TITLES.get(status, REASONS.get(status, b"Error").decode("ascii"))
    return (
        "<!doctype html>\n<html><head><meta charset=utf-8>"
        f"<title>{status} {title}</title></head>\n"
        f"<body><h1>{title}</h1>\n<p>{message}</p>\n"
        f"<p><small>Reference: {reference}</small></p></body></html>\n"
    ).encode()


@final
@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the current request with mailmoat's own response, then close."""

    status: int
    body: bytes
    headers: tuple[Header, ...] = ()


@final
@dataclass(frozen=True, slots=True)
class HttpSessionConfig:
    listener: str
    scheme: Literal["http", "https"] = "http"
    #: the body of 403 answers (the listener's ``deny_page``); ``None``: built-in
    deny_page: bytes | None = None


@final
class HttpSession(PolicySession):
    """Rule phases of one HTTP connection; see the module docstring."""

    def __init__(
        self,
        config: HttpSessionConfig,
        client_ip: str,
        client_port: int,
        *,
        rules: RuleHolder | None = None,
        session_id: str = "",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        #: HTTP has no pre-authentication dialogue: the transcript keeps the
        #: logins and the requests mailmoat refused (request line, then answer)
        self.transcript = Transcript(clock)
        self.transcript.active = False
        self.session_id = session_id
        self.judge = Judge(
            rules,
            "http",
            session_id=session_id,
            listener=config.listener,
            client_ip=client_ip,
            client_port=client_port,
        )
        self.close_reason: str | None = None
        self._closed = False
        #: a connect-phase refusal, answered to the first request
        self._held: list[Any] = []
        self.requests = 0
        self.refused = 0
        self.logins = 0
        self.login_user: str | None = None
        #: the password of the login request in flight, sealed; only its salted
        #: fingerprint leaves the session (:meth:`login_result`)
        self._password: Secret | None = None

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        return self._closed

    def client_gone(self) -> None:
        if not self._closed:
            self._closed = True
            self.close_reason = "client_gone"

    def ended(self, reason: str) -> None:
        """The connection ended without a refusal (client closed, idle, upgrade done)."""
        if not self._closed:
            self._closed = True
            self.close_reason = reason

    def shutdown(self) -> list[Any]:
        out: list[Any] = []
        self._close(out, "shutdown")
        return out

    def _close(self, out: list[Any], reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        out.append(Close(reason))

    # ------------------------------------------------------------------ phases

    def start(
        self,
        banned: bool = False,
        *,
        ban_remaining: float = 0.0,
        reputation: int = 0,
        geo: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """The connect phase; a refusal is held for the first request."""
        out = self._connect_phase(banned, False, reputation, geo)
        return self._hold(out, ban_remaining)

    def client_tls_started(
        self,
        version: str,
        cipher: str,
        sni: str | None,
        hello: ClientHelloFacts | None = None,
        *,
        handshake_ms: float | None = None,
    ) -> list[Any]:
        out: list[Any] = [self._client_tls(version, cipher, sni, hello, handshake_ms)]
        self._apply("tls", out)
        return self._hold(out)

    def _hold(self, out: list[Any], ban_remaining: float = 0.0) -> list[Any]:
        """A phase with no request to answer (connect, tls) refused the client:
        keep the session open and the answer (a banned address: 429) for its
        first request, then close for the same reason.  The rest of ``out``."""
        if not self._closed:
            return out
        reason = self.close_reason or "policy_deny"
        self.close_reason, self._closed = None, False
        held = [c for c in out if isinstance(c, Respond)] or [
            self._refusal(429, ban_remaining) if reason == "banned" else self._refusal(403, 0.0)
        ]
        self._held = [*held, Close(reason)]
        return [c for c in out if not isinstance(c, Respond | Close)]

    def upstream_tls_started(
        self, version: str, cipher: str, *, handshake_ms: float | None = None
    ) -> list[Any]:
        return [self._backend_tls(version, cipher, handshake_ms)]

    def wants_request_facts(self) -> bool:
        """Must :meth:`request` run (rules at ``request``, or a held refusal)?
        If not, the driver only counts the request and spares building its facts."""
        return bool(self._held) or self.judge.has("request")

    def note_request(self, line: Redactable) -> None:
        """The request now being served (its line is only built if it is refused)."""
        self.transcript.command(line)

    def note_login(
        self, line: Redactable, fields: Mapping[str, str], *, password: Secret | None = None
    ) -> None:
        """A login request: into the transcript with its non-secret form fields.

        ``password`` (``FormResult.password``) is kept, sealed, for this
        request's :meth:`login_result` only: never written down."""
        self._password = password
        t = self.transcript
        t.note("c", line.redacted())
        shown = " ".join(f"{k}={v[:64]}" for k, v in list(fields.items())[:12])
        t.note("c", b"[form] " + shown.encode("utf-8", "replace"))

    def screen_refused(self, reason: str, status: int, detail: str = "") -> list[Any]:
        """The request screen (or h11) refused what the client sent: its event;
        the driver answers ``status`` and closes."""
        self.refused += 1
        self.ended("http_refused")
        smuggling = reason in SMUGGLING_REASONS
        fields: dict[str, Any] = {
            "http.refusal": reason,
            "http.response.status_code": status,
            "event.severity": "high" if smuggling else "low",
            "message": "request smuggling attempt refused"
            if smuggling
            else "malformed or oversized request refused",
        }
        if detail:
            fields["error.message"] = detail[:200]
        t = self.transcript
        t.command(f"[request refused before parsing: {reason}]".encode())
        t.refused(b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"")))
        return [Emit("http.refused", fields, kind="verdict", outcome="failure")]

    def _note_refusals(self, out: list[Any]) -> None:
        for cmd in out:
            if isinstance(cmd, Respond):
                self.transcript.refused(
                    b"HTTP/1.1 %d %s" % (cmd.status, REASONS.get(cmd.status, b""))
                )

    def request(self, fields: RequestFields, *, login_user: str | None = None) -> list[Any]:
        """The ``request`` phase of one request; a :class:`Respond` in the answer refuses it."""
        self.requests += 1
        if self._held:
            out, self._held = self._held, []
            self.refused += 1
            self._closed = True
            self.close_reason = next(c.reason for c in out if isinstance(c, Close))
            self._note_refusals(out)
            return [self._request_event(fields, "failure"), *out]
        ctx = self.judge.ctx
        ctx["http"] = dict(fields)
        if login_user is not None:
            ctx["auth"] = {"user": login_user, "mechanism": "form", "result": ""}
            self.login_user = login_user
        if not self.judge.has("request"):
            return []
        out = []
        self._apply("request", out)
        if any(isinstance(c, Respond) for c in out):
            self.refused += 1
            self._note_refusals(out)
            out.insert(0, self._request_event(fields, "failure"))
        return out

    def response(self, status: int, headers: Mapping[str, str]) -> list[Any]:
        """The ``response`` phase: the backend's status and headers (lower-case names)."""
        http = self.judge.ctx.setdefault("http", {})
        http["status"] = status
        http["response_headers"] = dict(headers)
        out: list[Any] = []
        if self.judge.has("response"):
            self._apply("response", out)
            if any(isinstance(c, Respond) for c in out):
                self.refused += 1
                self._note_refusals(out)
        return out

    def login_result(self, user: str, success: bool, status: int) -> list[Any]:
        """The backend answered a login request: the event, then the store's counters."""
        self.logins += 1
        fingerprint = fingerprint_of(self._password)
        self._password = None
        outcome = "success" if success else "failure"
        self.transcript.note("s", f"HTTP/1.1 {status} (login {outcome} for {user[:128]})".encode())
        self.judge.ctx["auth"] = {"user": user, "mechanism": "form", "result": outcome}
        return [
            Emit(
                "auth.attempt",
                {
                    "auth.user": user,
                    "auth.mechanism": "form",
                    "http.status": status,
                    "http.path": self.judge.ctx.get("http", {}).get("path", ""),
                },
                outcome=outcome,
            ),
            CheckLogin(user, success, fingerprint),
        ]

    def login_checked(
        self,
        facts: LoginFacts,
        travel: Mapping[str, Any] | None = None,
        *,
        blind: bool = False,
        tls: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """The ``login`` phase; a :class:`Respond` replaces the backend's answer."""
        self._login_facts(facts, travel, tls)
        out: list[Any] = []
        if blind:
            out.append(
                Emit(
                    "auth.refused_blind",
                    {"auth.user": self.judge.ctx["auth"].get("user", "")},
                    kind="alert",
                    outcome="failure",
                )
            )
            out.append(self._refusal(503, 0.0, "The login could not be checked; try again."))
            self._close(out, "state_unavailable")
            self._note_refusals(out)
            return out
        self._apply("login", out)
        if any(isinstance(c, Respond) for c in out):
            self.refused += 1
            self._note_refusals(out)
        return out

    def finish(self) -> list[Any]:
        """The session is over: its transcript, then the close phase."""
        return self._transcript_event() + self._close_phase()

    def upstream_failed(self, reason: str, detail: str | None = None) -> list[Any]:
        """The backend could not be reached, timed out or broke: 502/504 and close."""
        out: list[Any] = []
        self._fail_upstream(out, reason, detail=detail)
        return out

    # ------------------------------------------------------------------ failures

    def _fail_upstream(
        self,
        out: list[Any],
        reason: str,
        *,
        detail: str | None = None,
        already_alerted: bool = False,
    ) -> None:
        if self._closed:
            return
        if not already_alerted:
            fields: dict[str, Any] = {"error.message": detail or reason}
            out.append(Emit("backend.failure", fields, outcome="failure"))
        if reason == "backend_timeout":
            out.append(self._refusal(504, 0.0, "The mail server took too long to answer."))
        else:
            out.append(self._refusal(502, 0.0, "The mail server could not be reached."))
        self._close(out, reason)

    # ------------------------------------------------------------------ verdicts

    def _apply(self, phase: str, out: list[Any], *, greet: bool = True) -> bool:
        verdict = self.judge.evaluate(phase)
        if not verdict.matches and verdict.action == "pass":
            return False
        out.extend(self.judge.events(verdict, phase))
        action = verdict.action
        blocked = action in ("reject", "deny", "ban")
        if action == "ban":
            rule = verdict.rule
            out.append(
                BanClient(
                    verdict.ban, f"rule {rule.id}" if rule else "policy", rule.id if rule else None
                )
            )
        if phase == "close":
            return blocked
        if blocked:
            if action == "ban":
                out.append(self._refusal(429, verdict.ban))
            else:
                out.append(self._refusal(_status_of(verdict), 0.0))
            self._close(out, "policy_ban" if action == "ban" else "policy_deny")
            return True
        if verdict.delay > 0 and phase not in SESSION_PHASES:
            out.append(self._refusal(429, verdict.delay))
            self._close(out, "policy_tarpit")
            return True
        return False

    def _refusal(self, status: int, retry_after: float, message: str = "") -> Respond:
        headers: list[Header] = [(b"Content-Type", b"text/html; charset=utf-8")]
        if status in (429, 503) and retry_after > 0:
            headers.append((b"Retry-After", str(max(1, math.ceil(retry_after))).encode()))
        if status == 403 and self.config.deny_page is not None:
            return Respond(status, self.config.deny_page, tuple(headers))
        if not message:
            message = (
                "Too many requests from your address; try again later."
                if status == 429
                else "This request was refused by the mail system's security policy."
            )
        return Respond(status, error_page(status, message, self.session_id), tuple(headers))

    def _request_event(self, fields: RequestFields, outcome: str) -> Emit:
        return Emit(
            "http.request",
            {
                "http.request.method": fields["method"],
                "url.path": fields["path"],
                "url.query": redact_query(fields["query"][:512]),
                "http.host": fields["host"],
                "user_agent.original": fields["user_agent"][:512],
            },
            outcome=outcome,
        )


def _status_of(verdict: Verdict) -> int:
    """The rule's ``reply`` status for http (``"451"``, ``"403 text"``), else 403."""
    reply = verdict.reply or "403"
    try:
        status = int(reply.split(" ", 1)[0])
    except ValueError:
        return 403
    return status if 400 <= status <= 599 else 403
