"""GeoIP lookups on real (test-written) MaxMind databases, and the travel/first-seen detector."""

from __future__ import annotations

import json
from pathlib import Path

import geoip2.database
import pytest

import geoip_fixtures
from geoip_fixtures import NETWORKS, TestNetwork
from mailmoat.detect.geo import EMPTY, GeoInfo, GeoIP, lookup_address
from mailmoat.detect.travel import (
    MAX_ASNS,
    MAX_COUNTRIES,
    MAX_JA4,
    Assessment,
    LoginProfile,
    Place,
    assess,
    haversine_km,
    travel_kmh,
)
from mailmoat.errors import ConfigError
from mailmoat.policy._fields import default_context

Dbs = tuple[Path, Path]

#: the session fixture, made visible to this module's tests by name
geoip_dbs = geoip_fixtures.geoip_dbs

BERLIN = "192.0.2.10"
SYDNEY = "198.51.100.10"
PARIS = "203.0.113.10"
TOKYO = "2001:db8::10"
HOUR = 3600.0
DAY = 86400.0
T0 = 1_700_000_000.0


@pytest.fixture
def geo(geoip_dbs: Dbs) -> GeoIP:
    city, asn = geoip_dbs
    return GeoIP.from_paths(city, asn)


# --------------------------------------------------------------------------- the databases


def test_written_databases_are_readable_by_geoip2(geoip_dbs: Dbs) -> None:
    city, asn = geoip_dbs
    with geoip2.database.Reader(str(city)) as reader:
        rec = reader.city(BERLIN)
        assert rec.country.iso_code == "DE"
        assert rec.city.name == "Berlin"
        assert rec.location.accuracy_radius == 20
        assert reader.metadata().database_type == "GeoLite2-City"
    with geoip2.database.Reader(str(asn)) as reader:
        a = reader.asn(BERLIN)
        assert a.autonomous_system_number == 64500
        assert a.autonomous_system_organization == "Example Berlin Net"


# --------------------------------------------------------------------------- lookups


def test_lookup_ipv4(geo: GeoIP) -> None:
    info = geo.lookup(BERLIN)
    assert info == GeoInfo("DE", "Berlin", 52.5244, 13.4105, 20, 64500, "Example Berlin Net")
    assert info.known
    assert info.has_location


@pytest.mark.parametrize("net", NETWORKS, ids=lambda n: n.city)
def test_lookup_every_network(geo: GeoIP, net: TestNetwork) -> None:
    ip = net.cidr.split("/")[0]
    ip = ip + "1" if ip.endswith("::") else ip[: ip.rfind(".")] + ".1"
    info = geo.lookup(ip)
    assert (info.country, info.city, info.asn_number, info.asn_org) == (
        net.country,
        net.city,
        net.asn,
        net.org,
    )
    assert (info.lat, info.lon, info.accuracy_radius_km) == (net.lat, net.lon, net.accuracy_radius)


def test_lookup_ipv6(geo: GeoIP) -> None:
    info = geo.lookup(TOKYO)
    assert (info.country, info.city, info.asn_number) == ("JP", "Tokyo", 64503)
    assert info.accuracy_radius_km == 100


def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(geo: GeoIP) -> None:
    # the test databases have no ::ffff:0:0/96 alias (real ones do): only the mapping finds it
    assert geo.lookup("::ffff:" + BERLIN) == geo.lookup(BERLIN)
    assert geo.lookup("::FFFF:C000:020A") == geo.lookup(BERLIN)
    assert lookup_address("::ffff:192.0.2.10") == lookup_address(BERLIN)


@pytest.mark.parametrize(
    "ip",
    [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "127.0.0.1",
        "::1",
        "0.0.0.0",
        "::",
        "169.254.1.1",
        "fe80::1",
        "fe80::1%eth0",
        "fd00::1",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
    ],
)
def test_private_and_special_addresses_are_empty(geo: GeoIP, ip: str) -> None:
    assert geo.lookup(ip) == EMPTY
    assert lookup_address(ip) is None


@pytest.mark.parametrize(
    "ip",
    ["", "garbage", "1.2.3", "1.2.3.4.5", "256.1.1.1", "2001:db8:::1", "x" * 10_000, " ", "\x00"],
)
def test_garbage_is_empty(geo: GeoIP, ip: str) -> None:
    assert geo.lookup(ip) == EMPTY


