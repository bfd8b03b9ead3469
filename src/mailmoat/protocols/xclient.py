"""Postfix XCLIENT command lines (https://www.postfix.org/XCLIENT_README.html).

XCLIENT lets a trusted proxy tell Postfix's smtpd who the real client is, so
that Postfix logs, access controls and the ``Received:`` header name the
client and not the proxy.  The grammar::

    xclient-command = XCLIENT 1*( SP attribute-name"="attribute-value )
    attribute-value = xtext

``xtext`` is RFC 3461 §4: "any ASCII CHAR between "!" (33) and "~" (126)
inclusive, except for "+" and "=", ... [is] encoded as itself"; everything
else becomes ``+`` followed by two upper-case hex digits.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from mailmoat.errors import LocalProtocolError

#: Attributes mailmoat may send; XCLIENT_README lists these names.
ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
#: Postfix's "this value is not available" markers, sent unencoded.
UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"


def xtext(value: str | bytes) -> str:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    out = []
    for b in raw:
        if 33 <= b <= 126 and b not in (0x2B, 0x3D):
            out.append(chr(b))
        else:
            out.append(f"+{b:02X}")
    return "".join(out)


def xclient_addr(ip: str) -> str:
    """The ADDR value: IPv4 as is, IPv6 with the ``IPV6:`` prefix Postfix expects."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return f"IPV6:{addr.compressed}"
    return str(addr)


def format_xclient(attributes: Mapping[str, str]) -> bytes:
    """One ``XCLIENT`` command line; values are xtext-encoded except the markers."""
    if not attributes:
        raise LocalProtocolError("XCLIENT needs at least one attribute")
    parts = []
    for name, value in attributes.items():
        if name not in ATTRIBUTES:
            raise LocalProtocolError(f"unknown XCLIENT attribute {name!r}")
        encoded = value if value in (UNAVAILABLE, TEMPUNAVAIL) else xtext(value)
        parts.append(f"{name}={encoded}")
    line = ("XCLIENT " + " ".join(parts)).encode("ascii") + b"\r\n"
    if len(line) > 512:
        raise LocalProtocolError("XCLIENT line longer than 512 octets")
    return line
