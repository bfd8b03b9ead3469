"""The admin API (tier 3): an h11 HTTP/1.1 server on ``[admin] listen`` and its CLI client."""

from ._client import AdminUnavailable as AdminUnavailable
from ._client import admin_call as admin_call
from ._server import AdminConfig as AdminConfig
from ._server import AdminLimits as AdminLimits
from ._server import AdminServer as AdminServer
from ._server import Handler as Handler
from ._server import Request as Request
from ._server import Response as Response
from ._server import check_admin_address as check_admin_address

__all__ = [
    "AdminConfig",
    "AdminLimits",
    "AdminServer",
    "AdminUnavailable",
    "Handler",
    "Request",
    "Response",
    "admin_call",
    "check_admin_address",
]