def test_non_string_input_is_empty(geo: GeoIP) -> None:
    assert geo.lookup(None) == EMPTY  # type: ignore[arg-type]
    assert geo.lookup(b"192.0.2.10") == EMPTY  # type: ignore[arg-type]
    assert geo.lookup(3221225994) == EMPTY  # type: ignore[arg-type]


def test_unknown_public_address_is_empty(geo: GeoIP) -> None:
    assert geo.lookup("8.8.8.8") == EMPTY
    assert geo.lookup("2606:4700::1111") == EMPTY


def test_empty_geoinfo_matches_rule_zero_values() -> None:
    client = default_context()["client"]
    assert EMPTY.fields() == {"geo": client["geo"], "asn": client["asn"]}
    assert not EMPTY.known
    assert not EMPTY.has_location


def test_fields_shape_matches_rule_context(geo: GeoIP) -> None:
    fields = geo.lookup(SYDNEY).fields()
    client = default_context()["client"]
    assert fields.keys() == {"geo", "asn"}
    assert fields["geo"].keys() == client["geo"].keys()
    assert fields["asn"].keys() == client["asn"].keys()
    assert fields == {
        "geo": {"country": "AU", "city": "Sydney", "lat": -33.8688, "lon": 151.2093},
        "asn": {"number": 64501, "org": "Example Sydney"},
    }
    for ns in ("geo", "asn"):
        for key, value in fields[ns].items():
            assert type(value) is type(client[ns][key]), (ns, key)


def test_only_city_or_only_asn(geoip_dbs: Dbs) -> None:
    city, asn = geoip_dbs
    with GeoIP.from_paths(city, None) as only_city:
        info = only_city.lookup(PARIS)
        assert (info.country, info.asn_number, info.asn_org) == ("FR", 0, "")
        assert only_city.database_types == ("GeoLite2-City", "")
    with GeoIP.from_paths(None, asn) as only_asn:
        info = only_asn.lookup(PARIS)
        assert (info.country, info.city, info.lat, info.asn_number) == ("", "", 0.0, 64502)
    nothing = GeoIP.from_paths(None, None)
    assert not nothing.enabled
    assert nothing.lookup(PARIS) == EMPTY


def test_closed_geoip_gives_empty(geoip_dbs: Dbs) -> None:
    g = GeoIP.from_paths(*geoip_dbs)
    assert g.lookup(BERLIN).known
    g.close()
    assert g.lookup(BERLIN) == EMPTY
    g.close()  # twice is fine


# --------------------------------------------------------------------------- opening errors


def test_asn_database_given_as_city_is_a_config_error(geoip_dbs: Dbs) -> None:
    _city, asn = geoip_dbs
    with pytest.raises(ConfigError) as info:
        GeoIP.from_paths(asn, None)
    err = info.value
    assert err.path == str(asn)
    assert str(asn) in str(err)
    assert "'GeoLite2-ASN'" in str(err)
    assert "City" in str(err)


def test_city_database_given_as_asn_is_a_config_error(geoip_dbs: Dbs) -> None:
    city, _asn = geoip_dbs
    with pytest.raises(ConfigError, match=r"asn database is a 'GeoLite2-City' database") as info:
        GeoIP.from_paths(None, city)
    assert info.value.path == str(city)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mmdb"
    with pytest.raises(ConfigError, match="does not exist") as info:
        GeoIP.from_paths(missing, None)
    assert str(missing) in str(info.value)


def test_not_a_maxmind_file_is_a_config_error(tmp_path: Path, geoip_dbs: Dbs) -> None:
    bogus = tmp_path / "bogus.mmdb"
    bogus.write_bytes(b"this is not a MaxMind database\n" * 100)
    with pytest.raises(ConfigError, match="not a MaxMind DB") as info:
        GeoIP.from_paths(geoip_dbs[0], bogus)
    assert info.value.path == str(bogus)
    empty = tmp_path / "empty.mmdb"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        GeoIP.from_paths(empty, None)
    assert info.value.path == str(empty)


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        GeoIP.from_paths(tmp_path, None)
    assert info.value.path == str(tmp_path)


# --------------------------------------------------------------------------- the cache


