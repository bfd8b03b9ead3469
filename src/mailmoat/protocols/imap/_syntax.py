"""IMAP lexical syntax shared by both readers: literal markers, tokens, quoting.

Contract: pure functions over ``bytes``; parse errors are reported as
:class:`SyntaxProblem` (caught by the readers and turned into events or
``RemoteProtocolError``), formatting errors as ``LocalProtocolError``.

Speed: every function here runs regular expressions (C loops), at most once
per token; none walks a line byte by byte in Python.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from mailmoat.errors import LocalProtocolError

from ._events import NIL, Atom, IdParams, Literal, Nil, ParenList, Quoted, Value


class SyntaxProblem(Exception):
    """Internal: a line does not parse.  ``args[0]`` is a fixed reason."""


# RFC 9051 9: atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards /
# quoted-specials / resp-specials; ASTRING-CHAR = ATOM-CHAR / resp-specials.
_ASTRING_CHARS: Final = rb"\x21\x23\x24\x26\x27\x2b-\x5b\x5d-\x7a\x7c-\x7e"
# tag = 1*<any ASTRING-CHAR except "+">
_TAG_CHARS: Final = rb"\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e"
TAG_RE: Final = re.compile(rb"[" + _TAG_CHARS + rb"]+")
_TAG_SP_RE: Final = re.compile(rb"([" + _TAG_CHARS + rb"]+) ")
ATOM_RE: Final = re.compile(rb"[" + _ASTRING_CHARS + rb"]+")
_NAME_RE: Final = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]*")

# RFC 9051 4.3 / 9: quoted = DQUOTE *QUOTED-CHAR DQUOTE; QUOTED-CHAR is any
# TEXT-CHAR but quoted-specials, or "\" quoted-specials, or UTF-8.  TEXT-CHAR
# excludes CR and LF; CHAR8 excludes NUL.
_TOKEN_RE: Final = re.compile(
    rb' |(\()|(\))|"((?:[^"\\\r\n\x00]++|\\["\\])*+)"|([' + _ASTRING_CHARS + rb"]++)"
)
_UNESCAPE_RE: Final = re.compile(rb'\\(["\\])')
_ESCAPE_RE: Final = re.compile(rb'(["\\])')

# Quote balance of a line fragment: outside quotes anything but DQUOTE,
# inside quotes any escaped octet or anything but DQUOTE / backslash.
_BALANCED_RE: Final = re.compile(rb'(?:[^"]++|"(?:[^"\\]++|\\.)*+")*+', re.DOTALL)

#: An atom or SASL initial response in base64 (RFC 4648), or "=" (empty).
BASE64_RE: Final = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")

MAX_NESTING: Final = 16


def content_of(line: bytes) -> bytes:
    """``line`` without its line ending (CRLF or bare LF)."""
    return line[:-2] if line.endswith(b"\r\n") else line[:-1]


def literal_marker(content: bytes) -> tuple[int, bool, int] | None:
    """If ``content`` (a line without its ending) ends in ``{n}`` / ``{n+}``
    (or ``~{n}``, RFC 3516 literal8), return (size, synchronizing, index of
    the ``{``), else None.

    RFC 9051 4.3: "A literal is a sequence of zero or more octets (including
    CR and LF), prefix-quoted with an octet count in the form of an open
    brace ("{"), the number of octets, a close brace ("}"), and a CRLF."
    Looks at the end of the line only (rfind, O(marker length)).
    """
    if not content.endswith(b"}"):
        return None
    start = content.rfind(b"{")
    if start < 0:
        return None
    digits = content[start + 1 : -1]
    sync = True
    if digits.endswith(b"+"):
        digits = digits[:-1]
        sync = False
    if not digits or not digits.isdigit() or not digits.isascii():
        return None
    return int(digits), sync, start


def quotes_balanced(content: bytes) -> bool:
    """True if every quoted string in ``content`` is closed."""
    return b'"' not in content or _BALANCED_RE.fullmatch(content) is not None


def marker_at_token_start(content: bytes, brace: int) -> bool:
    """A literal (``{``, or ``~{``) must start a token: after SP or ``(``."""
    if brace > 0 and content[brace - 1] == 0x7E:  # "~{n}" literal8
        brace -= 1
    return brace == 0 or content[brace - 1] in b" ("


# --------------------------------------------------------------------------
# Tokens -> values
# --------------------------------------------------------------------------

_SP: Final = 0
_OPEN: Final = 1
_CLOSE: Final = 2
Token = int | Value


def _unquote(raw: bytes) -> bytes:
    value = _UNESCAPE_RE.sub(rb"\1", raw) if b"\\" in raw else raw
    if not value.isascii():
        # RFC 9051 4.3: quoted strings may hold UTF-8; anything else is not
        # text.  Checked once per string, in C.
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise SyntaxProblem("invalid UTF-8 in quoted string") from None
    return value


def tokenize(parts: Sequence[bytes], literals: Sequence[Literal], start: int) -> list[Token]:
    """Tokens of ``parts[0][start:]``, literal 0, ``parts[1]``, literal 1, ...

    ``parts`` are line fragments without line ending and literal marker.
    """
    tokens: list[Token] = []
    append = tokens.append
    match = _TOKEN_RE.match
    for index, part in enumerate(parts):
        pos = start if index == 0 else 0
        end = len(part)
        while pos < end:
            found = match(part, pos)
            if found is None:
                raise SyntaxProblem("unexpected character")
            pos = found.end()
            if found.group(4) is not None:
                atom = found.group(4)
                append(NIL if atom.upper() == b"NIL" else Atom(atom))
            elif found.group(3) is not None:
                append(Quoted(_unquote(found.group(3))))
            elif found.group(1) is not None:
                append(_OPEN)
            elif found.group(2) is not None:
                append(_CLOSE)
            else:
                append(_SP)
        if index < len(literals):
            append(literals[index])
    return tokens


def parse_values(tokens: Sequence[Token]) -> tuple[Value, ...]:
    """Values after the command name: ``*(SP value)``, values nested in parens.

    The name counts as the preceding value, so the first token must be SP.
    """
    stack: list[list[Value]] = [[]]
    need_sep = True
    after_sp = False
    for token in tokens:
        if token == _SP and isinstance(token, int):
            if not need_sep:
                raise SyntaxProblem("unexpected space")
            need_sep, after_sp = False, True
        elif token == _OPEN and isinstance(token, int):
            if need_sep:
                raise SyntaxProblem("missing space")
            if len(stack) > MAX_NESTING:
                raise SyntaxProblem("lists nested too deeply")
            stack.append([])
            after_sp = False
        elif token == _CLOSE and isinstance(token, int):
            if len(stack) == 1 or after_sp:
                raise SyntaxProblem("unexpected ')'")
            items = stack.pop()
            stack[-1].append(ParenList(tuple(items)))
            need_sep = True
        else:
            assert not isinstance(token, int)
            if need_sep:
                raise SyntaxProblem("missing space")
            stack[-1].append(token)
            need_sep, after_sp = True, False
    if len(stack) != 1:
        raise SyntaxProblem("unclosed '('")
    if after_sp:
        raise SyntaxProblem("trailing space")
    return tuple(stack[0])


def split_head(first: bytes) -> tuple[bytes | None, str, int]:
    """(tag, NAME, index after the name) of a command's first line fragment.

    ``tag`` is None if the line does not start with a valid tag and a space;
    NAME is ``""`` if no command name follows.
    """
    head = _TAG_SP_RE.match(first)
    if head is None:
        return None, "", 0
    name = _NAME_RE.match(first, head.end())
    if name is None:
        return head.group(1), "", head.end()
    return head.group(1), name.group(0).decode("ascii").upper(), name.end()


def tag_of(data: bytes) -> bytes | None:
    """The tag opening ``data`` (followed by a space), if any."""
    head = _TAG_SP_RE.match(data)
    return None if head is None else head.group(1)


def string_of(value: Value, *, atom: bool) -> bytes | None:
    """The octets of a string value (quoted, literal, and atom if ``atom``)."""
    if isinstance(value, Quoted | Literal):
        return value.value
    if atom:
        if isinstance(value, Atom):
            return value.value
        if value is NIL:  # "NIL" is a valid astring atom (a user name)
            return b"NIL"
    return None


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------


def quote(value: bytes) -> bytes:
    """``value`` as an IMAP quoted string; LocalProtocolError if it cannot be one."""
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        raise LocalProtocolError("CR, LF or NUL cannot be sent in a quoted string")
    return b'"' + _ESCAPE_RE.sub(rb"\\\1", value) + b'"'


def format_value(value: Value) -> bytes:
    """One value in wire form.  Synchronizing literals are refused (the
    sender would have to wait for ``+`` in the middle): use ``{n+}``."""
    if isinstance(value, Atom):
        if ATOM_RE.fullmatch(value.value) is None:
            raise LocalProtocolError("not an atom")
        return value.value
    if isinstance(value, Quoted):
        return quote(value.value)
    if isinstance(value, Literal):
        if value.synchronizing:
            raise LocalProtocolError("cannot format a synchronizing literal in one piece")
        return b"{%d+}\r\n" % len(value.value) + value.value
    if isinstance(value, ParenList):
        return b"(" + b" ".join(format_value(item) for item in value.items) + b")"
    if isinstance(value, Nil):
        return b"NIL"
    raise LocalProtocolError(f"not an IMAP value: {value!r}")  # pragma: no cover


def format_command(tag: bytes, name: str, args: Sequence[Value] = ()) -> bytes:
    """``tag NAME args CRLF`` to send to a server.

    Raises LocalProtocolError for an invalid tag or name, a value that cannot
    be quoted, or a synchronizing literal.
    """
    if TAG_RE.fullmatch(tag) is None:
        raise LocalProtocolError("invalid tag")
    if _NAME_RE.fullmatch(name.encode("ascii", "replace")) is None:
        raise LocalProtocolError("invalid command name")
    out = [tag, name.upper().encode("ascii")]
    out.extend(format_value(arg) for arg in args)
    return b" ".join(out) + b"\r\n"


def format_id(tag: bytes, params: IdParams | None) -> bytes:
    """An ID command (RFC 2971): ``tag ID ("k" "v" ...)`` or ``tag ID NIL``."""
    if params is None:
        return format_command(tag, "ID", (NIL,))
    items: list[Value] = []
    for key, value in params:
        items.append(Quoted(key))
        items.append(NIL if value is None else Quoted(value))
    return format_command(tag, "ID", (ParenList(tuple(items)),))
