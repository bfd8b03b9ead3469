"""The IMAP proxy session: pure logic, bytes and events in, commands out.

Theory of operation
-------------------
One :class:`ImapSession` exists per client connection; it owns a
:class:`~mailmoat.protocols.imap.CommandReader` for the client and a
:class:`~mailmoat.protocols.imap.ResponseReader` for the backend and never
touches a socket.  The driver (``mailmoat.net.imap``) feeds it bytes,
executes the commands it returns in order and reads from whichever side
:attr:`awaiting` names, exactly as for SMTP.

Before authentication every client command is parsed and judged; mailmoat
answers CAPABILITY, NOOP, LOGOUT and STARTTLS itself, relays LOGIN,
AUTHENTICATE and ID (the latter stripped of the keys that would let a client
claim another address), and refuses every other command: RFC 9051 §6 allows
nothing else in the not-authenticated state.  One command is in flight at a
time; what the client pipelined waits in the reader.

The backend leg is bootstrapped before the client is greeted: its greeting
(which must carry its capabilities, or a CAPABILITY command fetches them),
then (backend ``tls = "starttls"``) STARTTLS and a handshake, then (backend
``client_identity = "imap-id"``) an ``ID`` naming the client's address.  The
client then gets a greeting whose capability list is mailmoat's view:
only what mailmoat handles (:data:`PRE_AUTH_CAPABILITIES`, the SASL
mechanisms whose user it can read), STARTTLS while TLS is available and not
active, and LOGINDISABLED (with no AUTH=) before TLS where the listener
requires it.  COMPRESS and anything unknown are not offered before login.

A successful login ends the inspection: the session hands the driver the
bytes already read on either side (:class:`StartRelay`) and the driver copies
bytes both ways until one side closes, IDLE included.  The tagged OK of the
login still passes through the session so its ``[CAPABILITY ...]`` loses
STARTTLS and LOGINDISABLED.

Until then the session keeps a transcript (credentials redacted, see
:mod:`mailmoat.session._transcript`); :meth:`ImapSession.finish` emits it
as ``session.transcript``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, assert_never, final

from mailmoat.detect.login import LoginFacts, fingerprint_of
from mailmoat.errors import LocalProtocolError, RemoteProtocolError
from mailmoat.policy import RuleHolder, Verdict, default_reply
from mailmoat.protocols.imap import (
    NEED_DATA,
    Authenticate,
    AuthenticateResponse,
    BadCommand,
    ClientClosed,
    Command,
    CommandReader,
    ContinuationRequest,
    Id,
    ImapLimits,
    LineTooLong,
    LiteralRefused,
    Login,
    NeedContinuation,
    NonSyncLiterals,
    ResponseReader,
    ServerClosed,
    Tagged,
    Untagged,
    format_capabilities,
    format_id,
    rewrite_capabilities,
    to_non_sync,
)
from mailmoat.protocols.sasl import SaslObserver

from ._policy import SESSION_PHASES, Judge, PolicySession
from ._transcript import Transcript
from .commands import (
    BanClient,
    CheckLogin,
    ClientHelloFacts,
    Close,
    Delay,
    Emit,
    SendToUpstream,
    SessionCommand,
    StartClientTls,
    StartUpstreamTls,
)

__all__ = [
    "Awaiting",
    "ImapSession",
    "ImapSessionConfig",
    "StartRelay",
]


@final
@dataclass(frozen=True, slots=True)
class StartRelay:
    """Authentication is done: write these bytes, then copy both ways until a side closes."""

    to_upstream: bytes
    to_client: bytes


ImapCommand = SessionCommand | StartRelay


class Awaiting(enum.Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"
    NOTHING = "nothing"  # a handshake or the state store is busy, the relay runs, or closed


class State(enum.Enum):
    UP_GREETING = "up_greeting"
    UP_CAPABILITY = "up_capability"  # our CAPABILITY (the greeting had none)
    UP_STARTTLS = "up_starttls"
    UP_TLS = "up_tls"
    UP_ID = "up_id"  # our ID with the client's address
    COMMAND = "command"  # waiting for a client command
    RELAY = "relay"  # a client command is at the backend
    AUTH_RESPONSE = "auth_response"  # AUTHENTICATE: the backend sent "+", the client answers
    CLIENT_TLS = "client_tls"
    LOGIN = "login"  # the backend answered the login; the state store is being asked
    RELAYING = "relaying"  # authenticated: the driver copies bytes
    CLOSED = "closed"


#: Capabilities passed to the client before login: what the session handles.
PRE_AUTH_CAPABILITIES: Final = frozenset(
    {"IMAP4REV1", "IMAP4REV2", "SASL-IR", "LITERAL+", "LITERAL-", "ID", "ENABLE", "IDLE"}
)
#: SASL mechanisms whose user mailmoat can read (protocols.sasl.SaslObserver).
READABLE_MECHANISMS: Final = frozenset(
    {"PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"}
)
#: Commands RFC 9051 §6.1-6.2 allows before authentication, plus ID (RFC 2971).
PRE_AUTH_COMMANDS: Final = frozenset(
    {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "AUTHENTICATE", "LOGIN", "ID"}
)
#: ID keys a client must not set: they tell Dovecot (login_trusted_networks)
#: who the client is, and only mailmoat may say that.
SPOOFABLE_ID_KEYS: Final = frozenset(
    {
        b"x-originating-ip",
        b"x-originating-port",
        b"x-connected-ip",
        b"x-connected-port",
        b"x-proxy-ttl",
        b"x-session-id",
        b"x-session-ext-id",
        b"x-client-transport",
    }
)
OWN_TAG_ID: Final = b"mm.id"
OWN_TAG_CAP: Final = b"mm.cap"
OWN_TAG_TLS: Final = b"mm.tls"


def _line(text: str) -> bytes:
    return text.encode("utf-8", "replace") + b"\r\n"


B_UNAVAILABLE = _line("* BYE [UNAVAILABLE] Service not available, try again later")
B_TIMEOUT = _line("* BYE Autologout; idle for too long")
B_SHUTDOWN = _line("* BYE [UNAVAILABLE] Server shutting down")
B_BANNED = _line("* BYE [UNAVAILABLE] Your address is blocked for a while")
B_TOO_MANY_ERRORS = _line("* BYE Too many invalid IMAP commands")
B_LINE_TOO_LONG = _line("* BYE [TOOBIG] Line too long")
B_INJECTION = _line("* BYE Commands pipelined after STARTTLS are refused")


@final
@dataclass(frozen=True, slots=True)
class ImapSessionConfig:
    listener: str
    client_tls: Literal["none", "starttls", "implicit"] = "none"
    require_tls: bool = False
    backend_tls: Literal["none", "starttls", "implicit"] = "none"
    client_identity: Literal["none", "imap-id", "proxy-v2"] = "none"
    max_errors: int = 10
    limits: ImapLimits = field(default_factory=ImapLimits)


@final
class ImapSession(PolicySession):
    """One client session, see the module docstring."""

    TIMEOUT_REPLY = B_TIMEOUT
    BANNED_REPLY = B_BANNED

    def __init__(
        self,
        config: ImapSessionConfig,
        client_ip: str = "",
        client_port: int = 0,
        *,
        local: tuple[str, int] = ("", 0),
        rules: RuleHolder | None = None,
        session_id: str = "",
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``clock``: seconds since the session started, for the transcript (the driver's)."""
        self.config = config
        self.transcript = Transcript(clock)
        self.client_ip = client_ip
        self.client_port = client_port
        self.local = local
        self.judge = Judge(
            rules,
            "imap",
            session_id=session_id,
            listener=config.listener,
            client_ip=client_ip,
            client_port=client_port,
        )
        self._imap = self.judge.ctx["imap"]
        self.state = State.UP_GREETING
        self.reader = CommandReader(config.limits, non_sync=NonSyncLiterals.NONE)
        self.responses = ResponseReader(config.limits)
        self.tls_active = config.client_tls == "implicit"
        if self.tls_active:
            self.judge.ctx["tls"]["active"] = True
        self.authenticated = False
        self.auth_user: str | None = None
        self.commands = 0
        self.errors = 0
        self.close_reason: str | None = None
        self.backend_caps: tuple[str, ...] = ()
        self._greeting_text = b"IMAP server ready"
        self._pending: Command | None = None
        self._sasl: SaslObserver | None = None
        self._login_reply = b""
        self._backend_literal_plus = False

    # ------------------------------------------------------------------ queries

    @property
    def awaiting(self) -> Awaiting:
        match self.state:
            case (
                State.UP_GREETING
                | State.UP_CAPABILITY
                | State.UP_STARTTLS
                | State.UP_ID
                | State.RELAY
            ):
                return Awaiting.UPSTREAM
            case State.COMMAND | State.AUTH_RESPONSE:
                return Awaiting.CLIENT
            case State.UP_TLS | State.CLIENT_TLS | State.LOGIN | State.RELAYING | State.CLOSED:
                return Awaiting.NOTHING
            case _ as unreachable:
                assert_never(unreachable)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def relaying(self) -> bool:
        return self.state is State.RELAYING

    def client_capabilities(self) -> tuple[str, ...]:
        """The capability list the client sees before login."""
        keep: list[str] = []
        for cap in self.backend_caps:
            upper = cap.upper()
            readable = upper.startswith("AUTH=") and upper[5:] in READABLE_MECHANISMS
            if upper in PRE_AUTH_CAPABILITIES or readable:
                keep.append(cap)
        if not any(c.upper() in ("IMAP4REV1", "IMAP4REV2") for c in keep):
            keep.insert(0, "IMAP4rev1")
        if self.config.client_tls == "starttls" and not self.tls_active:
            keep.append("STARTTLS")
        if self.config.require_tls and not self.tls_active:
            keep = [c for c in keep if not c.upper().startswith("AUTH=")]
            keep.append("LOGINDISABLED")
        return tuple(keep)

    # ------------------------------------------------------------------ inputs

    def start(
        self,
        banned: bool = False,
        *,
        greet: bool = True,
        reputation: int = 0,
        geo: Mapping[str, Any] | None = None,
    ) -> list[ImapCommand]:
        """The connect phase (see SmtpSession.start)."""
        return self._connect_phase(banned, greet, reputation, geo)

    def receive_upstream(self, data: bytes) -> list[ImapCommand]:
        out: list[ImapCommand] = []
        try:
            self.responses.receive_data(data)
            while self.state not in (State.CLOSED, State.RELAYING, State.LOGIN):
                ev = self.responses.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, ServerClosed):
                    self._fail_upstream(out, "backend_closed")
                    break
                self._on_response(ev, out)
                if self.state is State.COMMAND:
                    self._drain_client(out)
        except RemoteProtocolError as exc:
            self._fail_upstream(out, "backend_protocol_error", detail=str(exc))
        return out

    def receive_client(self, data: bytes) -> list[ImapCommand]:
        out: list[ImapCommand] = []
        try:
            self.reader.receive_data(data)
        except LocalProtocolError:
            return out  # data after EOF: nothing more to do
        self._drain_client(out)
        return out

    def client_tls_started(
        self,
        version: str,
        cipher: str,
        sni: str | None,
        hello: ClientHelloFacts | None = None,
        *,
        handshake_ms: float | None = None,
    ) -> list[ImapCommand]:
        self.tls_active = True
        if self.state is State.CLIENT_TLS:
            self.reader = CommandReader(self.config.limits, non_sync=self._non_sync())
            self.state = State.COMMAND
        out: list[ImapCommand] = [self._client_tls(version, cipher, sni, hello, handshake_ms)]
        self._apply("tls", out)
        return out

    def upstream_tls_started(
        self, version: str, cipher: str, *, handshake_ms: float | None = None
    ) -> list[ImapCommand]:
        out: list[ImapCommand] = [self._backend_tls(version, cipher, handshake_ms)]
        # capabilities change with TLS (RFC 9051 §6.2.1): ask again
        self.backend_caps = ()
        out.append(SendToUpstream(OWN_TAG_CAP + b" CAPABILITY\r\n"))
        self.state = State.UP_CAPABILITY
        return out

    def client_gone(self) -> None:
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = "client_gone"

    def shutdown(self) -> list[ImapCommand]:
        out: list[ImapCommand] = []
        if self.state is not State.CLOSED:
            self._send(out, B_SHUTDOWN)
            self._close(out, "shutdown")
        return out

    def relay_ended(self, reason: str) -> None:
        """The byte relay after login stopped (``client_closed``, ``backend_closed``, ...)."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = reason

    def login_checked(
        self,
        facts: LoginFacts,
        travel: Mapping[str, Any] | None = None,
        *,
        blind: bool = False,
        tls: Mapping[str, Any] | None = None,
    ) -> list[ImapCommand]:
        """The store counted this login (see SmtpSession.login_checked, ``blind`` too)."""
        out: list[ImapCommand] = []
        if self.state is not State.LOGIN:
            return out
        self._login_facts(facts, travel, tls)
        reply, self._login_reply = self._login_reply, b""
        self.state = State.COMMAND
        pending, self._pending = self._pending, None
        tag = pending.tag if pending is not None else b"*"
        if blind:
            out.append(
                Emit(
                    "auth.refused_blind",
                    {"auth.user": self.auth_user or ""},
                    kind="alert",
                    outcome="failure",
                )
            )
            if self.authenticated:
                self._send_refusal(out, B_UNAVAILABLE)
                self._close(out, "state_unavailable")
            else:
                self._send_refusal(
                    out, tag + b" NO [UNAVAILABLE] Temporary authentication failure\r\n"
                )
                self._drain_client(out)
            self.authenticated = False
            return out
        if self._apply("login", out, tag=tag):
            if self.state is not State.CLOSED and self.authenticated:
                # the backend's session is logged in and cannot be taken back
                self._send_refusal(out, B_UNAVAILABLE)
                self._close(out, "policy_deny")
            self.authenticated = False
            self.auth_user = None
            if self.state is State.COMMAND:
                self._drain_client(out)
            return out
        self._send(out, reply)
        if self.authenticated:
            # logged in: the relay records nothing (mailmoat refuses nothing there)
            self.transcript.active = False
            self.state = State.RELAYING
            out.append(StartRelay(self.reader.discard_buffer(), self.responses.buffered))
            return out
        self._drain_client(out)
        return out

    def finish(self) -> list[ImapCommand]:
        """The session is over: its transcript, then the close phase (bans for how it ended)."""
        out: list[ImapCommand] = self._transcript_event()
        out += self._close_phase()
        return out

    # ------------------------------------------------------------------ backend

    def _on_response(
        self, ev: Untagged | Tagged | ContinuationRequest, out: list[ImapCommand]
    ) -> None:
        match self.state:
            case State.UP_GREETING:
                self._on_greeting(ev, out)
            case State.UP_CAPABILITY:
                if isinstance(ev, Untagged) and ev.capabilities is not None:
                    self.backend_caps = ev.capabilities
                elif isinstance(ev, Tagged) and ev.tag == OWN_TAG_CAP:
                    if ev.status != "OK" or not self.backend_caps:
                        self._fail_upstream(out, "backend_refused", detail="CAPABILITY failed")
                        return
                    self._after_capabilities(out)
                elif isinstance(ev, Untagged) and ev.name == "BYE":
                    self._fail_upstream(out, "backend_closed")
            case State.UP_STARTTLS:
                if isinstance(ev, Tagged) and ev.tag == OWN_TAG_TLS:
                    if ev.status != "OK":
                        self._backend_alert(
                            out,
                            "backend.starttls_refused",
                            {"imap.reply": ev.raw[:512]},
                            "backend_starttls_refused",
                        )
                        return
                    if self.responses.buffered:
                        self._backend_alert(
                            out,
                            "backend.starttls_injection",
                            {
                                "tls.injected_bytes": len(self.responses.buffered),
                                "tls.injected_preview": _preview(bytes(self.responses.buffered)),
                            },
                            "backend_starttls_injection",
                        )
                        return
                    self.responses = ResponseReader(self.config.limits)
                    self.state = State.UP_TLS
                    out.append(StartUpstreamTls())
            case State.UP_ID:
                if isinstance(ev, Tagged) and ev.tag == OWN_TAG_ID:
                    if ev.status != "OK":
                        self._backend_alert(
                            out,
                            "backend.id_refused",
                            {"imap.reply": ev.raw[:512]},
                            "backend_id_refused",
                        )
                        return
                    self._greet_client(out)
                # the untagged "* ID (...)" answer is Dovecot's, not the client's business
            case State.RELAY:
                self._relay_response(ev, out)
            case _:
                if isinstance(ev, Untagged) and ev.name == "BYE":
                    self._send(out, ev.raw)
                    self._close(out, "backend_closed")
                elif isinstance(ev, Untagged):
                    self._send(out, ev.raw)  # unsolicited untagged data is allowed
                else:
                    self._fail_upstream(
                        out, "backend_protocol_error", detail="unsolicited tagged response"
                    )

    def _on_greeting(
        self, ev: Untagged | Tagged | ContinuationRequest, out: list[ImapCommand]
    ) -> None:
        if not isinstance(ev, Untagged) or ev.name not in ("OK", "BYE", "PREAUTH"):
            self._fail_upstream(out, "backend_protocol_error", detail="bad greeting")
            return
        if ev.name == "BYE":
            self._send(out, ev.raw)
            self._close(out, "backend_refused")
            return
        if ev.name == "PREAUTH":
            # the backend would log in every client unseen: never relay that
            self._fail_upstream(out, "backend_preauth", detail="backend greeted with PREAUTH")
            return
        if ev.text:
            self._greeting_text = ev.text
        if self.config.backend_tls == "starttls":
            if ev.capabilities is not None and "STARTTLS" not in {
                c.upper() for c in ev.capabilities
            }:
                # the greeting lists capabilities without STARTTLS: stripped
                # on the way (a greeting without a list still gets to try)
                self._backend_alert(
                    out,
                    "backend.starttls_missing",
                    {"imap.reply": ev.raw[:512]},
                    "backend_starttls_missing",
                )
                return
            out.append(SendToUpstream(OWN_TAG_TLS + b" STARTTLS\r\n"))
            self.state = State.UP_STARTTLS
            return
        if ev.capabilities is None:
            out.append(SendToUpstream(OWN_TAG_CAP + b" CAPABILITY\r\n"))
            self.state = State.UP_CAPABILITY
            return
        self.backend_caps = ev.capabilities
        self._after_capabilities(out)

    def _after_capabilities(self, out: list[ImapCommand]) -> None:
        upper = {c.upper() for c in self.backend_caps}
        self._backend_literal_plus = "LITERAL+" in upper
        self.reader.non_sync = self._non_sync()
        if self.config.client_identity == "imap-id":
            params: list[tuple[bytes, bytes | None]] = [
                (b"x-originating-ip", self.client_ip.encode()),
                (b"x-originating-port", str(self.client_port).encode()),
            ]
            if self.local[0]:
                params += [
                    (b"x-connected-ip", self.local[0].encode()),
                    (b"x-connected-port", str(self.local[1]).encode()),
                ]
            out.append(SendToUpstream(format_id(OWN_TAG_ID, tuple(params))))
            self.state = State.UP_ID
            return
        self._greet_client(out)

    def _non_sync(self) -> NonSyncLiterals:
        upper = {c.upper() for c in self.backend_caps}
        if "LITERAL+" in upper:
            return NonSyncLiterals.LITERAL_PLUS
        if "LITERAL-" in upper:
            return NonSyncLiterals.LITERAL_MINUS
        return NonSyncLiterals.NONE

    def _greet_client(self, out: list[ImapCommand]) -> None:
        caps = format_capabilities(self.client_capabilities())
        self._send(out, b"* OK [CAPABILITY " + caps + b"] " + self._greeting_text + b"\r\n")
        self.state = State.COMMAND

    def _relay_response(
        self, ev: Untagged | Tagged | ContinuationRequest, out: list[ImapCommand]
    ) -> None:
        pending = self._pending
        if isinstance(ev, ContinuationRequest):
            if isinstance(pending, Authenticate) and self._sasl is not None:
                self._sasl.server_challenge(ev.text)
                self.reader.expect_auth_response()
                self._send(out, ev.raw)
                self.state = State.AUTH_RESPONSE
                return
            self._fail_upstream(out, "backend_protocol_error", detail="unexpected continuation")
            return
        if isinstance(ev, Untagged):
            if ev.name == "BYE":
                self._send(out, ev.raw)
                self._close(out, "backend_closed")
                return
            data = ev.raw
            if ev.capabilities is not None:
                data = self._rewrite(ev, authenticated=False)
            self._send(out, data)
            return
        if pending is None or ev.tag != pending.tag:
            self._fail_upstream(out, "backend_protocol_error", detail="tag mismatch")
            return
        if isinstance(pending, Login | Authenticate):
            self._on_login_reply(pending, ev, out)
            return
        self._pending = None
        data = ev.raw
        if ev.capabilities is not None:
            data = self._rewrite(ev, authenticated=False)
        self._send(out, data)
        if ev.status != "OK":
            self.errors += 1
        self.state = State.COMMAND

    def _rewrite(self, ev: Untagged | Tagged, *, authenticated: bool) -> bytes:
        caps = ev.capabilities or ()
        if authenticated:
            return rewrite_capabilities(ev, remove=("STARTTLS", "LOGINDISABLED"))
        # before login the client sees mailmoat's list, whatever the backend says
        return rewrite_capabilities(ev, remove=caps, add=self.client_capabilities())

    def _on_login_reply(
        self, pending: Login | Authenticate, ev: Tagged, out: list[ImapCommand]
    ) -> None:
        ok = ev.status == "OK"
        self.authenticated = ok
        fingerprint: Callable[[bytes], str | None] | None
        if isinstance(pending, Login):
            user = pending.user.decode("utf-8", "replace")[:256]
            mechanism = "LOGIN"
            extra: dict[str, Any] = {}
            fingerprint = fingerprint_of(pending.password)
        else:
            sasl = self._sasl
            fingerprint = sasl.password_fingerprint if sasl is not None else None
            user = (sasl.user if sasl is not None else None) or ""
            mechanism = pending.mechanism
            extra = {}
            if sasl is not None and sasl.cancelled:
                extra["auth.cancelled"] = True
            if sasl is not None and sasl.malformed:
                extra["auth.malformed"] = True
        self._sasl = None
        if ok:
            self.auth_user = user
        out.append(
            Emit(
                "auth.attempt",
                {
                    "auth.user": user,
                    "auth.mechanism": mechanism,
                    "imap.status": ev.status,
                    **extra,
                },
                outcome="success" if ok else "failure",
            )
        )
        self.judge.ctx["auth"].update(
            user=user, mechanism=mechanism, result="success" if ok else "failure"
        )
        data = ev.raw
        if ev.capabilities is not None:
            data = self._rewrite(ev, authenticated=ok)
        self._login_reply = data
        self.state = State.LOGIN
        out.append(CheckLogin(user, ok, fingerprint))

    # ------------------------------------------------------------------ client

    def _drain_client(self, out: list[ImapCommand]) -> None:
        while self.state in (State.COMMAND, State.AUTH_RESPONSE):
            ev = self.reader.next_event()
            if ev is NEED_DATA:
                return
            match ev:
                case ClientClosed():
                    self._close(out, "client_closed")
                case AuthenticateResponse():
                    self.transcript.command(ev)  # "***" (or "*" to cancel)
                    self._on_auth_response(ev, out)
                case NeedContinuation():
                    # synchronizing literal (LOGIN with a literal): mailmoat answers "+"
                    self.transcript.command(_partial(ev.tag, ev.name, f"{{{ev.size}}}"))
                    self.reader.accept_literal()
                    self._send(out, b"+ Ready for literal data\r\n")
                case LineTooLong():
                    self.commands += 1
                    self.transcript.command(
                        _partial(ev.tag, "", f"[line over the limit of {ev.limit} bytes]")
                    )
                    out.append(
                        Emit("imap.line_too_long", {"imap.line_limit": ev.limit}, outcome="failure")
                    )
                    if ev.tag is None:
                        self._send_refusal(out, B_LINE_TOO_LONG)
                        self._close(out, "line_too_long")
                        return
                    self._refuse(out, ev.tag, b"BAD [TOOBIG] Line too long")
                    if self.state is State.AUTH_RESPONSE:
                        self.state = State.COMMAND
                case LiteralRefused():
                    self.commands += 1
                    self.transcript.command(
                        _partial(ev.tag, ev.name, f"[literal of {ev.size} bytes refused]")
                    )
                    out.append(
                        Emit(
                            "imap.literal_refused",
                            {
                                "imap.command": ev.name,
                                "imap.literal_size": ev.size,
                                "imap.literal_limit": ev.limit,
                            },
                            outcome="failure",
                        )
                    )
                    self._refuse(out, ev.tag or b"*", b"BAD [TOOBIG] Literal too big")
                case BadCommand():
                    self.commands += 1
                    self.transcript.command(ev)  # "tag NAME ***": it may hold a credential
                    out.append(
                        Emit(
                            "imap.bad_command",
                            {"imap.command": ev.name, "error.message": ev.reason},
                            outcome="failure",
                        )
                    )
                    self._refuse(
                        out, ev.tag or b"*", b"BAD " + ev.reason.encode("ascii", "replace")
                    )
                case Command():
                    self.commands += 1
                    self.transcript.command(ev)  # LOGIN: "tag LOGIN user ***"
                    self._on_command(ev, out)
                case _ as unreachable:
                    assert_never(unreachable)

    def _on_auth_response(self, ev: AuthenticateResponse, out: list[ImapCommand]) -> None:
        if self._sasl is not None:
            self._sasl.client_response(ev.data)
        out.append(SendToUpstream(ev.raw))
        self.state = State.RELAY

    def _on_command(self, cmd: Command, out: list[ImapCommand]) -> None:
        imap = self._imap
        imap["tag"] = cmd.tag.decode("ascii", "replace")
        imap["command"] = cmd.name
        imap["args"] = _args_of(cmd)
        if self._apply("command", out, tag=cmd.tag):
            return
        name = cmd.name
        if name not in PRE_AUTH_COMMANDS:
            self._refuse(out, cmd.tag, b"BAD Command not valid before authentication")
            return
        match name:
            case "CAPABILITY":
                caps = format_capabilities(self.client_capabilities())
                self._send(out, b"* CAPABILITY " + caps + b"\r\n")
                self._send(out, cmd.tag + b" OK CAPABILITY completed\r\n")
            case "NOOP":
                self._send(out, cmd.tag + b" OK NOOP completed\r\n")
            case "LOGOUT":
                self._send(out, b"* BYE Logging out\r\n" + cmd.tag + b" OK LOGOUT completed\r\n")
                self._close(out, "client_logout")
            case "STARTTLS":
                self._on_starttls(cmd, out)
            case "LOGIN" | "AUTHENTICATE":
                self._on_login(cmd, out)
            case "ID":
                self._on_id(cmd, out)
            case _:  # pragma: no cover - PRE_AUTH_COMMANDS is exhaustive here
                self._refuse(out, cmd.tag, b"BAD Command not valid before authentication")

    def _on_starttls(self, cmd: Command, out: list[ImapCommand]) -> None:
        if self.config.client_tls != "starttls" or self.tls_active:
            self._refuse(
                out,
                cmd.tag,
                b"BAD TLS already active" if self.tls_active else b"BAD STARTTLS not available",
            )
            return
        injected = self.reader.buffered
        if injected:
            # RFC 9051 §6.2.1 / CVE-2011-0411 class: bytes after STARTTLS in the
            # clear would run inside TLS; never execute them.
            self.reader.discard_buffer()
            self._refuse_injection(out, B_INJECTION, len(injected), _preview(injected))
            return
        self._send(out, cmd.tag + b" OK Begin TLS negotiation now\r\n")
        out.append(StartClientTls())
        self.state = State.CLIENT_TLS

    def _on_login(self, cmd: Command, out: list[ImapCommand]) -> None:
        if self.config.require_tls and not self.tls_active:
            self._refuse(out, cmd.tag, b"NO [PRIVACYREQUIRED] TLS required: use STARTTLS first")
            return
        auth = self.judge.ctx["auth"]
        sasl: SaslObserver | None = None
        if isinstance(cmd, Login):
            auth.update(
                mechanism="LOGIN", user=cmd.user.decode("utf-8", "replace")[:256], result=""
            )
        elif isinstance(cmd, Authenticate):
            upper = {c.upper() for c in self.backend_caps}
            if f"AUTH={cmd.mechanism}" not in upper or cmd.mechanism not in READABLE_MECHANISMS:
                self._refuse(out, cmd.tag, b"NO [CANNOT] Unsupported authentication mechanism")
                return
            sasl = SaslObserver(cmd.mechanism, cmd.initial_response)
            auth.update(mechanism=cmd.mechanism, user=sasl.user or "", result="")
        else:  # a LOGIN/AUTHENTICATE the codec could not parse arrives as BadCommand
            self._refuse(out, cmd.tag, b"BAD Syntax error")
            return
        if self._apply("auth", out, tag=cmd.tag):
            return
        self._sasl = sasl
        self._forward(cmd, out)

    def _on_id(self, cmd: Command, out: list[ImapCommand]) -> None:
        if not isinstance(cmd, Id):
            self._refuse(out, cmd.tag, b"BAD Syntax error in ID")
            return
        if cmd.params is None:
            self._forward(cmd, out)
            return
        kept = tuple(p for p in cmd.params if p[0].lower() not in SPOOFABLE_ID_KEYS)
        if len(kept) != len(cmd.params):
            stripped = sorted(
                {p[0].decode("ascii", "replace").lower() for p in cmd.params}
                - {p[0].decode("ascii", "replace").lower() for p in kept}
            )
            out.append(
                Emit(
                    "imap.id_spoofing",
                    {
                        "imap.id_keys": stripped,
                        "message": "the client tried to set its own address through ID; "
                        "the keys were removed",
                    },
                    kind="alert",
                    outcome="failure",
                )
            )
            self._pending = cmd
            out.append(SendToUpstream(format_id(cmd.tag, kept)))
            self.state = State.RELAY
            return
        self._forward(cmd, out)

    def _forward(self, cmd: Command, out: list[ImapCommand]) -> None:
        self._pending = cmd
        data = cmd.raw
        if cmd.literal_count:
            # the client's literals are in hand: one write, as {n+}
            if not self._backend_literal_plus:
                self._pending = None
                self._refuse(out, cmd.tag, b"NO [CANNOT] Literals are not supported here")
                return
            data = to_non_sync(cmd)
        out.append(SendToUpstream(data))
        self.state = State.RELAY

    # ------------------------------------------------------------------ policy

    def _apply(
        self, phase: str, out: list[ImapCommand], *, tag: bytes = b"*", greet: bool = True
    ) -> bool:
        verdict = self.judge.evaluate(phase)
        if not verdict.matches and verdict.action == "pass":
            return False
        out.extend(self.judge.events(verdict, phase))
        if verdict.delay > 0:
            out.append(Delay(verdict.delay))
        action = verdict.action
        if action not in ("reject", "deny", "ban"):
            return False
        text = self._policy_text(verdict)
        if action == "reject" and phase not in SESSION_PHASES and not text.startswith("BYE"):
            self._send_refusal(out, tag + b" " + text.encode("utf-8", "replace") + b"\r\n")
            return True
        if action == "ban":
            rule = verdict.rule
            out.append(
                BanClient(
                    verdict.ban,
                    f"rule {rule.id}" if rule else "policy",
                    rule.id if rule else None,
                )
            )
        if phase == "close":
            return True
        if greet:
            bye = text if text.startswith("BYE") else default_reply("imap", "deny") or "BYE"
            self._send_refusal(out, b"* " + bye.encode("utf-8", "replace") + b"\r\n")
        self._close(out, "policy_ban" if action == "ban" else "policy_deny")
        return True

    def _policy_text(self, verdict: Verdict) -> str:
        text = verdict.reply or default_reply("imap", verdict.action) or "NO Rejected by policy"
        if verdict.action in ("deny", "ban") and not text.startswith("BYE"):
            text = default_reply("imap", verdict.action) or "BYE Access denied"
        return text

    # ------------------------------------------------------------------ helpers

    def _refuse(self, out: list[ImapCommand], tag: bytes, text: bytes) -> None:
        self._send_refusal(out, tag + b" " + text + b"\r\n")
        self.errors += 1
        if self.errors >= self.config.max_errors and not self.closed:
            self._send_refusal(out, B_TOO_MANY_ERRORS)
            out.append(
                Emit("imap.too_many_errors", {"imap.errors": self.errors}, outcome="failure")
            )
            self._close(out, "too_many_errors")

    def _fail_upstream(
        self,
        out: list[ImapCommand],
        reason: str,
        *,
        detail: str | None = None,
        already_alerted: bool = False,
    ) -> None:
        if self.state is State.CLOSED:
            return
        if not already_alerted:
            fields: dict[str, Any] = {"backend.error": reason}
            if detail:
                fields["error.message"] = detail
            out.append(Emit("backend.failure", fields, outcome="failure"))
        self._send(out, B_UNAVAILABLE)
        self._close(out, reason)

    def _close(self, out: list[ImapCommand], reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_reason = reason
        out.append(Close(reason))


def _partial(tag: bytes | None, name: str, note: str) -> bytes:
    """A transcript line for client input that is no complete command (no client bytes)."""
    return b" ".join(p for p in (tag or b"", name.encode("ascii", "replace"), note.encode()) if p)


def _args_of(cmd: Command) -> str:
    """``imap.args`` for rules and events: the command's arguments, credentials redacted."""
    line = cmd.redacted()
    parts = line.split(b" ", 2)
    return parts[2].decode("utf-8", "replace")[:512] if len(parts) > 2 else ""


def _preview(data: bytes, limit: int = 200) -> str:
    """Injected bytes for an event: LOGIN passwords and AUTHENTICATE data cut off."""
    shown: list[str] = []
    for raw in data[:limit].split(b"\n"):
        words = raw.split(b" ")
        line = raw
        if len(words) > 2 and words[1].upper() in (b"LOGIN", b"AUTHENTICATE"):
            line = b" ".join(words[:3]) + b" ***"
        shown.append(line.decode("ascii", "backslashreplace"))
    return "\\n".join(shown)