def test_cache_hits_and_bound(geoip_dbs: Dbs) -> None:
    g = GeoIP.from_paths(*geoip_dbs, cache_size=3)
    first = g.lookup(BERLIN)
    assert g.cache_info() == (0, 1, 1, 3)
    assert g.lookup(BERLIN) is first
    assert g.cache_info() == (1, 1, 1, 3)
    for ip in (SYDNEY, PARIS, TOKYO, "10.0.0.1", "garbage"):
        g.lookup(ip)
    hits, misses, size, maxsize = g.cache_info()
    assert (hits, misses, size, maxsize) == (1, 6, 3, 3)
    # BERLIN was evicted (least recently used), so it is a miss again
    assert g.lookup(BERLIN) == first
    assert g.cache_info()[1] == 7
    g.cache_clear()
    assert g.cache_info() == (0, 0, 0, 3)


def test_cache_keeps_recently_used(geoip_dbs: Dbs) -> None:
    g = GeoIP.from_paths(*geoip_dbs, cache_size=2)
    g.lookup(BERLIN)
    g.lookup(SYDNEY)
    g.lookup(BERLIN)  # BERLIN is now the most recent
    g.lookup(PARIS)  # evicts SYDNEY
    hits_before = g.cache_info()[0]
    g.lookup(BERLIN)
    assert g.cache_info()[0] == hits_before + 1


def test_cache_disabled(geoip_dbs: Dbs) -> None:
    g = GeoIP.from_paths(*geoip_dbs, cache_size=0)
    assert g.lookup(BERLIN) == g.lookup(BERLIN)
    assert g.cache_info() == (0, 2, 0, 0)


# --------------------------------------------------------------------------- travel


def test_haversine_known_distances() -> None:
    assert haversine_km(0, 0, 0, 0) == 0
    # Berlin - Paris is about 878 km, Berlin - Sydney about 16,100 km
    assert 870 < haversine_km(52.5244, 13.4105, 48.8566, 2.3522) < 885
    assert 16_000 < haversine_km(52.5244, 13.4105, -33.8688, 151.2093) < 16_200
    # a quarter of the equator
    assert haversine_km(0, 0, 0, 90) == pytest.approx(10_007.5, rel=1e-3)
    # antipodes do not blow up
    assert haversine_km(0, 0, 0, 180) == pytest.approx(20_015, rel=1e-3)


def test_travel_subtracts_accuracy_and_floors_at_zero() -> None:
    d = haversine_km(52.5244, 13.4105, 48.8566, 2.3522)
    speed = travel_kmh(52.5244, 13.4105, 0.0, 100.0, 48.8566, 2.3522, HOUR, 50.0)
    assert speed == pytest.approx(d - 150.0)
    assert travel_kmh(52.5244, 13.4105, 0.0, 500.0, 48.8566, 2.3522, HOUR, 500.0) == 0.0


def test_travel_minimum_elapsed_time() -> None:
    # 10 km apart, 1 s later: counted as 60 s -> 600 km/h, not 36,000 km/h
    lat2 = 52.5244 + 10 / 111.2
    d = haversine_km(52.5244, 13.4105, lat2, 13.4105)
    speed = travel_kmh(52.5244, 13.4105, 0.0, 0.0, lat2, 13.4105, 1.0, 0.0)
    assert speed == pytest.approx(d * 60)
    # a clock going backwards is the minimum too
    assert travel_kmh(52.5244, 13.4105, 100.0, 0.0, lat2, 13.4105, 0.0, 0.0) == speed
    # and the minimum is adjustable
    slow = travel_kmh(52.5244, 13.4105, 0.0, 0.0, lat2, 13.4105, 1.0, 0.0, min_elapsed_s=3600.0)
    assert slow == pytest.approx(d)


def test_berlin_then_sydney_an_hour_later_is_impossible(geo: GeoIP) -> None:
    _, profile = assess(None, geo.lookup(BERLIN), "ja4a", T0)
    facts, _ = assess(profile, geo.lookup(SYDNEY), "ja4a", T0 + HOUR)
    assert facts.travel_kmh > 10_000


def test_berlin_then_paris_three_hours_later_is_possible(geo: GeoIP) -> None:
    _, profile = assess(None, geo.lookup(BERLIN), "ja4a", T0)
    facts, _ = assess(profile, geo.lookup(PARIS), "ja4a", T0 + 3 * HOUR)
    assert 0 < facts.travel_kmh < 1000
    assert facts.travel_kmh == pytest.approx(
        (haversine_km(52.5244, 13.4105, 48.8566, 2.3522) - 30) / 3
    )


