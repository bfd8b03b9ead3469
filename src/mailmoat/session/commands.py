"""What a session asks its driver to do.

Sessions are pure: they return a list of these commands and the driver
(``mailmoat.net``) executes them in order.  Commands that need the outside
world (a TLS handshake, the state store) are answered by the driver calling
back into the session; the commands the callback returns run next, in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, final


@final
@dataclass(frozen=True, slots=True)
class SendToClient:
    data: bytes


@final
@dataclass(frozen=True, slots=True)
class SendToUpstream:
    data: bytes


@final
@dataclass(frozen=True, slots=True)
class StartClientTls:
    """Run the server-side TLS handshake on the client leg, then call
    the session's ``client_tls_started`` (or ``client_tls_failed``)."""


@final
@dataclass(frozen=True, slots=True)
class StartUpstreamTls:
    """Run the client-side TLS handshake on the backend leg, then call
    the session's ``upstream_tls_started`` (or ``upstream_tls_failed``)."""


@final
@dataclass(frozen=True, slots=True)
class Emit:
    action: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "session"
    outcome: str = "unknown"


@final
@dataclass(frozen=True, slots=True)
class Close:
    reason: str


@final
@dataclass(frozen=True, slots=True)
class Delay:
    """Tarpit: wait ``seconds`` before going on with the next command."""

    seconds: float


@final
@dataclass(frozen=True, slots=True)
class BanClient:
    """Ban the client address for ``seconds`` in the node's state store."""

    seconds: float
    reason: str
    rule_id: str | None = None


@final
@dataclass(frozen=True, slots=True)
class CheckLogin:
    """Record a login outcome in the state store, then call the session's
    ``login_checked`` with the :class:`~mailmoat.detect.LoginFacts`.

    ``fingerprint`` turns the node's salt into the password's fingerprint
    (distinct wrong passwords per user); the password itself never leaves
    the session's SASL observer, LOGIN command or webmail login form.
    """

    user: str
    success: bool
    fingerprint: Callable[[bytes], str | None] | None = field(
        default=None, repr=False, compare=False
    )


@final
@dataclass(frozen=True, slots=True)
class CheckMessage:
    """An authenticated user's message is complete (its final dot held back):
    count it in the state store, then call the session's ``message_checked``."""

    user: str
    recipients: tuple[str, ...]
    count: int


@final
@dataclass(frozen=True, slots=True)
class CheckInbound:
    """An unauthenticated sender's first MAIL FROM (its command held back):
    count whether this session used STARTTLS per sending domain and network,
    then call the session's ``inbound_checked`` with the
    :class:`~mailmoat.detect.tls.InboundTls` facts."""

    domain: str


@final
@dataclass(frozen=True, slots=True)
class ClientHelloFacts:
    """What the client's ClientHello offered (the driver parses it; sessions read it).

    ``error`` says why the hello could not be parsed (the handshake then
    normally fails in OpenSSL as well); the other fields are then empty.
    """

    ja3: str = ""
    ja4: str = ""
    ja4_r: str = ""
    fallback_scsv: bool = False
    max_version: str = ""
    alpn: tuple[str, ...] = ()
    error: str = ""

    def context(self) -> dict[str, Any]:
        """The ``tls.*`` rule fields."""
        return {
            "ja3": self.ja3,
            "ja4": self.ja4,
            "fallback_scsv": self.fallback_scsv,
            "client_max_version": self.max_version,
        }

    def event_fields(self) -> dict[str, Any]:
        """The ``tls.*`` fields of a ``tls.handshake`` event."""
        if self.error:
            return {"tls.client_hello_error": self.error}
        return {
            "tls.ja3": self.ja3,
            "tls.ja4": self.ja4,
            "tls.ja4_r": self.ja4_r,
            "tls.fallback_scsv": self.fallback_scsv,
            "tls.client_max_version": self.max_version,
            "tls.client_alpn": list(self.alpn),
        }


SessionCommand = (
    SendToClient
    | SendToUpstream
    | StartClientTls
    | StartUpstreamTls
    | Emit
    | Close
    | Delay
    | BanClient
    | CheckLogin
    | CheckMessage
    | CheckInbound
)
