"""Who is logging in: the user name from a webmail login form, and its password sealed.

Contract: a :class:`LoginForm` names the login endpoint and its fields; a
:class:`FormExtractor` watches one request body go by (the proxy streams the
body on regardless: the extractor only observes) and :meth:`finish
<FormExtractor.finish>` returns a :class:`FormResult`.  Encodings, from the
``Content-Type``: ``application/x-www-form-urlencoded``,
``multipart/form-data`` (RFC 7578; small text parts only), and JSON (a
top-level object's string members).

* Nothing here raises on client bytes: an unknown content type, broken
  percent-encoding, a malformed multipart body or JSON gives ``user=None``.
* A body larger than ``limit`` is not kept: ``truncated=True``, ``user=None``.
* Secrets never leave: the password field and every field whose name
  contains ``pass``, ``passwd``, ``password``, ``secret``, ``token`` or
  ``otp`` (any case) are left out of ``fields``; the buffered body is
  dropped by :meth:`~FormExtractor.finish` and never shown by ``repr``.
  The password field's value is only handed over as a
  :class:`~mailmoat.secret.Secret` (``FormResult.password``), for the
  salted fingerprint of the distinct-passwords count
  (:func:`mailmoat.detect.login.password_fingerprint`).
* A user field sent more than once with different values (``_user=a&_user=b``:
  PHP reads the last, other stacks the first) gives ``user=None`` and
  ``ambiguous=True``, so that a rule can refuse it.  A password field sent
  with different values gives ``password=None``, as does an empty one.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Final, Literal, final

import h11

from mailmoat.errors import LocalProtocolError
from mailmoat.secret import Secret

from ._syntax import normalize_path, split_target

Encoding = Literal["urlencoded", "multipart", "json"]

#: Field names that hold secrets, whatever the form says.
SECRET_FIELD_RE: Final = re.compile(r"password|passwd|pass|secret|token|otp", re.IGNORECASE)
DEFAULT_FORM_LIMIT: Final = 64 * 1024
#: multipart parts longer than this are not text a login form sends
MAX_PART_SIZE: Final = 4096

_PARAM_RE: Final = re.compile(
    r';\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', re.DOTALL
)
# RFC 2046 5.1.1: boundary := 0*69<bchars> bcharsnospace
_BOUNDARY_RE: Final = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
# After a boundary delimiter: transport padding, then CRLF (RFC 2046 5.1.1).
_PADDING_CRLF_RE: Final = re.compile(rb"[ \t]*\r\n")


@final
@dataclass(frozen=True, slots=True)
class LoginForm:
    """A webmail login endpoint.

    ``path`` is compared with the request's path, both normalised by
    :func:`~mailmoat.protocols.http.normalize_path`; ``method`` exactly.
    ``password_field`` is named so that it is left out of the fields and only
    handed over sealed (:attr:`FormResult.password`).  A request that matches
    but carries no ``user_field`` is not a login (Roundcube posts every
    action to ``/``).
    """

    path: str
    user_field: str
    password_field: str
    method: str = "POST"

    def __post_init__(self) -> None:
        for name in ("path", "user_field", "password_field", "method"):
            value = getattr(self, name)
            if type(value) is not str or not value:
                raise LocalProtocolError(f"LoginForm.{name} must be a non-empty string")
        if not self.path.startswith("/"):
            raise LocalProtocolError("LoginForm.path must start with '/'")

    def matches(self, request: h11.Request) -> bool:
        """Does ``request`` go to this endpoint?"""
        if request.method != self.method.encode("ascii", "replace"):
            return False
        target = split_target(request.target)
        if target is None or target.form == "asterisk":
            return False
        return normalize_path(target.path) == normalize_path(self.path.encode("utf-8"))


@final
@dataclass(frozen=True, slots=True)
class FormResult:
    """What a login body said, secrets removed or sealed.

    ``fields`` maps field names to values (first occurrence wins), without
    secret fields; ``encoding`` is ``None`` when the content type is not one
    we read; ``size`` counts every body octet seen.  ``password`` is the
    password field's value (UTF-8) as a :class:`~mailmoat.secret.Secret`,
    whose ``repr`` is ``Secret(***)``; ``None`` when absent, empty or sent
    with different values.
    """

    user: str | None
    fields: dict[str, str] = field(default_factory=dict)
    encoding: Encoding | None = None
    truncated: bool = False
    ambiguous: bool = False
    size: int = 0
    password: Secret | None = None


def _media_type(content_type: bytes | str | None) -> tuple[str, dict[str, str]]:
    """``("type/subtype", {param: value})``, lower-cased type and names."""
    if content_type is None:
        return "", {}
    text = content_type.decode("latin-1") if isinstance(content_type, bytes) else str(content_type)
    essence, _, rest = text.partition(";")
    params: dict[str, str] = {}
    for name, raw in _PARAM_RE.findall(";" + rest):
        value = raw.strip()
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1], flags=re.DOTALL)
        params.setdefault(name.lower(), value)
    return essence.strip().lower(), params


def detect_encoding(content_type: bytes | str | None) -> tuple[Encoding | None, str]:
    """The form encoding a ``Content-Type`` announces, and the multipart boundary."""
    essence, params = _media_type(content_type)
    if essence == "application/x-www-form-urlencoded":
        return "urlencoded", ""
    if essence == "multipart/form-data":
        boundary = params.get("boundary", "")
        if _BOUNDARY_RE.fullmatch(boundary) is None:
            return None, ""
        return "multipart", boundary
    if essence == "application/json" or (
        essence.startswith("application/") and essence.endswith("+json")
    ):
        return "json", ""
    return None, ""


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _urlencoded(body: bytes) -> list[tuple[str, str]]:
    # WHATWG URL "application/x-www-form-urlencoded parsing": split on "&",
    # then on the first "=", "+" is a space, then percent-decode (invalid
    # escapes stay as they are).
    pairs = []
    for item in body.split(b"&"):
        if not item:
            continue
        name, _, value = item.partition(b"=")
        pairs.append(
            (
                _text(urllib.parse.unquote_to_bytes(name.replace(b"+", b" "))),
                _text(urllib.parse.unquote_to_bytes(value.replace(b"+", b" "))),
            )
        )
    return pairs


def _disposition_name(headers: bytes) -> tuple[str | None, bool]:
    """The ``name`` of a part's ``Content-Disposition: form-data``, and whether it is a file."""
    name: str | None = None
    is_file = False
    text_only = True
    for line in headers.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if not colon:
            continue
        key = key.strip().lower()
        if key == b"content-disposition":
            # non-ASCII names come as raw UTF-8 (RFC 7578 5.1)
            essence, params = _media_type(value.strip().decode("utf-8", "replace"))
            if essence != "form-data":
                return None, False
            name = params.get("name")
            is_file = "filename" in params or "filename*" in params
        elif key == b"content-type":
            essence, _ = _media_type(value.strip())
            text_only = essence in ("", "text/plain")
    return name, is_file or not text_only


