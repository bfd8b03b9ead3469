"""Did the webmail accept the login?  Judged from its response alone.

Contract: :func:`judge_login` reads the backend's final response to a login
request (see :class:`~mailmoat.protocols.http.LoginForm`) and says
``"success"`` or ``"failure"``, in this order:

1. the status is in ``failure_status``: failure;
2. ``failure_location`` is set and the ``Location`` matches it: failure;
3. the status is not in ``success_status``: failure;
4. ``success_location`` is set and the ``Location`` does not match it: failure;
5. ``success_cookie`` is set and the response does not set that cookie
   (a ``Set-Cookie`` with that name, a non-empty value other than
   ``deleted``, and no ``Max-Age`` <= 0): failure;
6. otherwise: success.

A ``Location`` matches a prefix if the header value starts with it, or, for
an absolute URL, if its path and query do.  Roundcube, for one, answers a
good login with ``302``, ``Location: ./?_task=mail`` and a
``roundcube_sessauth`` cookie, and a bad one with ``401`` (or ``200``) and
the login page again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, final

import h11

from mailmoat.errors import LocalProtocolError

from ._syntax import split_target

Outcome = Literal["success", "failure"]

_MAX_AGE_RE: Final = re.compile(rb"-?[0-9]{1,18}")


@final
@dataclass(frozen=True, slots=True)
class LoginOutcome:
    """How a webmail answers a login: see :func:`judge_login`."""

    success_status: tuple[int, ...] = (302, 303)
    success_location: str | None = None
    success_cookie: str | None = None
    failure_status: tuple[int, ...] = ()
    failure_location: str | None = None

    def __post_init__(self) -> None:
        for name in ("success_status", "failure_status"):
            codes = getattr(self, name)
            if type(codes) is not tuple or not all(
                type(code) is int and 100 <= code <= 599 for code in codes
            ):
                raise LocalProtocolError(f"LoginOutcome.{name} must be a tuple of HTTP statuses")
        if not self.success_status:
            raise LocalProtocolError("LoginOutcome.success_status must not be empty")
        for name in ("success_location", "success_cookie", "failure_location"):
            value = getattr(self, name)
            if value is not None and (type(value) is not str or not value):
                raise LocalProtocolError(f"LoginOutcome.{name} must be a non-empty string")


def _location_matches(location: bytes | None, prefix: str) -> bool:
    if location is None:
        return False
    wanted = prefix.encode("utf-8")
    if location.startswith(wanted):
        return True
    target = split_target(location)
    if target is None or target.form != "absolute":
        return False
    rest = target.path + (b"?" + target.query if target.query else b"")
    return rest.startswith(wanted)


def _sets_cookie(response: h11.Response, name: str) -> bool:
    wanted = name.encode("utf-8")
    for header, value in response.headers:
        if header != b"set-cookie":
            continue
        pair, *attributes = value.split(b";")
        cookie, equals, cookie_value = pair.partition(b"=")
        if not equals or cookie.strip() != wanted:
            continue
        cookie_value = cookie_value.strip().strip(b'"')
        if not cookie_value or cookie_value == b"deleted":
            continue
        deleted = False
        for attribute in attributes:
            key, _, attr_value = attribute.partition(b"=")
            # RFC 6265 5.2.2: "If delta-seconds is less than or equal to zero
            # (0), let expiry-time be the earliest representable date and time."
            # A Max-Age that is not an integer is ignored.
            if key.strip().lower() == b"max-age":
                seconds = _MAX_AGE_RE.fullmatch(attr_value.strip())
                if seconds is not None:
                    deleted = int(seconds.group()) <= 0
        if not deleted:
            return True
    return False


def judge_login(response: h11.Response, spec: LoginOutcome) -> Outcome:
    """``"success"`` or ``"failure"`` for the final response to a login request."""
    status = response.status_code
    location = next((value for name, value in response.headers if name == b"location"), None)
    if status in spec.failure_status:
        return "failure"
    if spec.failure_location is not None and _location_matches(location, spec.failure_location):
        return "failure"
    if status not in spec.success_status:
        return "failure"
    if spec.success_location is not None and not _location_matches(location, spec.success_location):
        return "failure"
    if spec.success_cookie is not None and not _sets_cookie(response, spec.success_cookie):
        return "failure"
    return "success"
