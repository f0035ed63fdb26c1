"""The HTTP endpoints' shared server: localhost by default, a warning beyond it, and a token that
every request (any method, any endpoint) must carry once it is set."""

from __future__ import annotations

import base64
import http.client
import socket
import urllib.error
import urllib.request

import pytest

from tensorline.engine import http as endpoints
from tensorline.engine import metrics
from tensorline.ops import dashboard

SECRET = "s3cr3t-t0ken"


class _Echo(endpoints.Handler):
    def do_GET(self) -> None:  # noqa: N802
        self._answer(b"get")

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Log:
    """Records what a server logs, to check the warning and that no secret is in it."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def warning(self, event: str, **kw) -> None:
        self.lines.append(("warning", event, kw))

    def debug(self, event: str, **kw) -> None:
        self.lines.append(("debug", event, kw))


def status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def basic(password: str, user: str = "anyone") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_without_a_token_every_request_is_answered() -> None:
    with endpoints.Server(_Echo, secret="") as server:
        assert status(server.url + "/x") == 200


@pytest.mark.parametrize("headers, expected", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": f"Bearer {SECRET}x"}, 401),
    ({"Authorization": SECRET}, 401),  # no scheme
    ({"Authorization": "Basic !!notbase64"}, 401),
    (basic("wrong"), 401),
    ({"Authorization": f"Bearer {SECRET}"}, 200),
    ({"Authorization": f"bearer  {SECRET} "}, 200),
    (basic(SECRET), 200),
    (basic(SECRET, user=""), 200),
])
def test_with_a_token_only_requests_carrying_it_are_answered(headers: dict[str, str], expected: int) -> None:
    with endpoints.Server(_Echo, secret=SECRET) as server:
        assert status(server.url + "/", headers) == expected


def test_a_refusal_asks_for_basic_auth_and_closes_before_reading_the_body() -> None:
    with endpoints.Server(_Echo, secret=SECRET) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/subjects/x/versions", body=b"{}" * 1000)
        answer = conn.getresponse()
        assert answer.status == 401
        assert answer.getheader("WWW-Authenticate").startswith("Basic ")
        assert answer.getheader("Connection") == "close"
        assert answer.read() == b"token required\n"
        conn.close()


def test_with_the_token_a_kept_alive_connection_serves_several_requests() -> None:
    with endpoints.Server(type("KeepAlive", (_Echo,), {"protocol_version": "HTTP/1.1"}), secret=SECRET) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for body in (b"one", b"two"):
            conn.request("POST", "/", body=body, headers={"Authorization": f"Bearer {SECRET}"})
            assert conn.getresponse().read() == body
        conn.close()


def test_binding_beyond_localhost_warns_and_never_logs_the_token() -> None:
    for secret, says in ((SECRET, "every request needs the token"), ("", "has no authentication")):
        log = _Log()
        with endpoints.Server(_Echo, host="0.0.0.0", secret=secret, name="thing", log=log) as server:
            assert status(f"http://127.0.0.1:{server.port}/", {"Authorization": f"Bearer {SECRET}"}) == 200
        warnings = [event for level, event, _ in log.lines if level == "warning"]
        assert len(warnings) == 1 and warnings[0].startswith("thing reachable beyond this host")
        assert says in warnings[0] and endpoints.TOKEN_ENV in warnings[0]
        assert SECRET not in repr(log.lines)


def test_localhost_binding_says_nothing() -> None:
    log = _Log()
    with endpoints.Server(_Echo, host="127.0.0.1", secret="", log=log) as server:
        assert status(server.url) == 200
    assert not [line for line in log.lines if line[0] == "warning"]


def test_ipv6_localhost_binds_when_the_host_has_ipv6() -> None:
    try:
        socket.socket(socket.AF_INET6).close()
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.fail("this host has no IPv6 loopback: the test cannot show the IPv6 binding")
    with endpoints.Server(_Echo, host="::1", secret="") as server:
        assert server.url.startswith("http://[::1]:")
        assert status(server.url + "/") == 200


def test_the_token_comes_from_the_environment_only() -> None:
    assert endpoints.token({endpoints.TOKEN_ENV: SECRET}) == SECRET
    assert endpoints.token({endpoints.TOKEN_ENV: ""}) is None
    assert endpoints.token({}) is None
    assert endpoints.authorization(None) == {}
    assert endpoints.authorization(SECRET) == {"Authorization": f"Bearer {SECRET}"}


def test_a_workers_metrics_need_the_token_and_the_dashboard_sends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(endpoints.TOKEN_ENV, SECRET)
    metrics.DLQ_PAUSED.labels("http-test", "").set(1)
    server = metrics.serve(0)
    try:
        assert status(f"http://127.0.0.1:{server.port}/metrics") == 401
        assert dashboard.held(f"127.0.0.1:{server.port}") is True
        monkeypatch.setenv(endpoints.TOKEN_ENV, "other")
        assert dashboard.held(f"127.0.0.1:{server.port}") is None  # refused: unknown, not "not held"
    finally:
        server.stop()
        metrics.DLQ_PAUSED.remove("http-test", "")
