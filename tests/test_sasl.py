"""Tests for passive SASL observation (mailmoat.protocols.sasl)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailmoat.protocols.sasl import MAX_NAME_LENGTH, SaslObserver, redact_auth_line
from mailmoat.secret import Secret

SALT = b"s" * 32
PASSWORD = b"correct horse battery staple"


def b64(data: bytes) -> Secret:
    return Secret(base64.b64encode(data))


def plain(authcid: bytes, password: bytes, authzid: bytes = b"") -> Secret:
    return b64(authzid + b"\x00" + authcid + b"\x00" + password)


def login(user: bytes, password: bytes) -> SaslObserver:
    observer = SaslObserver("login", None)
    observer.server_challenge(b"VXNlcm5hbWU6")
    observer.client_response(b64(user))
    observer.server_challenge(b"UGFzc3dvcmQ6")
    observer.client_response(b64(password))
    return observer


def assert_hides(observer: SaslObserver, *secrets: bytes) -> None:
    texts = [repr(observer), str(observer)]
    for name in type(observer).__slots__:
        value = getattr(observer, name)
        assert not isinstance(value, bytes | bytearray), name
        texts.append(repr(value))
        texts.append(str(value))
    blob = "\n".join(texts)
    for secret in secrets:
        assert secret.decode("latin-1") not in blob
        assert base64.b64encode(secret).decode() not in blob


# ---------------------------------------------------------------------------
# PLAIN (RFC 4616)
# ---------------------------------------------------------------------------


def test_plain_initial_response() -> None:
    observer = SaslObserver("PLAIN", plain(b"alice", PASSWORD))
    assert observer.mechanism == "PLAIN"
    assert observer.user == "alice"
    assert observer.authzid is None
    assert not observer.malformed
    assert not observer.cancelled
    assert_hides(observer, PASSWORD)


def test_plain_with_authzid() -> None:
    observer = SaslObserver("plain", plain(b"admin", PASSWORD, authzid=b"bob"))
    assert observer.mechanism == "PLAIN"
    assert observer.user == "admin"
    assert observer.authzid == "bob"
    assert not observer.malformed


def test_plain_after_empty_challenge() -> None:
    # RFC 4954: C: AUTH PLAIN / S: 334 / C: dGVzdAB0ZXN0ADEyMzQ=
    observer = SaslObserver("PLAIN", None)
    assert (observer.user, observer.authzid) == (None, None)
    observer.server_challenge(b"")
    observer.client_response(Secret(b"dGVzdAB0ZXN0ADEyMzQ="))
    assert observer.authzid == "test"
    assert observer.user == "test"
    assert observer.password_fingerprint(SALT) == fingerprint(b"1234")
    assert not observer.malformed


def test_plain_empty_initial_response_then_response() -> None:
    # RFC 4954 section 4: "=" is an empty initial response.
    observer = SaslObserver("PLAIN", Secret(b"="))
    assert observer.malformed  # an empty PLAIN message lacks the NULs
    assert observer.user is None
    assert observer.password_fingerprint(SALT) is None


@pytest.mark.parametrize(
    "message",
    [b"alice", b"\x00alice", b"a\x00b\x00c\x00d", b"\x00\x00pw", b"\x00alice\x00"],
)
def test_plain_bad_structure(message: bytes) -> None:
    observer = SaslObserver("PLAIN", b64(message))
    assert observer.malformed


def test_plain_second_response_is_malformed() -> None:
    observer = SaslObserver("PLAIN", plain(b"alice", PASSWORD))
    observer.client_response(plain(b"mallory", b"x"))
    assert observer.malformed
    assert observer.user == "alice"


def test_plain_non_utf8_and_long_names() -> None:
    observer = SaslObserver("PLAIN", plain(b"\xff\xfeal" + b"x" * 1000, b"pw", b"\xc3"))
    assert observer.user is not None
    assert observer.user.startswith("\ufffd\ufffdal")
    assert len(observer.user) == MAX_NAME_LENGTH
    assert observer.authzid == "\ufffd"
    assert not observer.malformed


# ---------------------------------------------------------------------------
# LOGIN
# ---------------------------------------------------------------------------


def test_login_two_steps() -> None:
    observer = login(b"alice@example.org", PASSWORD)
    assert observer.mechanism == "LOGIN"
    assert observer.user == "alice@example.org"
    assert not observer.malformed
    assert observer.password_fingerprint(SALT) == fingerprint(PASSWORD)
    assert_hides(observer, PASSWORD)


def test_login_does_not_rely_on_prompt_text() -> None:
    observer = SaslObserver("LOGIN", None)
    observer.server_challenge(b"UGFzc3dvcmQ6")  # "Password:" first, on purpose
    observer.client_response(b64(b"alice"))
    observer.server_challenge(b"garbage!")
    observer.client_response(b64(PASSWORD))
    assert observer.user == "alice"
    assert observer.password_fingerprint(SALT) == fingerprint(PASSWORD)


def test_login_with_initial_response() -> None:
    observer = SaslObserver("LOGIN", b64(b"alice"))
    assert observer.user == "alice"
    assert observer.password_fingerprint(SALT) is None
    observer.client_response(b64(PASSWORD))
    assert observer.password_fingerprint(SALT) == fingerprint(PASSWORD)


def test_login_third_response_is_malformed() -> None:
    observer = login(b"alice", PASSWORD)
    observer.client_response(b64(b"more"))
    assert observer.malformed


# ---------------------------------------------------------------------------
# CRAM-MD5 (RFC 2195), XOAUTH2, OAUTHBEARER, SCRAM, EXTERNAL, ANONYMOUS
# ---------------------------------------------------------------------------


def test_cram_md5_real_response() -> None:
    # The example of RFC 2195 section 2.
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    digest = hmac.new(b"tanstaaftanstaaf", challenge, hashlib.md5).hexdigest()
    assert digest == "b913a602c7eda7a495b4e6e7334d3890"
    observer = SaslObserver("CRAM-MD5", None)
    observer.server_challenge(base64.b64encode(challenge))
    observer.client_response(b64(b"tim " + digest.encode()))
    assert observer.user == "tim"
    assert not observer.malformed
    assert observer.password_fingerprint(SALT) is None
    assert_hides(observer, b"tanstaaftanstaaf")


def test_cram_md5_user_with_space() -> None:
    digest = hmac.new(b"pw", b"<1.2@x>", hashlib.md5).hexdigest().encode()
    observer = SaslObserver("CRAM-MD5", None)
    observer.client_response(b64(b"John Smith " + digest))
    assert observer.user == "John Smith"


@pytest.mark.parametrize("message", [b"tim", b"tim xyz", b" " + b"0" * 32])
def test_cram_md5_bad_response(message: bytes) -> None:
    observer = SaslObserver("CRAM-MD5", None)
    observer.client_response(b64(message))
    assert observer.malformed


def test_cram_md5_initial_response_is_malformed() -> None:
    assert SaslObserver("CRAM-MD5", b64(b"tim " + b"0" * 32)).malformed


def test_xoauth2() -> None:
    token = b"ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
    observer = SaslObserver("XOAUTH2", b64(b"user=alice@x\x01auth=Bearer " + token + b"\x01\x01"))
    assert observer.user == "alice@x"
    assert not observer.malformed
    assert observer.password_fingerprint(SALT) is None
    # After an error challenge the client sends an empty response.
    observer.server_challenge(base64.b64encode(b'{"status":"401"}'))
    observer.client_response(Secret(b""))
    assert not observer.malformed
    assert_hides(observer, token)


def test_xoauth2_without_user() -> None:
    observer = SaslObserver("XOAUTH2", b64(b"auth=Bearer tok\x01\x01"))
    assert observer.user is None
    assert observer.malformed


def test_oauthbearer() -> None:
    message = b"n,a=user=2Cname@example.com,\x01host=server\x01auth=Bearer tok\x01\x01"
    observer = SaslObserver("OAUTHBEARER", b64(message))
    assert observer.user == "user,name@example.com"
    assert not observer.malformed


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-1", "SCRAM-SHA-256-PLUS"])
def test_scram_client_first(mechanism: str) -> None:
    observer = SaslObserver(mechanism, b64(b"n,a=ad=3Dmin,n=us=2Cer,r=fyko+d2lbbFgONRv9qkxdawL"))
    assert observer.user == "us,er"
    assert observer.authzid == "ad=min"
    assert not observer.malformed
    observer.client_response(b64(b"c=biws,r=...,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="))
    assert observer.user == "us,er"
    assert observer.password_fingerprint(SALT) is None


def test_external_and_anonymous() -> None:
    external = SaslObserver("EXTERNAL", Secret(b"="))
    assert external.user is None
    assert external.authzid is None
    assert not external.malformed
    assert SaslObserver("EXTERNAL", b64(b"bob")).authzid == "bob"
    anonymous = SaslObserver("ANONYMOUS", b64(b"sirhc@example.com"))
    assert anonymous.user is None
    assert anonymous.trace == "sirhc@example.com"


def test_unknown_mechanism() -> None:
    observer = SaslObserver("GSSAPI", b64(b"\x60\x82opaque"))
    observer.client_response(b64(b"more"))
    assert observer.user is None
    assert not observer.malformed


# ---------------------------------------------------------------------------
# Cancel and garbage
# ---------------------------------------------------------------------------


def test_cancel() -> None:
    observer = SaslObserver("LOGIN", None)
    observer.client_response(b64(b"alice"))
    observer.client_response(Secret(b"*"))
    assert observer.cancelled
    assert observer.user == "alice"
    assert observer.password_fingerprint(SALT) is None
    observer.client_response(b64(PASSWORD))  # ignored after a cancel
    assert observer.password_fingerprint(SALT) is None
    assert not observer.malformed


def test_cancel_as_initial_response_is_malformed() -> None:
    observer = SaslObserver("PLAIN", Secret(b"*"))
    assert observer.malformed
    assert not observer.cancelled


@pytest.mark.parametrize("raw", [b"!!!", b"YQ", b" YWxpY2U=", b"YWxp\x00Y2U=", b"\xff\xfe"])
def test_garbage_base64(raw: bytes) -> None:
    observer = SaslObserver("PLAIN", Secret(raw))
    assert observer.malformed
    assert observer.user is None
    login = SaslObserver("LOGIN", None)
    login.client_response(Secret(raw))
    assert login.malformed
    assert login.user is None


# ---------------------------------------------------------------------------
# Password fingerprints
# ---------------------------------------------------------------------------


def fingerprint(password: bytes, salt: bytes = SALT) -> str:
    return hmac.new(salt, password, hashlib.sha256).hexdigest()[:8]


def test_fingerprint_same_password_same_value() -> None:
    one = SaslObserver("PLAIN", plain(b"alice", PASSWORD))
    two = login(b"alice", PASSWORD)
    value = one.password_fingerprint(SALT)
    assert value is not None
    assert len(value) == 8
    assert int(value, 16) >= 0
    assert value == two.password_fingerprint(SALT) == fingerprint(PASSWORD)


def test_fingerprint_different_password_different_value() -> None:
    one = SaslObserver("PLAIN", plain(b"alice", PASSWORD))
    two = SaslObserver("PLAIN", plain(b"alice", PASSWORD + b"!"))
    assert one.password_fingerprint(SALT) != two.password_fingerprint(SALT)


def test_fingerprint_different_salt_different_value() -> None:
    observer = SaslObserver("PLAIN", plain(b"alice", PASSWORD))
    assert observer.password_fingerprint(SALT) != observer.password_fingerprint(b"t" * 32)


def test_fingerprint_needs_a_salt() -> None:
    observer = SaslObserver("PLAIN", plain(b"alice", PASSWORD))
    with pytest.raises(ValueError, match="salt"):
        observer.password_fingerprint(b"")


def test_password_never_visible() -> None:
    for observer in (
        SaslObserver("PLAIN", plain(b"alice", PASSWORD, b"bob")),
        login(b"alice", PASSWORD),
    ):
        assert_hides(observer, PASSWORD)
        value = observer.password_fingerprint(SALT)
        assert value is not None
        assert PASSWORD.decode() not in value
        assert value not in repr(observer)
        with pytest.raises(TypeError):
            vars(observer)  # slotted: there is no __dict__ to leak from


# ---------------------------------------------------------------------------
# Transcript redaction
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"AUTH PLAIN AGFsaWNlAHB3\r\n", b"AUTH PLAIN ***\r\n"),
        (b"auth plain AGFsaWNlAHB3\n", b"auth plain ***\n"),
        (b"AUTH PLAIN =", b"AUTH PLAIN ***"),
        (b"AUTH LOGIN\r\n", b"AUTH LOGIN\r\n"),
        (b"AUTH LOGIN YWxpY2U=\r\n", b"AUTH LOGIN ***\r\n"),
        (b"AUTH\r\n", b"AUTH\r\n"),
        (b"AUTH  AGFsaWNlAHB3\r\n", b"AUTH ***\r\n"),
        (b"AUTH PL@IN secret\r\n", b"AUTH ***\r\n"),
        (b"AUTH PLAIN a b c\r\nMAIL FROM:<x>\r\n", b"AUTH PLAIN ***\r\n"),
        (b"a1 AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n", b"a1 AUTHENTICATE PLAIN ***\r\n"),
        (b"a1 AUTHENTICATE PLAIN\r\n", b"a1 AUTHENTICATE PLAIN\r\n"),
        (b'a2 LOGIN alice "pass word"\r\n', b"a2 LOGIN ***\r\n"),
        (b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b>\r\n"),
        (b"", b""),
    ],
)
def test_redact_auth_line(line: bytes, expected: bytes) -> None:
    assert redact_auth_line(line) == expected


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

MECHANISMS = st.sampled_from(
    ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER", "SCRAM-SHA-256", "EXTERNAL",
     "ANONYMOUS", "GSSAPI", "plain", ""]
)  # fmt: skip
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("client"), st.binary(max_size=64)),
        st.tuples(st.just("client64"), st.binary(max_size=300)),
        st.tuples(st.just("server"), st.binary(max_size=32)),
    ),
    max_size=6,
)


@given(MECHANISMS, st.one_of(st.none(), st.binary(max_size=64)), STEPS)
def test_arbitrary_input_never_raises(
    mechanism: str, initial: bytes | None, steps: list[tuple[str, bytes]]
) -> None:
    observer = SaslObserver(mechanism, None if initial is None else Secret(initial))
    for kind, data in steps:
        if kind == "server":
            observer.server_challenge(data)
        elif kind == "client":
            observer.client_response(Secret(data))
        else:
            observer.client_response(b64(data))
    user, authzid = observer.user, observer.authzid
    for name in (user, authzid, observer.trace):
        assert name is None or len(name) <= MAX_NAME_LENGTH
    value = observer.password_fingerprint(SALT)
    assert value is None or len(value) == 8
    assert isinstance(repr(observer), str)


@given(st.binary(max_size=200))
def test_redact_never_raises_and_keeps_line_ending(line: bytes) -> None:
    out = redact_auth_line(line)
    for ending in (b"\r\n", b"\n"):
        if line.endswith(ending):
            assert out.endswith(ending)
