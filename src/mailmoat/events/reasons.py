"""Every ``session.close_reason``, and what each one means downstream.

The protocol sessions and drivers set a session's close reason; three
readers judge it, and before this module each kept a list of its own that
drifted apart (``http_refused`` lowered a source's reputation but never
showed as blocked on the review page):

* the connection driver lowers the source's reputation after a
  :data:`REFUSALS` close;
* the journal (``mailmoat events --blocked``, ``/api/events?blocked``, the
  review page) calls a ``session.close`` blocked when its reason is in
  :data:`BLOCKING`;
* the metrics keep ``close_reason`` a closed label set: :data:`ALL`, anything
  else is ``other``.

A new close reason is added here, once, with its kind; docs/events.md lists
them for users.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ALL", "BLOCKING", "REFUSALS", "kind_of"]

#: the client or the session ended it the normal way
_ENDED: Final = (
    "client_quit",
    "client_logout",
    "client_closed",
    "client_gone",
    "client_timeout",
    "client_idle",
    "idle_timeout",
    "shutdown",
)
#: the client broke the protocol or its TLS, without a rule or a check saying no
_CLIENT_FAULT: Final = (
    "client_protocol_error",
    "tls_failed",
    "response_before_body",
)
#: mailmoat refused the client: a rule, a ban, or a built-in safety check.
#: These lower the source's reputation and are blocked sessions for the SOC.
_REFUSALS: Final = (
    "policy_deny",
    "policy_ban",
    "policy_tarpit",
    "pregreet",
    "non_smtp_command",
    "pipelining_violation",
    "starttls_injection",
    "message_smuggling",
    "message_bare_newline",
    "too_many_errors",
    "line_too_long",
    "http_refused",
)
#: mailmoat refused something without blaming the source's reputation for it:
#: an address already banned (counted when it was banned), a message a
#: ``data`` rule or a size limit refused, a login refused while the shared
#: store was blind.  Blocked sessions for the SOC all the same.
_REFUSED_QUIETLY: Final = (
    "banned",
    "message_rejected",
    "message_too_big",
    "message_line_too_long",
    "state_unavailable",
)
#: the backend failed or misbehaved; mailmoat closed the client's session
_BACKEND: Final = (
    "backend_xclient_refused",
    "backend_unavailable",
    "backend_refused",
    "backend_closed",
    "backend_timeout",
    "backend_protocol_error",
    "backend_tls_failed",
    "backend_starttls_missing",
    "backend_starttls_refused",
    "backend_starttls_injection",
    "backend_preauth",
    "backend_id_refused",
)
#: a bug: the session closed on an exception (an ``internal_error`` alert says which)
_INTERNAL: Final = ("internal_error", "unknown")

_KINDS: Final = {
    "ended": _ENDED,
    "client_fault": _CLIENT_FAULT,
    "refusal": _REFUSALS,
    "refused_quietly": _REFUSED_QUIETLY,
    "backend": _BACKEND,
    "internal": _INTERNAL,
}
_KIND_OF: Final = {reason: kind for kind, reasons in _KINDS.items() for reason in reasons}

#: every close reason (plus ``unknown``: a session that set none)
ALL: Final = frozenset(_KIND_OF)
#: the closes that lower the source's reputation
REFUSALS: Final = frozenset(_REFUSALS)
#: the closes that make a session *blocked* in the journal and on the review page
BLOCKING: Final = frozenset(_REFUSALS + _REFUSED_QUIETLY)


def kind_of(reason: str) -> str | None:
    """``ended``, ``client_fault``, ``refusal``, ``refused_quietly``,
    ``backend`` or ``internal``; ``None`` for a reason this module does not know."""
    return _KIND_OF.get(reason)