def _multipart(body: bytes, boundary: str) -> list[tuple[str, str]] | None:
    """The small text parts of a complete ``multipart/form-data`` body; None if broken."""
    # RFC 2046 5.1.1: "The boundary delimiter MUST occur at the beginning of
    # a line, i.e., following a CRLF"; the first one may open the body.
    marker = b"\r\n--" + boundary.encode("ascii")
    data = b"\r\n" + body
    spans: list[tuple[int, int]] = []  # (start, end) of each part
    start: int | None = None
    at = 0
    while True:
        found = data.find(marker, at)
        if found < 0:
            return None  # no close delimiter: incomplete
        after = found + len(marker)
        if data.startswith(b"--", after):
            if start is None:
                return None
            spans.append((start, found))
            break
        padding = _PADDING_CRLF_RE.match(data, after)
        if padding is None:
            at = after  # "--boundaryX": not a delimiter
            continue
        if start is not None:
            spans.append((start, found))
        start = at = padding.end()
    pairs = []
    for begin, end in spans:
        part = data[begin:end]
        if part.startswith(b"\r\n"):
            head, content = b"", part[2:]
        else:
            head, sep, content = part.partition(b"\r\n\r\n")
            if not sep:
                return None
        name, skip = _disposition_name(head)
        if name is None or skip or len(content) > MAX_PART_SIZE:
            continue
        pairs.append((name, _text(content)))
    return pairs


