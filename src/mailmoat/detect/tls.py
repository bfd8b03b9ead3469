"""TLS findings: downgrades against a user's history, shared client fingerprints, stripped STARTTLS.

Contract: pure functions and small value types; what they need from shared
state is expressed as store operations (like :mod:`mailmoat.detect.login`),
so the driver batches them into the round trip it already makes.

- **Per-user TLS history** (:class:`ProtocolTls`, kept inside the user's
  :class:`~mailmoat.detect.travel.LoginProfile`): per protocol, the TLS
  versions the user logged in with (most recent last), how many logins were
  encrypted and how many were plaintext.  :func:`assess_downgrade` says
  whether *this* login is a downgrade: plaintext although every earlier login
  on this protocol was encrypted, or a TLS version older than every version in
  the history.  It needs ``min_logins`` encrypted logins first, and is
  evaluated for failed logins too (a stripping attacker's guesses are
  downgrades), while only successful logins that are not downgrades update
  the history (:func:`remember_tls`), so an attacker cannot teach it; a user
  who really moved to an older client stays reported until an admin
  exempts them in the rule.
- **Shared JA4** (:func:`shared_ja4_ops`): distinct users that *failed* to log
  in with one client fingerprint within a window.  A credential-stuffing tool
  cycles through accounts from one TLS stack; legitimate mail clients of many
  users share a fingerprint too, but rarely fail for many accounts at once.
  Browser fingerprints (JA4 ALPN ``h1``/``h2``/``h3``) never count as shared:
  every webmail user's browser looks alike.
- **Stripped STARTTLS inbound** (:func:`inbound_ops`, :func:`inbound_facts`):
  for unauthenticated SMTP (port 25), per sending domain and per client
  network, how many sessions in the window used STARTTLS and how many did not.
  A plaintext session from a peer that used STARTTLS in at least
  ``min_sessions`` sessions and in more than nine of ten is
  ``tls.stripped_inbound``: an on-path box removing STARTTLS from the EHLO
  reply looks exactly like that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, final

from mailmoat.state.ops import Count, Distinct, DistinctPeek, Op, Peek

from ._net import prefix_of

#: TLS versions by age; higher is newer ("" is plaintext)
VERSION_RANK: Final[Mapping[str, int]] = {
    "SSLv3": 0,
    "TLSv1": 1,
    "TLSv1.1": 2,
    "TLSv1.2": 3,
    "TLSv1.3": 4,
}
#: versions remembered per protocol
MAX_VERSIONS: Final = 5
#: encrypted logins on a protocol before a downgrade can be judged
DOWNGRADE_MIN_LOGINS: Final = 3
#: distinct failing users per non-browser JA4 within the window that make it "shared"
SHARED_JA4_USERS: Final = 10
#: STARTTLS sessions a sender needs before a plaintext one is "stripped"
INBOUND_MIN_SESSIONS: Final = 3
INBOUND_WINDOW: Final = 30 * 86400.0
_BROWSER_ALPN: Final = frozenset({"h1", "h2", "h3"})


@final
@dataclass(frozen=True, slots=True)
class ProtocolTls:
    """How one user logged in over one protocol (``smtp``, ``imap``, ``http``)."""

    protocol: str
    versions: tuple[str, ...] = ()
    tls: int = 0
    plain: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"versions": list(self.versions), "tls": self.tls, "plain": self.plain}

    @classmethod
    def from_dict(cls, protocol: str, data: Any) -> ProtocolTls:
        """``ValueError`` unless ``data`` is what :meth:`to_dict` wrote."""
        if not isinstance(data, Mapping):
            raise ValueError(f"tls history for {protocol!r} must be a mapping")  # noqa: TRY004
        versions = data.get("versions", [])
        if not isinstance(versions, list) or not all(v in VERSION_RANK for v in versions):
            raise ValueError(f"tls history for {protocol!r}: unknown TLS version")
        counts = [data.get("tls", 0), data.get("plain", 0)]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(f"tls history for {protocol!r}: counts must be non-negative integers")
        return cls(protocol, tuple(versions[-MAX_VERSIONS:]), counts[0], counts[1])


def history_to_dict(history: Sequence[ProtocolTls]) -> dict[str, Any]:
    return {h.protocol: h.to_dict() for h in history}


def history_from_dict(data: Any) -> tuple[ProtocolTls, ...]:
    if data is None:
        return ()
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise ValueError("login profile: 'tls' must map protocol names to histories")
    return tuple(ProtocolTls.from_dict(k, v) for k, v in sorted(data.items()))


def _find(history: Sequence[ProtocolTls], protocol: str) -> ProtocolTls:
    return next((h for h in history if h.protocol == protocol), ProtocolTls(protocol))


@final
@dataclass(frozen=True, slots=True)
class Downgrade:
    """Whether one login is a downgrade, and against what."""

    downgrade: bool = False
    #: ``"plaintext"`` or ``"older_version"`` when ``downgrade``
    reason: str = ""
    #: the oldest version this user used before (``""`` if none)
    usual: str = ""

    def fields(self) -> dict[str, Any]:
        """The ``tls.downgrade`` / ``tls.usual_version`` rule context."""
        return {"downgrade": self.downgrade, "usual_version": self.usual}


def assess_downgrade(
    history: Sequence[ProtocolTls],
    protocol: str,
    version: str,
    *,
    min_logins: int = DOWNGRADE_MIN_LOGINS,
) -> Downgrade:
    """Is a login over ``protocol`` with ``version`` (``""``: plaintext) a downgrade?"""
    h = _find(history, protocol)
    known = [VERSION_RANK[v] for v in h.versions if v in VERSION_RANK]
    if not known:
        return Downgrade()
    oldest = min(known)
    usual = next(v for v, r in VERSION_RANK.items() if r == oldest)
    if h.tls < min_logins:
        return Downgrade(usual=usual)
    if version == "":
        if h.plain == 0:
            return Downgrade(True, "plaintext", usual)
        return Downgrade(usual=usual)
    rank = VERSION_RANK.get(version)
    if rank is not None and rank < oldest:
        return Downgrade(True, "older_version", usual)
    return Downgrade(usual=usual)


def remember_tls(
    history: Sequence[ProtocolTls], protocol: str, version: str
) -> tuple[ProtocolTls, ...]:
    """``history`` after a successful login over ``protocol`` with ``version`` (``""``: plain)."""
    h = _find(history, protocol)
    if version == "":
        updated = replace(h, plain=h.plain + 1)
    else:
        versions = (*(v for v in h.versions if v != version), version)[-MAX_VERSIONS:]
        updated = replace(h, versions=versions, tls=h.tls + 1)
    rest = tuple(x for x in history if x.protocol != protocol)
    return tuple(sorted((*rest, updated), key=lambda x: x.protocol))


# --------------------------------------------------------------------------- shared JA4


def is_browser_ja4(ja4: str) -> bool:
    """A JA4 whose client offered HTTP in ALPN (``t13d1516h2_...``): a browser or HTTP client."""
    return len(ja4) >= 10 and ja4[8:10] in _BROWSER_ALPN


def shared_ja4_ops(ja4: str, user: str, failed: bool, window: float) -> list[Op]:
    """One op: the distinct users that failed with ``ja4`` (this one added if ``failed``)."""
    key = f"tls:ja4u:{ja4}"
    if failed and user:
        return [Distinct(key, user.casefold(), window)]
    return [DistinctPeek(key, window)]


@final
@dataclass(frozen=True, slots=True)
class SharedJa4:
    users: int = 0
    shared: bool = False

    def fields(self) -> dict[str, Any]:
        """The ``tls.ja4_users`` / ``tls.shared_ja4`` rule context."""
        return {"ja4_users": self.users, "shared_ja4": self.shared}


def shared_ja4(ja4: str, result: object, threshold: int = SHARED_JA4_USERS) -> SharedJa4:
    users = int(result) if isinstance(result, int) else 0
    return SharedJa4(users, users >= threshold and not is_browser_ja4(ja4))


# --------------------------------------------------------------------------- inbound STARTTLS


def sender_network(ip: str) -> str:
    """The network a sending MTA is remembered by: IPv4 /24, IPv6 /48."""
    return prefix_of(ip, v6_prefix=48, v4_prefix=24)


def inbound_ops(domain: str, network: str, tls: bool, window: float = INBOUND_WINDOW) -> list[Op]:
    """Four ops: count this session as TLS or plain per domain and network, peek the other."""
    ops: list[Op] = []
    for key in (f"tls:in:dom:{domain.casefold()}", f"tls:in:net:{network}"):
        used, other = (f"{key}:tls", f"{key}:plain") if tls else (f"{key}:plain", f"{key}:tls")
        ops += [Count(used, window), Peek(other, window)]
    return ops


@final
@dataclass(frozen=True, slots=True)
class InboundTls:
    """STARTTLS history of a sending domain and network, this session included."""

    domain_tls: int = 0
    domain_plain: int = 0
    network_tls: int = 0
    network_plain: int = 0
    stripped: bool = False

    def fields(self) -> dict[str, Any]:
        """The ``tls.stripped_inbound`` / ``tls.inbound_*`` rule context."""
        return {
            "stripped_inbound": self.stripped,
            "inbound_tls_sessions": max(self.domain_tls, self.network_tls),
            "inbound_plain_sessions": max(self.domain_plain, self.network_plain),
        }


def _stripped(tls_sessions: int, plain_before: int, min_sessions: int) -> bool:
    return tls_sessions >= min_sessions and plain_before * 10 < tls_sessions


def inbound_facts(
    results: Sequence[object], tls: bool, min_sessions: int = INBOUND_MIN_SESSIONS
) -> InboundTls:
    """Read the results of :func:`inbound_ops` (in its order)."""
    n = [int(r) if isinstance(r, int) else 0 for r in results[:4]]
    n += [0] * (4 - len(n))
    if tls:
        return InboundTls(n[0], n[1], n[2], n[3], False)
    dom_plain, dom_tls, net_plain, net_tls = n
    stripped = _stripped(dom_tls, dom_plain - 1, min_sessions) or _stripped(
        net_tls, net_plain - 1, min_sessions
    )
    return InboundTls(dom_tls, dom_plain, net_tls, net_plain, stripped)
