"""The ClientHello parser: TLS records in, a :class:`ClientHello` out.

Wire formats: RFC 8446 5.1 (records), 4.1.2 (ClientHello), 4.2 (extensions);
RFC 5246 7.4.1.2 for the pre-1.3 view of the same bytes.  Extensions are
RFC 6066 3 (server_name), RFC 7301 3.1 (ALPN), RFC 8422 5.1 (supported
groups, ec_point_formats), RFC 8446 4.2.1 (supported_versions) and 4.2.3
(signature_algorithms); GREASE is RFC 8701.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final

from mailmoat.errors import RemoteProtocolError

__all__ = [
    "MAX_HELLO_LENGTH",
    "MAX_RECORD_LENGTH",
    "VERSION_NAMES",
    "ClientHello",
    "HelloError",
    "HelloIncomplete",
    "is_grease",
    "parse_client_hello",
]

_CONTENT_HANDSHAKE: Final = 0x16
_HANDSHAKE_CLIENT_HELLO: Final = 0x01
_RECORD_HEADER: Final = 5
_HANDSHAKE_HEADER: Final = 4

#: RFC 8446 5.1: "The length MUST NOT exceed 2^14 bytes."
MAX_RECORD_LENGTH: Final = 1 << 14
#: Our bound on the ClientHello message (handshake header excluded).  Real
#: ones are a few hundred bytes, about 2 KiB with post-quantum key shares;
#: the format allows about 128 KiB.  A longer declared length is refused as
#: soon as the handshake header is read, so a reader never buffers more than
#: this (plus record headers).
MAX_HELLO_LENGTH: Final = 1 << 16

EXT_SERVER_NAME: Final = 0x0000
EXT_SUPPORTED_GROUPS: Final = 0x000A
EXT_EC_POINT_FORMATS: Final = 0x000B
EXT_SIGNATURE_ALGORITHMS: Final = 0x000D
EXT_ALPN: Final = 0x0010
EXT_SUPPORTED_VERSIONS: Final = 0x002B
#: RFC 7507: the client is retrying with a lower version than it supports.
TLS_FALLBACK_SCSV: Final = 0x5600

#: Protocol versions by wire value, as named in :attr:`ClientHello.max_version`.
VERSION_NAMES: Final[dict[int, str]] = {
    0x0304: "TLSv1.3",
    0x0303: "TLSv1.2",
    0x0302: "TLSv1.1",
    0x0301: "TLSv1",
    0x0300: "SSLv3",
}

# RFC 6066 3: a HostName is an ASCII DNS name; we take the printable range
# (no space, no control bytes), 1 to 255 bytes, and leave its shape to policy.
_HOSTNAME = re.compile(rb"[\x21-\x7e]{1,255}")


def is_grease(value: int) -> bool:
    """True for the 16 GREASE values of RFC 8701 (``0x0a0a``, ``0x1a1a`` ... ``0xfafa``).

    They are reserved so that peers must tolerate unknown values; the same
    set is used for cipher suites, extensions, groups, signature algorithms
    and versions.
    """
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


class HelloError(RemoteProtocolError):
    """The bytes are not (the start of) a well-formed TLS ClientHello."""


class HelloIncomplete(HelloError):
    """The bytes are a valid start of a ClientHello that ends further on.

    A reader that is still receiving may read more and try again; every
    other :class:`HelloError` stays an error whatever follows.
    """


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A parsed ClientHello.  Lists are in the order sent, GREASE included.

    ``alpn`` holds the protocol names decoded as latin-1: one character per
    byte, so ``name.encode("latin-1")`` gives back the bytes sent, and
    ``"h2" in hello.alpn`` reads naturally.  Lists of absent extensions are
    empty; ``server_name`` is the first ``host_name`` entry, or ``None``.
    """

    record_version: int
    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    compression_methods: tuple[int, ...]
    extensions: tuple[int, ...]
    server_name: str | None
    alpn: tuple[str, ...]
    signature_algorithms: tuple[int, ...]
    supported_groups: tuple[int, ...]
    ec_point_formats: tuple[int, ...]
    supported_versions: tuple[int, ...]

    @property
    def fallback_scsv(self) -> bool:
        """The client sent TLS_FALLBACK_SCSV (0x5600, RFC 7507): a downgraded retry."""
        return TLS_FALLBACK_SCSV in self.cipher_suites

    @property
    def offered_versions(self) -> tuple[int, ...]:
        """The versions the client offers, GREASE removed.

        That is ``supported_versions`` when it names any (RFC 8446 4.2.1:
        a server then ignores ``legacy_version``), else ``legacy_version``.
        """
        offered = tuple(v for v in self.supported_versions if not is_grease(v))
        return offered or (self.legacy_version,)

    @property
    def max_version(self) -> str:
        """The highest known version offered: ``"TLSv1.3"`` ... ``"SSLv3"``.

        Only the five final versions of :data:`VERSION_NAMES` count: a TLS 1.3
        draft (``0x7fxx``, sent by 2017-2018 browsers) cannot meet a final
        TLS 1.3 server, so it is ignored like any other unknown value.
        ``""`` when the client offers no known version.
        """
        known = [v for v in self.offered_versions if v in VERSION_NAMES]
        return VERSION_NAMES[max(known)] if known else ""


