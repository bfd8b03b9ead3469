"""TLS over any Trio stream, with pyOpenSSL driven through memory BIOs.

Contract
--------
:class:`TlsStream` turns a plaintext :class:`trio.abc.Stream` (a TCP socket, or a
socket that has just said ``STARTTLS``) into an encrypted one, as server or
client. It behaves like any other Trio stream (it passes
``trio.testing.check_two_way_stream``) and additionally reports what the
handshake negotiated (``version``, ``cipher``, ``server_name``, ``alpn``), the
raw ClientHello records (``client_hello``, for fingerprinting) and whether the
peer went away without a ``close_notify`` (``unclean_eof``).

Failures surface as exactly three kinds of exception:

* :class:`TlsError` -- the TLS protocol failed (handshake refused, certificate
  rejected, a record did not decrypt). ``reason`` is OpenSSL's short reason.
* :class:`trio.BrokenResourceError` -- the transport broke, or the peer closed
  it before the handshake finished.
* :class:`trio.ClosedResourceError` -- we closed this stream ourselves.

Theory of operation
-------------------
OpenSSL never touches the socket. Each :class:`OpenSSL.SSL.Connection` is made
with two memory BIOs: ciphertext we receive is written into the *input* BIO
(``bio_write``), and whatever OpenSSL wants to put on the wire accumulates in
the *output* BIO (``bio_read``). Every operation (handshake, read, write,
shutdown) is therefore a synchronous OpenSSL call followed by moving bytes
between the BIOs and the transport; :meth:`TlsStream._drive` is that loop:

1. call the OpenSSL operation (never awaiting while inside OpenSSL);
2. if it produced output, send it -- output must reach the wire in the order
   OpenSSL produced it, so sends go through a strict-FIFO lock and the output
   is taken from the BIO right before queueing on that lock, with no
   checkpoint in between;
3. otherwise, if it wants input, receive one large piece (64 KiB) from the
   transport into the input BIO -- several tasks may want input at once (a
   reader and a writer during a handshake), so a counter lets a task that
   waited for the receive lock skip its own receive when somebody else
   already brought data in (receiving again could block forever);
4. retry until OpenSSL is satisfied.

Exactly one potentially blocking await happens per turn, so the loop never
acts on stale knowledge of OpenSSL's state. The handshake runs once, in the
first task that needs it; others wait for its outcome.

Throughput: ``receive_some`` drains every already-decrypted record up to
``max_bytes`` (default 64 KiB) before returning, and ``send_all`` encrypts a
whole call (in 256 KiB slices) before one ``transport.send_all``.

A TLS 1.3 server writes its session tickets right after the handshake. If we
sent them at once, a client that finishes its side, sends data and closes
could make that send fail; so the tickets are held back and go out in front
of the first thing this side sends (as BoringSSL does).

Contexts (:func:`server_context`, :func:`client_context`) are built once,
from validated files, and shared by every connection; :class:`CertStore`
rebuilds them on reload and swaps atomically, keeping the old one when the
new files are bad.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import ipaddress
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeAlias, TypeVar, final

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from mailmoat.errors import ConfigError, MailmoatError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "CertKeyPair",
    "CertStore",
    "ServerCert",
    "TlsError",
    "TlsStream",
    "client_context",
    "load_cert_pair",
    "server_context",
]

_T = TypeVar("_T")

ServerKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

_RECEIVE_SIZE: Final = 64 * 1024
"""How much ciphertext to ask the transport for at once."""
DEFAULT_MAX_BYTES: Final = 64 * 1024
"""``receive_some`` default: several full TLS records per call."""
_SEND_SLICE: Final = 256 * 1024
"""Plaintext encrypted per ``transport.send_all``; bounds the ciphertext buffered at once."""
_RECORD_PLAINTEXT_MAX: Final = 16 * 1024
"""RFC 8446 5.1: "The length MUST NOT exceed 2^14 bytes." One SSL_read returns at most this."""
CLIENT_HELLO_LIMIT: Final = 16 * 1024 + 5
"""Bound on :attr:`TlsStream.client_hello`: one maximal record and its header."""

_VERSIONS: Final = {
    "1.0": SSL.TLS1_VERSION,
    "1.1": SSL.TLS1_1_VERSION,
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}
_LEGACY_VERSIONS: Final = frozenset({"1.0", "1.1"})


class TlsError(MailmoatError):
    """The TLS protocol failed: handshake refused, certificate rejected, bad record.

    ``reason`` is a short, stable description: OpenSSL's reason string (e.g.
    ``"unsupported protocol"``, ``"no shared cipher"``, ``"certificate verify
    failed"``) or one of ours (``"certificate hostname mismatch"``,
    ``"certificate pin mismatch"``). It describes our side's view and never
    contains peer data, so it is safe to log.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"TLS failure: {reason}")
        self.reason = reason


