"""The SMTP proxy session: pure logic, bytes and events in, commands out.

Theory of operation
-------------------
One :class:`SmtpSession` exists per client connection.  It owns the two
codecs -- a :class:`~mailmoat.protocols.smtp.CommandReader` for what the
client says and a :class:`~mailmoat.protocols.smtp.ReplyReader` for what the
backend says -- and never touches a socket.  The driver (``mailmoat.net``)
feeds it bytes with :meth:`receive_client` / :meth:`receive_upstream`,
executes the commands it returns (``SendToClient``, ``SendToUpstream``,
``StartClientTls``, ``StartUpstreamTls``, ``Emit``, ``Close``) in order, and
then reads from whichever side :attr:`awaiting` names.

The session relays commands one group at a time.  Commands the client
pipelined sit in the command reader until the replies for the group in
flight have come back; then they are processed straight from the buffer.
When both sides speak PIPELINING (RFC 2920) a group of MAIL / RCPT / RSET
plus one final command is forwarded in one write, and the replies are
relayed in order as they arrive.

STARTTLS (RFC 3207) is answered by mailmoat itself; the backend never sees
the client's STARTTLS.  Bytes the client sent behind its STARTTLS line are
never executed.  The backend leg is bootstrapped before the client is
greeted: greeting, then (backend ``tls = "starttls"``) EHLO, STARTTLS and a
handshake.  The backend's greeting is then relayed to the client, so the
client sees the real server's banner.

EHLO replies are rewritten: only extensions mailmoat really handles are
passed on (:data:`PASSED_EXTENSIONS`), STARTTLS is offered while TLS is
available and not yet active, and AUTH is hidden before TLS where the
listener requires TLS.  CHUNKING/BDAT is not advertised: BDAT framing would
have to be parsed to be inspected, so BDAT is refused (RFC 3030 lets a
server not offer it).

Every line the client sees goes out through ``_send`` and every parsed client
line passes :class:`~mailmoat.session._transcript.Transcript`: the whole
exchange (message content excepted, credentials redacted) until a successful
AUTH, then only what mailmoat refused.  :meth:`SmtpSession.finish` emits it
as ``session.transcript``.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, assert_never, final

from mailmoat.detect.login import LoginFacts
from mailmoat.detect.outbound import OutboundFacts
from mailmoat.errors import RemoteProtocolError
from mailmoat.policy import RuleHolder, Verdict, default_reply
from mailmoat.protocols.sasl import SaslObserver, redact_auth_line
from mailmoat.protocols.smtp import (
    NEED_DATA,
    Auth,
    AuthResponse,
    ClientClosed,
    Command,
    CommandReader,
    DataChunk,
    EndOfData,
    Extension,
    Hello,
    LineTooLong,
    MailFrom,
    RcptTo,
    Reply,
    ReplyReader,
    ServerClosed,
    SmtpLimits,
    format_command,
    format_ehlo,
    parse_ehlo,
)
from mailmoat.protocols.xclient import UNAVAILABLE, format_xclient, xclient_addr

from ._policy import SESSION_PHASES, Judge, PolicySession
from ._transcript import Transcript
from .commands import (
    BanClient,
    CheckInbound,
    CheckLogin,
    CheckMessage,
    ClientHelloFacts,
    Close,
    Delay,
    Emit,
    SendToClient,
    SendToUpstream,
    SessionCommand,
    StartClientTls,
    StartUpstreamTls,
)

# Re-exported: the commands live in .commands, shared with the other protocols.
__all__ = [
    "BanClient",
    "CheckInbound",
    "CheckLogin",
    "CheckMessage",
    "Close",
    "Delay",
    "Emit",
    "SendToClient",
    "SendToUpstream",
    "SessionCommand",
    "SmtpSession",
    "SmtpSessionConfig",
    "StartClientTls",
    "StartUpstreamTls",
]


class Awaiting(enum.Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"
    NOTHING = "nothing"  # a TLS handshake is running, or the session is closed


class State(enum.Enum):
    UP_GREETING = "up_greeting"  # waiting for the backend's 220
    UP_EHLO = "up_ehlo"  # our EHLO to the backend before its STARTTLS
    UP_STARTTLS = "up_starttls"
    UP_TLS = "up_tls"  # backend handshake running
    LOGIN = "login"  # the backend answered AUTH; the state store is being asked
    MESSAGE = "message"  # an authenticated user's message is being counted
    INBOUND = "inbound"  # an unauthenticated sender's STARTTLS use is being counted
    COMMAND = "command"  # waiting for the client
    RELAY = "relay"  # replies in flight from the backend
    CLIENT_TLS = "client_tls"  # client handshake running
    DATA = "data"  # streaming a message body
    CLOSED = "closed"


class Pending(enum.Enum):
    """What a reply in flight answers; decides how it is relayed."""

    PLAIN = "plain"
    EHLO = "ehlo"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    RSET = "rset"
    AUTH = "auth"
    DATA = "data"
    END_OF_DATA = "end_of_data"
    QUIT = "quit"
    XCLIENT = "xclient"  # our XCLIENT; its 220 is not relayed, the held HELO/EHLO follows
    LOCAL = "local"  # a reply of mailmoat's own, queued behind replies still due


#: EHLO keywords relayed from the backend: each is something mailmoat's codec
#: and session handle end to end.  Everything else (CHUNKING, BINARYMIME,
#: XCLIENT, XFORWARD, ETRN, vendor extensions) is dropped.
PASSED_EXTENSIONS = frozenset(
    {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "AUTH", "ENHANCEDSTATUSCODES", "DSN"}
)

#: Commands forwarded to the backend.  Anything else is answered by mailmoat.
RELAYED_VERBS = frozenset(
    {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP", "AUTH"}
)

#: RFC 2920 §3.1: "The actual transfer of message content is explicitly
#: allowed to be the first 'command' in a group" -- and MAIL, RCPT and RSET
#: may appear anywhere in a group; other commands end it.
_GROUPABLE = frozenset({"MAIL", "RCPT", "RSET"})


def _r(text: str) -> bytes:
    return text.encode("ascii") + b"\r\n"


R_UNAVAILABLE = _r("421 4.3.2 Service not available, closing transmission channel")
R_TIMEOUT = _r("421 4.4.2 Timeout exceeded, closing transmission channel")
R_SHUTDOWN = _r("421 4.3.2 Server shutting down, closing transmission channel")
R_TLS_READY = _r("220 2.0.0 Ready to start TLS")
R_TLS_REQUIRED = _r("530 5.7.0 Must issue a STARTTLS command first")
R_TLS_ACTIVE = _r("503 5.5.1 TLS already active")
R_NOT_IMPLEMENTED = _r("502 5.5.1 Command not implemented")
R_UNRECOGNIZED = _r("500 5.5.2 Error: command not recognized")
R_LINE_TOO_LONG = _r("500 5.5.2 Line too long")
R_SYNTAX = _r("501 5.5.4 Syntax error in parameters or arguments")
R_BAD_SEQUENCE_HELO = _r("503 5.5.1 Error: send HELO/EHLO first")
R_INJECTION = _r("554 5.5.1 Error: commands pipelined after STARTTLS are refused")
R_TOO_BIG = _r("552 5.3.4 Message size exceeds fixed maximum message size")
R_TLS_TEMP_FAIL = _r("454 4.7.0 TLS not available due to temporary reason")
R_PREGREET = _r("554 5.5.1 Error: protocol error: client talked before the greeting")
R_NON_SMTP = _r("554 5.5.1 Error: non-SMTP command")
R_PIPELINING = _r("554 5.5.1 Error: improper command pipelining")
R_TOO_MANY_ERRORS = _r("421 4.7.0 Error: too many errors, closing transmission channel")
R_XCLIENT_REFUSED = _r("550 5.7.0 Error: XCLIENT and XFORWARD are not permitted")
R_BARE_NEWLINE = _r(
    "554 5.5.2 Error: bare <LF> or <CR> in message refused (SMTP smuggling defence)"
)
R_DATA_LINE_TOO_LONG = _r("554 5.5.2 Error: message line too long")
R_AUTH_BLIND = _r("454 4.7.0 Temporary authentication failure, try again later")
R_AUTH_BLIND_CLOSE = _r("421 4.7.0 Temporary authentication failure, closing transmission channel")
R_BANNED = _r("554 5.7.1 Service unavailable; your address is blocked for a while")

#: recipients kept for ``smtp.rcpt_to`` (``smtp.rcpt_count`` counts on)
MAX_RCPT_CONTEXT: Final = 1000

#: First words of requests in other protocols (postscreen's "non-SMTP command").
NON_SMTP_VERBS = frozenset(
    {"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "TRACE", "PATCH", "USER", "PASS"}
)
#: A dot line whose line ending on either side is not CRLF: what SMTP smuggling
#: (SEC Consult, 2023) uses as a fake end-of-data for a lenient backend.
_FAKE_END_OF_DATA = re.compile(rb"(?:\r\n|\n|\r)\.(?:\r\n|\n|\r)")
#: A bare CR or bare LF, and whether a "." follows it (it must then be stuffed).
_BARE_NEWLINE = re.compile(rb"(?:\r(?!\n)|(?<!\r)\n)(\.?)")


@final
@dataclass(frozen=True, slots=True)
class SmtpSessionConfig:
    """What one session needs to know about its listener and backend."""

    listener: str
    client_tls: Literal["none", "starttls", "implicit"] = "none"
    require_tls: bool = False
    backend_tls: Literal["none", "starttls", "implicit"] = "none"
    hostname: str = "mailmoat.invalid"
    max_message_size: int = 50 * 1024 * 1024
    greet_delay: float = 0.0
    bare_newline: Literal["reject", "normalize"] = "reject"
    max_errors: int = 20
    client_identity: Literal["none", "xclient", "proxy-v2"] = "none"
    limits: SmtpLimits = field(default_factory=SmtpLimits)
    #: ask the state store whether an unauthenticated sender used STARTTLS before
    inbound_tls: bool = False


@final
class SmtpSession(PolicySession):
    """One client session, see the module docstring."""

    TIMEOUT_REPLY = R_TIMEOUT
    BANNED_REPLY = R_BANNED

    def __init__(
        self,
        config: SmtpSessionConfig,
        client_ip: str = "",
        client_port: int = 0,
        *,
        rules: RuleHolder | None = None,
        session_id: str = "",
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``clock``: seconds since the session started, for the transcript (the driver's)."""
        self.config = config
        self.transcript = Transcript(clock)
        self.judge = Judge(
            rules,
            "smtp",
            session_id=session_id,
            listener=config.listener,
            client_ip=client_ip,
            client_port=client_port,
        )
        self._smtp = self.judge.ctx["smtp"]
        self._close_when_flushed: str | None = None
        self._login_reply = b""
        self._held_end: EndOfData | None = None
        self._held_mail: MailFrom | None = None
        self._inbound_checked = False
        self.client_ip = client_ip
        self.client_port = client_port
        self.state = State.UP_GREETING
        self.reader = CommandReader(config.limits)
        self.replies = ReplyReader(config.limits)
        self.tls_active = config.client_tls == "implicit"
        self.upstream_tls_active = config.backend_tls == "implicit"
        self.helo_seen = False
        self.authenticated = False
        self.upstream_pipelining = False
        self.commands = 0
        self.messages = 0
        self.close_reason: str | None = None
        self._greeting: Reply | None = None
        self._inflight: deque[tuple[Pending, bytes]] = deque()
        self.errors = 0
        self.auth_user: str | None = None
        self._sasl: SaslObserver | None = None
        self._pipelining_offered = False
        self._greet_open = False  # "220-" sent, the greeting's last line still due
        self._xclient_sent = config.client_identity != "xclient"
        self._held_hello: tuple[bytes, Pending] | None = None
        self._data_size = 0
        self._data_refused: tuple[bytes, str, dict[str, Any]] | None = None
        self._data_stats = {"bare_lf": 0, "bare_cr": 0, "fake_eod": 0}
        self._after_bare_newline = False
        self._raw_tail = b"\r\n"
        if self.tls_active:
            self.judge.ctx["tls"]["active"] = True

    # ------------------------------------------------------------------ queries

    @property
    def awaiting(self) -> Awaiting:
        match self.state:
            case State.UP_GREETING | State.UP_EHLO | State.UP_STARTTLS | State.RELAY:
                return Awaiting.UPSTREAM
            case State.COMMAND | State.DATA:
                return Awaiting.CLIENT
            case (
                State.UP_TLS
                | State.CLIENT_TLS
                | State.LOGIN
                | State.MESSAGE
                | State.INBOUND
                | State.CLOSED
            ):
                return Awaiting.NOTHING
            case _ as unreachable:
                assert_never(unreachable)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def in_data(self) -> bool:
        """True while a message body or its final reply is in flight (longer timeouts)."""
        return self.state is State.DATA or (
            self.state is State.RELAY
            and bool(self._inflight)
            and self._inflight[0][0] is Pending.END_OF_DATA
        )

    # ------------------------------------------------------------------ inputs

    def receive_upstream(self, data: bytes) -> list[SessionCommand]:
        out: list[SessionCommand] = []
        try:
            self.replies.receive_data(data)
            while self.state is not State.CLOSED:
                ev = self.replies.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, ServerClosed):
                    self._fail_upstream(out, "backend_closed")
                    break
                self._on_reply(ev, out)
                if self.state is State.COMMAND:
                    self._drain_client(out)
        except RemoteProtocolError as exc:
            self._fail_upstream(out, "backend_protocol_error", detail=str(exc))
        return out

    def receive_client(self, data: bytes) -> list[SessionCommand]:
        out: list[SessionCommand] = []
        try:
            self.reader.receive_data(data)
        except RemoteProtocolError as exc:  # pragma: no cover - receive_data only buffers
            self._protocol_error(out, exc)
            return out
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
    ) -> list[SessionCommand]:
        # RFC 3207 §4.2: "the server MUST discard any knowledge obtained from
        # the client ... which was not obtained from the TLS negotiation itself."
        self.tls_active = True
        if self.state is State.CLIENT_TLS:  # STARTTLS; implicit TLS happens before the greeting
            self.helo_seen = False
            self.reader = CommandReader(self.config.limits)
            self.state = State.COMMAND
            self._smtp["helo"] = ""
        out: list[SessionCommand] = [self._client_tls(version, cipher, sni, hello, handshake_ms)]
        self._apply("tls", out)
        return out

    def upstream_tls_started(
        self, version: str, cipher: str, *, handshake_ms: float | None = None
    ) -> list[SessionCommand]:
        self.upstream_tls_active = True
        out: list[SessionCommand] = [self._backend_tls(version, cipher, handshake_ms)]
        self._greet_client(out)
        return out

    def client_gone(self) -> None:
        """The client connection broke; nothing can be said to it any more."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = "client_gone"

    def shutdown(self) -> list[SessionCommand]:
        """The node is draining and the grace period is over."""
        out: list[SessionCommand] = []
        if self.state is not State.CLOSED:
            if self.state is not State.DATA:
                self._send(out, R_SHUTDOWN)
            self._close(out, "shutdown")
        return out

    # ------------------------------------------------------------------ upstream replies

    def _on_reply(self, reply: Reply, out: list[SessionCommand]) -> None:
        match self.state:
            case State.UP_GREETING:
                if reply.code != 220 and self._greet_open:
                    self._fail_upstream(out, "backend_refused", detail=f"greeting {reply.code}")
                    return
                if reply.code != 220:
                    # the backend refuses us (e.g. 554 or 421): tell the client the same
                    self._send(out, reply.to_bytes())
                    out.append(SendToUpstream(format_command("QUIT")))
                    self._close(out, "backend_refused")
                    return
                self._greeting = reply
                if self.config.backend_tls == "starttls":
                    out.append(
                        SendToUpstream(format_command("EHLO", self.config.hostname.encode()))
                    )
                    self.state = State.UP_EHLO
                else:
                    self._greet_client(out)
            case State.UP_EHLO:
                _, exts = parse_ehlo(reply) if reply.code == 250 else (b"", ())
                if not any(e.keyword == "STARTTLS" for e in exts):
                    self._backend_alert(
                        out,
                        "backend.starttls_missing",
                        {"smtp.reply": reply.to_bytes()[:512]},
                        "backend_starttls_missing",
                    )
                    return
                out.append(SendToUpstream(format_command("STARTTLS")))
                self.state = State.UP_STARTTLS
            case State.UP_STARTTLS:
                if reply.code != 220:
                    self._backend_alert(
                        out,
                        "backend.starttls_refused",
                        {"smtp.reply": reply.to_bytes()[:512]},
                        "backend_starttls_refused",
                    )
                    return
                if self.replies.buffered:
                    # bytes after the 220 but before the handshake: response injection
                    self._backend_alert(
                        out,
                        "backend.starttls_injection",
                        {
                            "tls.injected_bytes": len(self.replies.buffered),
                            "tls.injected_preview": _preview(bytes(self.replies.buffered)),
                        },
                        "backend_starttls_injection",
                    )
                    return
                self.replies = ReplyReader(self.config.limits)
                self.state = State.UP_TLS
                out.append(StartUpstreamTls())
            case State.RELAY:
                self._relay_reply(reply, out)
            case _:
                # a reply nobody asked for (e.g. an unsolicited 421 while we wait for the client)
                if reply.code == 421:
                    self._send(out, reply.to_bytes())
                    self._close(out, "backend_closed")
                else:
                    self._fail_upstream(
                        out, "backend_protocol_error", detail=f"unsolicited reply {reply.code}"
                    )

    def _relay_reply(self, reply: Reply, out: list[SessionCommand]) -> None:
        pending, _ = self._inflight.popleft()
        data = reply.to_bytes()
        match pending:
            case Pending.XCLIENT:
                # Postfix answers XCLIENT with a fresh 220 greeting; the client
                # never sees it.  Anything else: the backend does not trust us
                # to speak for the client -- never relay without the identity.
                if reply.code != 220 or self._held_hello is None:
                    self._backend_alert(
                        out,
                        "backend.xclient_refused",
                        {"smtp.reply": reply.to_bytes()[:512]},
                        "backend_xclient_refused",
                    )
                    return
                line, kind = self._held_hello
                self._held_hello = None
                self._inflight.appendleft((kind, b""))
                out.append(SendToUpstream(line))
                return
            case Pending.EHLO:
                if reply.code == 250:
                    greeting, exts = parse_ehlo(reply)
                    self.upstream_pipelining = any(e.keyword == "PIPELINING" for e in exts)
                    kept = self._rewrite_extensions(exts)
                    self._pipelining_offered = any(e.keyword == "PIPELINING" for e in kept)
                    data = format_ehlo(greeting, kept).to_bytes()
                    self.helo_seen = True
            case Pending.HELO:
                if reply.code == 250:
                    self.helo_seen = True
                    self.upstream_pipelining = False
                    self._pipelining_offered = False
            case Pending.AUTH:
                sasl = self._sasl
                if reply.code == 334:
                    # the exchange goes on: the client's next line is a SASL response
                    if sasl is not None:
                        sasl.server_challenge(reply.lines[0] if reply.lines else b"")
                    self.reader.expect_auth_response()
                    self._send(out, data)
                    self.state = State.COMMAND
                    return
                self.authenticated = reply.code == 235
                user = sasl.user if sasl is not None else None
                if sasl is not None:
                    if self.authenticated:
                        self.auth_user = sasl.user
                    fields: dict[str, Any] = {
                        "auth.mechanism": sasl.mechanism,
                        "auth.user": sasl.user,
                        "smtp.reply_code": reply.code,
                    }
                    if sasl.authzid:
                        fields["auth.authzid"] = sasl.authzid
                    if sasl.cancelled:
                        fields["auth.cancelled"] = True
                    if sasl.malformed:
                        fields["auth.malformed"] = True
                    out.append(
                        Emit(
                            "auth.attempt",
                            fields,
                            outcome="success" if self.authenticated else "failure",
                        )
                    )
                self._sasl = None
                if reply.code != 421:
                    # the login phase runs once the state store has counted it
                    self.judge.ctx["auth"].update(
                        user=user or "", result="success" if self.authenticated else "failure"
                    )
                    self._login_reply = data
                    self.state = State.LOGIN
                    out.append(
                        CheckLogin(
                            user or "",
                            self.authenticated,
                            sasl.password_fingerprint if sasl is not None else None,
                        )
                    )
                    return
            case Pending.DATA:
                if reply.code == 354:
                    self.reader.expect_data()
                    self._data_size = 0
                    self._data_refused = None
                    self._data_stats = {"bare_lf": 0, "bare_cr": 0, "fake_eod": 0}
                    self._after_bare_newline = False
                    self._raw_tail = b"\r\n"  # the DATA line's CRLF opens the first line
                    self._send(out, data)
                    self.state = State.DATA
                    return
            case Pending.END_OF_DATA:
                if reply.code == 250:
                    self.messages += 1
                fields = {"smtp.data.size": self._data_size, "smtp.reply_code": reply.code}
                if self._data_stats["bare_lf"] or self._data_stats["bare_cr"]:
                    fields["smtp.data.bare_lf"] = self._data_stats["bare_lf"]
                    fields["smtp.data.bare_cr"] = self._data_stats["bare_cr"]
                    fields["smtp.data.normalized"] = True
                out.append(
                    Emit(
                        "smtp.message",
                        fields,
                        outcome="success" if reply.code == 250 else "failure",
                    )
                )
            case Pending.QUIT:
                self._send(out, data)
                self._close(out, "client_quit")
                return
            case Pending.PLAIN | Pending.MAIL | Pending.RCPT | Pending.RSET | Pending.LOCAL:
                pass
            case _ as unreachable:
                assert_never(unreachable)
        self._send(out, data)
        if reply.code == 421:
            self._close(out, "backend_closed")
            return
        while self._inflight and self._inflight[0][0] is Pending.LOCAL:
            self._send(out, self._inflight.popleft()[1])
        if self._close_when_flushed is not None and not self._inflight:
            self._close(out, self._close_when_flushed)
            return
        if reply.code >= 400 and pending is not Pending.AUTH:
            self.errors += 1
        if self.errors >= self.config.max_errors and not self._inflight:
            self._too_many_errors(out)
            return
        if not self._inflight:
            self.state = State.COMMAND

    def _rewrite_extensions(self, exts: tuple[Extension, ...]) -> list[Extension]:
        kept: list[Extension] = []
        for offered in exts:
            ext = offered
            if ext.keyword not in PASSED_EXTENSIONS:
                continue
            if ext.keyword == "AUTH" and self.config.require_tls and not self.tls_active:
                continue
            if ext.keyword == "SIZE":
                backend_limit = int(ext.params[0]) if ext.params and ext.params[0].isdigit() else 0
                limit = self.config.max_message_size
                if backend_limit:
                    limit = min(limit, backend_limit)
                ext = Extension("SIZE", (str(limit),))
            kept.append(ext)
        if self.config.client_tls == "starttls" and not self.tls_active:
            kept.append(Extension("STARTTLS", ()))
        return kept

    # ------------------------------------------------------------------ client events

    def _drain_client(self, out: list[SessionCommand]) -> None:
        """Process buffered client input until we must wait for something."""
        while self.state in (State.COMMAND, State.DATA):
            try:
                ev = self.reader.next_event()
            except RemoteProtocolError as exc:
                self._protocol_error(out, exc)
                return
            if ev is NEED_DATA:
                break
            if isinstance(ev, DataChunk):
                self._on_data_chunk(ev, out)
            elif isinstance(ev, EndOfData):
                self.transcript.command(b".")  # the message itself is never recorded
                self._on_end_of_data(ev, out)
            elif isinstance(ev, ClientClosed):
                self._close(out, "client_closed")
            elif isinstance(ev, LineTooLong):
                self.commands += 1
                self.transcript.command(
                    f"[line of {ev.length} bytes, over the limit of {ev.limit}]".encode()
                )
                self._refuse(
                    out,
                    R_LINE_TOO_LONG,
                    "smtp.line_too_long",
                    {"smtp.line_length": ev.length, "smtp.line_limit": ev.limit},
                )
            elif isinstance(ev, AuthResponse):
                self.transcript.command(ev)  # "***" (or "*" to cancel)
                if self._sasl is not None:
                    self._sasl.client_response(ev.data)
                self._forward(ev.line, Pending.AUTH, out, ends_group=True)
            else:
                self.commands += 1
                self.transcript.command(b"PASS ***" if ev.verb == "PASS" else ev)
                # postscreen's pipelining test: more input already waiting
                # behind a command although PIPELINING was never offered
                if not self._pipelining_offered and self.reader.buffered and not self._inflight:
                    self._send_refusal(out, R_PIPELINING)
                    out.append(
                        Emit(
                            "smtp.pipelining_violation",
                            {
                                "smtp.command": ev.verb,
                                "smtp.pipelined_bytes": len(self.reader.buffered),
                                "smtp.pipelined_preview": _preview(self.reader.buffered),
                            },
                            outcome="failure",
                        )
                    )
                    self._close(out, "pipelining_violation")
                    return
                self._on_command(ev, out)
        if self._inflight and self.state is State.COMMAND:
            self.state = State.RELAY

    def _on_command(self, cmd: Command, out: list[SessionCommand]) -> None:
        verb = cmd.verb
        if verb not in NON_SMTP_VERBS and verb and self._judged(cmd, out):
            return
        if verb == "STARTTLS":
            self._on_starttls(cmd, out)
            return
        if verb in NON_SMTP_VERBS or not verb:
            self._send_refusal(out, R_NON_SMTP)
            out.append(
                Emit(
                    "smtp.non_smtp_command",
                    {"smtp.command": verb, "smtp.line_preview": _preview(cmd.redacted(), 100)},
                    outcome="failure",
                )
            )
            self._close(out, "non_smtp_command")
            return
        if verb in ("XCLIENT", "XFORWARD"):
            self._refuse(
                out,
                R_XCLIENT_REFUSED,
                "smtp.xclient_refused",
                {"smtp.command": verb, "smtp.args": _preview(cmd.args, 200)},
                kind="alert",
            )
            return
        if verb == "BDAT":
            self._refuse(out, R_NOT_IMPLEMENTED)
            return
        if verb not in RELAYED_VERBS:
            self._refuse(out, R_UNRECOGNIZED)
            return
        if verb in ("AUTH", "MAIL") and self.config.require_tls and not self.tls_active:
            self._refuse(out, R_TLS_REQUIRED)
            return
        if verb in ("MAIL", "RCPT", "DATA", "AUTH") and not self.helo_seen:
            self._refuse(out, R_BAD_SEQUENCE_HELO)
            return
        match cmd:
            case Hello():
                self._smtp["helo"] = cmd.name
                if self._apply("helo", out):
                    return
                kind = Pending.EHLO if cmd.extended else Pending.HELO
                if not self._xclient_sent:
                    # tell the backend who the client is before its HELO/EHLO
                    self._xclient_sent = True
                    self._held_hello = (cmd.line, kind)
                    self._forward(self._xclient_line(cmd), Pending.XCLIENT, out, ends_group=True)
                else:
                    self._forward(cmd.line, kind, out, ends_group=True)
            case MailFrom():
                size = next((v for k, v in cmd.params if k == "SIZE"), None)
                if size is not None and size.isdigit() and int(size) > self.config.max_message_size:
                    self._refuse(out, R_TOO_BIG)
                    return
                smtp = self._smtp
                smtp["mail_from"] = cmd.address.decode("utf-8", "replace")
                smtp["rcpt_to"] = []
                smtp["rcpt_count"] = 0
                if self.config.inbound_tls and not self.authenticated and not self._inbound_checked:
                    # port 25: did this sender use STARTTLS before? (state store, async)
                    self._inbound_checked = True
                    self._held_mail = cmd
                    self.state = State.INBOUND
                    domain = smtp["mail_from"].rpartition("@")[2] or smtp.get("helo", "")
                    out.append(CheckInbound(domain.casefold()))
                    return
                self._mail_phase(cmd, out)
            case RcptTo():
                smtp = self._smtp
                count = smtp.get("rcpt_count", 0) + 1
                smtp["rcpt_count"] = count
                if count <= MAX_RCPT_CONTEXT:
                    smtp.setdefault("rcpt_to", []).append(cmd.address.decode("utf-8", "replace"))
                if self._apply("rcpt", out):
                    return
                self._forward(cmd.line, Pending.RCPT, out, ends_group=False)
            case Auth():
                sasl = SaslObserver(cmd.mechanism, cmd.initial_response)
                self.judge.ctx["auth"].update(
                    mechanism=cmd.mechanism, user=sasl.user or "", result=""
                )
                if self._apply("auth", out):
                    return
                self._sasl = sasl
                self._forward(cmd.line, Pending.AUTH, out, ends_group=True)
            case _:
                if verb in ("MAIL", "RCPT", "HELO", "EHLO", "AUTH"):
                    self._refuse(out, R_SYNTAX)  # the codec could not parse its arguments
                elif verb == "DATA":
                    self._forward(cmd.line, Pending.DATA, out, ends_group=True)
                elif verb == "QUIT":
                    self._forward(cmd.line, Pending.QUIT, out, ends_group=True)
                elif verb == "RSET":
                    self._smtp.update(mail_from="", rcpt_to=[], rcpt_count=0)
                    self._forward(cmd.line, Pending.RSET, out, ends_group=False)
                else:
                    self._forward(cmd.line, Pending.PLAIN, out, ends_group=True)

    def _mail_phase(self, cmd: MailFrom, out: list[SessionCommand]) -> None:
        if self._apply("mail_from", out):
            return
        self._forward(cmd.line, Pending.MAIL, out, ends_group=False)

    def inbound_checked(self, facts: Mapping[str, Any]) -> list[SessionCommand]:
        """The store counted this sender's STARTTLS use: the mail_from phase, then on."""
        out: list[SessionCommand] = []
        cmd, self._held_mail = self._held_mail, None
        if self.state is not State.INBOUND or cmd is None:
            return out
        self.state = State.COMMAND
        self.judge.ctx["tls"].update(facts)
        self._mail_phase(cmd, out)
        self._drain_client(out)
        return out

    def _judged(self, cmd: Command, out: list[SessionCommand]) -> bool:
        """Fill ``smtp.command``/``args``/``errors``, run the command phase (every
        command): True when a rule refused it."""
        smtp = self._smtp
        smtp["command"] = cmd.verb
        smtp["errors"] = self.errors
        if isinstance(cmd, Auth):
            smtp["args"] = cmd.mechanism + (" ***" if cmd.initial_response is not None else "")
        else:
            smtp["args"] = cmd.args.decode("utf-8", "replace")[:512]
        return self._apply("command", out)

    def _xclient_line(self, hello: Hello) -> bytes:
        attrs = {
            "ADDR": xclient_addr(self.client_ip) if self.client_ip else UNAVAILABLE,
            "PORT": str(self.client_port) if self.client_port else UNAVAILABLE,
            "NAME": UNAVAILABLE,
            "PROTO": "ESMTP" if hello.extended else "SMTP",
        }
        if hello.name:
            attrs["HELO"] = hello.name[:255]
        return format_xclient(attrs)

    def _on_starttls(self, cmd: Command, out: list[SessionCommand]) -> None:
        if self.config.client_tls != "starttls":
            self._refuse(out, R_NOT_IMPLEMENTED)
            return
        if self.tls_active:
            self._refuse(out, R_TLS_ACTIVE)
            return
        if cmd.args.strip():
            self._refuse(out, R_SYNTAX)
            return
        # RFC 3207 §4: "The STARTTLS command ... MUST be the last command in a
        # group"; anything behind it was sent in the clear and would be run
        # inside the TLS session (CVE-2011-0411).  Refuse, never execute.
        injected = self.reader.buffered
        if injected or self._inflight:
            self.reader.discard_buffer()
            self._refuse_injection(out, R_INJECTION, len(injected), _preview(injected))
            return
        self._send(out, R_TLS_READY)
        out.append(StartClientTls())
        self.state = State.CLIENT_TLS

    def _on_data_chunk(self, chunk: DataChunk, out: list[SessionCommand]) -> None:
        self._data_size += len(chunk.data)
        if self._data_refused is not None:
            return  # already refused: read the rest of the body and drop it
        data = chunk.data
        raw_tail = self._raw_tail
        self._raw_tail = (raw_tail + data)[-3:]
        if chunk.bare_lf or chunk.bare_cr:
            stats = self._data_stats
            stats["bare_lf"] += chunk.bare_lf
            stats["bare_cr"] += chunk.bare_cr
            fake = len(_FAKE_END_OF_DATA.findall(data))
            stats["fake_eod"] += fake
            if self.config.bare_newline == "reject":
                # SMTP smuggling: never forward a bare LF/CR, whatever the
                # backend would make of it; the final "." is never sent.
                self._refuse_message(
                    R_BARE_NEWLINE,
                    "smtp.smuggling" if fake else "smtp.bare_newline",
                    {
                        "smtp.data.bare_lf": chunk.bare_lf,
                        "smtp.data.bare_cr": chunk.bare_cr,
                        "smtp.data.smuggling": bool(fake),
                    },
                )
                return
            self._raw_tail = raw_tail
            data = self._normalize(data)
            self._raw_tail = (raw_tail + chunk.data)[-3:]
        elif self._after_bare_newline and data.startswith(b"."):
            data = b"." + data  # the bare newline that ended the last chunk started a line
        if chunk.long_line:
            self._refuse_message(
                R_DATA_LINE_TOO_LONG,
                "smtp.line_too_long",
                {"smtp.line_limit": self.config.limits.max_text_line, "smtp.in_data": True},
            )
            return
        if self._data_size > self.config.max_message_size:
            self._refuse_message(
                R_TOO_BIG, "smtp.message_too_big", {"smtp.data.size": self._data_size}
            )
            return
        out.append(SendToUpstream(data))

    def _normalize(self, data: bytes) -> bytes:
        out = normalize_newlines(data, self._raw_tail, dot_pending=self._after_bare_newline)
        # a bare newline as the chunk's last byte: a "." opening the next chunk must be stuffed
        self._after_bare_newline = data.endswith(b"\n") and not data.endswith(b"\r\n")
        return out

    def _refuse_message(self, reply: bytes, action: str, fields: dict[str, Any]) -> None:
        """Stop relaying this body; the verdict is given at its end."""
        self._data_refused = (reply, action, fields)

    def _on_end_of_data(self, end: EndOfData, out: list[SessionCommand]) -> None:
        if self._data_refused is not None:
            reply, action, fields = self._data_refused
            # The backend holds a partial body; only a closed connection makes
            # it discard that safely, so this session cannot go on either.
            self._send_refusal(out, reply)
            fields = dict(fields, **{"smtp.data.size": self._data_size})
            out.append(Emit(action, fields, outcome="failure"))
            out.append(Emit("smtp.message", {"smtp.data.size": self._data_size}, outcome="failure"))
            self._close(
                out, action.replace("smtp.message_", "message_").replace("smtp.", "message_")
            )
            return
        if self.authenticated and self.auth_user:
            # the outbound detector needs the state store first (async)
            self._held_end = end
            self.state = State.MESSAGE
            smtp = self._smtp
            out.append(
                CheckMessage(
                    self.auth_user,
                    tuple(smtp.get("rcpt_to", ())),
                    int(smtp.get("rcpt_count", 0)),
                )
            )
            return
        self._finish_message(end, out)

    def message_checked(self, facts: OutboundFacts) -> list[SessionCommand]:
        """The state store counted this message: the data phase, then the final dot."""
        out: list[SessionCommand] = []
        end, self._held_end = self._held_end, None
        if self.state is not State.MESSAGE or end is None:
            return out
        self._smtp.update(facts.fields())
        if facts.burst:
            out.append(
                Emit(
                    "smtp.user_burst",
                    {
                        "auth.user": self.auth_user,
                        "smtp.user_rcpt_rate": facts.rcpt_rate,
                        "smtp.user_domains": facts.domains,
                        "smtp.user_baseline": round(facts.baseline, 1),
                    },
                    kind="alert",
                    outcome="unknown",
                )
            )
        self._finish_message(end, out)
        return out

    def _finish_message(self, end: EndOfData, out: list[SessionCommand]) -> None:
        if self.judge.has("data"):
            stats = self._data_stats
            self._smtp["data"] = {
                "size": self._data_size,
                "bare_lf": stats["bare_lf"] > 0,
                "bare_cr": stats["bare_cr"] > 0,
                "smuggling": stats["fake_eod"] > 0,
            }
            self._smtp["errors"] = self.errors
            if self._apply("data", out):
                # the final "." is held back, so nothing was delivered; the
                # backend holds a partial body that only a close discards
                out.append(
                    Emit("smtp.message", {"smtp.data.size": self._data_size}, outcome="failure")
                )
                self._close(out, "message_rejected")
                return
        self._inflight.append((Pending.END_OF_DATA, b""))
        out.append(SendToUpstream(end.line))
        self.state = State.RELAY

    # ------------------------------------------------------------------ policy

    def start(
        self,
        banned: bool = False,
        *,
        greet: bool = True,
        reputation: int = 0,
        geo: Mapping[str, Any] | None = None,
    ) -> list[SessionCommand]:
        """The connect phase, before anything is said: rules, then the ban list.

        An ``allow`` here trusts the session (no later rule and no ban check
        applies).  A banned address, or a ``deny``/``ban``/``reject`` verdict,
        gets a 554 (only when ``greet``; on an implicit-TLS port nothing can
        be said before the handshake) and the session ends.
        """
        return self._connect_phase(banned, greet, reputation, geo)

    def _apply(self, phase: str, out: list[SessionCommand], *, greet: bool = True) -> bool:
        """Evaluate ``phase``; carry out the verdict. True when the command or
        session was refused (the caller must not go on with it)."""
        verdict = self.judge.evaluate(phase)
        if not verdict.matches and verdict.action == "pass":
            return False
        out.extend(self.judge.events(verdict, phase))
        if verdict.delay > 0:
            out.append(Delay(verdict.delay))
        action = verdict.action
        if action not in ("reject", "deny", "ban"):
            return False
        reply = self._policy_reply(verdict)
        if action == "reject" and phase not in SESSION_PHASES:
            self._local(out, reply, refusal=True)
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
        reason = "policy_ban" if action == "ban" else "policy_deny"
        if phase == "close":
            return True
        if not greet:
            self._close(out, reason)
        elif self._inflight:
            # earlier pipelined commands' replies come first (RFC 2920)
            self._inflight.append((Pending.LOCAL, reply))
            self.transcript.refused(reply)
            self._close_when_flushed = reason
            self.reader.discard_buffer()
        else:
            self._send_refusal(out, reply)
            self._close(out, reason)
        return True

    def _policy_reply(self, verdict: Verdict) -> bytes:
        text = verdict.reply or default_reply("smtp", verdict.action)
        if verdict.action != "reject" and text and not text.startswith(("421", "554")):
            # a session-ending reply must be 421 or 554 (RFC 5321 §3.8, §4.2.2)
            text = None
        if verdict.action == "reject" and text and text[0] not in "45":
            text = None
        if not text:
            text = default_reply("smtp", verdict.action) or "554 5.7.1 Access denied"
        return text.encode("utf-8", "replace") + b"\r\n"

    def login_checked(
        self,
        facts: LoginFacts,
        travel: Mapping[str, Any] | None = None,
        *,
        blind: bool = False,
        tls: Mapping[str, Any] | None = None,
    ) -> list[SessionCommand]:
        """The state store counted this login: run the login phase, then relay the reply.

        ``blind``: the shared store is down and ``[state] on_failure = "closed"``:
        the login is refused (a temporary failure) instead of judged.
        ``travel`` and ``tls`` are the ``login.*`` and ``tls.*`` findings of the
        user's history (travel, new JA4, downgrade, shared JA4).
        """
        out: list[SessionCommand] = []
        if self.state is not State.LOGIN:
            return out
        self._login_facts(facts, travel, tls)
        self.state = State.RELAY
        reply, self._login_reply = self._login_reply, b""
        if blind:
            out.append(
                Emit(
                    "auth.refused_blind",
                    {"auth.user": self.auth_user or ""},
                    kind="alert",
                    outcome="failure",
                )
            )
            if self.authenticated:  # cannot be taken back at the backend
                self._send_refusal(out, R_AUTH_BLIND_CLOSE)
                self._close(out, "state_unavailable")
                return out
            self._send_refusal(out, R_AUTH_BLIND)
            self.state = State.COMMAND
            self._drain_client(out)
            return out
        if self._apply("login", out):
            # reject: our reply stands for the backend's; deny/ban closed already
            if self.state is not State.CLOSED:
                if self.authenticated:
                    # the backend's session is logged in: it cannot be taken back
                    self._close(out, "policy_deny")
                    return out
                self.state = State.COMMAND
                self._drain_client(out)
            return out
        self._send(out, reply)
        if self.authenticated:
            # logged in: from here on the transcript keeps only refused commands
            self.transcript.active = False
        self.state = State.COMMAND
        self._drain_client(out)
        return out

    def finish(self) -> list[SessionCommand]:
        """The session is over: its transcript, then the close phase (bans for how it ended)."""
        self._smtp["errors"] = self.errors
        out: list[SessionCommand] = self._transcript_event()
        out += self._close_phase()
        return out

    # ------------------------------------------------------------------ helpers

    def _forward(
        self, line: bytes, pending: Pending, out: list[SessionCommand], *, ends_group: bool
    ) -> None:
        self._inflight.append((pending, b""))
        out.append(SendToUpstream(line))
        # Keep reading pipelined commands only if the backend pipelines too and
        # the group is still open; otherwise wait for the reply first.
        if ends_group or not self.upstream_pipelining:
            self.state = State.RELAY

    def _local(self, out: list[SessionCommand], data: bytes, *, refusal: bool = False) -> None:
        """Answer a command ourselves, in order with replies still in flight.

        ``refusal``: ``data`` refuses the command (the transcript keeps it in every phase).
        """
        if refusal:
            self.transcript.refused(data)
        if self._inflight:
            # A reply of ours must not overtake the backend's replies to
            # earlier pipelined commands (RFC 2920 §3.1: replies in order).
            self._inflight.append((Pending.LOCAL, data))
        else:
            self._send(out, data)

    def _refuse(
        self,
        out: list[SessionCommand],
        reply: bytes,
        action: str | None = None,
        fields: Mapping[str, Any] | None = None,
        *,
        kind: str = "session",
    ) -> None:
        """Answer a command with an error of ours; counts towards max_errors."""
        self._local(out, reply, refusal=True)
        if action is not None:
            out.append(Emit(action, fields or {}, kind=kind, outcome="failure"))
        self._count_error(out)

    def _count_error(self, out: list[SessionCommand]) -> None:
        self.errors += 1
        # with replies in flight, _relay_reply decides once they are out
        if self.errors >= self.config.max_errors and not self._inflight:
            self._too_many_errors(out)

    def _too_many_errors(self, out: list[SessionCommand]) -> None:
        if not self.closed:
            self._send_refusal(out, R_TOO_MANY_ERRORS)
            out.append(
                Emit("smtp.too_many_errors", {"smtp.errors": self.errors}, outcome="failure")
            )
            self._close(out, "too_many_errors")

    def _protocol_error(self, out: list[SessionCommand], exc: RemoteProtocolError) -> None:
        self._send_refusal(out, exc.reply_hint or R_UNRECOGNIZED)
        out.append(Emit("smtp.protocol_error", {"error.message": str(exc)}, outcome="failure"))
        self._close(out, "client_protocol_error")

    # ------------------------------------------------------------------ greeting

    def begin_greet_delay(self) -> list[SessionCommand]:
        """postscreen's pregreet test: send the first line of a multi-line 220
        and give the client a moment; a client that speaks now breaks RFC 5321
        §4.3.1 ("the client MUST wait for the greeting")."""
        self._greet_open = True
        host = self.config.hostname.encode("ascii", "replace")
        out: list[SessionCommand] = []
        self._send(out, b"220-" + host + b" ESMTP\r\n")
        return out

    def pregreet(self, data: bytes) -> list[SessionCommand]:
        """The client sent ``data`` during the greet delay (b"" = it hung up)."""
        out: list[SessionCommand] = []
        if not data:
            self._close(out, "client_closed")
            return out
        self._greet_open = False
        self._smtp["pregreet"] = True
        for line in data[:2048].split(b"\n"):
            if line.strip():
                self.transcript.command(_redact_line(line))
        host = self.config.hostname.encode("ascii", "replace")
        self._send(out, b"220 " + host + b" ESMTP\r\n" + R_PREGREET)
        out.append(
            Emit(
                "smtp.pregreet",
                {"smtp.pregreet_bytes": len(data), "smtp.pregreet_preview": _preview(data, 100)},
                outcome="failure",
            )
        )
        self._close(out, "pregreet")
        return out

    def _greet_client(self, out: list[SessionCommand]) -> None:
        assert self._greeting is not None
        # after "220-host" the backend's lines complete the same multi-line reply
        self._send(out, self._greeting.to_bytes())
        self._greet_open = False
        self.state = State.COMMAND

    def _fail_upstream(
        self,
        out: list[SessionCommand],
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
        if self._greet_open:
            # a multi-line reply keeps one code: finish the 220, then say 421
            host = self.config.hostname.encode("ascii", "replace")
            self._send(out, b"220 " + host + b" ESMTP\r\n")
            self._greet_open = False
        self._send(out, R_UNAVAILABLE)
        self._close(out, reason)

    def _close(self, out: list[SessionCommand], reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self.close_reason = reason
        out.append(Close(reason))


def normalize_newlines(data: bytes, before: bytes, *, dot_pending: bool) -> bytes:
    """Turn bare CR and bare LF into CRLF without ever creating an end-of-data.

    ``before`` holds the (up to 3) raw body bytes preceding ``data`` (``b"\\r\\n"``
    at the start of a body); ``dot_pending`` says the previous piece ended in
    a bare newline.  Two things would otherwise turn a fake terminator into a
    real ``CRLF . CRLF``:

    * a line opened by a bare newline was never dot-stuffed by the client
      (it did not see a line there), so a "." opening it gets one more;
    * a dot-only line opened by a real CRLF but closed by a bare newline
      (``CRLF . LF``) becomes ``..`` -- the receiver unstuffs it back to ".".
    """
    ctx = before + data
    off = len(before)

    def repl(m: re.Match[bytes]) -> bytes:
        i = m.start() + off
        extra = b"." if ctx[i - 1 : i] == b"." and ctx[max(i - 3, 0) : i - 1] == b"\r\n" else b""
        return extra + b"\r\n" + (b".." if m.group(1) else b"")

    out = _BARE_NEWLINE.sub(repl, data)
    if dot_pending and data.startswith(b"."):
        out = b"." + out
    return out


def _redact_line(line: bytes) -> bytes:
    """A raw client line for the transcript: AUTH data and a POP3 PASS become ``***``."""
    if line[:5].upper() == b"PASS ":
        return b"PASS ***"
    return redact_auth_line(line.rstrip(b"\r\n"))


def _preview(data: bytes, limit: int = 200) -> str:
    """A loggable preview of injected bytes, with SASL material redacted."""
    lines = data[:limit].split(b"\n")
    shown = []
    for raw in lines:
        line = raw
        if line[:4].upper() == b"AUTH":
            parts = line.split(b" ", 2)
            line = b" ".join(parts[:2]) + (b" ***" if len(parts) > 2 else b"")
        shown.append(line.decode("ascii", "backslashreplace"))
    return "\\n".join(shown)
