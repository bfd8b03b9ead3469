"""Backend connections: an address list tried in order, unhealthy ones last.

A backend that refused or timed out is marked unhealthy for
:data:`UNHEALTHY_FOR` seconds; while it is, the other addresses are tried
before it (never skipped outright: if every address is marked, all are tried
in order, because a wrong guess about health must not take mail down).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import final

import trio

from mailmoat.config import Address, BackendConfig

from .tls import TlsError, TlsStream, client_context

UNHEALTHY_FOR = 30.0


@final
class BackendUnavailable(Exception):
    """No address of the backend could be reached; ``attempts`` says why per address."""

    def __init__(self, attempts: list[tuple[Address, str]]) -> None:
        super().__init__("; ".join(f"{a}: {why}" for a, why in attempts) or "no address")
        self.attempts = attempts


@final
@dataclass
class BackendPool:
    config: BackendConfig
    _unhealthy_until: dict[Address, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tls_context = (
            client_context(
                verify=self.config.verify,
                ca_file=self.config.ca,
                pin_sha256=self.config.pin_sha256,
            )
            if self.config.tls != "none"
            else None
        )

    def order(self) -> list[Address]:
        now = trio.current_time()
        healthy = [a for a in self.config.address if self._unhealthy_until.get(a, 0.0) <= now]
        sick = [a for a in self.config.address if a not in healthy]
        return healthy + sick

    def mark_unhealthy(self, address: Address) -> None:
        self._unhealthy_until[address] = trio.current_time() + UNHEALTHY_FOR

    async def connect(self, prefix: bytes = b"") -> tuple[trio.abc.Stream, Address]:
        """Open a connection to the first address that answers.

        ``prefix`` (a PROXY protocol header) is sent first, before any TLS.
        With ``tls = "implicit"`` the TLS handshake is part of connecting;
        a handshake failure is not retried on the next address (a MITM or a
        misconfiguration is not a health problem) and raises :class:`TlsError`.
        """
        attempts: list[tuple[Address, str]] = []
        for address in self.order():
            try:
                with trio.fail_after(self.config.connect_timeout):
                    stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
            except trio.TooSlowError:
                attempts.append((address, "connect timeout"))
                self.mark_unhealthy(address)
                continue
            except OSError as exc:
                attempts.append((address, exc.strerror or type(exc).__name__))
                self.mark_unhealthy(address)
                continue
            self._unhealthy_until.pop(address, None)
            if prefix:
                try:
                    await stream.send_all(prefix)
                except trio.BrokenResourceError:
                    attempts.append((address, "closed while sending the PROXY header"))
                    await trio.aclose_forcefully(stream)
                    continue
            if self.config.tls == "implicit":
                stream = await self.start_tls(stream, address)
            return stream, address
        raise BackendUnavailable(attempts)

    async def start_tls(self, stream: trio.abc.Stream, address: Address) -> TlsStream:
        """The client-side handshake to ``address``.

        The certificate must name ``server_name`` or, when that is not set,
        the host mailmoat connected to (a name, or an IP literal matched
        against the certificate's IP addresses); a pin replaces both.
        Without a name check, any certificate a trusted CA issued to anyone
        would let an on-path box read the relayed credentials.
        """
        assert self.tls_context is not None
        tls = TlsStream(
            stream,
            self.tls_context,
            server_side=False,
            server_hostname=self.config.server_name or address.host,
        )
        try:
            with trio.fail_after(self.config.connect_timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise TlsError("handshake timeout") from None
        except (TlsError, trio.BrokenResourceError):
            await trio.aclose_forcefully(stream)
            raise
        return tls