def _tls_error(exc: SSL.Error) -> TlsError:
    if isinstance(exc, SSL.SysCallError):
        return TlsError("unexpected eof")
    queue = exc.args[0] if exc.args else None
    if isinstance(queue, list):
        for entry in queue:
            if isinstance(entry, tuple) and len(entry) == 3 and entry[2]:
                return TlsError(str(entry[2]))
    return TlsError("unknown error")


class _TransportEof(Exception):
    """Internal: OpenSSL needs more ciphertext but the transport has ended."""


class _State(enum.Enum):
    OPEN = enum.auto()
    BROKEN = enum.auto()
    CLOSED = enum.auto()


class _Handshake(enum.Enum):
    PENDING = enum.auto()
    RUNNING = enum.auto()
    DONE = enum.auto()


class _OneCaller:
    """Raise BusyResourceError when a second task enters while one is inside."""

    __slots__ = ("_busy", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._busy = False

    def __enter__(self) -> None:
        if self._busy:
            raise trio.BusyResourceError(self._message)
        self._busy = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._busy = False


class _ClientHelloRecorder:
    """Keeps the handshake records that carry the first handshake message.

    RFC 8446 5.1: handshake messages "MAY be coalesced into a single
    TLSPlaintext record or fragmented across several records", so records are
    collected until the ClientHello's own length is covered, up to
    :data:`CLIENT_HELLO_LIMIT` bytes. Anything that is not a handshake record
    carrying a ClientHello records nothing.
    """

    __slots__ = ("_buffer", "captured", "done")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.captured = b""
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._buffer += data[: CLIENT_HELLO_LIMIT - len(self._buffer)]
        self._scan()

    def _finish(self, captured: bytes) -> None:
        self.captured = captured
        self.done = True
        self._buffer = bytearray()

    def _scan(self) -> None:
        buffer = self._buffer
        pos = 0
        handshake = bytearray()
        while len(buffer) - pos >= 5:
            if buffer[pos] != 0x16:  # ContentType.handshake
                self._finish(bytes(buffer[:pos]) if handshake else b"")
                return
            end = pos + 5 + int.from_bytes(buffer[pos + 3 : pos + 5], "big")
            if end > len(buffer):
                break
            handshake += buffer[pos + 5 : end]
            pos = end
            if len(handshake) >= 4:
                if handshake[0] != 0x01:  # HandshakeType.client_hello
                    self._finish(b"")
                    return
                if len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
                    self._finish(bytes(buffer[:pos]))
                    return
        if len(buffer) >= CLIENT_HELLO_LIMIT:
            self._finish(bytes(buffer))  # bounded: keep the truncated prefix


@dataclass(frozen=True, slots=True)
class _ClientPolicy:
    """Post-handshake checks a client context asks :class:`TlsStream` to make."""

    check_hostname: bool
    pin_sha256: bytes | None


@final
class TlsStream(trio.abc.Stream):
    """TLS over ``transport``; see the module docstring for the design.

    ``initial_data`` is ciphertext already read from the transport (e.g. bytes
    that arrived behind a ``STARTTLS`` line); it is given to OpenSSL first.
    Client side: ``server_hostname`` is sent as SNI (unless it is an IP
    address) and, if the context verifies, checked against the leaf
    certificate's subjectAltName after the handshake.

    ``aclose`` sends ``close_notify`` without waiting for the peer's, then
    closes the transport. Like any ``send_all``, that send can block on a peer
    that does not read; bound it with a timeout. If another task is blocked in
    a send, the close is not graceful (sending would interleave) and the
    transport is simply closed, which wakes that task with
    ``ClosedResourceError``.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        initial_data: bytes = b"",
    ) -> None:
        self._transport = transport
        self._server_side = server_side
        self._conn = SSL.Connection(context, None)
        self._policy: _ClientPolicy | None = None
        self._sni: str | None = None
        self._hostname: str | None = None
        if server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
            app_data = context.get_app_data()
            if isinstance(app_data, _ClientPolicy):
                self._policy = app_data
            if server_hostname is not None:
                self._hostname = _normalize_hostname(server_hostname)
                if not _is_ip_address(self._hostname):
                    # RFC 6066 3: 'Literal IPv4 and IPv6 addresses are not permitted in "HostName".'
                    self._sni = self._hostname
                    self._conn.set_tlsext_host_name(self._sni.encode("ascii"))
        self._hello = _ClientHelloRecorder() if server_side else None

        self._state = _State.OPEN
        self._handshake = _Handshake.PENDING
        self._handshake_finished = trio.Event()
        self._send_lock = trio.StrictFIFOLock()
        self._receive_lock = trio.Lock()
        self._receive_count = 0
        self._transport_eof = False
        self._held_output = b""
        self._eof = False
        self._unclean_eof = False
        self._deferred_error: SSL.Error | None = None
        self._send_guard = _OneCaller("another task is sending on this TlsStream")
        self._receive_guard = _OneCaller("another task is receiving on this TlsStream")

        self._version: str | None = None
        self._cipher: str | None = None
        self._server_name: str | None = None
        self._alpn: str | None = None

        if initial_data:
            self._feed(initial_data)

    # ---- what the handshake negotiated -------------------------------------

    @property
    def transport(self) -> trio.abc.Stream:
        return self._transport

    @property
    def server_side(self) -> bool:
        return self._server_side

    @property
    def version(self) -> str | None:
        """Protocol version, e.g. ``"TLSv1.3"``; None before the handshake."""
        return self._version

    @property
    def cipher(self) -> str | None:
        """Cipher suite, e.g. ``"TLS_AES_256_GCM_SHA384"``; None before the handshake."""
        return self._cipher

    @property
    def server_name(self) -> str | None:
        """Server side: the SNI the client sent. Client side: the SNI we sent."""
        return self._server_name if self._server_side else self._sni

    @property
    def alpn(self) -> str | None:
        """The negotiated ALPN protocol, or None."""
        return self._alpn

    @property
    def client_hello(self) -> bytes:
        """Server side: the raw record(s) carrying the ClientHello, as received; else b""."""
        return self._hello.captured if self._hello is not None else b""

    @property
    def unclean_eof(self) -> bool:
        """True once the transport ended after the handshake without a ``close_notify``."""
        return self._unclean_eof

    def peer_certificate_chain(self) -> list[x509.Certificate]:
        """The certificates the peer presented, leaf first; [] if none (yet)."""
        leaf = self._conn.get_peer_certificate(as_cryptography=True)
        if leaf is None:
            return []
        chain = self._conn.get_peer_cert_chain(as_cryptography=True) or []
        # OpenSSL includes the leaf in the chain on the client side only.
        if chain and chain[0] == leaf:
            return chain
        return [leaf, *chain]

    # ---- trio.abc.Stream ----------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake if it has not run yet; idempotent.

        Raises :class:`TlsError` if the TLS protocol fails (including our
        client-side hostname and pin checks), ``BrokenResourceError`` if the
        transport breaks or ends first. Either leaves the stream broken.
        """
        self._check_state()
        if self._handshake is _Handshake.DONE:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_handshake()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_guard:
            self._check_state()
            await self._ensure_handshake()
            view = memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            for start in range(0, len(view), _SEND_SLICE):
                piece = view[start : start + _SEND_SLICE]
                try:
                    await self._drive(self._writer(piece), output_hint=_ciphertext_size(len(piece)))
                except _TransportEof as exc:  # only a renegotiation could make a write read
                    self._mark_broken()
                    raise trio.BrokenResourceError("transport ended during a TLS write") from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receive_guard:
            if max_bytes is None:
                max_bytes = DEFAULT_MAX_BYTES
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_state()
            await self._ensure_handshake()
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            if self._deferred_error is not None:
                error, self._deferred_error = self._deferred_error, None
                self._mark_broken()
                raise _tls_error(error) from error
            try:
                return await self._drive(lambda: self._read_plaintext(max_bytes))
            except _TransportEof:
                # The handshake authenticated the peer; a missing close_notify can
                # only truncate, and the application protocol (SMTP ".", IMAP
                # tagged replies) detects truncation itself. Report it, do not fail.
                self._eof = True
                self._unclean_eof = True
                return b""

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard:
            self._check_state()
            # A receive_some may be sending handshake output right now; the lock
            # keeps us from using the transport's send side concurrently with it.
            async with self._send_lock:
                await self._transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        graceful = (
            self._state is _State.OPEN
            and self._handshake is _Handshake.DONE
            and not self._send_lock.locked()
        )
        self._state = _State.CLOSED
        if not graceful:
            await self._transport.aclose()
            return
        sent = False
        try:
            # One SSL_shutdown: send our close_notify, do not wait for the peer's.
            # RFC 8446 6.1 allows the initiator to close its read side at once.
            with contextlib.suppress(
                TlsError,
                _TransportEof,
                trio.BrokenResourceError,
                trio.BusyResourceError,
                trio.ClosedResourceError,
            ):
                await self._drive(self._shutdown_once)
            sent = True
        finally:
            if sent:
                await self._transport.aclose()
            else:
                await trio.aclose_forcefully(self._transport)

    # ---- internals ----------------------------------------------------------

    def _check_state(self) -> None:
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TlsStream is broken")
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TlsStream was closed")

    def _mark_broken(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.BROKEN

    def _feed(self, data: bytes) -> None:
        if self._hello is not None:
            self._hello.feed(data)
        self._conn.bio_write(data)

    def _drain_output(self, hint: int) -> bytes:
        parts: list[bytes] = []
        while True:
            try:
                parts.append(self._conn.bio_read(hint))
            except SSL.WantReadError:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _writer(self, piece: memoryview) -> Callable[[], None]:
        # Resumable: after WantReadError SSL_write must be retried with the rest.
        offset = 0

        def write() -> None:
            nonlocal offset
            while offset < len(piece):
                offset += self._conn.send(piece[offset:])

        return write

    def _read_plaintext(self, max_bytes: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while total < max_bytes:
            try:
                chunk = self._conn.recv(min(max_bytes - total, _RECORD_PLAINTEXT_MAX))
            except SSL.WantReadError:
                if parts:
                    break
                raise
            except SSL.ZeroReturnError:
                self._eof = True  # close_notify
                break
            except SSL.Error as exc:
                if not parts:
                    raise
                self._deferred_error = exc  # deliver the good data first
                break
            parts.append(chunk)
            total += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _shutdown_once(self) -> None:
        # WantReadError means "waiting for the peer's close_notify": exactly what we skip.
        with contextlib.suppress(SSL.WantReadError):
            self._conn.shutdown()

    async def _ensure_handshake(self) -> None:
        if self._handshake is _Handshake.DONE:
            return
        if self._handshake is _Handshake.RUNNING:
            # Another task is running it; its failure leaves us BROKEN (or CLOSED).
            await self._handshake_finished.wait()
            self._check_state()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        self._handshake = _Handshake.RUNNING
        try:
            await self._drive(self._conn.do_handshake, handshake=True)
            self._after_handshake()
        except _TransportEof:
            self._mark_broken()
            raise trio.BrokenResourceError("transport ended during the TLS handshake") from None
        except BaseException:
            self._mark_broken()
            raise
        else:
            self._handshake = _Handshake.DONE
        finally:
            self._handshake_finished.set()

    def _after_handshake(self) -> None:
        conn = self._conn
        self._version = conn.get_protocol_version_name()
        self._cipher = conn.get_cipher_name()
        alpn = conn.get_alpn_proto_negotiated()
        self._alpn = alpn.decode("latin-1") if alpn else None
        if self._server_side:
            sni = conn.get_servername()
            self._server_name = sni.decode("ascii", "replace") if sni else None
            return
        policy = self._policy
        if policy is None:
            return
        chain = self.peer_certificate_chain()
        if not chain:
            raise TlsError("no peer certificate")
        leaf = chain[0]
        if policy.pin_sha256 is not None:
            if not hmac.compare_digest(spki_sha256(leaf), policy.pin_sha256):
                raise TlsError("certificate pin mismatch")
        elif (
            policy.check_hostname
            and self._hostname is not None
            and not _certificate_matches(leaf, self._hostname)
        ):
            raise TlsError("certificate hostname mismatch")

    async def _drive(
        self,
        operation: Callable[[], _T],
        *,
        handshake: bool = False,
        output_hint: int = _RECORD_PLAINTEXT_MAX,
    ) -> _T:
        """Run ``operation`` until OpenSSL is satisfied, moving ciphertext as it asks.

        Raises :class:`_TransportEof` when OpenSSL wants input the transport no
        longer has; callers decide what that means.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        yielded = False
        while True:
            try:
                result = operation()
            except SSL.WantReadError:
                pass
            except SSL.Error as exc:
                self._mark_broken()
                alert = self._drain_output(output_hint)
                if alert:
                    await self._send_alert(alert)
                raise _tls_error(exc) from exc
            else:
                output = self._drain_output(output_hint)
                if (
                    handshake
                    and self._server_side
                    and self._conn.get_protocol_version_name() == "TLSv1.3"
                ):
                    self._held_output += output  # session tickets: see the module docstring
                    output = b""
                if output:
                    await self._send_output(output)
                elif not yielded:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return result
            # OpenSSL needs input. Whatever it wrote meanwhile goes out first.
            output = self._drain_output(output_hint)
            if output:
                yielded = True
                await self._send_output(output)
            elif self._transport_eof:
                if not yielded:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                raise _TransportEof
            else:
                yielded = True
                await self._receive_input()

    async def _send_output(self, output: bytes) -> None:
        try:
            async with self._send_lock:
                if self._held_output:
                    output, self._held_output = self._held_output + output, b""
                await self._transport.send_all(output)
        except trio.BrokenResourceError as exc:
            self._mark_broken()
            raise trio.BrokenResourceError("transport broke while sending TLS data") from exc
        except BaseException:
            # Ciphertext taken from the BIO was (partly) lost: the TLS stream is desynchronised.
            self._mark_broken()
            raise

    async def _send_alert(self, alert: bytes) -> None:
        """Best effort: tell the peer why we fail (an alert) before raising."""
        if self._send_lock.locked():
            return
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError
        ):
            await self._send_output(alert)

    async def _receive_input(self) -> None:
        seen = self._receive_count
        async with self._receive_lock:
            if seen != self._receive_count:
                return  # another task brought input while we waited; retry OpenSSL first
            try:
                data = await self._transport.receive_some(_RECEIVE_SIZE)
            except trio.BrokenResourceError as exc:
                self._mark_broken()
                raise trio.BrokenResourceError("transport broke while receiving TLS data") from exc
            self._receive_count += 1
            if data:
                self._feed(bytes(data))
            else:
                self._transport_eof = True


def _ciphertext_size(plaintext: int) -> int:
    # Per 16 KiB record: 5 header + up to 16 tag/MAC + padding; 1/64 is ample headroom.
    return plaintext + plaintext // 64 + 1024


# ---- names and identities ---------------------------------------------------


def spki_sha256(certificate: x509.Certificate) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: the value ``pin_sha256`` compares."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def _normalize_hostname(name: str) -> str:
    name = name.strip().rstrip(".").lower()
    if not name.isascii():
        name = name.encode("idna").decode("ascii")
    return name


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _dns_name_matches(pattern: str, hostname: str) -> bool:
    """RFC 6125 6.4.3: a ``*`` may stand for the whole left-most label, and only it."""
    pattern = pattern.rstrip(".").lower()
    if not pattern.startswith("*."):
        return pattern == hostname
    suffix = pattern[2:]
    label, _, rest = hostname.partition(".")
    return bool(label) and "." in suffix and "*" not in suffix and rest == suffix


def _certificate_matches(certificate: x509.Certificate, hostname: str) -> bool:
    """Client-side identity check against subjectAltName only (RFC 6125 6.4.4: no CN fallback)."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if _is_ip_address(hostname):
        address = ipaddress.ip_address(hostname)
        return address in san.get_values_for_type(x509.IPAddress)
    return any(_dns_name_matches(p, hostname) for p in san.get_values_for_type(x509.DNSName))


def _certificate_dns_names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = [
            str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    else:
        names = san.get_values_for_type(x509.DNSName)
    return tuple(n.rstrip(".").lower() for n in names)


# ---- certificates and contexts -----------------------------------------------


@dataclass(frozen=True, slots=True)
class CertKeyPair:
    """Where a server certificate chain (PEM, leaf first) and its private key live."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class ServerCert:
    """A loaded, checked certificate chain and its key."""

    source: CertKeyPair
    chain: tuple[x509.Certificate, ...]
    key: ServerKey = field(repr=False)
    dns_names: tuple[str, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror or exc}", str(path)) from exc


def load_cert_pair(pair: CertKeyPair) -> ServerCert:
    """Load and check a certificate chain and its key; ConfigError names the bad file."""
    cert_pem = _read_file(pair.cert_file, "certificate file")
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_pem))
    except ValueError as exc:
        raise ConfigError("no valid PEM certificate in file", str(pair.cert_file)) from exc
    key_pem = _read_file(pair.key_file, "private key file")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: the key is encrypted
        raise ConfigError(
            "no valid unencrypted PEM private key in file", str(pair.key_file)
        ) from exc
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise ConfigError(f"unsupported private key type {type(key).__name__}", str(pair.key_file))
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != chain[0].public_key().public_bytes(*public):
        raise ConfigError(
            f"private key does not match the certificate in {pair.cert_file}",
            str(pair.key_file),
        )
    return ServerCert(pair, chain, key, _certificate_dns_names(chain[0]))


def _version_constant(min_version: str) -> int:
    try:
        return _VERSIONS[min_version]
    except KeyError:
        raise ConfigError(
            f"min_version must be one of {', '.join(_VERSIONS)}, not {min_version!r}"
        ) from None


def _base_context(min_version: str) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(_version_constant(min_version))
    if min_version in _LEGACY_VERSIONS:
        # OpenSSL 3 refuses TLS 1.0/1.1 (SHA-1 signatures) above security level 0.
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    return ctx


class _AlpnSelector:
    """Server preference order wins (RFC 7301 3.2: the server selects)."""

    __slots__ = ("_preferred",)

    def __init__(self, preferred: tuple[bytes, ...]) -> None:
        self._preferred = preferred

    def __call__(
        self, conn: SSL.Connection, offered: list[bytes]
    ) -> bytes | SSL._NoOverlappingProtocols:
        for protocol in self._preferred:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS


def _check_alpn(alpn: Sequence[bytes]) -> tuple[bytes, ...]:
    protocols = tuple(alpn)
    for protocol in protocols:
        # RFC 7301 3.1: "Empty strings MUST NOT be included"; lengths are one byte.
        if not 1 <= len(protocol) <= 255:
            raise ConfigError(f"invalid ALPN protocol id {protocol!r}")
    return protocols


def _context_for(cert: ServerCert, min_version: str, alpn: tuple[bytes, ...]) -> SSL.Context:
    ctx = _base_context(min_version)
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    try:
        ctx.use_certificate(cert.leaf)
        for extra in cert.chain[1:]:
            ctx.add_extra_chain_cert(extra)
    except SSL.Error as exc:  # e.g. "ee key too small" at the security level
        raise ConfigError(
            f"certificate refused by OpenSSL: {_tls_error(exc).reason}",
            str(cert.source.cert_file),
        ) from exc
    try:
        ctx.use_privatekey(cert.key)
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise ConfigError(
            f"private key refused by OpenSSL: {_tls_error(exc).reason}",
            str(cert.source.key_file),
        ) from exc
    if alpn:
        ctx.set_alpn_select_callback(_AlpnSelector(alpn))
    return ctx


class _SniSelector:
    """Picks the context whose certificate names the SNI: exact name, then wildcard."""

    __slots__ = ("_exact", "_wildcard")

    def __init__(self, entries: Sequence[tuple[ServerCert, SSL.Context]]) -> None:
        self._exact: dict[str, SSL.Context] = {}
        self._wildcard: dict[str, SSL.Context] = {}
        for cert, ctx in entries:
            for name in cert.dns_names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], ctx)
                else:
                    self._exact.setdefault(name, ctx)

    def lookup(self, name: str) -> SSL.Context | None:
        found = self._exact.get(name)
        if found is None and "." in name:
            found = self._wildcard.get(name.partition(".")[2])
        return found

    def __call__(self, conn: SSL.Connection) -> None:
        # Must not raise: pyOpenSSL turns an exception here into a fatal alert.
        raw = conn.get_servername()
        if not raw:
            return  # no SNI: the default (first) certificate
        try:
            name = raw.decode("ascii").rstrip(".").lower()
        except UnicodeDecodeError:
            return
        found = self.lookup(name)
        if found is not None and found is not conn.get_context():
            conn.set_context(found)


def _build_server_context(
    certs: Sequence[ServerCert], min_version: str, alpn: Sequence[bytes]
) -> SSL.Context:
    if not certs:
        raise ConfigError("at least one certificate is required")
    protocols = _check_alpn(alpn)
    contexts = [_context_for(cert, min_version, protocols) for cert in certs]
    if len(contexts) > 1:
        # Every context gets identical settings: after set_context, OpenSSL
        # consults the new context's callbacks (ALPN) for the rest of the handshake.
        selector = _SniSelector(list(zip(certs, contexts, strict=True)))
        contexts[0].set_tlsext_servername_callback(selector)
    return contexts[0]


def server_context(
    certs: Sequence[CertKeyPair], *, min_version: str = "1.2", alpn: Sequence[bytes] = ()
) -> SSL.Context:
    """A server context serving ``certs`` (chosen by SNI; the first is the default).

    ``min_version`` is one of "1.0", "1.1", "1.2", "1.3"; allowing 1.0/1.1
    lowers OpenSSL's security level to 0, and only then. Compression and
    renegotiation are off, the server's cipher order wins, OpenSSL's default
    cipher list is kept otherwise. ``alpn`` lists protocols in our preference.
    Raises ConfigError (naming the file) when anything is wrong.
    """
    return _build_server_context([load_cert_pair(p) for p in certs], min_version, alpn)


def client_context(
    *,
    verify: bool = True,
    ca_file: Path | None = None,
    min_version: str = "1.2",
    pin_sha256: bytes | None = None,
    alpn: Sequence[bytes] = (),
) -> SSL.Context:
    """A client context for connecting to upstream servers.

    ``verify``: the chain must verify against ``ca_file`` (or the system's
    trust store) and, when the stream is given ``server_hostname``, the leaf's
    subjectAltName must match it (checked by :class:`TlsStream`, since OpenSSL
    is not asked to). ``pin_sha256``: instead of all that, the SHA-256 of the
    leaf's DER SubjectPublicKeyInfo must equal the pin (see :func:`spki_sha256`).
    """
    ctx = _base_context(min_version)
    if pin_sha256 is not None:
        if len(pin_sha256) != hashlib.sha256().digest_size:
            raise ConfigError("pin_sha256 must be a 32-byte SHA-256 digest")
        ctx.set_verify(SSL.VERIFY_NONE)
    elif verify:
        ctx.set_verify(SSL.VERIFY_PEER)
        if ca_file is not None:
            _read_file(ca_file, "CA file")  # a readable-file error names the problem better
            try:
                ctx.load_verify_locations(str(ca_file))
            except SSL.Error as exc:
                raise ConfigError(
                    f"no usable CA certificates: {_tls_error(exc).reason}", str(ca_file)
                ) from exc
        else:
            ctx.set_default_verify_paths()
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    protocols = _check_alpn(alpn)
    if protocols:
        ctx.set_alpn_protos(list(protocols))
    policy = _ClientPolicy(check_hostname=verify and pin_sha256 is None, pin_sha256=pin_sha256)
    ctx.set_app_data(policy)
    return ctx


@final
class CertStore:
    """The current server context; :meth:`reload` swaps in a fresh one from the same files.

    A failed reload keeps serving the old context and raises ConfigError, so
    a bad file on SIGHUP never takes the listener down. Connections already
    running keep whichever context they started with.
    """

    def __init__(
        self, certs: Sequence[CertKeyPair], *, min_version: str = "1.2", alpn: Sequence[bytes] = ()
    ) -> None:
        self._pairs = tuple(certs)
        self._min_version = min_version
        self._alpn = tuple(alpn)
        self._certs, self._context = self._build()
        self._generation = 1

    def _build(self) -> tuple[tuple[ServerCert, ...], SSL.Context]:
        certs = tuple(load_cert_pair(p) for p in self._pairs)
        return certs, _build_server_context(certs, self._min_version, self._alpn)

    @property
    def context(self) -> SSL.Context:
        return self._context

    @property
    def certs(self) -> tuple[ServerCert, ...]:
        """The certificates behind the current context (for expiry monitoring)."""
        return self._certs

    @property
    def generation(self) -> int:
        """Counts successful loads, starting at 1."""
        return self._generation

    def reload(self) -> None:
        """Rebuild from the same files; on ConfigError the old context stays current."""
        certs, context = self._build()  # raises before anything is replaced
        self._certs, self._context = certs, context
        self._generation += 1
