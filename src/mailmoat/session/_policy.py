"""The rule engine as a session sees it: one context, filled in as the session goes.

Contract: a :class:`Judge` belongs to one session.  It keeps the session's
rule context (a sparse nested dict in the shape of
:func:`mailmoat.policy.default_context`; the engine fills absent fields with
their zero values), its risk score and tags, and whether an ``allow`` in the
connect phase made the session trusted.  :meth:`Judge.evaluate` fetches the
holder's *current* rule set every time, so a reload reaches sessions in
flight at their next phase.  A phase without rules costs two dict lookups.

:meth:`Judge.events` turns a verdict into ``rule.match`` events: one per
matching rule, with the rule's id, name, severity and action, what was done
(``verdict.action``; ``detect`` for a rule in detect mode) and, as
``verdict.evidence``, the context fields the condition read.  The context
never holds a password, so neither do the events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal, final

from mailmoat.detect.login import LoginFacts
from mailmoat.policy import PASS, EvalCache, RuleHolder, Verdict

from ._transcript import Transcript
from .commands import ClientHelloFacts, Close, Emit, SendToClient

#: phases with no command to refuse: ``reject`` there ends the session like ``deny``
SESSION_PHASES: Final = frozenset({"connect", "tls", "close"})


@final
class Judge:
    """Per-session rule evaluation; see the module docstring."""

    __slots__ = ("cache", "ctx", "holder", "protocol", "risk_score", "tags", "trusted")

    def __init__(
        self,
        holder: RuleHolder | None,
        protocol: str,
        *,
        session_id: str,
        listener: str,
        client_ip: str,
        client_port: int,
    ) -> None:
        self.holder = holder
        self.protocol = protocol
        self.risk_score = 0
        self.tags: list[str] = []
        self.trusted = False
        self.cache = EvalCache()
        self.ctx: dict[str, dict[str, Any]] = {
            "session": {"id": session_id, "protocol": protocol, "listener": listener},
            "client": {"ip": client_ip, "port": client_port},
            "tls": {},
            "auth": {},
            "login": {},
            protocol: {},
        }

    def has(self, phase: str) -> bool:
        holder = self.holder
        return holder is not None and not self.trusted and holder.current.has(self.protocol, phase)

    def evaluate(self, phase: str) -> Verdict:
        holder = self.holder
        if holder is None or self.trusted:
            return PASS
        rules = holder.current
        if not rules.has(self.protocol, phase):
            return PASS
        self.ctx["session"]["phase"] = phase
        verdict = rules.evaluate(
            self.protocol, phase, self.ctx, risk_score=self.risk_score, cache=self.cache
        )
        if verdict.score:
            self.risk_score += verdict.score
        for tag in verdict.tags:
            if tag not in self.tags:
                self.tags.append(tag)
        if verdict.action == "allow" and phase == "connect":
            self.trusted = True
        return verdict

    def events(self, verdict: Verdict, phase: str) -> list[Emit]:
        out: list[Emit] = []
        for m in verdict.matches:
            rule = m.rule
            if m.detect_only:
                done = "detect"
            elif rule is verdict.rule:
                done = verdict.action
            else:
                done = rule.action  # log, tag, score, tarpit: they never decide
            fields: dict[str, Any] = {
                "rule.id": rule.id,
                "rule.name": rule.name,
                "rule.severity": rule.severity,
                "rule.action": rule.action,
                "rule.phase": phase,
                "rule.source": f"{rule.source}:{rule.line}" if rule.line else rule.source,
                "verdict.action": done,
                "verdict.evidence": dict(m.fields),
                "risk.score": self.risk_score,
            }
            if rule.tags:
                fields["rule.tags"] = list(rule.tags)
            if m.detect_only and verdict.would_have is not None:
                fields["verdict.would_have"] = verdict.would_have
            out.append(
                Emit(
                    "rule.match",
                    fields,
                    kind="verdict",
                    outcome="success"
                    if done in ("log", "tag", "score", "allow", "detect")
                    else "failure",
                )
            )
        if verdict.threshold is not None:
            out.append(
                Emit(
                    "risk.threshold",
                    {"risk.score": self.risk_score, "verdict.action": verdict.threshold},
                    kind="verdict",
                    outcome="failure",
                )
            )
        return out


class PolicySession:
    """The connect and close phases, the same for every protocol's session.

    A session sets ``judge``, ``close_reason``, ``transcript`` and
    :attr:`BANNED_REPLY` and implements ``_apply`` (run a phase, carry out its
    verdict) and ``_close``.  Every byte for the client goes out through
    :meth:`_send` (the transcript sees it); a reply that refuses a command
    through :meth:`_send_refusal` (the transcript keeps it after login too).
    """

    judge: Judge
    close_reason: str | None
    transcript: Transcript
    #: what a banned client gets instead of the greeting
    BANNED_REPLY: bytes = b""
    #: what a client silent for too long gets before the close
    TIMEOUT_REPLY: bytes = b""

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def _apply(self, phase: str, out: list[Any], *, greet: bool = True) -> bool:
        raise NotImplementedError

    def _close(self, out: list[Any], reason: str) -> None:
        raise NotImplementedError

    def _fail_upstream(
        self,
        out: list[Any],
        reason: str,
        *,
        detail: str | None = None,
        already_alerted: bool = False,
    ) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ to the client

    def _send(self, out: list[Any], data: bytes) -> None:
        """Say ``data`` to the client (recorded while the transcript is active)."""
        out.append(SendToClient(data))
        self.transcript.reply(data)

    def _send_refusal(self, out: list[Any], data: bytes) -> None:
        """Refuse the last command with ``data``: recorded in every phase."""
        self._send(out, data)
        self.transcript.refused(data)

    def _transcript_event(self) -> list[Any]:
        """The ``session.transcript`` event, if anything was recorded (once)."""
        ev = self.transcript.event()
        return [] if ev is None else [ev]

    # ------------------------------------------------------------------ failures

    def _refuse_injection(self, out: list[Any], reply: bytes, injected: int, preview: str) -> None:
        """Bytes pipelined behind STARTTLS in the clear: refused, never executed (CVE-2011-0411)."""
        self._send_refusal(out, reply)
        out.append(
            Emit(
                "tls.starttls_injection",
                {
                    "tls.injected_plaintext": injected,
                    "tls.injected_preview": preview,
                    "event.severity": "high",
                    "message": "commands pipelined after STARTTLS in plaintext: "
                    "possible on-path attacker between client and mailmoat",
                },
                kind="alert",
                outcome="failure",
            )
        )
        self._close(out, "starttls_injection")

    def _backend_alert(
        self, out: list[Any], action: str, fields: Mapping[str, Any], reason: str
    ) -> None:
        """The backend misbehaved: a critical alert for the analyst, then 421/BYE and close.

        Every caller fires before any credential has been relayed: the backend
        leg is secured (or found tampered with) before the client is greeted.
        """
        out.append(
            Emit(action, {**fields, "event.severity": "critical"}, kind="alert", outcome="failure")
        )
        self._fail_upstream(out, reason, already_alerted=True)

    def _login_facts(
        self,
        facts: LoginFacts,
        travel: Mapping[str, Any] | None,
        tls: Mapping[str, Any] | None,
    ) -> None:
        """The state store's findings about a login, into the context of the login phase."""
        ctx = self.judge.ctx
        ctx["login"].update(facts.fields())
        if travel:
            ctx["login"].update(travel)
        if tls:
            ctx["tls"].update(tls)

    def _client_tls(
        self,
        version: str,
        cipher: str,
        sni: str | None,
        hello: ClientHelloFacts | None,
        handshake_ms: float | None,
    ) -> Emit:
        """Fill the ``tls.*`` context of a finished client handshake; its event."""
        tls = self.judge.ctx["tls"]
        tls.update(active=True, version=version, cipher=cipher, sni=sni or "")
        fields: dict[str, Any] = {
            "tls.version": version,
            "tls.cipher": cipher,
            "tls.sni": sni,
            "tls.leg": "client",
        }
        if hello is not None:
            tls.update(hello.context())
            fields.update(hello.event_fields())
        return Emit("tls.handshake", _timed(fields, handshake_ms), outcome="success")

    @staticmethod
    def _backend_tls(version: str, cipher: str, handshake_ms: float | None) -> Emit:
        """The event of a finished STARTTLS handshake with the backend."""
        fields = {"tls.version": version, "tls.cipher": cipher, "tls.leg": "backend"}
        return Emit("tls.handshake", _timed(fields, handshake_ms), outcome="success")

    def client_tls_failed(
        self,
        reason: str,
        hello: ClientHelloFacts | None = None,
        *,
        handshake_ms: float | None = None,
    ) -> list[Any]:
        fields: dict[str, Any] = {"tls.leg": "client", "error.message": reason}
        if hello is not None:
            fields.update(hello.event_fields())
        out: list[Any] = [Emit("tls.handshake", _timed(fields, handshake_ms), outcome="failure")]
        if hello is not None and hello.fallback_scsv and "fallback" in reason:
            # RFC 7507: the client retried with an older version although we
            # speak a newer one -- something broke its first attempt on the way
            out.append(
                Emit(
                    "tls.fallback_refused",
                    {
                        **fields,
                        "event.severity": "high",
                        "message": "client fell back to an older TLS version (TLS_FALLBACK_SCSV)"
                        ": possible downgrade attack between client and mailmoat",
                    },
                    kind="alert",
                    outcome="failure",
                )
            )
        self._close(out, "tls_failed")
        return out

    def upstream_tls_failed(self, reason: str) -> list[Any]:
        out: list[Any] = []
        fields = {"tls.leg": "backend", "error.message": reason}
        self._backend_alert(out, "backend.tls_failed", fields, "backend_tls_failed")
        return out

    def upstream_failed(self, reason: str) -> list[Any]:
        """The backend could not be reached or broke mid-session."""
        out: list[Any] = []
        self._fail_upstream(out, reason)
        return out

    def timed_out(self, side: Literal["client", "upstream"]) -> list[Any]:
        out: list[Any] = []
        if self.closed:
            return out
        if side == "client":
            self._send(out, self.TIMEOUT_REPLY)
            self._close(out, "client_timeout")
        else:
            self._fail_upstream(out, "backend_timeout")
        return out

    def _connect_phase(
        self,
        banned: bool,
        greet: bool,
        reputation: int,
        geo: Mapping[str, Any] | None,
    ) -> list[Any]:
        """Rules first (an ``allow`` trusts the session), then the ban list."""
        out: list[Any] = []
        client = self.judge.ctx["client"]
        client.update(banned=banned, reputation=reputation)
        if geo:
            client.update(geo)
        if self._apply("connect", out, greet=greet) or self.judge.trusted or not banned:
            return out
        holder = self.judge.holder
        detect = holder is not None and holder.mode == "detect"
        out.append(
            Emit(
                "client.banned",
                {"verdict.action": "detect" if detect else "deny"},
                kind="verdict",
                outcome="failure",
            )
        )
        if not detect:
            if greet:
                self._send(out, self.BANNED_REPLY)
            self._close(out, "banned")
        return out

    def _close_phase(self) -> list[Any]:
        """The close phase, once the session is over (bans for how it ended)."""
        out: list[Any] = []
        if not self.judge.has("close"):
            return out
        self.judge.ctx["session"]["close_reason"] = self.close_reason or "unknown"
        self._apply("close", out)
        return [c for c in out if not isinstance(c, SendToClient | Close)]


def _timed(fields: dict[str, Any], handshake_ms: float | None) -> dict[str, Any]:
    """``fields`` with ``tls.handshake_ms`` (the driver timed the handshake:
    a session has no clock of its own) when it is known."""
    if handshake_ms is not None:
        fields["tls.handshake_ms"] = handshake_ms
    return fields
