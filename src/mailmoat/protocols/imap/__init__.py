"""Sans-IO IMAP codec (tier 1): bytes in, typed events out, no I/O.

:class:`CommandReader` parses the client side (commands with their
literals, AUTHENTICATE responses), :class:`ResponseReader` the server side
(whole responses, literals included).  Both follow h11:
``receive_data(bytes)``, then ``next_event()`` until :data:`NEED_DATA`.
IMAP is framed into lines and literals first, then parsed (as imap-codec
does); see docs/imap.md.
"""

from ._commands import PARSED_COMMANDS as PARSED_COMMANDS
from ._commands import CommandReader as CommandReader
from ._commands import ReaderMode as ReaderMode
from ._commands import parse_command as parse_command
from ._commands import to_non_sync as to_non_sync
from ._events import LITERAL_MINUS_MAX as LITERAL_MINUS_MAX
from ._events import NEED_DATA as NEED_DATA
from ._events import NIL as NIL
from ._events import SENSITIVE_COMMANDS as SENSITIVE_COMMANDS
from ._events import Atom as Atom
from ._events import Authenticate as Authenticate
from ._events import AuthenticateResponse as AuthenticateResponse
from ._events import BadCommand as BadCommand
from ._events import ClientClosed as ClientClosed
from ._events import ClientEvent as ClientEvent
from ._events import Command as Command
from ._events import ContinuationRequest as ContinuationRequest
from ._events import Enable as Enable
from ._events import Id as Id
from ._events import IdParams as IdParams
from ._events import ImapLimits as ImapLimits
from ._events import LineTooLong as LineTooLong
from ._events import Literal as Literal
from ._events import LiteralRefused as LiteralRefused
from ._events import Login as Login
from ._events import NeedContinuation as NeedContinuation
from ._events import NeedData as NeedData
from ._events import Nil as Nil
from ._events import NonSyncLiterals as NonSyncLiterals
from ._events import ParenList as ParenList
from ._events import Quoted as Quoted
from ._events import ResponseCode as ResponseCode
from ._events import ServerClosed as ServerClosed
from ._events import ServerEvent as ServerEvent
from ._events import Tagged as Tagged
from ._events import Untagged as Untagged
from ._events import Value as Value
from ._events import parse_capabilities as parse_capabilities
from ._responses import ResponseReader as ResponseReader
from ._responses import edit_capabilities as edit_capabilities
from ._responses import format_capabilities as format_capabilities
from ._responses import parse_response as parse_response
from ._responses import rewrite_capabilities as rewrite_capabilities
from ._syntax import format_command as format_command
from ._syntax import format_id as format_id
from ._syntax import format_value as format_value
from ._syntax import quote as quote
