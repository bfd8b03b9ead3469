"""PROXY protocol versions 1 and 2 (tier 1): tell a backend who the client is.

Contract: mailmoat terminates client connections itself, so Postfix
(``smtpd_upstream_proxy_protocol = haproxy``) and Dovecot (``haproxy = yes``)
would otherwise see mailmoat's address.  :func:`encode_v2` / :func:`encode_v1`
build the header mailmoat writes first on each upstream connection;
:func:`parse` reads one (for tests, and later for a trusted load balancer in
front of mailmoat).  Specification: HAProxy's "The PROXY protocol, Versions
1 & 2" (doc/proxy-protocol.txt); section numbers below refer to it.

* :class:`ProxyHeader` validates in its constructor and raises
  :class:`~mailmoat.errors.LocalProtocolError` for what we must not send.
* :func:`parse` raises only :class:`~mailmoat.errors.RemoteProtocolError`,
  whatever the bytes, returns ``None`` while a valid header could still
  follow, and never looks further than :data:`MAX_V1_LINE` bytes (v1) or
  16 + ``max_v2_length`` bytes (v2).
* Addresses are strings (``"192.0.2.1"``, ``"2001:db8::1"``); parsed ones
  are in canonical form.  When both ends are IPv4 or IPv4-mapped IPv6 the
  encoders send TCP over IPv4; a mixed pair goes out as IPv6 with the IPv4
  end mapped (``::ffff:a.b.c.d``), since one header has one family.
* Only TCP is carried: "no address" (v1 ``UNKNOWN``, v2 ``LOCAL``, ``UNSPEC``
  and ``AF_UNIX``) parses to ``source = destination = None``; UDP is refused.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Final, Literal, final

from mailmoat.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_V1_LINE",
    "MAX_V2_LENGTH",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V2_SIGNATURE",
    "ProxyHeader",
    "crc32c",
    "encode_v1",
    "encode_v2",
    "parse",
    "ssl_tlv",
]

# 2.1: "a 108-byte buffer is always enough to store all the line and a
# trailing zero" -- the line itself, CRLF included, is at most 107 bytes.
MAX_V1_LINE: Final = 107
_V1_PREFIX: Final = b"PROXY "

# 2.2: "The binary header format starts with a constant 12 bytes block
# containing the protocol signature: \x0D \x0A \x0D \x0A \x00 \x0D \x0A \x51
# \x55 \x49 \x54 \x0A".
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED: Final = 16
#: Our bound on the v2 length field (address block + TLVs).  The protocol
#: allows 65535; the largest address block is 216 bytes (AF_UNIX), and
#: HAProxy's TLVs (authority, ALPN, SSL with its sub-TLVs, unique id) fit
#: well within 4096.
MAX_V2_LENGTH: Final = 4096

_VERSION_2: Final = 0x20
_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1
# 2.2, 14th byte: 0x00 UNSPEC, 0x11 TCP over IPv4, 0x12 UDP over IPv4,
# 0x21 TCP over IPv6, 0x22 UDP over IPv6, 0x31 UNIX stream, 0x32 UNIX
# datagram.  "Other values are unspecified and must not be emitted in version
# 2 of this protocol and must be rejected as invalid by receivers."
_FAM_UNSPEC: Final = 0x00
_FAM_TCP4: Final = 0x11
_FAM_TCP6: Final = 0x21
_FAM_UNIX_STREAM: Final = 0x31
_DGRAM_FAMILIES: Final = frozenset({0x12, 0x22, 0x32})
# Size of the address block of each family (2.2, "union proxy_addr").
_ADDRESS_LENGTH: Final = {_FAM_UNSPEC: 0, _FAM_TCP4: 12, _FAM_TCP6: 36, _FAM_UNIX_STREAM: 216}

# 2.2.1-2.2.7: TLV types.
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02  # the host name the client asked for (TLS SNI)
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04
_MAX_TLV_VALUE: Final = 0xFFFF

# 2.1: "IPv4 addresses must be indicated as a series of exactly 4 integers
# [...] Heading zeroes are not permitted"; "IPv6 addresses must be indicated
# as series of 4 hexadecimal digits (upper or lower case) delimited by
# colons".  The character sets here pre-filter; ipaddress does the rest
# (and refuses leading zeros in IPv4).  No "%zone" suffix: it is not an
# address the peer can use.
_V1_IPV4_RE: Final = re.compile(rb"[0-9.]{7,15}")
_V1_IPV6_RE: Final = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
# 2.1: ports are "a decimal integer in the range [0..65535] inclusive.
# Heading zeroes are not permitted".
_V1_PORT_RE: Final = re.compile(rb"0|[1-9][0-9]{0,4}")

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@final
@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header says.

    ``source`` / ``destination`` are ``(address, port)`` of the client and of
    the address it connected to, both or neither set.  ``LOCAL`` (v2 only:
    a connection the proxy made on its own, e.g. a health check) carries no
    addresses.  ``tlvs`` are v2 ``(type, value)`` pairs in wire order; a
    :data:`PP2_TYPE_CRC32C` TLV (at most one, 4 bytes) is recomputed by
    :func:`encode_v2` whatever its value.
    """

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    command: Literal["PROXY", "LOCAL"] = "PROXY"
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def __post_init__(self) -> None:
        if self.command not in ("PROXY", "LOCAL"):
            raise LocalProtocolError(f"command must be PROXY or LOCAL, not {self.command!r}")
        if (self.source is None) != (self.destination is None):
            raise LocalProtocolError("source and destination must both be set or both be None")
        if self.command == "LOCAL" and self.source is not None:
            raise LocalProtocolError("a LOCAL header carries no addresses")
        for endpoint in (self.source, self.destination):
            if endpoint is not None:
                _check_endpoint(endpoint)
        if type(self.tlvs) is not tuple:
            raise LocalProtocolError("tlvs must be a tuple of (type, value) pairs")
        checksums = 0
        for tlv in self.tlvs:
            if type(tlv) is not tuple or len(tlv) != 2:
                raise LocalProtocolError("each TLV must be a (type, value) pair")
            kind, value = tlv
            if type(kind) is not int or not 0 <= kind <= 0xFF:
                raise LocalProtocolError(f"TLV type must be an int in 0..255, not {kind!r}")
            if type(value) is not bytes or len(value) > _MAX_TLV_VALUE:
                raise LocalProtocolError("TLV value must be bytes of at most 65535 octets")
            if kind == PP2_TYPE_CRC32C:
                checksums += 1
                if len(value) != 4:
                    raise LocalProtocolError("a PP2_TYPE_CRC32C value is 4 bytes")
        if checksums > 1:
            raise LocalProtocolError("at most one PP2_TYPE_CRC32C TLV")