def parse_client_hello(data: bytes, *, max_length: int = MAX_HELLO_LENGTH) -> ClientHello:
    """Parse the first bytes a TLS server receives: records carrying a ClientHello.

    The ClientHello may be fragmented over several handshake records (RFC
    8446 5.1); the record that completes it must end with it.  Bytes after
    that record (a ChangeCipherSpec, early data) are ignored.  Raises
    :class:`HelloIncomplete` while the input is a proper prefix of a possible
    ClientHello, :class:`HelloError` for anything else that is not one
    (including an SSLv2-compatible hello), and nothing else.  Linear in
    ``len(data)``.
    """
    record_version, body = _reassemble(data, max_length)
    return _parse_body(record_version, body)


def _reassemble(data: bytes, max_length: int) -> tuple[int, bytes]:
    """Collect the ClientHello message from its records; check everything as it arrives."""
    end = len(data)
    pos = 0
    record_version = 0
    message = bytearray()
    need = 0  # handshake header + body, once the header is known
    while True:
        if pos >= end:
            raise HelloIncomplete("the input ends before the ClientHello does")
        content_type = data[pos]
        if content_type != _CONTENT_HANDSHAKE:
            if pos:
                raise HelloError(f"record type {content_type} inside the ClientHello")
            if content_type & 0x80:
                raise HelloError("SSLv2-compatible ClientHello is not supported")
            raise HelloError(f"not a TLS handshake record (first byte 0x{content_type:02x})")
        if pos + 1 < end and data[pos + 1] != 3:
            raise HelloError("bad record version")
        if end - pos < _RECORD_HEADER:
            raise HelloIncomplete("the input ends before the ClientHello does")
        version = int.from_bytes(data[pos + 1 : pos + 3])
        if not pos:
            record_version = version
        length = int.from_bytes(data[pos + 3 : pos + 5])
        if length == 0:
            raise HelloError("empty handshake record")
        if length > MAX_RECORD_LENGTH:
            raise HelloError("record longer than 2^14 bytes")
        start = pos + _RECORD_HEADER
        fragment = data[start : start + length]
        message += fragment
        if not need and message:
            if message[0] != _HANDSHAKE_CLIENT_HELLO:
                raise HelloError(f"not a ClientHello (handshake type {message[0]})")
            if len(message) >= _HANDSHAKE_HEADER:
                body_length = int.from_bytes(message[1:_HANDSHAKE_HEADER])
                if body_length > max_length:
                    raise HelloError(f"ClientHello longer than {max_length} bytes")
                need = _HANDSHAKE_HEADER + body_length
        if need and len(message) > need:
            raise HelloError("data after the ClientHello in its record")
        if len(fragment) < length:
            raise HelloIncomplete("the input ends before the ClientHello does")
        pos = start + length
        if need and len(message) == need:
            return record_version, bytes(message[_HANDSHAKE_HEADER:])


def _truncated(what: str) -> HelloError:
    # The whole message is there: a field running past it is malformed, not
    # incomplete (more input would not help).
    return HelloError(f"ClientHello truncated in {what}")


