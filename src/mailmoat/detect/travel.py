"""Login anomalies from a user's own history: impossible travel and first-seen places.

Contract: a :class:`LoginProfile` per user remembers the last successful
login's place and time, the countries, autonomous systems and JA4
fingerprints seen recently (each a bounded, most-recent-last list), the TLS
history per protocol (:mod:`mailmoat.detect.tls`), how many successful
logins there were and when the first was.  It round-trips
through a small JSON-able dict (:meth:`LoginProfile.to_dict`,
:meth:`LoginProfile.from_dict`) so a state store can keep it.

:func:`assess` is called once per *successful* login with the client's
:class:`~mailmoat.detect.geo.GeoInfo`, its JA4 and the current time, and
returns the ``login.travel_kmh`` / ``new_country`` / ``new_asn`` /
``new_ja4`` facts together with the updated profile.  During the learning
period (fewer than ``learning_logins`` logins, or the first one less than
``learning_days`` ago) the ``new_*`` facts are all false, but the profile
still learns.  An unknown country never counts as new and never moves the
last place; an unknown AS (0) and an empty JA4 are never new.

:func:`travel_kmh` is the speed needed between two logins: the great-circle
distance minus both places' accuracy radii (never below 0), over the elapsed
time but at least ``min_elapsed_s``, so two logins a second apart from
neighbouring places do not give absurd speeds.

Pure functions: times are passed in (seconds, any epoch), no I/O, no trio.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar, final

from .geo import GeoInfo
from .tls import ProtocolTls, history_from_dict, history_to_dict

EARTH_RADIUS_KM: Final = 6371.0088
#: two logins closer in time than this are treated as this far apart
MIN_ELAPSED_S: Final = 60.0
MAX_COUNTRIES: Final = 20
MAX_ASNS: Final = 20
MAX_JA4: Final = 10
LEARNING_LOGINS: Final = 5
LEARNING_DAYS: Final = 7.0
#: :meth:`LoginProfile.to_dict` format version
PROFILE_VERSION: Final = 1

_T = TypeVar("_T", bound=Hashable)


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance between two points in kilometres (degrees in)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def travel_kmh(
    prev_lat: float,
    prev_lon: float,
    prev_time: float,
    prev_accuracy_km: float,
    lat: float,
    lon: float,
    now: float,
    accuracy_km: float,
    *,
    min_elapsed_s: float = MIN_ELAPSED_S,
) -> float:
    """Speed in km/h needed to get from the previous login to this one.

    The distance is reduced by both accuracy radii (floored at 0); the
    elapsed time is at least ``min_elapsed_s`` (a clock going backwards
    counts as that minimum too).
    """
    distance = haversine_km(prev_lat, prev_lon, lat, lon)
    distance = max(0.0, distance - max(0.0, prev_accuracy_km) - max(0.0, accuracy_km))
    if distance == 0.0:
        return 0.0
    elapsed = max(now - prev_time, min_elapsed_s, 1e-3)
    return distance / (elapsed / 3600.0)


@final
@dataclass(frozen=True, slots=True)
class Place:
    """Where and when a successful login happened."""

    lat: float
    lon: float
    time: float
    accuracy_km: float


def _remember(seen: tuple[_T, ...], value: _T, bound: int) -> tuple[_T, ...]:
    """``seen`` with ``value`` moved (or added) to the end, oldest dropped beyond ``bound``."""
    kept = (*(v for v in seen if v != value), value)
    return kept[-bound:] if bound > 0 else ()


@final
@dataclass(frozen=True, slots=True)
class LoginProfile:
    """One user's login history, small enough to store per user."""

    last: Place | None = None
    countries: tuple[str, ...] = ()
    asns: tuple[int, ...] = ()
    ja4s: tuple[str, ...] = ()
    logins: int = 0
    first_seen: float | None = None
    #: per protocol: TLS versions and plaintext logins (see :mod:`mailmoat.detect.tls`)
    tls: tuple[ProtocolTls, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` reads it back."""
        return {
            "v": PROFILE_VERSION,
            "last": (
                None
                if self.last is None
                else [self.last.lat, self.last.lon, self.last.time, self.last.accuracy_km]
            ),
            "countries": list(self.countries),
            "asns": list(self.asns),
            "ja4": list(self.ja4s),
            "logins": self.logins,
            "first_seen": self.first_seen,
            "tls": history_to_dict(self.tls),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoginProfile:
        """The profile :meth:`to_dict` wrote; ``ValueError`` if ``data`` is not one.

        Lists longer than the bounds are cut to their most recent entries.
        """
        if not isinstance(data, Mapping) or data.get("v") != PROFILE_VERSION:
            raise ValueError(f"not a login profile (version {PROFILE_VERSION})")
        last_raw = data.get("last")
        last: Place | None = None
        if last_raw is not None:
            if (
                not isinstance(last_raw, Sequence)
                or isinstance(last_raw, str)
                or len(last_raw) != 4
                or not all(_is_number(x) for x in last_raw)
            ):
                raise ValueError("login profile: 'last' must be [lat, lon, time, accuracy_km]")
            last = Place(*(float(x) for x in last_raw))
        logins = data.get("logins", 0)
        if not isinstance(logins, int) or isinstance(logins, bool) or logins < 0:
            raise ValueError("login profile: 'logins' must be a non-negative integer")
        first_seen = data.get("first_seen")
        if first_seen is not None and not _is_number(first_seen):
            raise ValueError("login profile: 'first_seen' must be a number or null")
        return cls(
            last=last,
            countries=_list_of(data, "countries", str, MAX_COUNTRIES),
            asns=_list_of(data, "asns", int, MAX_ASNS),
            ja4s=_list_of(data, "ja4", str, MAX_JA4),
            logins=logins,
            first_seen=None if first_seen is None else float(first_seen),
            tls=history_from_dict(data.get("tls")),
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _list_of(data: Mapping[str, Any], key: str, typ: type[_T], bound: int) -> tuple[_T, ...]:
    raw = data.get(key, [])
    if not isinstance(raw, list) or not all(
        isinstance(x, typ) and not isinstance(x, bool) for x in raw
    ):
        raise ValueError(f"login profile: {key!r} must be a list of {typ.__name__}")
    return tuple(raw[-bound:]) if bound > 0 else ()


@final
@dataclass(frozen=True, slots=True)
class Assessment:
    """The ``login.*`` facts of one successful login."""

    travel_kmh: float = 0.0
    new_country: bool = False
    new_asn: bool = False
    new_ja4: bool = False
    learning: bool = True

    def fields(self) -> dict[str, Any]:
        """The ``login.travel_kmh`` / ``new_*`` rule context (to merge into ``login``)."""
        return {
            "travel_kmh": self.travel_kmh,
            "new_country": self.new_country,
            "new_asn": self.new_asn,
            "new_ja4": self.new_ja4,
        }


def assess(
    profile: LoginProfile | None,
    geo: GeoInfo,
    ja4: str,
    now: float,
    *,
    learning_logins: int = LEARNING_LOGINS,
    learning_days: float = LEARNING_DAYS,
    min_elapsed_s: float = MIN_ELAPSED_S,
) -> tuple[Assessment, LoginProfile]:
    """The facts of a successful login at ``now`` and the profile that includes it.

    ``learning`` is true while the profile had fewer than ``learning_logins``
    logins before this one, or its first login was less than
    ``learning_days`` ago; the ``new_*`` facts are then all false.
    ``travel_kmh`` is reported even while learning (it needs only one
    earlier located login).
    """
    if profile is None:
        profile = LoginProfile()
    first_seen = profile.first_seen if profile.first_seen is not None else now
    learning = profile.logins < learning_logins or (now - first_seen) < learning_days * 86400.0

    known_country = geo.country != ""
    located = known_country and geo.has_location
    speed = 0.0
    last = profile.last
    if located and last is not None:
        speed = travel_kmh(
            last.lat,
            last.lon,
            last.time,
            last.accuracy_km,
            geo.lat,
            geo.lon,
            now,
            float(geo.accuracy_radius_km),
            min_elapsed_s=min_elapsed_s,
        )
    new_country = known_country and geo.country not in profile.countries
    new_asn = geo.asn_number != 0 and geo.asn_number not in profile.asns
    new_ja4 = ja4 != "" and ja4 not in profile.ja4s

    updated = replace(
        profile,
        last=Place(geo.lat, geo.lon, now, float(geo.accuracy_radius_km)) if located else last,
        countries=(
            _remember(profile.countries, geo.country, MAX_COUNTRIES)
            if known_country
            else profile.countries
        ),
        asns=(
            _remember(profile.asns, geo.asn_number, MAX_ASNS)
            if geo.asn_number != 0
            else profile.asns
        ),
        ja4s=_remember(profile.ja4s, ja4, MAX_JA4) if ja4 != "" else profile.ja4s,
        logins=profile.logins + 1,
        first_seen=first_seen,
    )
    facts = Assessment(
        travel_kmh=speed,
        new_country=new_country and not learning,
        new_asn=new_asn and not learning,
        new_ja4=new_ja4 and not learning,
        learning=learning,
    )
    return facts, updated
