"""Static analysis of rule conditions (CEL source text).

CEL itself only reports the top-level names and the functions an expression
uses.  To reject a typo such as ``client.ipp`` at load time, and to record
which fields a rule reads, this module tokenizes the condition (string
literals and comments are skipped as whole tokens) and walks the dotted
identifier paths rooted at the context namespaces.

Contract of :func:`analyze`: given a condition that CEL already compiled, it
returns the fields read, the lists used, the functions called and a list of
problems, each with its 0-based line offset inside the condition.  Names bound
by the comprehension macros (``.exists(r, ...)``, ``.all``, ``.exists_one``,
``.map``, ``.filter``) are recognised and never reported.

:func:`rewrite_list_membership` turns every ``X in lists.NAME`` into
``in_list(X, lists.NAME)``: CEL's ``in`` cannot be overloaded, and the list
entries must never be copied into the CEL context (a 100k-entry list would
cost milliseconds per evaluation).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Final, final

from ._fields import FIELDS, NAMESPACES, check_path
from ._functions import parse_network

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*)
    |(?P<string>
        (?:[bB]?[rR]|[rR][bB])(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"[^"\n]*"|'[^'\n]*')
        |[bB]?(?:\"\"\"(?:\\[\s\S]|[^\\])*?\"\"\"|'''(?:\\[\s\S]|[^\\])*?'''
                |"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
    )
    |(?P<number>0[xX][0-9a-fA-F]+[uU]?|(?:\d+\.\d+|\.\d+|\d+)(?:[eE][+-]?\d+)?[uU]?)
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op>&&|\|\||==|!=|<=|>=|[<>!+\-*/%?:.,()\[\]{}])
    """,
    re.VERBOSE,
)

MACROS: Final = frozenset({"all", "exists", "exists_one", "map", "filter"})
_KEYWORDS: Final = frozenset({"true", "false", "null", "in"})
_TYPE_NAMES: Final = frozenset(
    {"int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type", "dyn"}
)
_RELATIONS: Final = frozenset({"==", "!=", "<", "<=", ">", ">=", "in"})
_LOWER_PRECEDENCE: Final = frozenset({"&&", "||", "?", ":", ","})
_OPENERS: Final = {"(": ")", "[": "]", "{": "}"}
_CLOSERS: Final = frozenset(_OPENERS.values())
#: what may follow ``lists.NAME`` on the right of ``in``
_AFTER_LIST: Final = _CLOSERS | _RELATIONS | _LOWER_PRECEDENCE

#: CEL functions the interpreter provides natively (macros included)
NATIVE_FUNCTIONS: Final = frozenset(
    {
        "has",
        "size",
        "int",
        "uint",
        "double",
        "string",
        "bytes",
        "type",
        "dyn",
        "duration",
        "timestamp",
        "matches",
        "startsWith",
        "endsWith",
        "contains",
        "getFullYear",
        "getMonth",
        "getDate",
        "getDayOfMonth",
        "getDayOfWeek",
        "getDayOfYear",
        "getHours",
        "getMinutes",
        "getSeconds",
        "getMilliseconds",
        *MACROS,
    }
)


@final
@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    start: int
    end: int


_ProblemFn = Callable[[str, "Token"], None]


def tokenize(source: str) -> list[Token]:
    """Significant tokens (no whitespace or comments); ``ValueError`` on a stray character."""
    tokens: list[Token] = []
    pos = 0
    while pos < len(source):
        m = _TOKEN.match(source, pos)
        if m is None:
            raise ValueError(f"unexpected character {source[pos]!r}")
        kind = m.lastgroup or "op"
        if kind != "ws":
            tokens.append(Token(kind, m.group(), m.start(), m.end()))
        pos = m.end()
    return tokens


def string_value(token: Token) -> str | None:
    """The text of a string literal token; ``None`` for bytes or what Python cannot read."""
    text = token.text
    prefix = text[: len(text) - len(text.lstrip("rRbB"))]
    if "b" in prefix.lower():
        return None
    try:
        value = ast.literal_eval(("r" if prefix else "") + text[len(prefix) :])
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


