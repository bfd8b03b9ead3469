"""GeoIP: where an address is and which network it belongs to (``client.geo.*``, ``client.asn.*``).

Contract: :meth:`GeoIP.from_paths` opens a MaxMind City *or* Country
database and an ASN database, each optional, and fails with a
:class:`~mailmoat.errors.ConfigError` naming the file when one cannot be
opened or is not a MaxMind database of the expected kind.
:meth:`GeoIP.lookup` turns an address into a :class:`GeoInfo` and never
raises: an IPv4-mapped IPv6 address is looked up as IPv4; a private,
loopback, link-local, multicast, reserved or unparsable address, or one the
databases do not know, gives the empty :class:`GeoInfo` (the rule fields'
zero values).  Answers are kept in a bounded LRU cache.

The databases are read with :mod:`maxminddb` directly (its C extension,
memory-mapped) rather than through ``geoip2.database.Reader``: a City plus
ASN lookup takes about 5 us against about 22 us through ``geoip2``, which
builds model objects we would only take apart again.  A whole uncached
:meth:`GeoIP.lookup` takes about 18 us (IPv6 22 us; most of the rest is
parsing and classifying the address), a cache hit about 0.4 us.

The documentation ranges (``192.0.2.0/24``, ``2001:db8::/32``, ...) are
*not* treated as private: they never occur in the real databases, and the
tests use them.  No network I/O and no trio here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, final

import maxminddb

from mailmoat.errors import ConfigError

DEFAULT_CACHE_SIZE: Final = 8192
#: longer input cannot be an address (the longest IPv6 text with a zone is shorter)
_MAX_INPUT: Final = 100

#: database_type substrings accepted in each slot
_CITY_TYPES: Final = ("City", "Country", "Enterprise")
_ASN_TYPES: Final = ("ASN", "ISP")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ranges(*cidrs: str) -> tuple[tuple[int, int], ...]:
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return tuple((int(n.network_address), int(n.broadcast_address)) for n in nets)


#: IPv4 that is never in a geo database: this network, private, CGNAT, loopback,
#: link-local, benchmarking, multicast, reserved and broadcast
_V4_NOT_GLOBAL: Final = _ranges(
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
)
#: IPv6 global unicast is 2000::/3 (top three bits 001); everything else (loopback,
#: ULA, link-local, multicast, ...) is never in a geo database
_V6_GLOBAL_TOP3: Final = 0b001


@final
@dataclass(frozen=True, slots=True)
class GeoInfo:
    """What the databases say about one address; every field at its zero value if unknown."""

    country: str = ""
    city: str = ""
    lat: float = 0.0
    lon: float = 0.0
    accuracy_radius_km: int = 0
    asn_number: int = 0
    asn_org: str = ""

    @property
    def known(self) -> bool:
        """The country is known."""
        return self.country != ""

    @property
    def has_location(self) -> bool:
        """Coordinates are known (a Country database gives none; (0, 0) counts as none)."""
        return self.lat != 0.0 or self.lon != 0.0

    def fields(self) -> dict[str, dict[str, Any]]:
        """The ``client.geo`` and ``client.asn`` rule context, shaped to merge into ``client``."""
        return {
            "geo": {"country": self.country, "city": self.city, "lat": self.lat, "lon": self.lon},
            "asn": {"number": self.asn_number, "org": self.asn_org},
        }


EMPTY: Final = GeoInfo()


def lookup_address(ip: str) -> Address | None:
    """The address to look up for ``ip``, or ``None`` if it is unparsable or not global.

    IPv4-mapped IPv6 becomes IPv4; an IPv6 zone (``%eth0``) is dropped.
    """
    if not isinstance(ip, str) or len(ip) > _MAX_INPUT:
        return None
    try:
        addr: Address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif addr.scope_id is not None:
            addr = ipaddress.IPv6Address(addr.packed)
    if isinstance(addr, ipaddress.IPv4Address):
        value = int(addr)
        if any(lo <= value <= hi for lo, hi in _V4_NOT_GLOBAL):
            return None
    elif int(addr) >> 125 != _V6_GLOBAL_TOP3:
        return None
    return addr


def _open(kind: str, path: Path, accepted: Sequence[str], example: str) -> maxminddb.Reader:
    where = str(path)
    try:
        reader = maxminddb.open_database(os.fspath(path), maxminddb.MODE_AUTO)
    except FileNotFoundError:
        raise ConfigError(
            f"{kind} database does not exist (a MaxMind .mmdb file, e.g. {example})", where
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot open {kind} database: {exc.strerror or exc}", where) from None
    except (maxminddb.InvalidDatabaseError, ValueError) as exc:
        raise ConfigError(
            f"{kind} database is not a MaxMind DB file ({exc}); expected e.g. {example}", where
        ) from None
    db_type = str(reader.metadata().database_type)
    if not any(t in db_type for t in accepted):
        reader.close()
        raise ConfigError(
            f"{kind} database is a {db_type!r} database, expected a"
            f" {' or '.join(accepted)} database (e.g. {example})",
            where,
        )
    return reader


def _get(reader: maxminddb.Reader | None, addr: Address) -> Any:
    if reader is None:
        return None
    try:
        return reader.get(addr)
    except (ValueError, TypeError, maxminddb.InvalidDatabaseError):
        # e.g. IPv6 in an IPv4-only database, a closed reader, a corrupt tree
        return None


_NO_RECORD: Final[Mapping[str, Any]] = {}


def _sub(record: Any, key: str) -> Mapping[str, Any]:
    # maxminddb decodes maps to dict (plain isinstance: ABC checks cost here)
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, dict) else _NO_RECORD


def _name(record: Mapping[str, Any], locales: Sequence[str]) -> str:
    names = _sub(record, "names")
    for locale in locales:
        name = names.get(locale)
        if isinstance(name, str):
            return name
    return ""


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@final
class GeoIP:
    """Lookups in a City/Country database and an ASN database, either may be absent.

    ``GeoIP()`` with no readers answers every lookup with the empty
    :class:`GeoInfo`; use :meth:`from_paths` to open files.
    """

    def __init__(
        self,
        city: maxminddb.Reader | None = None,
        asn: maxminddb.Reader | None = None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        locales: Sequence[str] = ("en",),
    ) -> None:
        self._city = city
        self._asn = asn
        self._locales = tuple(locales)
        self._cache_size = max(0, cache_size)
        self._cache: OrderedDict[str, GeoInfo] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_paths(
        cls,
        city: Path | None,
        asn: Path | None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        locales: Sequence[str] = ("en",),
    ) -> GeoIP:
        """Open the databases; :class:`ConfigError` naming the file if one is unusable."""
        city_reader = (
            _open("city", Path(city), _CITY_TYPES, "GeoLite2-City.mmdb")
            if city is not None
            else None
        )
        try:
            asn_reader = (
                _open("asn", Path(asn), _ASN_TYPES, "GeoLite2-ASN.mmdb")
                if asn is not None
                else None
            )
        except ConfigError:
            if city_reader is not None:
                city_reader.close()
            raise
        return cls(city_reader, asn_reader, cache_size=cache_size, locales=locales)

    @property
    def enabled(self) -> bool:
        """At least one database is open."""
        return self._city is not None or self._asn is not None

    @property
    def database_types(self) -> tuple[str, str]:
        """``(city_type, asn_type)`` from the metadata, ``""`` for an absent database."""
        return (
            str(self._city.metadata().database_type) if self._city is not None else "",
            str(self._asn.metadata().database_type) if self._asn is not None else "",
        )

    def lookup(self, ip: str) -> GeoInfo:
        """Country, city, location and AS of ``ip``; the empty :class:`GeoInfo` if unknown."""
        if not self.enabled or not isinstance(ip, str) or len(ip) > _MAX_INPUT:
            return EMPTY
        cached = self._cache.get(ip)
        if cached is not None:
            self.hits += 1
            with contextlib.suppress(KeyError):  # evicted meanwhile by another thread
                self._cache.move_to_end(ip)
            return cached
        self.misses += 1
        info = self._lookup(ip)
        if self._cache_size:
            self._cache[ip] = info
            while len(self._cache) > self._cache_size:
                try:
                    self._cache.popitem(last=False)
                except KeyError:  # emptied meanwhile by another thread
                    break
        return info

    def _lookup(self, ip: str) -> GeoInfo:
        addr = lookup_address(ip)
        if addr is None:
            return EMPTY
        city = _get(self._city, addr)
        asn = _get(self._asn, addr)
        if city is None and asn is None:
            return EMPTY
        location = _sub(city, "location")
        lat, lon = _float(location.get("latitude")), _float(location.get("longitude"))
        if not isinstance(asn, dict):
            asn = _NO_RECORD
        org = asn.get("autonomous_system_organization")
        iso = _sub(city, "country").get("iso_code")
        return GeoInfo(
            country=iso if isinstance(iso, str) else "",
            city=_name(_sub(city, "city"), self._locales),
            lat=lat,
            lon=lon,
            accuracy_radius_km=_int(location.get("accuracy_radius")),
            asn_number=_int(asn.get("autonomous_system_number")),
            asn_org=org if isinstance(org, str) else "",
        )

    def cache_info(self) -> tuple[int, int, int, int]:
        """``(hits, misses, current size, max size)`` of the lookup cache."""
        return (self.hits, self.misses, len(self._cache), self._cache_size)

    def cache_clear(self) -> None:
        self._cache.clear()
        self.hits = self.misses = 0

    def close(self) -> None:
        """Close the databases; later lookups give the empty :class:`GeoInfo`."""
        for reader in (self._city, self._asn):
            if reader is not None:
                reader.close()
        self._city = self._asn = None
        self._cache.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
