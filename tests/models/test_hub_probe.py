"""Behind a proxy, the hub probe asks the proxy for a tunnel instead of trusting it blindly."""

import socket
import threading
import time

import pytest

from patchsparse.network import hub_reachable


def _fake_proxy(reply: bytes | None):
    """A one-connection HTTP proxy on localhost answering CONNECT with `reply` (None: never answers)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    requests = []

    def serve():
        conn, _ = server.accept()
        with conn:
            requests.append(conn.recv(1024))
            if reply is None:
                time.sleep(3)
            else:
                conn.sendall(reply)
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", requests


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    for name in ("https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_dead_proxy_is_unreachable_at_once(online):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    online.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    assert hub_reachable(timeout=2.0) is False
    assert time.perf_counter() - started < 2.5


@pytest.mark.parametrize("reply, expected", [
    (b"HTTP/1.1 200 Connection established\r\n\r\n", True),
    (b"HTTP/1.1 403 Forbidden\r\n\r\n", False),
    (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", False),
    (None, False),  # accepts, never answers: the timeout decides
])
def test_proxy_is_asked_for_a_tunnel(online, reply, expected):
    url, requests = _fake_proxy(reply)
    online.setenv("HTTPS_PROXY", url)
    assert hub_reachable(timeout=1.0) is expected
    assert requests and requests[0].startswith(b"CONNECT huggingface.co:443 HTTP/1.1\r\n")