@final
@dataclass(slots=True)
class Problem:
    message: str
    line_offset: int


@final
@dataclass(slots=True)
class Analysis:
    reads: list[str] = field(default_factory=list)
    lists: list[str] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)


def _prev(tokens: list[Token], i: int) -> Token | None:
    return tokens[i - 1] if i > 0 else None


def _next(tokens: list[Token], i: int) -> Token | None:
    return tokens[i + 1] if i + 1 < len(tokens) else None


def _call_args(tokens: list[Token], open_index: int) -> list[list[Token]]:
    """Argument token runs of the call whose ``(`` is at ``open_index``."""
    args: list[list[Token]] = [[]]
    depth = 0
    for tok in tokens[open_index + 1 :]:
        if tok.text in _OPENERS:
            depth += 1
        elif tok.text in _CLOSERS:
            if depth == 0:
                break
            depth -= 1
        elif tok.text == "," and depth == 0:
            args.append([])
            continue
        args[-1].append(tok)
    return args


def _enclosing_call(tokens: list[Token], i: int) -> tuple[str | None, int]:
    """Name of the call whose parentheses enclose token ``i``, and the argument index."""
    depth = 0
    arg = 0
    for j in range(i - 1, -1, -1):
        text = tokens[j].text
        if text in _CLOSERS:
            depth += 1
        elif text in _OPENERS:
            if depth == 0:
                if text == "(" and j > 0 and tokens[j - 1].kind == "ident":
                    return tokens[j - 1].text, arg
                return None, arg
            depth -= 1
        elif text == "," and depth == 0:
            arg += 1
    return None, arg


def analyze(source: str, functions: Collection[str], lists: Collection[str]) -> Analysis:
    """Check the paths, names, functions, list uses and literal networks of a condition."""
    result = Analysis()
    try:
        tokens = tokenize(source)
    except ValueError as exc:
        result.problems.append(Problem(str(exc), 0))
        return result

    def problem(message: str, tok: Token) -> None:
        result.problems.append(Problem(message, source.count("\n", 0, tok.start)))

    bound: set[str] = set()
    for i, tok in enumerate(tokens):
        prev, nxt = _prev(tokens, i), _next(tokens, i)
        if (
            tok.kind == "ident"
            and tok.text in MACROS
            and prev is not None
            and prev.text == "."
            and nxt is not None
            and nxt.text == "("
            and i + 3 < len(tokens)
            and tokens[i + 2].kind == "ident"
            and tokens[i + 3].text == ","
        ):
            name = tokens[i + 2].text
            if name in NAMESPACES:
                problem(f"the macro variable {name!r} hides the namespace {name!r}", tokens[i + 2])
            bound.add(name)

    i = 0
    while i < len(tokens):
        tok = tokens[i]
        prev = _prev(tokens, i)
        if tok.kind != "ident" or (prev is not None and prev.text == "."):
            if tok.kind == "ident" and i + 1 < len(tokens) and tokens[i + 1].text == "(":
                result.functions.add(tok.text)  # a method call
            i += 1
            continue
        # an identifier in root position
        parts = [tok.text]
        j = i
        while (
            j + 2 < len(tokens)
            and tokens[j + 1].text == "."
            and tokens[j + 2].kind == "ident"
            and not (j + 3 < len(tokens) and tokens[j + 3].text == "(")
        ):
            parts.append(tokens[j + 2].text)
            j += 2
        nxt = _next(tokens, j)
        name = tok.text
        if len(parts) == 1 and nxt is not None and nxt.text == "(":
            result.functions.add(name)
            if name == "cidr":
                _check_cidr_literal(tokens, i + 1, 1, problem)
        elif name in bound or name in _KEYWORDS or name in _TYPE_NAMES:
            pass
        elif name == "lists":
            _check_list_use(tokens, i, j, parts, lists, result, problem)
        elif name in NAMESPACES:
            path = ".".join(parts)
            if (why := check_path(path)) is not None:
                problem(why, tok)
            elif path not in result.reads:
                result.reads.append(path)
        else:
            problem(f"unknown name {name!r}; conditions start from: {', '.join(NAMESPACES)}", tok)
        # a method call right after the path, e.g. smtp.helo.cidr("...")
        if (
            j + 3 < len(tokens)
            and tokens[j + 1].text == "."
            and tokens[j + 3].text == "("
            and tokens[j + 2].text == "cidr"
        ):
            _check_cidr_literal(tokens, j + 3, 0, problem)
        i = j + 1

    for name in sorted(result.functions):
        if name not in functions:
            hint = ", ".join(sorted(functions))
            first = next(t for t in tokens if t.text == name)
            problem(f"unknown function {name!r}; functions are: {hint}", first)
    return result


