"""Passive SASL observation (tier 1): who is logging in, and with how many passwords.

Contract: mailmoat relays every SASL exchange between client and backend
unchanged -- the backend alone decides whether a login succeeds.  A
:class:`SaslObserver` only *watches* one exchange (SMTP ``AUTH``, RFC 4954, or
IMAP ``AUTHENTICATE``, RFC 9051 / RFC 4959: the mechanisms are the same) to
learn the user name and a short keyed fingerprint of the password, so that
detectors can count distinct passwords per user without any password being
stored or logged.

* Client input never raises: undecodable base64, missing separators,
  non-UTF-8 names and extra responses set :attr:`SaslObserver.malformed`.
* Names are decoded as UTF-8 with ``errors="replace"`` and cut to
  :data:`MAX_NAME_LENGTH` characters.
* Credentials only ever live inside a :class:`~mailmoat.secret.Secret`: the
  observer has no plain ``bytes`` attribute, and its ``repr`` shows the
  mechanism, the names and the flags -- never a password or token.  The
  password (PLAIN and LOGIN only) is kept, wrapped, until the observer is
  dropped, because :meth:`SaslObserver.password_fingerprint` needs the salt.

Mechanisms understood: PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login),
CRAM-MD5 (RFC 2195), XOAUTH2 (Google), OAUTHBEARER (RFC 7628), SCRAM-*
(RFC 5802), EXTERNAL (RFC 4422 appendix A) and ANONYMOUS (RFC 4505).  Any
other mechanism is observed without a user name and is not malformed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from typing import Final, final

from mailmoat.secret import Secret

__all__ = ["MAX_NAME_LENGTH", "SaslObserver", "redact_auth_line"]

#: User names, authorization identities and ANONYMOUS trace strings are cut
#: to this many characters after decoding.
MAX_NAME_LENGTH: Final = 256

# 32 bits: enough to tell a handful of passwords per user apart, far too few
# to confirm a guessed password from a leaked fingerprint with any confidence.
_FINGERPRINT_HEX_DIGITS: Final = 8

# RFC 4954 section 4: "If the client wishes to cancel the authentication
# exchange, it issues a line with a single "*"."
_CANCEL: Final = b"*"
# RFC 4954 section 4: "If the initial response argument is omitted [...].
# [...] an initial response [...] of zero length [...] MUST [be] sent as a
# single equals sign ("=")."  RFC 4959 says the same for IMAP SASL-IR.
_EMPTY_INITIAL_RESPONSE: Final = b"="

# RFC 2195: the response is "the user name, a space, and the digest", the
# digest being 16 octets "represented in hexadecimal [...] lowercase".
_CRAM_DIGEST_RE: Final = re.compile(rb"[0-9a-f]{32}")

# How many client responses each mechanism may send (the initial response
# included); more are malformed.  XOAUTH2 and OAUTHBEARER answer an error
# challenge with one more (empty) response; SCRAM ends with an empty response
# to the server-final message in SMTP.  Unlisted mechanisms are not counted.
_MAX_RESPONSES: Final = {
    "PLAIN": 1,
    "LOGIN": 2,
    "CRAM-MD5": 1,
    "XOAUTH2": 2,
    "OAUTHBEARER": 2,
    "EXTERNAL": 1,
    "ANONYMOUS": 1,
}
# Mechanisms whose password is visible to a man in the middle.
_PASSWORD_MECHANISMS: Final = frozenset({"PLAIN", "LOGIN"})


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")[:MAX_NAME_LENGTH]


def _unescape_saslname(raw: bytes) -> bytes | None:
    """RFC 5802 5.1 / RFC 7628 3.1: "," and "=" are sent as "=2C" and "=3D";
    any other "=" makes the name invalid (``None``)."""
    parts = raw.split(b"=")
    out = [parts[0]]
    for part in parts[1:]:
        if part[:2] == b"2C":
            out.append(b"," + part[2:])
        elif part[:2] == b"3D":
            out.append(b"=" + part[2:])
        else:
            return None
    return b"".join(out)


@final
class SaslObserver:
    """Watches one SASL exchange; see the module docstring for the contract.

    Feed it the ``AUTH``/``AUTHENTICATE`` mechanism and initial response, then
    every challenge (:meth:`server_challenge`) and response
    (:meth:`client_response`) in wire order, as base64 text without the line
    ending.  Responses after a cancel are ignored.
    """

    __slots__ = (
        "_authzid",
        "_cancelled",
        "_malformed",
        "_mechanism",
        "_password",
        "_responses",
        "_trace",
        "_user",
    )

    def __init__(self, mechanism: str, initial_response: Secret | None) -> None:
        self._mechanism = mechanism.upper()
        self._user: str | None = None
        self._authzid: str | None = None
        self._trace: str | None = None
        # The only place a password lives: wrapped, never as plain bytes.
        self._password: Secret | None = None
        self._responses = 0
        self._cancelled = False
        self._malformed = False
        if initial_response is not None:
            raw = initial_response.reveal()
            if self._mechanism == "CRAM-MD5":
                # RFC 2195 is server-first: the challenge comes before any
                # response, so an initial response cannot be a valid one.
                self._malformed = True
            elif raw == _EMPTY_INITIAL_RESPONSE:
                self._observe(b"")
            elif raw == _CANCEL:
                # Not allowed as an initial response; a server will fail it.
                self._malformed = True
            else:
                self._decode_and_observe(raw)

    # -- input ---------------------------------------------------------------

    def client_response(self, data: Secret) -> None:
        """One client line sent after a 334 (SMTP) or ``+`` (IMAP) challenge."""
        if self._cancelled:
            return
        raw = data.reveal()
        if raw == _CANCEL:
            self._cancelled = True
            return
        self._decode_and_observe(raw)

    def server_challenge(self, data: bytes) -> None:
        """The base64 text of one server challenge.

        None of the understood mechanisms needs it: CRAM-MD5's response names
        the user in clear, and LOGIN's prompts ("Username:", "Password:") are
        free text that servers vary, so LOGIN goes by response order.  It is
        accepted so that a session can feed both directions without knowing
        the mechanism.
        """
        del data

    # -- results -------------------------------------------------------------

    @property
    def mechanism(self) -> str:
        """The mechanism name, upper-cased."""
        return self._mechanism

    @property
    def user(self) -> str | None:
        """The authentication identity, if the mechanism shows one.

        PLAIN: the authcid; LOGIN: the first response; CRAM-MD5: the response
        up to its last space; XOAUTH2: the ``user=`` field; OAUTHBEARER: the
        GS2 ``a=`` identity; SCRAM-*: the ``n=`` user name.  ``None`` for
        EXTERNAL (the certificate names the user), ANONYMOUS (see
        :attr:`trace`) and unknown mechanisms.
        """
        return self._user

    @property
    def authzid(self) -> str | None:
        """The authorization identity (act as), when one is given and non-empty."""
        return self._authzid

    @property
    def trace(self) -> str | None:
        """ANONYMOUS trace information (RFC 4505: an e-mail address or token)."""
        return self._trace

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def malformed(self) -> bool:
        """Bad base64, a response that does not fit the mechanism, or too many responses."""
        return self._malformed

    def password_fingerprint(self, salt: bytes) -> str | None:
        """A 32-bit keyed digest of the password, as 8 hex digits.

        ``HMAC-SHA256(key=salt, msg=password)`` truncated; ``None`` unless the
        mechanism is PLAIN or LOGIN and a password was seen.  Equal passwords
        give equal fingerprints under one salt, which is all a detector needs
        to count distinct passwords per user.  ``salt`` is a process secret
        (32 random bytes is plenty) that must not be logged next to the
        fingerprints.
        """
        if not salt:
            raise ValueError("password_fingerprint needs a non-empty salt")
        if self._password is None or self._mechanism not in _PASSWORD_MECHANISMS:
            return None
        digest = hmac.new(salt, self._password.reveal(), hashlib.sha256).hexdigest()
        return digest[:_FINGERPRINT_HEX_DIGITS]

    def __repr__(self) -> str:
        return (
            f"SaslObserver(mechanism={self._mechanism!r}, user={self._user!r}, "
            f"authzid={self._authzid!r}, cancelled={self._cancelled!r}, "
            f"malformed={self._malformed!r})"
        )

    # -- mechanisms ----------------------------------------------------------

    def _decode_and_observe(self, raw: bytes) -> None:
        try:
            # RFC 4954 section 4: the response is "encoded as Base64"; the
            # strict decoder refuses stray characters and bad padding.
            message = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            self._malformed = True
            self._responses += 1
            return
        self._observe(message)

    def _observe(self, message: bytes) -> None:
        index = self._responses
        self._responses += 1
        limit = _MAX_RESPONSES.get(self._mechanism)
        if limit is not None and self._responses > limit:
            # A trailing empty response (XOAUTH2 after an error challenge)
            # fits the limits above; anything else does not.
            self._malformed = True
            return
        match self._mechanism:
            case "PLAIN":
                self._plain(message)
            case "LOGIN":
                if index == 0:
                    self._user = _name(message) or None
                else:
                    self._password = Secret(message)
            case "CRAM-MD5":
                self._cram_md5(message)
            case "XOAUTH2":
                if index == 0:
                    self._xoauth2(message)
                elif message:
                    self._malformed = True
            case "OAUTHBEARER":
                if index == 0:
                    self._oauthbearer(message)
                elif message:
                    self._malformed = True
            case "EXTERNAL":
                # RFC 4422 appendix A.1: the client's message is the requested
                # authorization identity, empty to derive it from the credentials.
                self._authzid = _name(message) or None
            case "ANONYMOUS":
                # RFC 4505 section 3: message = [ email / token ], 1*255 chars.
                self._trace = _name(message) or None
            case mechanism if mechanism.startswith("SCRAM-"):
                if index == 0:
                    self._scram(message)
            case _:
                pass

    def _plain(self, message: bytes) -> None:
        # RFC 4616 section 2:  message = [authzid] UTF8NUL authcid UTF8NUL passwd
        #                      authcid = 1*SAFE ; passwd = 1*SAFE
        parts = message.split(b"\x00")
        if len(parts) != 3:
            self._malformed = True
            return
        authzid, authcid, passwd = parts
        self._authzid = _name(authzid) or None
        self._user = _name(authcid) or None
        self._password = Secret(passwd)
        if not authcid or not passwd:
            self._malformed = True

    def _cram_md5(self, message: bytes) -> None:
        # RFC 2195 section 2: the client "responds with a string consisting of
        # the user name, a space, and a 'digest'".  The name may hold spaces.
        user, space, digest = message.rpartition(b" ")
        if not space or not user or not _CRAM_DIGEST_RE.fullmatch(digest):
            self._malformed = True
        if space and user:
            self._user = _name(user)

    def _xoauth2(self, message: bytes) -> None:
        # Google XOAUTH2: "user=" {User} "^Aauth=Bearer " {Access Token} "^A^A"
        fields = message.split(b"\x01")
        users = [f[5:] for f in fields if f.startswith(b"user=")]
        if len(users) != 1 or not users[0] or not message.endswith(b"\x01\x01"):
            self._malformed = True
        if users and users[0]:
            self._user = _name(users[0])

    def _oauthbearer(self, message: bytes) -> None:
        # RFC 7628 3.1: gs2-header kvsep *kvpair kvsep, where
        # gs2-header = gs2-cbind-flag "," [ "a=" saslname ] ","  and kvsep = %x01.
        header, sep, _ = message.partition(b"\x01")
        gs2 = header.split(b",")
        if not sep or len(gs2) != 3 or gs2[2] or gs2[0] not in (b"n", b"y"):
            self._malformed = True
            return
        if gs2[1]:
            name = _unescape_saslname(gs2[1][2:]) if gs2[1].startswith(b"a=") else None
            if name is None:
                self._malformed = True
            elif name:
                self._user = _name(name)

    def _scram(self, message: bytes) -> None:
        # RFC 5802 section 7:
        #   client-first-message = gs2-header client-first-message-bare
        #   gs2-header = gs2-cbind-flag "," [ authzid ] ","
        #   client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
        #   authzid = "a=" saslname ; username = "n=" saslname
        fields = message.split(b",")
        if len(fields) < 4:
            self._malformed = True
            return
        cbind, authzid, *bare = fields
        if not (cbind in (b"n", b"y") or cbind.startswith(b"p=")):
            self._malformed = True
            return
        if authzid:
            name = _unescape_saslname(authzid[2:]) if authzid.startswith(b"a=") else None
            if name is None:
                self._malformed = True
            elif name:
                self._authzid = _name(name)
        if bare[0].startswith(b"m="):
            bare = bare[1:]
        user = _unescape_saslname(bare[0][2:]) if bare and bare[0].startswith(b"n=") else None
        if not user:
            self._malformed = True
            return
        self._user = _name(user)


# SMTP:  "AUTH" SP sasl-mech [SP initial-response]               (RFC 4954 section 4)
# IMAP:  tag SP "AUTHENTICATE" SP auth-type [SP initial-resp]    (RFC 9051 6.2.2)
#        tag SP "LOGIN" SP userid SP password                    (RFC 9051 6.2.3)
_SMTP_AUTH_RE: Final = re.compile(rb"(AUTH)(?: (.*))?", re.IGNORECASE | re.DOTALL)
_IMAP_AUTH_RE: Final = re.compile(rb"([^ ]+ AUTHENTICATE)(?: (.*))?", re.IGNORECASE | re.DOTALL)
_IMAP_LOGIN_RE: Final = re.compile(rb"([^ ]+ LOGIN)(?: (.*))?", re.IGNORECASE | re.DOTALL)
# RFC 4422 3.1: sasl-mech = 1*20mech-char (clients send any case).
_MECH_RE: Final = re.compile(rb"[A-Za-z0-9_-]{1,20}")
_REDACTED: Final = b"***"


def redact_auth_line(line: bytes) -> bytes:
    """``line`` with any credential replaced by ``***``, for transcripts.

    ``AUTH PLAIN dGVzdA==\\r\\n`` becomes ``AUTH PLAIN ***\\r\\n``: the verb,
    the mechanism (if it looks like one) and the line ending are kept as sent.
    IMAP ``tag AUTHENTICATE mech resp`` is treated the same way and
    ``tag LOGIN user pass`` becomes ``tag LOGIN ***`` (a password sent as a
    literal arrives on the next line: redact that in the IMAP layer).  Other
    lines, and AUTH lines without an initial response, come back unchanged.
    SASL continuation lines are not recognisable on their own: callers redact
    them by context.
    """
    if line.endswith(b"\r\n"):
        content, ending = line[:-2], line[-2:]
    elif line.endswith(b"\n"):
        content, ending = line[:-1], line[-1:]
    else:
        content, ending = line, b""
    login = _IMAP_LOGIN_RE.fullmatch(content)
    if login is not None:
        head, rest = login.groups()
        return line if rest is None else head + b" " + _REDACTED + ending
    match = _SMTP_AUTH_RE.fullmatch(content) or _IMAP_AUTH_RE.fullmatch(content)
    if match is None:
        return line
    head, rest = match.groups()
    if rest is None:
        return line
    mechanism, space, _ = rest.partition(b" ")
    if not _MECH_RE.fullmatch(mechanism):
        return head + b" " + _REDACTED + ending
    if not space:
        return line
    return head + b" " + mechanism + b" " + _REDACTED + ending
