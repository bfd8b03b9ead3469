"""The ``http.*`` rule facts of one request.

Contract: :func:`request_fields` returns the values of the ``http``
namespace of the rule context (keys relative to it, as ``LoginFacts.fields``
does for ``login``), so that a session does ``ctx["http"].update(...)``.
Every key is always present, at the schema's zero value (``""``, ``0``,
``{}``) when the request does not say.  Credentials never appear: the
values of ``Authorization``, ``Proxy-Authorization`` and ``Cookie`` are
redacted, and ``form`` comes from a :class:`FormResult`, which holds no
secret fields.
"""

from __future__ import annotations

import urllib.parse
from typing import Final, TypedDict, final

import h11

from ._forms import SECRET_FIELD_RE, FormResult
from ._syntax import normalize_path, split_target

REDACTED: Final = "***"
#: whose value is a credential; ``Authorization`` keeps its scheme (``Basic ***``)
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})


class RequestFields(TypedDict):
    """Keys of the ``http`` rule namespace, relative to it."""

    method: str
    #: normalised: see :func:`normalize_path`; what path rules should test
    path: str
    #: as sent (no query), percent-encoding and dot-segments untouched
    raw_path: str
    #: as sent, without the ``?``
    query: str
    #: lower-cased ``Host`` (or the authority of an absolute-form target)
    host: str
    user_agent: str
    #: lower-case name -> value; repeated fields joined with ", "; secrets redacted
    headers: dict[str, str]
    content_type: str
    #: the declared ``Content-Length``; 0 when absent (chunked or no body)
    content_length: int
    #: the login form's non-secret fields (empty unless a form was read)
    form: dict[str, str]


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _redact(name: str, value: str) -> str:
    if name == "cookie":
        return REDACTED
    scheme, _, _ = value.partition(" ")
    return f"{scheme} {REDACTED}" if scheme else REDACTED


def redact_query(query: str) -> str:
    """``query`` with the value of every parameter whose name looks secret
    (:data:`SECRET_FIELD_RE`, as for form fields) replaced by ``***``."""
    if "=" not in query:
        return query
    parts = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        secret = equals and SECRET_FIELD_RE.search(urllib.parse.unquote_plus(name))
        parts.append(f"{name}={REDACTED}" if secret else part)
    return "&".join(parts)


@final
class RequestLine:
    """``METHOD target`` of a request for a transcript, built only if asked
    (:meth:`redacted`): most requests are never written down."""

    __slots__ = ("request",)

    def __init__(self, request: h11.Request) -> None:
        self.request = request

    def redacted(self) -> bytes:
        """The line, the target cut at 1 KiB and its secret query values masked."""
        path, question, query = self.request.target[:1024].partition(b"?")
        if question:
            path += b"?" + redact_query(query.decode("latin-1")).encode("latin-1")
        return self.request.method + b" " + path


def request_fields(request: h11.Request, body_form: FormResult | None = None) -> RequestFields:
    """The facts rules see about ``request`` (and its login form, if read)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers:
        name, value = _text(raw_name), _text(raw_value)
        if name in _SECRET_HEADERS:
            value = _redact(name, value)
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    target = split_target(request.target)
    if target is None:
        raw_path, query, host = request.target, b"", b""
    else:
        raw_path, query, host = target.path, target.query, target.authority
    if not host:
        host = next((value for name, value in request.headers if name == b"host"), b"")
    length = next((value for name, value in request.headers if name == b"content-length"), b"")
    return RequestFields(
        method=_text(request.method),
        path=normalize_path(raw_path),
        raw_path=_text(raw_path),
        query=_text(query),
        host=_text(host).lower(),
        user_agent=headers.get("user-agent", ""),
        headers=headers,
        content_type=headers.get("content-type", ""),
        content_length=int(length) if length.isdigit() and len(length) <= 19 else 0,
        form=dict(body_form.fields) if body_form is not None else {},
    )