def _check_cidr_literal(
    tokens: list[Token], open_index: int, arg_index: int, problem: _ProblemFn
) -> None:
    args = _call_args(tokens, open_index)
    if arg_index < len(args) and len(args[arg_index]) == 1:
        tok = args[arg_index][0]
        if tok.kind == "string" and (value := string_value(tok)) is not None:
            try:
                parse_network(value)
            except ValueError as exc:
                problem(f"cidr(): {exc}", tok)


def _check_list_use(
    tokens: list[Token],
    i: int,
    j: int,
    parts: list[str],
    lists: Collection[str],
    result: Analysis,
    problem: _ProblemFn,
) -> None:
    tok = tokens[i]
    usage = "use a list as 'value in lists.NAME' or 'in_list(value, lists.NAME)'"
    if len(parts) != 2:
        problem(f"'{'.'.join(parts)}' is not a list: {usage}", tok)
        return
    name = parts[1]
    if name not in lists:
        known = ", ".join(sorted(lists)) or "none are defined"
        problem(f"unknown list 'lists.{name}'; lists: {known}", tok)
        return
    prev = _prev(tokens, i)
    nxt = _next(tokens, j)
    if prev is not None and prev.text == "in":
        if nxt is not None and nxt.text not in _AFTER_LIST:
            problem(f"parenthesize '(... in lists.{name})' before applying {nxt.text!r}", nxt)
            return
        start = _left_operand_start(tokens, i - 1)
        if start is None:
            problem(f"parenthesize the left side of 'in lists.{name}'", tokens[i - 1])
            return
    elif not (
        prev is not None and prev.text == "," and _enclosing_call(tokens, i) == ("in_list", 1)
    ):
        problem(f"lists.{name} used on its own: {usage}", tok)
        return
    if name not in result.lists:
        result.lists.append(name)


def _left_operand_start(tokens: list[Token], in_index: int) -> int | None:
    """Index of the first token of the left operand of the ``in`` at ``in_index``.

    ``None`` when a relational operator precedes it at the same level: CEL
    groups ``a == b in l`` as ``(a == b) in l``, which a rewrite that stops at
    ``==`` would change, so the author must add parentheses.
    """
    depth = 0
    k = in_index - 1
    while k >= 0:
        text = tokens[k].text
        if text in _CLOSERS:
            depth += 1
        elif text in _OPENERS:
            if depth == 0:
                return k + 1
            depth -= 1
        elif depth == 0 and tokens[k].kind == "op" and text in _LOWER_PRECEDENCE:
            return k + 1
        elif depth == 0 and text in _RELATIONS and tokens[k].kind in ("op", "ident"):
            return None
        k -= 1
    return 0