def _check_endpoint(endpoint: object) -> None:
    if type(endpoint) is not tuple or len(endpoint) != 2:
        raise LocalProtocolError("an endpoint is an (address, port) tuple")
    host, port = endpoint
    if type(host) is not str or "%" in host:
        raise LocalProtocolError(f"invalid address {host!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise LocalProtocolError(f"invalid address {host!r}") from None
    if type(port) is not int or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port must be an int in 0..65535, not {port!r}")


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def _as_v4(address: _IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return address
    return address.ipv4_mapped


def _as_v6(address: _IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)


def _endpoints(header: ProxyHeader) -> tuple[int, _IPAddress, _IPAddress, int, int] | None:
    """``(family, source, destination, source port, destination port)`` or None."""
    if header.source is None or header.destination is None:
        return None
    source = ipaddress.ip_address(header.source[0])
    destination = ipaddress.ip_address(header.destination[0])
    ports = header.source[1], header.destination[1]
    source4, destination4 = _as_v4(source), _as_v4(destination)
    if source4 is not None and destination4 is not None:
        return _FAM_TCP4, source4, destination4, *ports
    return _FAM_TCP6, _as_v6(source), _as_v6(destination), *ports


def encode_v2(header: ProxyHeader, *, checksum: bool = False) -> bytes:
    """The binary (v2) header.

    ``checksum=True`` appends a :data:`PP2_TYPE_CRC32C` TLV if ``header``
    has none; an existing one is always filled in (2.2.3).
    """
    # 2.2, 13th byte: "The highest four bits contains the version [...] \x2";
    # "The lowest four bits represents the command: \x0 : LOCAL, \x1 : PROXY".
    command = _CMD_PROXY if header.command == "PROXY" else _CMD_LOCAL
    endpoints = _endpoints(header)
    if endpoints is None:
        # 2.2: UNSPEC: "The sender should use this family when sending LOCAL
        # commands or when dealing with unsupported protocol families."
        family, block = _FAM_UNSPEC, b""
    else:
        family, source, destination, source_port, destination_port = endpoints
        block = source.packed + destination.packed
        block += struct.pack("!HH", source_port, destination_port)
    tlvs = list(header.tlvs)
    if checksum and all(kind != PP2_TYPE_CRC32C for kind, _ in tlvs):
        tlvs.append((PP2_TYPE_CRC32C, b"\x00" * 4))
    crc_at: int | None = None
    parts = [block]
    offset = _V2_FIXED + len(block)
    for kind, value in tlvs:
        if kind == PP2_TYPE_CRC32C:
            # 2.2.3: "initialize the checksum field to '0's".
            crc_at, wire_value = offset + 3, b"\x00" * 4
        else:
            wire_value = value
        parts.append(struct.pack("!BH", kind, len(wire_value)) + wire_value)
        offset += 3 + len(wire_value)
    body = b"".join(parts)
    if len(body) > 0xFFFF:
        raise LocalProtocolError("PROXY v2 header longer than 65535 bytes")
    out = bytearray(V2_SIGNATURE)
    out += struct.pack("!BBH", _VERSION_2 | command, family, len(body))
    out += body
    if crc_at is not None:
        out[crc_at : crc_at + 4] = crc32c(bytes(out)).to_bytes(4, "big")
    return bytes(out)


def encode_v1(header: ProxyHeader) -> bytes:
    """The text (v1) header; ``LOCAL`` and address-less headers become ``UNKNOWN``.

    v1 has no TLVs: a header with TLVs raises ``LocalProtocolError`` rather
    than losing them silently.
    """
    if header.tlvs:
        raise LocalProtocolError("PROXY v1 cannot carry TLVs")
    endpoints = _endpoints(header)
    if endpoints is None:
        # 2.1: "For "UNKNOWN", the rest of the line before the CRLF may be
        # omitted by the sender".
        return b"PROXY UNKNOWN\r\n"
    family, source, destination, source_port, destination_port = endpoints
    protocol = "TCP4" if family == _FAM_TCP4 else "TCP6"
    line = f"PROXY {protocol} {source} {destination} {source_port} {destination_port}\r\n"
    return line.encode("ascii")


def ssl_tlv(
    *,
    version: str | None = None,
    cipher: str | None = None,
    client_cert_verified: bool = False,
) -> tuple[int, bytes]:
    """A minimal :data:`PP2_TYPE_SSL` TLV: "the client connected over TLS".

    2.2.5: ``struct pp2_tlv_ssl { uint8_t client; uint32_t verify; struct
    pp2_tlv sub_tlv[0]; }``; "The <verify> field will be zero if the client
    presented a certificate and it was successfully verified, and non-zero
    otherwise."  ``version`` (e.g. ``"TLSv1.3"``) and ``cipher`` become
    sub-TLVs.
    """
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN if client_cert_verified else 0)
    verify = 0 if client_cert_verified else 1
    value = struct.pack("!BI", client, verify)
    for kind, text in ((PP2_SUBTYPE_SSL_VERSION, version), (PP2_SUBTYPE_SSL_CIPHER, cipher)):
        if text is not None:
            try:
                encoded = text.encode("ascii")
            except UnicodeEncodeError:
                raise LocalProtocolError(f"non-ASCII SSL sub-TLV {text!r}") from None
            value += struct.pack("!BH", kind, len(encoded)) + encoded
    return PP2_TYPE_SSL, value


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


def parse(data: bytes, *, max_v2_length: int = MAX_V2_LENGTH) -> tuple[ProxyHeader, int] | None:
    """Parse one header at the start of ``data``.

    Returns ``(header, bytes used)``, or ``None`` if ``data`` is a valid
    beginning that needs more bytes; raises ``RemoteProtocolError`` as soon
    as ``data`` cannot start a valid header.  Bytes after the header (the
    client's own stream) are left alone.
    """
    head = bytes(data[: len(V2_SIGNATURE)])
    if V2_SIGNATURE.startswith(head):
        return _parse_v2(data, max_v2_length)
    if _V1_PREFIX.startswith(head[: len(_V1_PREFIX)]):
        return _parse_v1(data)
    raise RemoteProtocolError("no PROXY protocol signature")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    window = bytes(data[:MAX_V1_LINE])
    end = window.find(b"\n")
    if end < 0:
        # 2.1: "The receiver must wait for the CRLF sequence before starting
        # to decode the addresses"; "a receiver may reject an incomplete line
        # which does not contain the CRLF sequence in the first 107 characters".
        if len(window) >= MAX_V1_LINE:
            raise RemoteProtocolError("PROXY v1 line longer than 107 bytes")
        if b"\r" in window[:-1]:
            raise RemoteProtocolError("PROXY v1 line with a CR not before LF")
        return None
    if end == 0 or window[end - 1] != 0x0D:
        raise RemoteProtocolError("PROXY v1 line not ended by CRLF")
    line = window[: end - 1]
    if b"\r" in line:
        raise RemoteProtocolError("PROXY v1 line with a stray CR")
    fields = line.split(b" ")
    # 2.1: "If the announced transport protocol is "UNKNOWN", then the
    # receiver knows that the sender speaks the correct PROXY protocol with
    # the appropriate version, and SHOULD accept the connection [...]"; "the
    # rest of the line before the CRLF [...] must be ignored by the receiver".
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(None, None), end + 1
    if len(fields) != 6:
        raise RemoteProtocolError("PROXY v1 line needs 6 fields")
    _, protocol, source, destination, source_port, destination_port = fields
    if protocol == b"TCP4":
        address_re: re.Pattern[bytes] = _V1_IPV4_RE
        parse_address: type[_IPAddress] = ipaddress.IPv4Address
    elif protocol == b"TCP6":
        address_re, parse_address = _V1_IPV6_RE, ipaddress.IPv6Address
    else:
        raise RemoteProtocolError("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN")
    endpoints: list[tuple[str, int]] = []
    for address, port in ((source, source_port), (destination, destination_port)):
        if not address_re.fullmatch(address):
            raise RemoteProtocolError("invalid PROXY v1 address")
        try:
            host = str(parse_address(address.decode("ascii")))
        except ValueError:
            raise RemoteProtocolError("invalid PROXY v1 address") from None
        if not _V1_PORT_RE.fullmatch(port) or int(port) > 0xFFFF:
            raise RemoteProtocolError("invalid PROXY v1 port")
        endpoints.append((host, int(port)))
    return ProxyHeader(endpoints[0], endpoints[1]), end + 1


def _parse_v2(data: bytes, max_v2_length: int) -> tuple[ProxyHeader, int] | None:
    if len(data) < _V2_FIXED:
        return None
    version_command, family = data[12], data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    # 2.2: "The receiver must [...] reject any version other than \x2";
    # "Other values [of the command] are unassigned and must not be emitted
    # by senders. Receivers must drop connections presenting unexpected
    # values here."
    if version_command & 0xF0 != _VERSION_2:
        raise RemoteProtocolError("unsupported PROXY protocol version")
    command = version_command & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise RemoteProtocolError("unknown PROXY v2 command")
    if length > max_v2_length:
        raise RemoteProtocolError("PROXY v2 header too long")
    end = _V2_FIXED + length
    if len(data) < end:
        return None
    header = bytes(data[:end])
    address_length = _ADDRESS_LENGTH.get(family)
    if command == _CMD_LOCAL:
        # 2.2: LOCAL: "the receiver must accept this connection as valid and
        # must use the real connection endpoints and discard the protocol
        # block including the family which is ignored."  TLVs after a block
        # we can size are still reported; the CRC, if any, still checked.
        tlvs: tuple[tuple[int, bytes], ...] = ()
        if address_length is not None and address_length <= length:
            tlvs = _parse_tlvs(header, _V2_FIXED + address_length) or ()
        return ProxyHeader(None, None, "LOCAL", tlvs), end
    if family in _DGRAM_FAMILIES:
        raise RemoteProtocolError("PROXY v2 over UDP is not supported")
    if address_length is None:
        raise RemoteProtocolError("invalid PROXY v2 address family")
    if length < address_length:
        raise RemoteProtocolError("PROXY v2 address block truncated")
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if family in (_FAM_TCP4, _FAM_TCP6):
        size = 4 if family == _FAM_TCP4 else 16
        factory: type[_IPAddress] = (
            ipaddress.IPv4Address if family == _FAM_TCP4 else ipaddress.IPv6Address
        )
        at = _V2_FIXED
        source_port, destination_port = struct.unpack_from("!HH", header, at + 2 * size)
        source = str(factory(header[at : at + size])), source_port
        destination = str(factory(header[at + size : at + 2 * size])), destination_port
    # UNSPEC: 2.2 "the receiver is free to accept the connection anyway and
    # use the real endpoint addresses"; AF_UNIX paths do not fit (str, int).
    tlvs_or_none = _parse_tlvs(header, _V2_FIXED + address_length)
    if tlvs_or_none is None:
        raise RemoteProtocolError("malformed PROXY v2 TLVs")
    return ProxyHeader(source, destination, "PROXY", tlvs_or_none), end


def _parse_tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...] | None:
    """The TLVs from ``start`` to the end of ``header``; None if they do not
    tile it exactly or break a rule the constructor enforces.

    Raises ``RemoteProtocolError`` on a checksum mismatch (2.2.3: "if they do
    not match, the connection SHOULD be dropped").
    """
    tlvs: list[tuple[int, bytes]] = []
    crc_at: int | None = None
    at = start
    while at < len(header):
        if at + 3 > len(header):
            return None
        kind, size = struct.unpack_from("!BH", header, at)
        value = header[at + 3 : at + 3 + size]
        if len(value) != size:
            return None
        if kind == PP2_TYPE_CRC32C:
            if size != 4 or crc_at is not None:
                return None
            crc_at = at + 3
        tlvs.append((kind, value))
        at += 3 + size
    if crc_at is not None:
        expected = int.from_bytes(header[crc_at : crc_at + 4], "big")
        zeroed = header[:crc_at] + b"\x00" * 4 + header[crc_at + 4 :]
        if crc32c(zeroed) != expected:
            raise RemoteProtocolError("PROXY v2 CRC32C mismatch")
    return tuple(tlvs)


# --------------------------------------------------------------------------
# CRC32C (2.2.3: "as described in RFC4960, Appendix B")
# --------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    # Castagnoli polynomial, bit-reflected (RFC 4960 appendix B).
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
