"""A tiny synchronous admin API client for the command line (stdlib :mod:`http.client`).

``mailmoat reload``, ``unban`` and friends call :func:`admin_call`; when the
node cannot be reached they get :class:`AdminUnavailable`, whose message names
the address tried and the two usual causes.
"""

from __future__ import annotations

import http.client
import json
from typing import Any, final

from mailmoat.errors import MailmoatError


@final
class AdminUnavailable(MailmoatError):
    """The admin API at ``host:port`` did not answer (or is not mailmoat's)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(
            f"cannot reach the admin API at {self.address}: {reason}"
            " (is mailmoat running? is [admin] listen right?)"
        )


def admin_call(
    host: str,
    port: int,
    token: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 10,
) -> tuple[int, Any]:
    """Call the admin API; return the status and the parsed JSON body (None when empty)."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    payload: bytes | None = None
    if body is not None:
        payload = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        status = response.status
        data = response.read()
    except TimeoutError as exc:
        raise AdminUnavailable(host, port, f"no answer within {timeout:g} s") from exc
    except OSError as exc:
        raise AdminUnavailable(host, port, exc.strerror or type(exc).__name__) from exc
    except http.client.HTTPException as exc:
        raise AdminUnavailable(host, port, f"not an HTTP answer ({type(exc).__name__})") from exc
    finally:
        conn.close()
    if not data:
        return status, None
    try:
        return status, json.loads(data)
    except ValueError as exc:
        raise AdminUnavailable(host, port, "the answer is not JSON") from exc
