"""Functions available to conditions, and the matchers behind named lists.

Contract:

- ``cidr(ip, net) -> bool``: ``ip`` is inside ``net`` (``"10.0.0.0/8"``, or a
  plain address).  ``::ffff:1.2.3.4`` matches as ``1.2.3.4``.  An ``ip`` that is
  not an address gives ``false``; a literal ``net`` is validated at load time,
  a computed one that does not parse gives ``false``.
- ``glob(s, pattern) -> bool``: shell-style, case-sensitive, whole string:
  ``*`` any run, ``?`` one character, ``[abc]``/``[!abc]`` a class.
- ``in_list(value, lists.NAME) -> bool``: membership in a named list, with the
  list kind's matching rules (see :class:`NamedList`).  The loader rewrites
  ``value in lists.NAME`` into this call, so both spellings are the same.

None of them raises for a value of the wrong type: they answer ``false``.
A function that raised would turn the condition into an evaluation error.

Theory of operation for IP lists: every entry (address or network) becomes
an integer range ``[first, last]`` per IP version; ranges are sorted and
merged once at load time into two parallel lists ``starts``/``ends``.  A
lookup is one :func:`bisect.bisect_right` on ``starts`` plus one comparison,
O(log n) whatever the list size.
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, final

ListKind = Literal["ip", "cidr", "user", "domain", "ja4", "string"]
LIST_KINDS: tuple[ListKind, ...] = ("ip", "cidr", "user", "domain", "ja4", "string")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(value: object) -> IPAddress | None:
    """An address, IPv4-mapped IPv6 unwrapped to IPv4; ``None`` if not an address."""
    if not isinstance(value, str):
        return None
    return _cached_ip(value)


@functools.lru_cache(maxsize=65536)
def _cached_ip(value: str) -> IPAddress | None:
    # parsing costs ~4 µs; a session's address is looked at in every phase
    try:
        addr = ipaddress.ip_address(value.strip("[]") if value.startswith("[") else value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def normalize_ip(value: str) -> str:
    """Canonical text of an address (``::ffff:1.2.3.4`` -> ``1.2.3.4``); unchanged if invalid."""
    addr = parse_ip(value)
    return value if addr is None else str(addr)


def parse_network(value: str) -> IPNetwork:
    """A network from ``"a.b.c.d/n"`` or a plain address; :class:`ValueError` with the fix."""
    text = value.strip()
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"not an IP network: {value!r} ({exc})") from None
        raise ValueError(
            f"{value!r} has host bits set; write {str(loose)!r} (or the address without /n)"
        ) from None
    mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


@functools.lru_cache(maxsize=4096)
def _cached_network(value: str) -> IPNetwork | None:
    try:
        return parse_network(value)
    except ValueError:
        return None


def cidr(ip: object, net: object) -> bool:
    """CEL ``cidr(ip, net)``."""
    if not isinstance(net, str):
        return False
    addr = parse_ip(ip)
    network = _cached_network(net)
    if addr is None or network is None or addr.version != network.version:
        return False
    return addr in network


@functools.lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.DOTALL)


def glob(value: object, pattern: object) -> bool:
    """CEL ``glob(s, pattern)``: case-sensitive shell-style match of the whole string."""
    if not isinstance(value, str) or not isinstance(pattern, str):
        return False
    return _glob_regex(pattern).match(value) is not None


@final
class IpRanges:
    """A set of addresses and networks, as merged sorted ranges per IP version."""

    __slots__ = ("_v4", "_v6")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for net in networks:
            span = (int(net.network_address), int(net.broadcast_address))
            (v4 if net.version == 4 else v6).append(span)
        self._v4 = _merge(v4)
        self._v6 = _merge(v6)

    def ranges(self, version: Literal[4, 6]) -> tuple[list[int], list[int]]:
        """``(starts, ends)`` for one IP version: sorted, disjoint, non-adjacent."""
        return self._v4 if version == 4 else self._v6

    def __len__(self) -> int:
        return len(self._v4[0]) + len(self._v6[0])

    def contains_address(self, addr: IPAddress) -> bool:
        starts, ends = self._v4 if addr.version == 4 else self._v6
        value = int(addr)
        i = bisect.bisect_right(starts, value) - 1
        return i >= 0 and value <= ends[i]

    def __contains__(self, value: object) -> bool:
        addr = parse_ip(value)
        return addr is not None and self.contains_address(addr)


def _merge(spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    spans.sort()
    starts: list[int] = []
    ends: list[int] = []
    for first, last in spans:
        if ends and first <= ends[-1] + 1:
            ends[-1] = max(ends[-1], last)
        else:
            starts.append(first)
            ends.append(last)
    return starts, ends


def _domain_key(value: str) -> str:
    # an address is matched by its domain: lists of domains apply to mail_from
    return value.rpartition("@")[2].strip().rstrip(".").lower()


@final
@dataclass(frozen=True, slots=True, eq=False)
class NamedList:
    """A ``[[list]]``: its entries, compiled for lookups by kind.

    Matching by kind (``value in lists.NAME``):

    - ``ip``, ``cidr``: ``value`` is an address inside any entry (addresses and
      networks may be mixed in both kinds; IPv4-mapped IPv6 matches IPv4);
    - ``domain``: case-insensitive, trailing dot ignored; an address
      (``a@example.org``) is matched by its domain; an entry ``*.example.org``
      matches every subdomain of ``example.org`` (not ``example.org`` itself);
    - ``user``: case-insensitive exact match;
    - ``ja4``, ``string``: exact, case-sensitive.
    """

    name: str
    kind: ListKind
    items: tuple[str, ...]
    source: str
    line: int | None
    matcher: Callable[[str], bool]

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and self.matcher(value)

    def __len__(self) -> int:
        return len(self.items)


def build_list(
    name: str,
    kind: ListKind,
    items: Iterable[tuple[str, int | None]],
    source: str,
    line: int | None,
) -> tuple[NamedList, list[tuple[str, int | None]]]:
    """Compile a list; returns it and ``(message, line)`` for every bad entry."""
    errors: list[tuple[str, int | None]] = []
    kept: list[str] = []
    matcher: Callable[[str], bool]
    if kind in ("ip", "cidr"):
        networks: list[IPNetwork] = []
        for item, item_line in items:
            if kind == "ip" and "/" in item:
                errors.append((f"list {name!r} is of kind ip: {item!r} is a network", item_line))
                continue
            try:
                networks.append(parse_network(item))
            except ValueError as exc:
                errors.append((f"list {name!r}: {exc}", item_line))
                continue
            kept.append(item)
        ranges = IpRanges(networks)
        matcher = ranges.__contains__
        return NamedList(name, kind, tuple(kept), source, line, matcher), errors
    exact: set[str] = set()
    suffixes: set[str] = set()
    for item, item_line in items:
        if kind == "domain":
            key = item.lower().rstrip(".")
            bare = key[2:] if key.startswith("*.") else key
            if not _DOMAIN.fullmatch(bare):
                errors.append((f"list {name!r}: {item!r} is not a domain name", item_line))
                continue
            (suffixes if key.startswith("*.") else exact).add(
                "." + bare if key.startswith("*.") else key
            )
        elif kind == "ja4":
            if not _JA4.fullmatch(item):
                errors.append(
                    (
                        f"list {name!r}: {item!r} is not a JA4 fingerprint"
                        " (like t13d1516h2_8daaf6152771_e5627efa2ab1)",
                        item_line,
                    )
                )
                continue
            exact.add(item)
        elif kind == "user":
            exact.add(item.lower())
        else:
            exact.add(item)
        kept.append(item)
    frozen_exact = frozenset(exact)
    if kind == "domain":
        frozen_suffixes = frozenset(suffixes)

        def match_domain(value: str) -> bool:
            key = _domain_key(value)
            if key in frozen_exact:
                return True
            if frozen_suffixes:
                dot = key.find(".")
                while dot != -1:
                    if key[dot:] in frozen_suffixes:
                        return True
                    dot = key.find(".", dot + 1)
            return False

        matcher = match_domain
    elif kind == "user":

        def match_user(value: str) -> bool:
            return value.lower() in frozen_exact

        matcher = match_user
    else:
        matcher = frozen_exact.__contains__
    return NamedList(name, kind, tuple(kept), source, line, matcher), errors


_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_-]{1,63})*")
_JA4 = re.compile(r"[a-z0-9]{10}_[0-9a-f]{12}_[0-9a-f]{12}")


def make_in_list(lists: dict[str, NamedList]) -> Callable[[Any, Any], bool]:
    """The CEL ``in_list(value, lists.NAME)`` function over a rule set's lists.

    ``lists.NAME`` evaluates to the list's name (a handle): the entries never
    enter CEL, so a 100k-entry list costs nothing per evaluation.
    """

    def in_list(value: Any, name: Any) -> bool:
        named = lists.get(name) if isinstance(name, str) else None
        return named is not None and isinstance(value, str) and named.matcher(value)

    return in_list
