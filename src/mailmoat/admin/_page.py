"""The SOC review page: static HTML, CSS and JavaScript served on the admin listener.

Contract (docs/review.md): :func:`add_page_routes` registers ``GET /`` (the
page) and ``GET /review/{name}`` for its assets, all without the bearer
token: they are the files in ``mailmoat/admin/review/`` as shipped and hold
no data.  The page asks the analyst for the token and sends it with every
``/api/...`` call it makes; the API checks it there.

Every answer is ``no-store`` and ``nosniff`` (the server adds both to every
response); the page also gets a Content-Security-Policy that lets it load
only its own script, style and icon from this origin and connect only to this
origin: no inline script or style, no frames, no forms posted elsewhere.  The
server's own ``default-src 'self'`` policy on HTML is kept; a browser
enforces both, so the stricter one decides.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from ._server import AdminServer, Handler, Request, Response

#: the policy of the page (beside the server's ``default-src 'self'``)
PAGE_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
#: the assets under ``/review/``, with their content types
ASSETS: Final = {
    "review.js": "text/javascript; charset=utf-8",
    "review.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
_PAGE_HEADERS: Final = (
    ("Content-Security-Policy", PAGE_CSP),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)


def _read(name: str) -> bytes:
    return (files("mailmoat.admin") / "review" / name).read_bytes()


def _static(body: bytes, content_type: str, headers: tuple[tuple[str, str], ...] = ()) -> Handler:
    async def handler(_request: Request) -> Response:
        return Response(200, body, content_type, headers)

    return handler


def add_page_routes(server: AdminServer) -> None:
    """Register the review page and its assets (read once, here) on ``server``."""
    server.route(
        "GET",
        "/",
        _static(_read("index.html"), "text/html; charset=utf-8", _PAGE_HEADERS),
        auth=False,
    )
    for name, content_type in ASSETS.items():
        server.route("GET", f"/review/{name}", _static(_read(name), content_type), auth=False)
