"""The network an address is counted in (shared by the login, reputation and TLS detectors)."""

from __future__ import annotations

import ipaddress

from mailmoat.state.ops import normalize_ip


def prefix_of(ip: str, v6_prefix: int = 64, v4_prefix: int = 32) -> str:
    """``ip``'s network: IPv4 per ``v4_prefix`` (itself by default), IPv6 per ``v6_prefix``.

    IPv4-mapped IPv6 counts as IPv4; a string that is no address is its own key.
    """
    key = normalize_ip(ip)
    try:
        addr = ipaddress.ip_address(key)
    except ValueError:
        return key
    if addr.version == 4 and v4_prefix == 32:
        return key
    bits = v4_prefix if addr.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{key}/{bits}", strict=False))
