"""The HTTP layer of the webmail reverse proxy (tier 1): a hardening shell around h11.

No trio, no sockets, no logging, no clock: bytes and h11 events in, typed
values out.  Client-caused errors are :class:`RequestRefused` (a
:class:`~mailmoat.errors.RemoteProtocolError` with an HTTP status and a
reason code); docs/http.md lists every refusal and forwarding rule.

* :class:`HeadScreen` -- between the client socket and h11 (server role):
  refuses smuggling-prone and oversized requests before h11 parses them.
* :func:`normalize_request` / :func:`normalize_response` -- what is
  forwarded: hop-by-hop fields gone, one framing field, mailmoat's
  ``Forwarded`` / ``X-Forwarded-*`` / ``X-Real-IP``.
* :func:`request_fields` -- the ``http.*`` rule facts of a request.
* :class:`LoginForm`, :class:`FormExtractor` -- the user name from a login
  body (urlencoded, multipart, JSON), and the password sealed in a
  :class:`~mailmoat.secret.Secret` (for its fingerprint only, never shown).
* :class:`LoginOutcome`, :func:`judge_login` -- was the login accepted?
"""

from ._facts import RequestFields as RequestFields
from ._facts import RequestLine as RequestLine
from ._facts import redact_query as redact_query
from ._facts import request_fields as request_fields
from ._forms import DEFAULT_FORM_LIMIT as DEFAULT_FORM_LIMIT
from ._forms import SECRET_FIELD_RE as SECRET_FIELD_RE
from ._forms import FormExtractor as FormExtractor
from ._forms import FormResult as FormResult
from ._forms import LoginForm as LoginForm
from ._forms import detect_encoding as detect_encoding
from ._forward import is_websocket_upgrade as is_websocket_upgrade
from ._forward import normalize_request as normalize_request
from ._forward import normalize_response as normalize_response
from ._outcome import LoginOutcome as LoginOutcome
from ._outcome import judge_login as judge_login
from ._screen import REFUSALS as REFUSALS
from ._screen import SMUGGLING_REASONS as SMUGGLING_REASONS
from ._screen import Framing as Framing
from ._screen import HeadScreen as HeadScreen
from ._screen import HttpLimits as HttpLimits
from ._screen import RequestRefused as RequestRefused
from ._screen import ScreenedHead as ScreenedHead
from ._syntax import normalize_path as normalize_path
