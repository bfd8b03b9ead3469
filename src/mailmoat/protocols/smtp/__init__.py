"""Sans-IO SMTP codec (tier 1): bytes in, typed events out, no I/O.

:class:`CommandReader` parses the client side (commands, SASL responses,
message bodies), :class:`ReplyReader` the server side (replies).  Both follow
h11: ``receive_data(bytes)``, then ``next_event()`` until :data:`NEED_DATA`.
"""

from ._ehlo import Extension as Extension
from ._ehlo import format_ehlo as format_ehlo
from ._ehlo import parse_ehlo as parse_ehlo
from ._events import NEED_DATA as NEED_DATA
from ._events import Auth as Auth
from ._events import AuthResponse as AuthResponse
from ._events import ClientClosed as ClientClosed
from ._events import ClientEvent as ClientEvent
from ._events import Command as Command
from ._events import DataChunk as DataChunk
from ._events import EndOfData as EndOfData
from ._events import EsmtpParams as EsmtpParams
from ._events import Hello as Hello
from ._events import LineTooLong as LineTooLong
from ._events import MailFrom as MailFrom
from ._events import NeedData as NeedData
from ._events import RcptTo as RcptTo
from ._events import Reply as Reply
from ._events import ServerClosed as ServerClosed
from ._events import ServerEvent as ServerEvent
from ._events import SmtpLimits as SmtpLimits
from ._reader import CommandReader as CommandReader
from ._reader import ReaderMode as ReaderMode
from ._reader import format_command as format_command
from ._reader import parse_command as parse_command
from ._replies import ReplyReader as ReplyReader
from ._replies import reply as reply