class _Pairs(list[tuple[str, object]]):
    """A JSON object, as its members in order."""


def _json(body: bytes) -> list[tuple[str, str]] | None:
    try:
        value = json.loads(body.decode("utf-8"), object_pairs_hook=_Pairs)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(value, _Pairs):
        return None
    return [(name, member) for name, member in value if isinstance(member, str)]


@final
class FormExtractor:
    """Observe one request body; :meth:`finish` says what the form held.

    ``content_type`` is the request's ``Content-Type`` value (bytes as h11
    gives it, or text).  At most ``limit`` octets are kept.
    """

    __slots__ = (
        "_body",
        "_boundary",
        "_done",
        "_encoding",
        "_limit",
        "_size",
        "_truncated",
        "spec",
    )

    def __init__(
        self,
        spec: LoginForm,
        content_type: bytes | str | None,
        limit: int = DEFAULT_FORM_LIMIT,
    ) -> None:
        if type(limit) is not int or limit < 0:
            raise LocalProtocolError(f"limit must be an int >= 0, not {limit!r}")
        self.spec: Final = spec
        self._encoding, self._boundary = detect_encoding(content_type)
        self._body = bytearray()
        self._size = 0
        self._limit = limit
        self._truncated = False
        self._done = False

    def __repr__(self) -> str:
        return f"<FormExtractor {self._encoding} size={self._size}>"

    def feed(self, chunk: bytes) -> None:
        """Another piece of the body, as it goes by."""
        if self._done:
            raise LocalProtocolError("feed() after finish()")
        self._size += len(chunk)
        if self._encoding is None or self._truncated:
            return
        if self._size > self._limit:
            self._truncated = True
            self._body.clear()
            return
        self._body += chunk

    def finish(self) -> FormResult:
        """The end of the body: the user, the non-secret fields and the sealed password."""
        if self._done:
            raise LocalProtocolError("finish() called twice")
        self._done = True
        body = bytes(self._body)
        self._body.clear()
        if self._encoding is None or self._truncated:
            return FormResult(None, {}, self._encoding, self._truncated, False, self._size)
        pairs: list[tuple[str, str]] | None
        if self._encoding == "urlencoded":
            pairs = _urlencoded(body)
        elif self._encoding == "multipart":
            pairs = _multipart(body, self._boundary)
        else:
            pairs = _json(body)
        if pairs is None:
            return FormResult(None, {}, self._encoding, False, False, self._size)
        spec = self.spec
        user, ambiguous = _single(pairs, spec.user_field)
        password, _ = _single(pairs, spec.password_field)
        fields: dict[str, str] = {}
        for name, value in pairs:
            if name == spec.password_field or SECRET_FIELD_RE.search(name):
                continue
            fields.setdefault(name, value)
        return FormResult(
            user,
            fields,
            self._encoding,
            False,
            ambiguous,
            self._size,
            # surrogatepass: a JSON "\udc80" (a lone surrogate) must not raise
            password=Secret(password.encode("utf-8", "surrogatepass")) if password else None,
        )


def _single(pairs: list[tuple[str, str]], name: str) -> tuple[str | None, bool]:
    """The value of field ``name`` if it has one (``None`` if absent or empty),
    and whether it was sent with different values (then ``None`` too)."""
    values = {value for field_name, value in pairs if field_name == name}
    if len(values) > 1:
        return None, True
    return (values.pop() or None) if values else None, False
