"""Small MaxMind databases written by the tests (real MMDB format, via ``mmdb-writer``).

:func:`write_test_databases` writes a City and an ASN database covering the
documentation ranges; :data:`NETWORKS` lists what is in them.  The fixture
``geoip_dbs`` writes them once per session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet


@dataclass(frozen=True)
class TestNetwork:
    __test__ = False  # not a test class despite the name

    cidr: str
    country: str
    city: str
    lat: float
    lon: float
    accuracy_radius: int
    asn: int
    org: str


NETWORKS: tuple[TestNetwork, ...] = (
    TestNetwork("192.0.2.0/24", "DE", "Berlin", 52.5244, 13.4105, 20, 64500, "Example Berlin Net"),
    TestNetwork("198.51.100.0/24", "AU", "Sydney", -33.8688, 151.2093, 50, 64501, "Example Sydney"),
    TestNetwork("203.0.113.0/24", "FR", "Paris", 48.8566, 2.3522, 10, 64502, "Example Paris SA"),
    TestNetwork("2001:db8::/32", "JP", "Tokyo", 35.6895, 139.6917, 100, 64503, "Example Tokyo KK"),
)


def _city_record(net: TestNetwork) -> dict[str, Any]:
    return {
        "continent": {"code": "EU", "names": {"en": "Somewhere"}},
        "country": {"iso_code": net.country, "names": {"en": net.country}},
        "registered_country": {"iso_code": net.country, "names": {"en": net.country}},
        "city": {"names": {"en": net.city}},
        "location": {
            "latitude": net.lat,
            "longitude": net.lon,
            "accuracy_radius": net.accuracy_radius,
        },
    }


def _asn_record(net: TestNetwork) -> dict[str, Any]:
    return {"autonomous_system_number": net.asn, "autonomous_system_organization": net.org}


def write_test_databases(directory: Path) -> tuple[Path, Path]:
    """Write ``GeoLite2-City.mmdb`` and ``GeoLite2-ASN.mmdb`` into ``directory``.

    Both are IPv6 trees with IPv4 under ``::/96`` (as MaxMind ships them).
    """
    directory.mkdir(parents=True, exist_ok=True)
    city = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type="GeoLite2-City",
        languages=["en"],
        description="mailmoat test City database",
    )
    asn = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type="GeoLite2-ASN",
        languages=["en"],
        description="mailmoat test ASN database",
    )
    for net in NETWORKS:
        city.insert_network(IPSet([net.cidr]), _city_record(net))
        asn.insert_network(IPSet([net.cidr]), _asn_record(net))
    city_path = directory / "GeoLite2-City.mmdb"
    asn_path = directory / "GeoLite2-ASN.mmdb"
    city.to_db_file(str(city_path))
    asn.to_db_file(str(asn_path))
    return city_path, asn_path


@pytest.fixture(scope="session")
def geoip_dbs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(city_path, asn_path)`` of the test databases, written once per session."""
    return write_test_databases(tmp_path_factory.mktemp("geoip"))
