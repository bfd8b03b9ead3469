"""A small SMTP sink that stores every message under a directory.

Used by ``mailmoat demo`` when no Postfix is installed, so that the demo
still delivers somewhere you can look.  It is deliberately simple: it
accepts any sender and recipient, offers no AUTH and no TLS, and writes each
message (dot-unstuffed) to ``<dir>/<time>-<n>.eml`` with an ``X-Mailmoat-Sink``
header naming the envelope.  It speaks through mailmoat's own SMTP codec.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path

import trio

from mailmoat.protocols.smtp import (
    NEED_DATA,
    ClientClosed,
    CommandReader,
    DataChunk,
    EndOfData,
    LineTooLong,
    MailFrom,
    RcptTo,
    SmtpLimits,
)

MAX_MESSAGE = 60 * 1024 * 1024
_counter = itertools.count(1)


def _unstuff(body: bytes) -> bytes:
    # RFC 5321 4.5.2: a line that starts with "." had one more "." added
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


async def _session(stream: trio.SocketStream, directory: Path) -> None:
    reader = CommandReader(SmtpLimits(max_text_line=None))
    mail_from = b""
    rcpts: list[bytes] = []
    body: list[bytes] = []
    size = 0

    async def say(line: str) -> None:
        await stream.send_all(line.encode() + b"\r\n")

    await say("220 mailmoat-demo-sink ESMTP ready")
    while True:
        ev = reader.next_event()
        if ev is NEED_DATA:
            with trio.move_on_after(300):
                reader.receive_data(await stream.receive_some(65536))
                continue
            await say("421 4.4.2 Timeout")
            return
        if isinstance(ev, ClientClosed):
            return
        if isinstance(ev, LineTooLong):
            await say("500 5.5.2 Line too long")
        elif isinstance(ev, DataChunk):
            size += len(ev.data)
            if size <= MAX_MESSAGE:
                body.append(ev.data)
        elif isinstance(ev, EndOfData):
            if size > MAX_MESSAGE:
                await say("552 5.3.4 Message too big")
            else:
                name = f"{time.strftime('%Y%m%dT%H%M%S')}-{next(_counter):06d}.eml"
                envelope = (
                    b"X-Mailmoat-Sink: from=<"
                    + mail_from
                    + b"> to=<"
                    + b">,<".join(rcpts)
                    + b">\r\n"
                )
                await trio.Path(directory / name).write_bytes(envelope + _unstuff(b"".join(body)))
                await say(f"250 2.0.0 Ok: stored as {name}")
            body, size, rcpts = [], 0, []
        elif isinstance(ev, MailFrom):
            mail_from, rcpts = ev.address, []
            await say("250 2.1.0 Ok")
        elif isinstance(ev, RcptTo):
            rcpts.append(ev.address)
            await say("250 2.1.5 Ok")
        else:
            verb = getattr(ev, "verb", "")
            if verb == "EHLO":
                await stream.send_all(
                    b"250-mailmoat-demo-sink\r\n250-PIPELINING\r\n250-SIZE 62914560\r\n"
                    b"250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
                )
            elif verb in ("HELO", "NOOP", "RSET"):
                if verb == "RSET":
                    mail_from, rcpts, body, size = b"", [], [], 0
                await say("250 2.0.0 Ok")
            elif verb == "DATA":
                if not rcpts:
                    await say("554 5.5.1 Error: no valid recipients")
                else:
                    await say("354 End data with <CR><LF>.<CR><LF>")
                    reader.expect_data()
            elif verb == "QUIT":
                await say("221 2.0.0 Bye")
                return
            else:
                await say("502 5.5.1 Command not implemented")


async def _guarded(stream: trio.SocketStream, directory: Path) -> None:
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await _session(stream, directory)


async def serve_sink(
    directory: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; reports the bound port through ``task_status``."""
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = int(listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        while True:
            stream = await listeners[0].accept()
            nursery.start_soon(_guarded, stream, directory)