def rewrite_list_membership(source: str) -> str:
    """``X in lists.NAME`` -> ``in_list(X, lists.NAME)``, every occurrence (analysis passed)."""
    for _ in range(source.count("lists") + 1):
        tokens = tokenize(source)
        for i, tok in enumerate(tokens):
            if (
                tok.text == "in"
                and tok.kind == "ident"
                and i + 3 < len(tokens)
                and tokens[i + 1].text == "lists"
                and tokens[i + 2].text == "."
            ):
                start = _left_operand_start(tokens, i)
                if start is None:  # pragma: no cover - analyze() reported it
                    raise ValueError("ambiguous 'in lists'")
                name_tok = tokens[i + 3]
                left = source[tokens[start].start : tok.start].rstrip()
                source = (
                    source[: tokens[start].start]
                    + f"in_list({left}, lists.{name_tok.text})"
                    + source[name_tok.end :]
                )
                break
        else:
            return source
    raise ValueError("too many list rewrites")  # pragma: no cover - loop bound is generous


#: how a flattened variable gets its value: a scalar or list field, a
#: ``map(string,string)`` field, or an object (a namespace or e.g. ``client.geo``)
VarKind = str


def flat_name(path: str) -> str:
    """The CEL variable for ``path``: ``client.geo.country`` -> ``_client__geo__country``."""
    return "_" + path.replace(".", "__")


def flatten_paths(source: str) -> tuple[str, tuple[tuple[str, str, VarKind], ...]]:
    """Replace every context path by one top-level variable (analysis passed).

    Converting a Python value into CEL costs microseconds per dict entry, so
    the engine hands CEL each field the condition reads as its own variable
    and re-adds only those whose value changed since the session's last phase.
    ``client.ip`` becomes ``_client__ip``; a key of a map field keeps its
    selection (``http.headers.host`` -> ``_http__headers.host``); an object used
    whole becomes one variable holding it; inside ``has(...)`` the last
    segment stays a selection on its parent (``has(client.geo.city)`` ->
    ``has(_client__geo.city)``), since ``has`` needs one.

    Returns the new source and ``(variable, path, kind)`` for each variable,
    ``kind`` being ``"field"``, ``"map"`` or ``"object"``.
    """
    tokens = tokenize(source)
    bound: set[str] = set()
    for i, tok in enumerate(tokens):
        if (
            tok.kind == "ident"
            and tok.text in MACROS
            and i > 0
            and tokens[i - 1].text == "."
            and i + 3 < len(tokens)
            and tokens[i + 1].text == "("
            and tokens[i + 2].kind == "ident"
            and tokens[i + 3].text == ","
        ):
            bound.add(tokens[i + 2].text)
    out: list[str] = []
    variables: dict[str, tuple[str, str, VarKind]] = {}
    pos = 0
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        prev = tokens[i - 1] if i > 0 else None
        if (
            tok.kind != "ident"
            or (prev is not None and prev.text == ".")
            or tok.text not in NAMESPACES
            or tok.text == "lists"
            or tok.text in bound
        ):
            i += 1
            continue
        parts = [tok.text]
        j = i
        while (
            j + 2 < len(tokens)
            and tokens[j + 1].text == "."
            and tokens[j + 2].kind == "ident"
            and not (j + 3 < len(tokens) and tokens[j + 3].text == "(")
        ):
            parts.append(tokens[j + 2].text)
            j += 2
        in_has = (
            i >= 2
            and tokens[i - 1].text == "("
            and tokens[i - 2].text == "has"
            and j + 1 < len(tokens)
            and tokens[j + 1].text == ")"
            and len(parts) > 1
        )
        keep = parts[-1:] if in_has else []
        head = parts[:-1] if in_has else parts
        # the longest prefix of head that is a field decides what the variable holds
        var_path, kind = ".".join(head), "object"
        for k in range(1, len(head) + 1):
            prefix = ".".join(head[:k])
            if prefix in FIELDS:
                var_path = prefix
                kind = "map" if FIELDS[prefix].type == "map(string,string)" else "field"
                keep = head[k:] + keep
                break
        name = flat_name(var_path)
        variables.setdefault(name, (name, var_path, kind))
        out.append(source[pos : tok.start])
        out.append(name + "".join("." + p for p in keep))
        pos = tokens[j].end
        i = j + 1
    out.append(source[pos:])
    return "".join(out), tuple(variables.values())