def test_same_place_minutes_apart_is_zero(geo: GeoIP) -> None:
    _, profile = assess(None, geo.lookup(BERLIN), "ja4a", T0)
    facts, profile = assess(profile, geo.lookup("192.0.2.99"), "ja4a", T0 + 120)
    assert facts.travel_kmh == 0.0
    facts, _ = assess(profile, geo.lookup(BERLIN), "ja4a", T0 + 121)
    assert facts.travel_kmh == 0.0


def test_first_login_has_no_travel(geo: GeoIP) -> None:
    facts, profile = assess(None, geo.lookup(SYDNEY), "", T0)
    assert facts.travel_kmh == 0.0
    assert profile.last == Place(-33.8688, 151.2093, T0, 50.0)
    assert profile.first_seen == T0
    assert profile.logins == 1


def test_unknown_geo_does_not_move_last_place(geo: GeoIP) -> None:
    _, profile = assess(None, geo.lookup(BERLIN), "ja4a", T0)
    facts, after_private = assess(profile, geo.lookup("10.0.0.1"), "ja4a", T0 + 60)
    assert facts.travel_kmh == 0.0
    assert after_private.last == profile.last
    assert after_private.countries == ("DE",)
    # the next located login is measured from Berlin, not from the private address
    facts, _ = assess(after_private, geo.lookup(SYDNEY), "ja4a", T0 + HOUR)
    assert facts.travel_kmh > 10_000


# --------------------------------------------------------------------------- first seen


def _learned(geo: GeoIP, n: int = 5) -> LoginProfile:
    """A profile past its learning period: ``n`` logins from Berlin over a week."""
    profile: LoginProfile | None = None
    for i in range(n):
        facts, profile = assess(profile, geo.lookup(BERLIN), "ja4a", T0 + i * 2 * DAY)
        assert facts.learning
        assert (facts.new_country, facts.new_asn, facts.new_ja4) == (False, False, False)
    assert profile is not None
    return profile


def test_new_asn_fires_once_and_only_once(geo: GeoIP) -> None:
    profile = _learned(geo)
    now = T0 + 20 * DAY
    facts, profile = assess(profile, geo.lookup(PARIS), "ja4a", now)
    assert not facts.learning
    assert facts.new_asn
    assert facts.new_country
    assert not facts.new_ja4
    for i in range(1, 4):
        facts, profile = assess(profile, geo.lookup(PARIS), "ja4a", now + i * HOUR)
        assert not facts.new_asn
        assert not facts.new_country
    # going back home is not new either
    facts, profile = assess(profile, geo.lookup(BERLIN), "ja4a", now + DAY)
    assert not facts.new_asn
    assert not facts.new_country


def test_new_ja4_fires_once(geo: GeoIP) -> None:
    profile = _learned(geo)
    facts, profile = assess(profile, geo.lookup(BERLIN), "ja4b", T0 + 20 * DAY)
    assert (facts.new_ja4, facts.new_asn, facts.new_country) == (True, False, False)
    facts, profile = assess(profile, geo.lookup(BERLIN), "ja4b", T0 + 21 * DAY)
    assert not facts.new_ja4
    # no JA4 (plaintext) is never new
    facts, _ = assess(profile, geo.lookup(BERLIN), "", T0 + 22 * DAY)
    assert not facts.new_ja4
    assert facts.fields() == {
        "travel_kmh": 0.0,
        "new_country": False,
        "new_asn": False,
        "new_ja4": False,
    }


def test_unknown_geo_is_never_new(geo: GeoIP) -> None:
    profile = _learned(geo)
    facts, after = assess(profile, geo.lookup("10.0.0.1"), "ja4a", T0 + 20 * DAY)
    assert not facts.new_country
    assert not facts.new_asn
    assert after.countries == profile.countries
    assert after.asns == profile.asns


