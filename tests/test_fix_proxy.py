"""Tests for the fault-injection proxy in fix_proxy.py.

They use plain sockets and a tiny in-process server; no PostgreSQL, no fixtures
from conftest.py.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

try:
    from fix_proxy import Proxy
except ImportError:  # tests/ imported as a package
    from tests.fix_proxy import Proxy  # type: ignore[no-redef, import-not-found, unused-ignore]

PAYLOAD = random.Random(42).randbytes(1024 * 1024)  # what the bulk server sends


class _Server:
    """Loopback TCP server: "bulk" sends PAYLOAD then closes; "echo" echoes."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5.0)
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            if self.mode == "bulk":
                conn.sendall(PAYLOAD)
                return
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sock.close()
        for conn in self._conns:
            conn.close()


@pytest.fixture
def bulk_server() -> Iterator[_Server]:
    server = _Server("bulk")
    yield server
    server.close()


@pytest.fixture
def echo_server() -> Iterator[_Server]:
    server = _Server("echo")
    yield server
    server.close()


def _connect(proxy: Proxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def _recv_all(sock: socket.socket) -> tuple[bytes, str]:
    """Read until the stream ends; return the data and "eof" or "reset"."""
    chunks: list[bytes] = []
    with sock:
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return b"".join(chunks), "reset"
            if not data:
                return b"".join(chunks), "eof"
            chunks.append(data)


def _fetch(proxy: Proxy) -> tuple[bytes, str]:
    """Connect and read everything the proxy delivers; see _recv_all."""
    sock = socket.socket()
    sock.settimeout(5.0)
    # Under load a cut can RST the connection before connect() returns; the
    # bytes received before the RST remain readable, so read them anyway.
    err = sock.connect_ex(("127.0.0.1", proxy.port))
    if err not in (0, errno.ECONNRESET):
        sock.close()
        raise OSError(err, os.strerror(err))
    data, end = _recv_all(sock)
    return data, "reset" if err else end


def _proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fix-proxy-")]


def test_forwards_bulk_intact(bulk_server: _Server) -> None:
    with Proxy("127.0.0.1", bulk_server.port) as proxy:
        for _ in range(2):
            data, end = _fetch(proxy)
            assert end == "eof"
            assert data == PAYLOAD
        assert proxy.connections == 2
        assert proxy.cuts == 0


def test_forwards_both_ways_and_half_close(echo_server: _Server) -> None:
    with Proxy("localhost", echo_server.port) as proxy:
        sock = _connect(proxy)
        sender = threading.Thread(target=sock.sendall, args=(PAYLOAD,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < len(PAYLOAD):
            data = sock.recv(65536)
            assert data
            got += data
        sender.join(5.0)
        assert bytes(got) == PAYLOAD
        # Our FIN reaches the echo server, which closes; its FIN reaches us.
        sock.shutdown(socket.SHUT_WR)
        assert _recv_all(sock) == (b"", "eof")
        assert proxy.cuts == 0


def test_threads_are_daemon(echo_server: _Server) -> None:
    with Proxy("127.0.0.1", echo_server.port) as proxy, _connect(proxy) as sock:
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"
        threads = _proxy_threads()
        assert len(threads) == 2  # the acceptor and one connection pump
        assert all(t.daemon for t in threads)


def test_cut_after(bulk_server: _Server) -> None:
    with Proxy("127.0.0.1", bulk_server.port) as proxy:
        proxy.cut_after(1000)
        data, end = _fetch(proxy)
        assert 1000 < len(data) < len(PAYLOAD) // 10
        assert data == PAYLOAD[: len(data)]
        assert end == "reset"
        assert proxy.cuts == 1


def test_cut_after_every_connection(bulk_server: _Server) -> None:
    with Proxy("127.0.0.1", bulk_server.port) as proxy:
        proxy.cut_after(5000)
        for _ in range(3):
            data, end = _fetch(proxy)
            assert 5000 < len(data) < len(PAYLOAD) // 10
            assert end == "reset"
        assert (proxy.connections, proxy.cuts) == (3, 3)


def test_cut_after_times(bulk_server: _Server) -> None:
    with Proxy("127.0.0.1", bulk_server.port) as proxy:
        proxy.cut_after(1000, times=2)
        results = [_fetch(proxy) for _ in range(4)]
        assert [end for _, end in results] == ["reset", "reset", "eof", "eof"]
        assert all(len(data) < len(PAYLOAD) // 10 for data, _ in results[:2])
        assert all(data == PAYLOAD for data, _ in results[2:])
        assert (proxy.connections, proxy.cuts) == (4, 2)


def test_stall_and_unstall(echo_server: _Server) -> None:
    with Proxy("127.0.0.1", echo_server.port) as proxy:
        live = _connect(proxy, timeout=0.5)
        live.sendall(b"ping")
        assert live.recv(10) == b"ping"

        proxy.stall()
        live.sendall(b"during stall")
        new = _connect(proxy, timeout=0.1)  # accepted even while stalled
        new.sendall(b"new")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            live.recv(100)  # no data, and no EOF nor RST either
        assert time.monotonic() - t0 >= 0.4
        with pytest.raises(TimeoutError):
            new.recv(100)

        proxy.unstall()
        live.settimeout(2.0)
        new.settimeout(2.0)
        assert live.recv(100) == b"during stall"
        assert new.recv(100) == b"new"
        live.sendall(b"again")
        assert live.recv(100) == b"again"
        live.close()
        new.close()
        assert proxy.connections == 2
        assert proxy.cuts == 0


def test_cut_all(echo_server: _Server) -> None:
    with Proxy("127.0.0.1", echo_server.port) as proxy:
        socks = [_connect(proxy) for _ in range(2)]
        for sock in socks:
            sock.sendall(b"ping")
            assert sock.recv(10) == b"ping"
        proxy.stall()  # a cut must work on a stalled connection too
        proxy.cut_all()
        assert proxy.cuts == 2
        for sock in socks:
            assert _recv_all(sock) == (b"", "reset")
        proxy.unstall()
        # The proxy itself keeps working.
        with _connect(proxy) as sock:
            sock.sendall(b"ping")
            assert sock.recv(10) == b"ping"
        assert proxy.connections == 3


def test_reset(bulk_server: _Server) -> None:
    with Proxy("127.0.0.1", bulk_server.port) as proxy:
        proxy.cut_after(1000)
        proxy.stall()
        proxy.reset()
        assert _fetch(proxy) == (PAYLOAD, "eof")
        assert proxy.cuts == 0


def test_unreachable_target() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        with Proxy("127.0.0.1", holder.getsockname()[1]) as proxy:
            assert _fetch(proxy) == (b"", "reset")
            assert proxy.connections == 1
            assert proxy.cuts == 0


def test_close_releases_everything(echo_server: _Server) -> None:
    proxy = Proxy("127.0.0.1", echo_server.port)
    proxy.start()
    port = proxy.port
    sock = _connect(proxy)
    sock.sendall(b"ping")
    assert sock.recv(10) == b"ping"

    proxy.close()
    proxy.close()  # idempotent
    assert _proxy_threads() == []
    assert _recv_all(sock) == (b"", "reset")  # live connection closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0)
    # Nothing listens on the port any more: it can be bound and listened on again.
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
    with pytest.raises(RuntimeError):
        proxy.start()


def test_listens_on_loopback_only(echo_server: _Server) -> None:
    with Proxy("127.0.0.1", echo_server.port) as proxy:
        assert proxy._listener.getsockname() == ("127.0.0.1", proxy.port)