def _parse_body(record_version: int, body: bytes) -> ClientHello:
    end = len(body)
    # legacy_version(2) random(32) session_id<0..32>
    if end < 35:
        raise _truncated("version and random")
    legacy_version = int.from_bytes(body[0:2])
    random = body[2:34]
    sid_length = body[34]
    if sid_length > 32:
        raise HelloError("session_id longer than 32 bytes")
    pos = 35 + sid_length
    # cipher_suites<2..2^16-2>
    if pos + 2 > end:
        raise _truncated("session_id")
    cs_length = int.from_bytes(body[pos : pos + 2])
    pos += 2
    if cs_length == 0 or cs_length & 1:
        raise HelloError("bad cipher_suites length")
    if pos + cs_length > end:
        raise _truncated("cipher_suites")
    cipher_suites = struct.unpack_from(f">{cs_length >> 1}H", body, pos)
    session_id = body[35 : 35 + sid_length]
    pos += cs_length
    # compression_methods<1..2^8-1>
    if pos >= end:
        raise _truncated("cipher_suites")
    cm_length = body[pos]
    pos += 1
    if cm_length == 0:
        raise HelloError("empty compression_methods")
    if pos + cm_length > end:
        raise _truncated("compression_methods")
    compression_methods = tuple(body[pos : pos + cm_length])
    pos += cm_length

    extensions: list[int] = []
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    signature_algorithms: tuple[int, ...] = ()
    supported_groups: tuple[int, ...] = ()
    ec_point_formats: tuple[int, ...] = ()
    supported_versions: tuple[int, ...] = ()
    # extensions<8..2^16-1>, absent altogether in old (SSLv3, TLS 1.0) hellos
    if pos < end:
        if pos + 2 > end:
            raise _truncated("extensions length")
        if int.from_bytes(body[pos : pos + 2]) != end - pos - 2:
            raise HelloError("extensions length does not match the ClientHello")
        pos += 2
        seen: set[int] = set()
        while pos < end:
            if pos + 4 > end:
                raise _truncated("an extension header")
            ext_type, ext_length = struct.unpack_from(">HH", body, pos)
            pos += 4
            if pos + ext_length > end:
                raise _truncated(f"extension 0x{ext_type:04x}")
            ext = body[pos : pos + ext_length]
            pos += ext_length
            # RFC 8446 4.2 (and RFC 5246 7.4.1.4): "There MUST NOT be more
            # than one extension of the same type in a given extension block."
            if ext_type in seen:
                raise HelloError(f"duplicate extension 0x{ext_type:04x}")
            seen.add(ext_type)
            extensions.append(ext_type)
            if ext_type == EXT_SERVER_NAME:
                server_name = _server_name(ext)
            elif ext_type == EXT_ALPN:
                alpn = _alpn(ext)
            elif ext_type == EXT_SIGNATURE_ALGORITHMS:
                signature_algorithms = _u16_list(ext, 2, "signature_algorithms")
            elif ext_type == EXT_SUPPORTED_GROUPS:
                supported_groups = _u16_list(ext, 2, "supported_groups")
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                supported_versions = _u16_list(ext, 1, "supported_versions")
            elif ext_type == EXT_EC_POINT_FORMATS:
                if len(ext) < 2 or ext[0] != len(ext) - 1:
                    raise HelloError("malformed ec_point_formats extension")
                ec_point_formats = tuple(ext[1:])

    return ClientHello(
        record_version=record_version,
        legacy_version=legacy_version,
        random=random,
        session_id=session_id,
        cipher_suites=cipher_suites,
        compression_methods=compression_methods,
        extensions=tuple(extensions),
        server_name=server_name,
        alpn=alpn,
        signature_algorithms=signature_algorithms,
        supported_groups=supported_groups,
        ec_point_formats=ec_point_formats,
        supported_versions=supported_versions,
    )


def _u16_list(ext: bytes, prefix: int, name: str) -> tuple[int, ...]:
    """A non-empty list of 16-bit values behind a 1- or 2-byte length."""
    size = len(ext) - prefix
    if size < 2 or size & 1 or int.from_bytes(ext[:prefix]) != size:
        raise HelloError(f"malformed {name} extension")
    return struct.unpack_from(f">{size >> 1}H", ext, prefix)


def _server_name(ext: bytes) -> str | None:
    """RFC 6066 3: the first host_name of a ServerNameList<1..2^16-1>."""
    end = len(ext)
    if end < 2 or int.from_bytes(ext[:2]) != end - 2 or end == 2:
        raise HelloError("malformed server_name extension")
    pos = 2
    host: str | None = None
    while pos < end:
        if pos + 3 > end:
            raise HelloError("malformed server_name extension")
        name_type = ext[pos]
        length = int.from_bytes(ext[pos + 1 : pos + 3])
        pos += 3
        if pos + length > end:
            raise HelloError("malformed server_name extension")
        if name_type == 0:
            # "The ServerNameList MUST NOT contain more than one name of the same name_type."
            if host is not None:
                raise HelloError("two host names in server_name")
            name = ext[pos : pos + length]
            if not _HOSTNAME.fullmatch(name):
                raise HelloError("bad host name in server_name")
            host = name.decode("ascii")
        pos += length
    return host


def _alpn(ext: bytes) -> tuple[str, ...]:
    """RFC 7301 3.1: ProtocolNameList<2..2^16-1> of ProtocolName<1..2^8-1>."""
    end = len(ext)
    if end < 3 or int.from_bytes(ext[:2]) != end - 2:
        raise HelloError("malformed ALPN extension")
    names: list[str] = []
    pos = 2
    while pos < end:
        length = ext[pos]
        pos += 1
        if length == 0 or pos + length > end:
            raise HelloError("malformed ALPN extension")
        names.append(ext[pos : pos + length].decode("latin-1"))
        pos += length
    return tuple(names)
