"""TLS findings: downgrade against the user's history, shared JA4, stripped STARTTLS inbound."""

from __future__ import annotations

import pytest

from mailmoat.detect.tls import (
    ProtocolTls,
    assess_downgrade,
    history_from_dict,
    history_to_dict,
    inbound_facts,
    inbound_ops,
    is_browser_ja4,
    remember_tls,
    sender_network,
    shared_ja4,
    shared_ja4_ops,
)
from mailmoat.detect.travel import LoginProfile
from mailmoat.state import MemoryStore


def logins(*versions: str, protocol: str = "imap") -> tuple[ProtocolTls, ...]:
    history: tuple[ProtocolTls, ...] = ()
    for v in versions:
        history = remember_tls(history, protocol, v)
    return history


def test_no_history_is_never_a_downgrade() -> None:
    assert not assess_downgrade((), "imap", "").downgrade
    assert not assess_downgrade((), "imap", "TLSv1").downgrade


def test_plaintext_after_encrypted_logins_is_a_downgrade() -> None:
    history = logins("TLSv1.3", "TLSv1.3", "TLSv1.3")
    d = assess_downgrade(history, "imap", "")
    assert (d.downgrade, d.reason, d.usual) == (True, "plaintext", "TLSv1.3")
    assert d.fields() == {"downgrade": True, "usual_version": "TLSv1.3"}


def test_needs_min_logins_first() -> None:
    history = logins("TLSv1.3", "TLSv1.3")
    assert not assess_downgrade(history, "imap", "").downgrade
    assert assess_downgrade(history, "imap", "", min_logins=2).downgrade


def test_older_version_than_every_earlier_login() -> None:
    history = logins("TLSv1.3", "TLSv1.2", "TLSv1.3")
    assert not assess_downgrade(history, "imap", "TLSv1.2").downgrade  # one device speaks 1.2
    assert not assess_downgrade(history, "imap", "TLSv1.3").downgrade
    d = assess_downgrade(history, "imap", "TLSv1")
    assert (d.downgrade, d.reason, d.usual) == (True, "older_version", "TLSv1.2")


def test_a_user_who_logs_in_plaintext_anyway_is_no_downgrade() -> None:
    history = logins("TLSv1.3", "TLSv1.3", "TLSv1.3", "")
    assert not assess_downgrade(history, "imap", "").downgrade


def test_history_is_per_protocol() -> None:
    history = logins("TLSv1.3", "TLSv1.3", "TLSv1.3", protocol="imap")
    history = remember_tls(history, "smtp", "")
    assert not assess_downgrade(history, "smtp", "").downgrade
    assert assess_downgrade(history, "imap", "").downgrade
    assert [h.protocol for h in history] == ["imap", "smtp"]


def test_history_round_trips_inside_the_login_profile() -> None:
    history = logins("TLSv1.2", "TLSv1.3", "")
    profile = LoginProfile(logins=3, tls=history)
    again = LoginProfile.from_dict(profile.to_dict())
    assert again.tls == history
    assert history_from_dict(history_to_dict(history)) == history
    # a profile written before TLS history existed still reads
    old = profile.to_dict()
    del old["tls"]
    assert LoginProfile.from_dict(old).tls == ()


@pytest.mark.parametrize(
    "bad",
    [
        {"imap": {"versions": ["TLSv9"], "tls": 1, "plain": 0}},
        {"imap": {"versions": [], "tls": -1, "plain": 0}},
        {"imap": {"versions": [], "tls": True, "plain": 0}},
        {"imap": []},
        ["imap"],
    ],
)
def test_damaged_history_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="tls"):
        history_from_dict(bad)


def test_versions_are_bounded() -> None:
    history = logins("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "SSLv3", "TLSv1.2")
    (h,) = history
    assert len(h.versions) == 5
    assert h.versions[-1] == "TLSv1.2"
    assert h.tls == 6


def test_browser_ja4() -> None:
    assert is_browser_ja4("t13d1516h2_8daaf6152771_e5627efa2ab1")
    assert is_browser_ja4("t12d1209h1_d34a8e72043a_b39be8c56a14")
    assert not is_browser_ja4("t13i190900_9dc949149365_97f8aa674fd9")
    assert not is_browser_ja4("")


async def test_shared_ja4_counts_distinct_failing_users() -> None:
    store = MemoryStore()
    tool = "t13i190900_9dc949149365_97f8aa674fd9"
    result = None
    for i in range(10):
        (result,) = await store.run(shared_ja4_ops(tool, f"user{i}", True, 600.0))
    assert shared_ja4(tool, result, threshold=10).fields() == {"ja4_users": 10, "shared_ja4": True}
    assert not shared_ja4(tool, result, threshold=11).shared
    # successes only peek, and the same user twice counts once
    (peek,) = await store.run(shared_ja4_ops(tool, "user0", False, 600.0))
    (again,) = await store.run(shared_ja4_ops(tool, "user0", True, 600.0))
    assert peek == again == 10
    # a browser's fingerprint is never "shared"
    browser = "t13d1516h2_8daaf6152771_e5627efa2ab1"
    assert not shared_ja4(browser, 500).shared


def test_sender_network() -> None:
    assert sender_network("192.0.2.77") == "192.0.2.0/24"
    assert sender_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert sender_network("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert sender_network("garbage") == "garbage"


async def session(store: MemoryStore, tls: bool, domain: str = "example.net") -> dict[str, object]:
    ops = inbound_ops(domain, "192.0.2.0/24", tls)
    return inbound_facts(await store.run(ops), tls).fields()


async def test_stripped_inbound_after_a_starttls_history() -> None:
    store = MemoryStore()
    for _ in range(2):
        assert (await session(store, True))["stripped_inbound"] is False
    # two STARTTLS sessions are not yet a history
    young = MemoryStore()
    for _ in range(2):
        await session(young, True)
    assert (await session(young, False))["stripped_inbound"] is False
    await session(store, True)
    facts = await session(store, False)
    assert facts == {
        "stripped_inbound": True,
        "inbound_tls_sessions": 3,
        "inbound_plain_sessions": 1,
    }
    # a second plain session right after: 1 of 3 before is more than one in ten
    assert (await session(store, False))["stripped_inbound"] is False


async def test_a_plaintext_sender_is_not_stripped() -> None:
    store = MemoryStore()
    for _ in range(5):
        assert (await session(store, False))["stripped_inbound"] is False


async def test_network_history_covers_a_changed_domain() -> None:
    store = MemoryStore()
    for _ in range(3):
        await session(store, True, "a.example")
    facts = await session(store, False, "b.example")  # same /24, another domain
    assert facts["stripped_inbound"] is True
