"""Whether the model/data hub can be reached: fail fast offline instead of waiting on retries."""

from __future__ import annotations

import os


def hub_reachable(timeout: float = 3.0) -> bool:
    """Fail fast offline: huggingface_hub would otherwise retry for about a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(v)), None)
    if proxy:  # behind a proxy a direct probe proves nothing: ask the proxy for a tunnel to the hub
        return _proxy_tunnels_to(proxy, host, timeout)
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _proxy_tunnels_to(proxy: str, host: str, timeout: float) -> bool:
    """Whether an HTTP(S) proxy answers a CONNECT to host:443 with 200 within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return True  # a SOCKS or unusual proxy: we cannot probe it, let the hub client try
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with socket.create_connection((parsed.hostname, port), timeout=timeout) as conn:
            if parsed.scheme == "https":
                return True  # reachable; the tunnel itself would need TLS to the proxy first
            conn.settimeout(timeout)
            conn.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
            status = conn.recv(64).split(b"\r\n", 1)[0].split()
        return len(status) >= 2 and status[1] == b"200"
    except (OSError, ValueError):
        return False
