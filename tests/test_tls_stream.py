"""TlsStream and the context builders.

Memory streams (``trio.testing``) for the stream contract and the failure
modes; real loopback TCP against the stdlib ``ssl`` module and the
``openssl s_client`` binary for interoperability.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import final

import pytest
import trio
import trio.testing
import trustme
from OpenSSL import SSL

from mailmoat.errors import ConfigError
from mailmoat.net.tls import (
    CLIENT_HELLO_LIMIT,
    CertKeyPair,
    CertStore,
    TlsError,
    TlsStream,
    _ClientHelloRecorder,
    client_context,
    load_cert_pair,
    server_context,
    spki_sha256,
)

TIMEOUT = 20.0


# ---- fixtures and helpers ---------------------------------------------------


def write_pair(ca: trustme.CA, directory: Path, stem: str, *identities: str) -> CertKeyPair:
    leaf = ca.issue_cert(*identities)
    pair = CertKeyPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    pair.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    pair.key_file.write_bytes(leaf.private_key_pem.bytes())
    return pair


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    mail: CertKeyPair  # mail.example.org
    other: CertKeyPair  # imap.example.net
    wildcard: CertKeyPair  # *.example.net
    ip: CertKeyPair  # 127.0.0.1
    untrusted: CertKeyPair  # mail.example.org, from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    rogue = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(
        ca_file=ca_file,
        mail=write_pair(ca, directory, "mail", "mail.example.org"),
        other=write_pair(ca, directory, "other", "imap.example.net"),
        wildcard=write_pair(ca, directory, "wildcard", "*.example.net"),
        ip=write_pair(ca, directory, "ip", "127.0.0.1"),
        untrusted=write_pair(rogue, directory, "untrusted", "mail.example.org"),
    )


def memory_pair(
    server_ctx: SSL.Context,
    client_ctx: SSL.Context,
    *,
    hostname: str | None = "mail.example.org",
    lockstep: bool = False,
) -> tuple[TlsStream, TlsStream]:
    client_transport: trio.abc.Stream
    server_transport: trio.abc.Stream
    if lockstep:
        client_transport, server_transport = trio.testing.lockstep_stream_pair()
    else:
        client_transport, server_transport = trio.testing.memory_stream_pair()
    client = TlsStream(client_transport, client_ctx, server_side=False, server_hostname=hostname)
    server = TlsStream(server_transport, server_ctx, server_side=True)
    return client, server


async def handshake_both(
    client: TlsStream, server: TlsStream
) -> tuple[BaseException | None, BaseException | None]:
    """Run both handshakes; return (client failure, server failure)."""
    outcome: dict[str, BaseException | None] = {}

    async def run(side: str, stream: TlsStream) -> None:
        try:
            await stream.do_handshake()
        except (TlsError, trio.BrokenResourceError) as exc:
            outcome[side] = exc
        else:
            outcome[side] = None

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "client", client)
            nursery.start_soon(run, "server", server)
    return outcome["client"], outcome["server"]


async def handshake_ok(client: TlsStream, server: TlsStream) -> None:
    assert await handshake_both(client, server) == (None, None)


def reason_of(exc: BaseException | None) -> str:
    assert isinstance(exc, TlsError), repr(exc)
    return exc.reason


@final
class RecordingStream(trio.abc.Stream):
    """Wraps a transport: records what is sent, optionally trickles what is received."""

    def __init__(self, inner: trio.abc.Stream, *, receive_limit: int | None = None) -> None:
        self.inner = inner
        self.sent: list[bytes] = []
        self.receive_limit = receive_limit

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.receive_limit is not None:
            max_bytes = self.receive_limit
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


async def receive_line(stream: trio.abc.ReceiveStream) -> bytes:
    got = bytearray()
    while not got.endswith(b"\n"):
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {bytes(got)!r}"
        got += chunk
    return bytes(got)


# ---- the trio stream contract ------------------------------------------------


@pytest.mark.parametrize(
    ("max_version", "expected"),
    [(SSL.TLS1_2_VERSION, "TLSv1.2"), (SSL.TLS1_3_VERSION, "TLSv1.3")],
)
async def test_passes_check_two_way_stream(pki: Pki, max_version: int, expected: str) -> None:
    server_ctx = server_context([pki.mail])
    client_ctx = client_context(ca_file=pki.ca_file)
    client_ctx.set_max_proto_version(max_version)

    async def stream_maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        return memory_pair(server_ctx, client_ctx)

    async def clogged_stream_maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        # Handshake first: a lockstep peer cannot unclog us while it handshakes.
        client, server = memory_pair(server_ctx, client_ctx, lockstep=True)
        await handshake_ok(client, server)
        return client, server

    with trio.fail_after(60):
        await trio.testing.check_two_way_stream(stream_maker, clogged_stream_maker)

    client, server = memory_pair(server_ctx, client_ctx)
    await handshake_ok(client, server)
    assert client.version == server.version == expected
    assert client.cipher is not None
    assert client.cipher == server.cipher


async def test_handshake_reports_what_was_negotiated(pki: Pki) -> None:
    client, server = memory_pair(server_context([pki.mail]), client_context(ca_file=pki.ca_file))
    assert (client.version, client.cipher, server.server_name) == (None, None, None)
    await handshake_ok(client, server)
    assert server.version == "TLSv1.3"
    assert server.cipher is not None
    assert server.cipher.startswith("TLS_")
    assert server.server_name == client.server_name == "mail.example.org"
    assert server.alpn is None
    chain = client.peer_certificate_chain()
    assert chain[0] == load_cert_pair(pki.mail).leaf
    # do_handshake is idempotent
    await client.do_handshake()
    await server.do_handshake()


async def test_alpn_is_negotiated_in_server_preference(pki: Pki) -> None:
    server_ctx = server_context([pki.mail], alpn=[b"imap", b"smtp"])
    client, server = memory_pair(
        server_ctx, client_context(ca_file=pki.ca_file, alpn=[b"smtp", b"imap"])
    )
    await handshake_ok(client, server)
    assert client.alpn == server.alpn == "imap"


async def test_receive_returns_many_records_and_send_flushes_once(pki: Pki) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    recording = RecordingStream(client_transport)
    client = TlsStream(
        recording,
        client_context(ca_file=pki.ca_file),
        server_side=False,
        server_hostname="mail.example.org",
    )
    server = TlsStream(server_transport, server_context([pki.mail]), server_side=True)
    await handshake_ok(client, server)

    # Three full TLS records: their ciphertext fits one 64 KiB transport read.
    payload = random.Random(1).randbytes(48 * 1024)
    before = len(recording.sent)
    await client.send_all(payload)
    assert len(recording.sent) == before + 1
    assert await server.receive_some() == payload  # all three records in one call
    await client.send_all(payload)
    assert await server.receive_some(1000) == payload[:1000]
    assert await server.receive_some(100_000) == payload[1000:]


async def test_five_megabytes_both_ways(pki: Pki) -> None:
    client, server = memory_pair(server_context([pki.mail]), client_context(ca_file=pki.ca_file))
    upload = random.Random(2).randbytes(5 * 1024 * 1024)
    download = random.Random(3).randbytes(5 * 1024 * 1024)
    received: dict[str, bytes] = {}

    async def send(stream: TlsStream, data: bytes) -> None:
        await stream.send_all(data[:1234])
        await stream.send_all(data[1234:])

    async def receive(name: str, stream: TlsStream, size: int) -> None:
        received[name] = await receive_exactly(stream, size)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, client, upload)
            nursery.start_soon(send, server, download)
            nursery.start_soon(receive, "server", server, len(upload))
            nursery.start_soon(receive, "client", client, len(download))
    assert hashlib.sha256(received["server"]).digest() == hashlib.sha256(upload).digest()
    assert received["client"] == download


# ---- EOF, close and breakage ------------------------------------------------


async def test_close_notify_is_a_clean_eof(pki: Pki) -> None:
    client, server = memory_pair(server_context([pki.mail]), client_context(ca_file=pki.ca_file))
    await handshake_ok(client, server)
    await client.send_all(b"bye")
    await client.aclose()
    assert await server.receive_some() == b"bye"
    assert await server.receive_some() == b""
    assert await server.receive_some() == b""
    assert not server.unclean_eof
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"more")


async def test_transport_eof_after_handshake_is_an_unclean_eof(pki: Pki) -> None:
    client, server = memory_pair(server_context([pki.mail]), client_context(ca_file=pki.ca_file))
    await handshake_ok(client, server)
    await client.send_all(b"partial")
    await client.transport.aclose()  # no close_notify
    assert await server.receive_some() == b"partial"
    assert not server.unclean_eof
    assert await server.receive_some() == b""
    assert server.unclean_eof


async def test_transport_eof_during_handshake_is_broken(pki: Pki) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = TlsStream(server_transport, server_context([pki.mail]), server_side=True)
    await client_transport.send_all(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes
    await client_transport.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")
    await server.aclose()


async def test_corrupted_record_raises_tls_error_then_stays_broken(pki: Pki) -> None:
    client, server = memory_pair(server_context([pki.mail]), client_context(ca_file=pki.ca_file))
    await handshake_ok(client, server)
    await client.send_all(b"good")
    # An application_data record that cannot decrypt.
    await client.transport.send_all(b"\x17\x03\x03\x00\x20" + bytes(32))
    assert await server.receive_some() == b"good"
    with pytest.raises(TlsError) as caught:
        await server.receive_some()
    assert "mac" in caught.value.reason or "decrypt" in caught.value.reason
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()


async def test_aclose_while_a_sender_is_blocked_does_not_wait_for_it(
    pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = memory_pair(
        server_context([pki.mail]), client_context(ca_file=pki.ca_file), lockstep=True
    )
    await handshake_ok(client, server)
    outcome: list[BaseException] = []

    async def blocked_sender() -> None:
        try:
            await client.send_all(b"nobody reads this")  # lockstep: blocks until read
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    with trio.fail_after(TIMEOUT):  # the autojump clock turns a hang into a quick failure
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_sender)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
    assert len(outcome) == 1


async def test_transport_breakage_is_broken_resource_error_with_cause(pki: Pki) -> None:
    client, server = memory_pair(server_context([pki.mail]), client_context(ca_file=pki.ca_file))
    await handshake_ok(client, server)
    await server.transport.aclose()
    with pytest.raises(trio.BrokenResourceError) as caught:
        await client.send_all(b"x" * 100)
    assert isinstance(caught.value.__cause__, trio.BrokenResourceError)


# ---- handshake failures -------------------------------------------------------


async def test_untrusted_certificate_fails_verification(pki: Pki) -> None:
    client, server = memory_pair(
        server_context([pki.untrusted]), client_context(ca_file=pki.ca_file)
    )
    client_failure, server_failure = await handshake_both(client, server)
    assert reason_of(client_failure) == "certificate verify failed"
    assert "unknown ca" in reason_of(server_failure)  # our alert reached the server
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")


@pytest.mark.parametrize(
    ("pair", "hostname", "ok"),
    [
        ("mail", "mail.example.org", True),
        ("mail", "MAIL.Example.ORG.", True),
        ("mail", "other.example.org", False),
        ("wildcard", "smtp.example.net", True),
        ("wildcard", "a.b.example.net", False),
        ("wildcard", "example.net", False),
        ("ip", "127.0.0.1", True),
        ("ip", "127.0.0.2", False),
        ("mail", "127.0.0.1", False),
    ],
)
async def test_hostname_is_checked_against_subject_alt_names(
    pki: Pki, pair: str, hostname: str, ok: bool
) -> None:
    pairs = {"mail": pki.mail, "wildcard": pki.wildcard, "ip": pki.ip}
    client, server = memory_pair(
        server_context([pairs[pair]]), client_context(ca_file=pki.ca_file), hostname=hostname
    )
    client_failure, server_failure = await handshake_both(client, server)
    assert server_failure is None
    if ok:
        assert client_failure is None
    else:
        assert reason_of(client_failure) == "certificate hostname mismatch"


async def test_hostname_is_not_checked_without_verification(pki: Pki) -> None:
    client, server = memory_pair(
        server_context([pki.untrusted]), client_context(verify=False), hostname="x.invalid"
    )
    await handshake_ok(client, server)


async def test_server_minimum_above_client_maximum_fails(pki: Pki) -> None:
    client_ctx = client_context(ca_file=pki.ca_file)
    client_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    client, server = memory_pair(server_context([pki.mail], min_version="1.3"), client_ctx)
    client_failure, server_failure = await handshake_both(client, server)
    assert reason_of(server_failure) == "unsupported protocol"
    assert "protocol version" in reason_of(client_failure)


async def test_legacy_versions_only_when_asked(pki: Pki) -> None:
    client_ctx = client_context(ca_file=pki.ca_file, min_version="1.0")
    client_ctx.set_max_proto_version(SSL.TLS1_VERSION)
    client, server = memory_pair(server_context([pki.mail], min_version="1.0"), client_ctx)
    await handshake_ok(client, server)
    assert server.version == "TLSv1"

    client, server = memory_pair(server_context([pki.mail]), client_ctx)
    _, server_failure = await handshake_both(client, server)
    assert reason_of(server_failure) == "unsupported protocol"


def test_unknown_min_version_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="min_version"):
        server_context([pki.mail], min_version="1.4")
    with pytest.raises(ConfigError, match="min_version"):
        client_context(min_version="SSLv3")


# ---- pinning ------------------------------------------------------------------


async def test_pin_replaces_ca_verification(pki: Pki) -> None:
    pin = spki_sha256(load_cert_pair(pki.untrusted).leaf)
    # No ca_file: the system store does not know trustme's CA, only the pin can pass.
    client, server = memory_pair(server_context([pki.untrusted]), client_context(pin_sha256=pin))
    await handshake_ok(client, server)


async def test_pin_mismatch_fails(pki: Pki) -> None:
    pin = spki_sha256(load_cert_pair(pki.other).leaf)
    client, server = memory_pair(server_context([pki.mail]), client_context(pin_sha256=pin))
    client_failure, _ = await handshake_both(client, server)
    assert reason_of(client_failure) == "certificate pin mismatch"


def test_pin_must_be_a_sha256_digest() -> None:
    with pytest.raises(ConfigError, match="32-byte"):
        client_context(pin_sha256=b"short")


# ---- SNI ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sni", "expected"),
    [
        ("imap.example.net", "other"),  # exact beats the wildcard listed before it
        ("pop.example.net", "wildcard"),
        ("mail.example.org", "mail"),
        ("unknown.example.com", "mail"),  # no match: the first certificate
        (None, "mail"),  # no SNI at all
    ],
)
async def test_sni_selects_the_certificate(pki: Pki, sni: str | None, expected: str) -> None:
    pairs = {"mail": pki.mail, "wildcard": pki.wildcard, "other": pki.other}
    server_ctx = server_context([pki.mail, pki.wildcard, pki.other])
    client, server = memory_pair(server_ctx, client_context(verify=False), hostname=sni)
    await handshake_ok(client, server)
    assert client.peer_certificate_chain()[0] == load_cert_pair(pairs[expected]).leaf
    assert server.server_name == sni


# ---- initial data and the ClientHello -----------------------------------------


async def test_initial_data_after_starttls_line_is_fed_first(pki: Pki) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client = TlsStream(
        client_transport,
        client_context(ca_file=pki.ca_file),
        server_side=False,
        server_hostname="mail.example.org",
    )
    reply: list[bytes] = []

    async def client_side() -> None:
        # A pipelining client: the command and the ClientHello in one go.
        await client_transport.send_all(b"STARTTLS\r\n")
        await client.send_all(b"EHLO client\r\n")
        reply.append(await client.receive_some())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            await trio.testing.wait_all_tasks_blocked()
            buffered = bytes(await server_transport.receive_some())
            line, _, rest = buffered.partition(b"\r\n")
            assert line == b"STARTTLS"
            assert rest.startswith(b"\x16\x03")
            server = TlsStream(
                server_transport, server_context([pki.mail]), server_side=True, initial_data=rest
            )
            assert await server.receive_some() == b"EHLO client\r\n"
            await server.send_all(b"250 ok\r\n")
    assert reply == [b"250 ok\r\n"]
    assert server.client_hello == rest


async def test_client_hello_is_captured_as_received(pki: Pki) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    recording = RecordingStream(client_transport)
    client = TlsStream(
        recording,
        client_context(ca_file=pki.ca_file),
        server_side=False,
        server_hostname="mail.example.org",
    )
    # The server reads in 7-byte pieces: capture must work across reads.
    trickle = RecordingStream(server_transport, receive_limit=7)
    server = TlsStream(trickle, server_context([pki.mail]), server_side=True)
    assert server.client_hello == b""
    await handshake_ok(client, server)

    hello = server.client_hello
    assert hello.startswith(b"\x16\x03")
    assert len(hello) == 5 + int.from_bytes(hello[3:5], "big")
    assert hello[5] == 0x01  # HandshakeType.client_hello
    assert b"mail.example.org" in hello  # the SNI extension
    assert hello == recording.sent[0]  # exactly the client's first flight
    assert client.client_hello == b""


def test_client_hello_recorder_edges() -> None:
    body = b"\x01\x00\x00\x06" + b"abcdef"  # ClientHello header + 6 body bytes
    first, second = body[:5], body[5:]
    fragmented = (
        b"\x16\x03\x01\x00\x05" + first + b"\x16\x03\x01\x00\x05" + second + b"\x17trailing"
    )
    whole = _ClientHelloRecorder()
    whole.feed(fragmented)
    assert whole.done
    assert whole.captured == fragmented[:20]
    bytewise = _ClientHelloRecorder()
    for byte in fragmented:
        bytewise.feed(bytes([byte]))
    assert bytewise.captured == fragmented[:20]

    not_tls = _ClientHelloRecorder()
    not_tls.feed(b"EHLO example.org\r\n")
    assert (not_tls.done, not_tls.captured) == (True, b"")

    not_a_hello = _ClientHelloRecorder()
    not_a_hello.feed(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00")  # a ServerHello
    assert (not_a_hello.done, not_a_hello.captured) == (True, b"")

    huge = _ClientHelloRecorder()
    huge.feed(b"\x16\x03\x01\x40\x00\x01\x01\x00\x00" + bytes(40_000))  # claims 65 KiB body
    assert huge.done
    assert len(huge.captured) == CLIENT_HELLO_LIMIT


# ---- loading and reloading certificates ---------------------------------------


def test_load_cert_pair_names_the_bad_file(pki: Pki, tmp_path: Path) -> None:
    loaded = load_cert_pair(pki.mail)
    assert loaded.dns_names == ("mail.example.org",)
    assert len(loaded.chain) == 1

    missing = CertKeyPair(tmp_path / "missing.crt", pki.mail.key_file)
    with pytest.raises(ConfigError) as caught:
        load_cert_pair(missing)
    assert caught.value.path == str(missing.cert_file)

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN NONSENSE-----\n")
    with pytest.raises(ConfigError) as caught:
        load_cert_pair(CertKeyPair(garbage, pki.mail.key_file))
    assert caught.value.path == str(garbage)
    with pytest.raises(ConfigError) as caught:
        load_cert_pair(CertKeyPair(pki.mail.cert_file, garbage))
    assert caught.value.path == str(garbage)

    with pytest.raises(ConfigError, match="does not match") as caught:
        load_cert_pair(CertKeyPair(pki.mail.cert_file, pki.other.key_file))
    assert caught.value.path == str(pki.other.key_file)

    with pytest.raises(ConfigError, match="at least one"):
        server_context([])


async def test_cert_store_reload_swaps_and_keeps_old_on_error(pki: Pki, tmp_path: Path) -> None:
    live = CertKeyPair(tmp_path / "live.crt", tmp_path / "live.key")
    live.cert_file.write_bytes(pki.mail.cert_file.read_bytes())
    live.key_file.write_bytes(pki.mail.key_file.read_bytes())
    store = CertStore([live])
    client_ctx = client_context(verify=False)

    async def served_leaf() -> object:
        client, server = memory_pair(store.context, client_ctx)
        await handshake_ok(client, server)
        return client.peer_certificate_chain()[0]

    first_context = store.context
    assert await served_leaf() == load_cert_pair(pki.mail).leaf
    assert store.generation == 1

    live.cert_file.write_bytes(pki.other.cert_file.read_bytes())
    live.key_file.write_bytes(pki.other.key_file.read_bytes())
    store.reload()
    assert store.context is not first_context
    assert store.generation == 2
    assert store.certs[0].dns_names == ("imap.example.net",)
    assert await served_leaf() == load_cert_pair(pki.other).leaf

    second_context = store.context
    live.key_file.write_bytes(b"not a key")
    with pytest.raises(ConfigError) as caught:
        store.reload()
    assert caught.value.path == str(live.key_file)
    assert store.context is second_context
    assert store.generation == 2
    assert await served_leaf() == load_cert_pair(pki.other).leaf


# ---- interoperability over real loopback TCP ---------------------------------


async def open_listener() -> tuple[trio.SocketListener, int]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port: int = listener.socket.getsockname()[1]
    return listener, port


async def test_stdlib_client_against_our_server(pki: Pki) -> None:
    listener, port = await open_listener()
    payload = random.Random(4).randbytes(48 * 1024) + b"\n"
    outcome: dict[str, object] = {}

    def stdlib_client() -> None:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="mail.example.org") as tls,
        ):
            tls.sendall(payload)
            got = bytearray()
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                got += chunk
            outcome["client"] = (tls.version(), bytes(got))

    async def serve() -> None:
        stream = await listener.accept()
        server = TlsStream(stream, server_context([pki.mail]), server_side=True)
        line = await receive_line(server)
        await server.send_all(b"ECHO " + line)
        outcome["server"] = (server.version, server.server_name)
        await server.aclose()

    with trio.fail_after(TIMEOUT):
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await trio.to_thread.run_sync(stdlib_client)
    assert outcome["server"] == ("TLSv1.3", "mail.example.org")
    assert outcome["client"] == ("TLSv1.3", b"ECHO " + payload)


async def test_our_client_against_stdlib_server(pki: Pki) -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    listening.settimeout(TIMEOUT)
    port = listening.getsockname()[1]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.mail.cert_file), str(pki.mail.key_file))
    payload = random.Random(5).randbytes(48 * 1024) + b"\n"

    def stdlib_server() -> None:
        conn, _ = listening.accept()
        conn.settimeout(TIMEOUT)
        with ctx.wrap_socket(conn, server_side=True) as tls:
            got = bytearray()
            while not got.endswith(b"\n"):
                chunk = tls.recv(65536)
                assert chunk
                got += chunk
            tls.sendall(b"ECHO " + bytes(got))
            tls.unwrap()  # close_notify, then wait for the client's

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, stdlib_server)
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                client = TlsStream(
                    stream,
                    client_context(ca_file=pki.ca_file),
                    server_side=False,
                    server_hostname="mail.example.org",
                )
                await client.send_all(payload)
                reply = await receive_exactly(client, len(payload) + 5)
                assert await client.receive_some() == b""
                await client.aclose()
    finally:
        listening.close()
    assert reply == b"ECHO " + payload
    assert client.version == "TLSv1.3"
    assert not client.unclean_eof


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
@pytest.mark.parametrize(("flag", "expected"), [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")])
async def test_openssl_s_client(pki: Pki, flag: str, expected: str) -> None:
    listener, port = await open_listener()
    seen: dict[str, object] = {}

    async def serve() -> None:
        stream = await listener.accept()
        server = TlsStream(stream, server_context([pki.mail]), server_side=True)
        line = await receive_line(server)
        seen["server"] = (server.version, server.server_name)
        await server.send_all(b"HELLO " + line)
        await server.aclose()

    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "x"]
    command += [flag, "-quiet"]
    with trio.fail_after(TIMEOUT):
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            result = await trio.run_process(
                command, stdin=b"PING\n", capture_stdout=True, capture_stderr=True, check=False
            )
    assert seen["server"] == (expected, "x")
    assert b"HELLO PING\n" in result.stdout, result.stderr
    assert result.returncode == 0, result.stderr


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
async def test_openssl_s_client_below_min_version_is_refused(pki: Pki) -> None:
    listener, port = await open_listener()
    failures: list[BaseException] = []

    async def serve() -> None:
        stream = await listener.accept()
        server = TlsStream(stream, server_context([pki.mail], min_version="1.3"), server_side=True)
        try:
            await server.do_handshake()
        except TlsError as exc:
            failures.append(exc)
        await server.aclose()

    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-quiet"]
    with trio.fail_after(TIMEOUT):
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            result = await trio.run_process(
                command, stdin=b"", capture_stdout=True, capture_stderr=True, check=False
            )
    assert result.returncode != 0
    assert [reason_of(f) for f in failures] == ["unsupported protocol"]
