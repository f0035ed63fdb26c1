"""What tensorline's HTTP endpoints (a worker's /metrics, the dashboard, the schema registry) share:
a threaded server with `start()`, `url` and `stop()`, bound to localhost unless told otherwise,
and an optional token.

With `TENSORLINE_HTTP_TOKEN` set in a server's environment, every request must carry it, as a
bearer token (`Authorization: Bearer <token>`, Prometheus' `authorization` scrape setting) or as
the password of HTTP basic auth (any user name: what a browser prompts for). The token is read
from the environment only, compared in constant time and never logged. Binding beyond localhost
logs one warning, saying whether a token is required.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import socket
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_ENV = "TENSORLINE_HTTP_TOKEN"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def token(environ: Mapping[str, str] = os.environ) -> str | None:
    """The token every request must carry, from the environment; None (no token) when unset or empty."""
    return environ.get(TOKEN_ENV) or None


def authorization(secret: str | None) -> dict[str, str]:
    """The header a client sends to a server requiring `secret` (none without one)."""
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def presented(header: str | None) -> str:
    """The token an `Authorization` header carries: a bearer token or a basic-auth password."""
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


class Handler(BaseHTTPRequestHandler):
    """Base of the endpoints' handlers: a request without the token is answered 401 as it is
    parsed, before any `do_*` runs; requests are logged at debug level by `log`."""

    secret: str | None = None  # set on the subclass each Server makes
    log: Any = None  # likewise: a structlog logger

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if not self.secret or hmac.compare_digest(presented(self.headers.get("Authorization")).encode(),
                                                  self.secret.encode()):
            return True
        self.close_connection = True  # the request's body, if any, is not read
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="tensorline", charset="UTF-8"')
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", "15")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"token required\n")
        return False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        if self.log is not None:
            self.log.debug("http", client=self.client_address[0], request=format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class Server:
    """`handler` served on its own thread: `start()`, `url`, `stop()`; a context manager.
    `secret` defaults to the environment's token (`token()`)."""

    def __init__(self, handler: type[Handler], *, host: str = "127.0.0.1", port: int = 0, name: str = "http",
                 secret: str | None = None, log: Any = None, **attributes: Any):
        self.secret = token() if secret is None else secret
        self.name = name
        bound = type(handler.__name__, (handler,), {"secret": self.secret, "log": log, **attributes})
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("Server", (_Server,), {"address_family": family})
        self.server = server_class((host, port), bound)
        self._thread: threading.Thread | None = None
        if host not in LOCAL_HOSTS and log is not None:
            if self.secret:
                log.warning(f"{name} reachable beyond this host; every request needs the token from ${TOKEN_ENV}",
                            host=host)
            else:
                log.warning(f"{name} reachable beyond this host and has no authentication: set ${TOKEN_ENV} "
                            "to require a token", host=host)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        host = self.server.server_address[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"{self.name}-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
