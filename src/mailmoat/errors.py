"""The exception hierarchy.

Policy outcomes are values (verdicts), never exceptions.  Exceptions are for
protocol violations (with a reply hint the session may send) and for bad
configuration (with the file and line to fix).
"""

from __future__ import annotations


class MailmoatError(Exception):
    """Root of every error mailmoat raises on purpose."""


class ProtocolError(MailmoatError):
    """A protocol rule was broken.

    ``reply_hint`` is the protocol-level reply a session may send to the peer
    (for SMTP e.g. ``b"500 5.5.2 Line too long"``); it never carries
    exception text or peer data.
    """

    def __init__(self, message: str, reply_hint: bytes | None = None) -> None:
        super().__init__(message)
        self.reply_hint = reply_hint


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class ConfigError(MailmoatError):
    """A configuration problem, located as ``file:line: message``."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


class RuleError(ConfigError):
    """A rule file problem; ``rule_id`` names the rule when known."""

    def __init__(
        self,
        message: str,
        path: str | None = None,
        line: int | None = None,
        rule_id: str | None = None,
    ) -> None:
        super().__init__(message, path, line)
        self.rule_id = rule_id