def test_learning_period_by_logins(geo: GeoIP) -> None:
    ips = [SYDNEY, PARIS, TOKYO, BERLIN]
    profile: LoginProfile | None = None
    for i, ip in enumerate(ips):
        facts, profile = assess(
            profile, geo.lookup(ip), f"ja4-{i}", T0 + i * DAY, learning_logins=4, learning_days=0
        )
        assert facts.learning
        assert (facts.new_country, facts.new_asn, facts.new_ja4) == (False, False, False)
    assert profile is not None
    assert profile.countries == ("AU", "FR", "JP", "DE")  # learned while silent
    assert profile.asns == (64501, 64502, 64503, 64500)
    # the fifth login is judged; Sydney is known, a new JA4 is not
    facts, profile = assess(
        profile, geo.lookup(SYDNEY), "ja4-new", T0 + 10 * DAY, learning_logins=4, learning_days=0
    )
    assert not facts.learning
    assert (facts.new_country, facts.new_asn, facts.new_ja4) == (False, False, True)


def test_learning_period_by_days(geo: GeoIP) -> None:
    profile: LoginProfile | None = None
    for i in range(10):  # many logins in the first hours
        facts, profile = assess(profile, geo.lookup(BERLIN), "ja4a", T0 + i * 60, learning_days=7)
    facts, profile = assess(profile, geo.lookup(PARIS), "ja4a", T0 + 6 * DAY, learning_days=7)
    assert facts.learning
    assert not facts.new_country
    facts, profile = assess(profile, geo.lookup(TOKYO), "ja4a", T0 + 8 * DAY, learning_days=7)
    assert not facts.learning
    assert facts.new_country
    assert facts.new_asn


def test_travel_is_reported_while_learning(geo: GeoIP) -> None:
    _, profile = assess(None, geo.lookup(BERLIN), "", T0)
    facts, _ = assess(profile, geo.lookup(TOKYO), "", T0 + 60)
    assert facts.learning
    assert facts.travel_kmh > 100_000


# --------------------------------------------------------------------------- profile storage


def test_profile_json_round_trip(geo: GeoIP) -> None:
    profile = _learned(geo)
    _, profile = assess(profile, geo.lookup(TOKYO), "ja4z", T0 + 30 * DAY)
    data = json.loads(json.dumps(profile.to_dict()))
    assert LoginProfile.from_dict(data) == profile
    assert LoginProfile.from_dict(LoginProfile().to_dict()) == LoginProfile()
    assert len(json.dumps(profile.to_dict())) < 300


def test_profile_bounds(geo: GeoIP) -> None:
    profile = LoginProfile()
    for i in range(50):
        info = GeoInfo(f"C{i}", "", 1.0, 1.0, 10, 70_000 + i, "")
        _, profile = assess(profile, info, f"ja4-{i}", T0 + i * DAY)
    assert len(profile.countries) == MAX_COUNTRIES
    assert len(profile.asns) == MAX_ASNS
    assert len(profile.ja4s) == MAX_JA4
    assert profile.countries[-1] == "C49"  # most recent kept
    assert "C0" not in profile.countries
    assert profile.logins == 50
    assert profile.first_seen == T0
    # re-seeing a value refreshes it instead of duplicating it
    oldest = profile.countries[0]
    info = GeoInfo(oldest, "", 1.0, 1.0, 10, 0, "")
    facts, profile = assess(profile, info, "", T0 + 60 * DAY)
    assert not facts.new_country
    assert profile.countries[-1] == oldest
    assert len(set(profile.countries)) == MAX_COUNTRIES
    # from_dict cuts oversized stored lists to the most recent entries
    data = profile.to_dict()
    data["countries"] = [f"X{i}" for i in range(100)]
    assert LoginProfile.from_dict(data).countries == tuple(f"X{i}" for i in range(80, 100))


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"v": 2},
        {"v": 1, "last": [1, 2, 3]},
        {"v": 1, "last": "here"},
        {"v": 1, "last": [1, 2, 3, float("nan")]},
        {"v": 1, "countries": "DE"},
        {"v": 1, "asns": ["64500"]},
        {"v": 1, "asns": [True]},
        {"v": 1, "logins": -1},
        {"v": 1, "logins": 1.5},
        {"v": 1, "first_seen": "yesterday"},
    ],
)
def test_profile_from_bad_dict(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="profile"):
        LoginProfile.from_dict(data)


def test_country_database_without_location(geo: GeoIP) -> None:
    # a Country database gives a country but no coordinates: new_country works, travel stays 0
    profile = _learned(geo)
    info = GeoInfo("NZ", "", 0.0, 0.0, 0, 0, "")
    facts, after = assess(profile, info, "ja4a", T0 + 20 * DAY)
    assert facts == Assessment(0.0, True, False, False, False)
    assert after.last == profile.last
