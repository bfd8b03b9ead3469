"""HTTP/1.1 grammar pieces shared by the screen, the forwarding rules and the facts.

Everything works on bytes; nothing here raises: callers decide what a
mismatch means (a refusal in the screen, a best effort in the facts).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Final, final

# RFC 9110 5.6.2: token = 1*tchar; tchar = "!" / "#" / "$" / "%" / "&" / "'" /
# "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
TOKEN_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# RFC 9110 5.5: field-value = *field-content; field-vchar = VCHAR / obs-text,
# with SP and HTAB between.  Every other CTL (NUL, CR, LF, VT, FF, DEL, ...)
# is refused: "Field values containing CR, LF, or NUL characters are invalid
# and dangerous [...]. Field values containing other CTL characters are also
# invalid".
CTL_IN_VALUE_RE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# RFC 3986 3.2.2 host (IP-literal or reg-name) and 3.2.3 port, narrowed to
# what a browser sends: DNS names, IPv4, bracketed IPv6; no userinfo, no
# sub-delims, no percent-encoding.
HOST_RE: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::[0-9]{0,5})?")

# RFC 9112 3.2.2: absolute-form = absolute-URI; only http and https name
# something a web server can serve.
ABSOLUTE_RE: Final = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)

DEFAULT_PORTS: Final = {b"http": 80, b"https": 443}


@final
@dataclass(frozen=True, slots=True)
class Target:
    """A request-target taken apart (RFC 9112 3.2).

    ``form`` is ``"origin"`` (``/path?query``), ``"absolute"``
    (``http://host/path``) or ``"asterisk"`` (``*``); the authority-form
    (``host:port``) belongs to CONNECT, which a reverse proxy refuses.
    ``path`` and ``query`` are raw bytes (``query`` without the ``?``);
    ``authority`` is set for the absolute form.
    """

    form: str
    path: bytes
    query: bytes
    scheme: bytes = b""
    authority: bytes = b""


def split_target(target: bytes) -> Target | None:
    """Classify ``target``; ``None`` if it has none of the three forms."""
    if target == b"*":
        return Target("asterisk", b"*", b"")
    if target.startswith(b"/"):
        path, _, query = target.partition(b"?")
        return Target("origin", path, query)
    absolute = ABSOLUTE_RE.fullmatch(target)
    if absolute is not None:
        scheme, authority, rest = absolute.groups()
        if rest and not rest.startswith((b"/", b"?")):
            return None
        path, _, query = rest.partition(b"?")
        return Target("absolute", path or b"/", query, scheme.lower(), authority)
    return None


def canonical_authority(authority: bytes, scheme: bytes) -> bytes:
    """``authority`` lower-cased, its port in decimal without leading zeros;
    an empty port and the scheme's default port are left out."""
    lowered = authority.lower()
    if lowered.endswith(b"]") or b":" not in lowered:
        return lowered
    host, _, port = lowered.rpartition(b":")
    if port == b"":
        return host
    if not port.isdigit():
        return lowered
    number = int(port)
    if number == DEFAULT_PORTS.get(scheme):
        return host
    return host + b":" + str(number).encode("ascii")


def comma_tokens(values: list[bytes]) -> list[bytes]:
    """The lower-cased, non-empty items of comma-separated header values."""
    out = []
    for value in values:
        for item in value.split(b","):
            token = item.strip(b" \t").lower()
            if token:
                out.append(token)
    return out


def normalize_path(path: bytes) -> str:
    """The path a rule should see, whatever spelling the client chose.

    Percent-decoded (as UTF-8, invalid sequences replaced by U+FFFD), then
    ``.`` and ``..`` segments resolved (RFC 3986 5.2.4) and empty segments
    (``//``) dropped; always starts with ``/`` (``*`` stays ``*``).  A
    decoded ``%2F`` separates segments, so ``/a%2F..%2Fadmin`` is
    ``/admin``: rules see what a decoding backend would serve.
    """
    if path == b"*":
        return "*"
    decoded = urllib.parse.unquote_to_bytes(path).decode("utf-8", "replace")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    result = "/" + "/".join(segments)
    if segments and decoded.endswith(("/", "/.", "/..")):
        result += "/"
    return result
