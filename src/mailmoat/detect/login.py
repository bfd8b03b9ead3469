"""Login facts for the rules: failures and distinct counts per source and per user.

Contract: :meth:`LoginDetector.record` is called once per login outcome (SMTP
AUTH, IMAP LOGIN/AUTHENTICATE, later webmail) with the client address, the
user and whether the backend accepted it, and returns :class:`LoginFacts`,
the ``login.*`` rule fields, counted over ``window`` seconds *including* this
attempt.  Everything it needs from shared state is one list of operations,
so a Redis store answers it in one round trip.

What is counted (keys under ``login:``):

- failed logins per address, per IPv6 prefix (``/64`` by default; an IPv4
  address is its own prefix), per user and per user+address;
- among the failures: distinct users per address (password spraying) and
  distinct addresses per user (credential stuffing); successful logins do not
  count, so an office NAT where many people log in is not a sprayer;
- distinct passwords per user among the failures, through a salted,
  truncated HMAC of the password (:func:`password_fingerprint`): a phone
  retrying one stale password counts one, a guesser counts many.  The
  fingerprint is 32 bits, never logged, and only stored inside the store's
  distinct-count structure.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from mailmoat.secret import Secret
from mailmoat.state.ops import Count, Distinct, DistinctPeek, Op, Peek, Store, normalize_ip

from ._net import prefix_of
from .tls import DOWNGRADE_MIN_LOGINS, INBOUND_WINDOW, SHARED_JA4_USERS

__all__ = ["LoginDetector", "LoginFacts", "fingerprint_of", "password_fingerprint", "prefix_of"]

DEFAULT_WINDOW: Final = 600.0
FINGERPRINT_HEX_DIGITS: Final = 8


@final
@dataclass(frozen=True, slots=True)
class LoginFacts:
    failures_ip: int = 0
    failures_prefix: int = 0
    failures_user: int = 0
    failures_user_ip: int = 0
    distinct_users_ip: int = 0
    distinct_ips_user: int = 0
    distinct_passwords_user: int = 0

    def fields(self) -> dict[str, int]:
        """The ``login.*`` rule context."""
        return {
            "failures_ip": self.failures_ip,
            "failures_prefix": self.failures_prefix,
            "failures_user": self.failures_user,
            "failures_user_ip": self.failures_user_ip,
            "distinct_users_ip": self.distinct_users_ip,
            "distinct_ips_user": self.distinct_ips_user,
            "distinct_passwords_user": self.distinct_passwords_user,
        }


def password_fingerprint(salt: bytes, password: bytes) -> str:
    """A salted 32-bit fingerprint of a password: tells passwords apart, reveals nothing."""
    digest = hmac.new(salt, password, hashlib.sha256).hexdigest()
    return digest[:FINGERPRINT_HEX_DIGITS]


def fingerprint_of(password: Secret | None) -> Callable[[bytes], str | None] | None:
    """What :class:`~mailmoat.session.commands.CheckLogin` takes for a sealed
    ``password``: the salt to its fingerprint (``None`` without a password)."""
    if password is None:
        return None
    return lambda salt: password_fingerprint(salt, password.reveal())


@final
class LoginDetector:
    """Counts login outcomes in a :class:`~mailmoat.state.Store`; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        window: float = DEFAULT_WINDOW,
        v6_prefix: int = 64,
        shared_ja4_users: int = SHARED_JA4_USERS,
        inbound_tls_window: float = INBOUND_WINDOW,
        downgrade_min_logins: int = DOWNGRADE_MIN_LOGINS,
    ) -> None:
        self.store = store
        self.window = window
        self.v6_prefix = v6_prefix
        #: thresholds of the TLS findings (:mod:`mailmoat.detect.tls`)
        self.shared_ja4_users = shared_ja4_users
        self.inbound_tls_window = inbound_tls_window
        self.downgrade_min_logins = downgrade_min_logins

    def ops(self, ip: str, user: str, success: bool, fingerprint: str | None = None) -> list[Op]:
        """The operations recording one login (exposed for batching with other detectors)."""
        w = self.window
        addr = normalize_ip(ip)
        prefix = prefix_of(addr, self.v6_prefix)
        who = user.casefold()
        failed = not success
        ops: list[Op] = []
        for key in (
            f"login:f:ip:{addr}",
            f"login:f:pfx:{prefix}",
            f"login:f:user:{who}",
            f"login:f:uip:{who}|{addr}",
        ):
            ops.append(Count(key, w) if failed else Peek(key, w))
        if failed and who:
            ops.append(Distinct(f"login:du:ip:{addr}", who, w))
            ops.append(Distinct(f"login:di:user:{who}", addr, w))
        else:
            ops.append(DistinctPeek(f"login:du:ip:{addr}", w))
            ops.append(DistinctPeek(f"login:di:user:{who}", w))
        if failed and fingerprint and who:
            ops.append(Distinct(f"login:dp:user:{who}", fingerprint, w))
        else:
            ops.append(DistinctPeek(f"login:dp:user:{who}", w))
        return ops

    @staticmethod
    def facts(results: list[object]) -> LoginFacts:
        values = [int(r) if isinstance(r, int) else 0 for r in results[:7]]
        return LoginFacts(*values)

    async def record(
        self, ip: str, user: str, success: bool, fingerprint: str | None = None
    ) -> LoginFacts:
        """Record one login outcome; the facts over the window, this attempt included."""
        return self.facts(await self.store.run(self.ops(ip, user, success, fingerprint)))
