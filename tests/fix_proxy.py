"""A small TCP fault-injection proxy for tests.

The proxy listens on 127.0.0.1 (loopback only) on a random free port and
forwards every accepted connection to a fixed target ``(host, port)``.  Faults
can be switched on and off while it runs, to prove that a client survives
network trouble::

    with Proxy("127.0.0.1", pg_port) as proxy:
        proxy.cut_after(100_000, times=1)   # RST the next connection mid-stream
        ...connect to 127.0.0.1:proxy.port...

Design: one daemon thread accepts connections and one daemon thread per
connection pumps bytes both ways with non-blocking sockets and a selector.
Every wait uses a short timeout, so threads notice ``close()``, ``stall()`` and
``cut_all()`` promptly.  Each connection thread owns its two sockets and
closes them when it ends; ``close()`` stops all threads and waits for them.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
from types import TracebackType

__all__ = ["Proxy"]

_TICK = 0.02  # seconds: longest time a thread waits before re-checking its flags
_CHUNK = 65536  # bytes read at once; also the bound of each direction's buffer
_JOIN_TIMEOUT = 5.0  # seconds to wait for a thread to stop
_LINGER_ZERO = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _abort(sock: socket.socket) -> None:
    """Close *sock* abortively: the peer gets an RST rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


class _Conn:
    """One proxied connection, pumped by its own thread."""

    def __init__(self, proxy: Proxy, client: socket.socket, limit: int | None, n: int) -> None:
        self.proxy = proxy
        self.client = client
        # Cut once more than `limit` bytes went server -> client (None: never).
        self.limit = limit
        self.sent = 0  # bytes forwarded server -> client so far
        self.cut = threading.Event()  # set by Proxy.cut_all()
        self.thread = threading.Thread(
            target=self._run, name=f"fix-proxy-{proxy.port}-conn-{n}", daemon=True
        )

    def _stopping(self) -> bool:
        return self.cut.is_set() or self.proxy._closing.is_set()

    def _run(self) -> None:
        server: socket.socket | None = None
        outcome = "abort"  # "close": graceful end; "abort": RST both; "cut": fault
        try:
            server = self._connect()
            if server is not None:
                outcome = self._pump(self.client, server)
            elif self.cut.is_set():
                outcome = "cut"
        except OSError:
            outcome = "abort"
        finally:
            if outcome == "cut":
                self.proxy._count_cut()  # before the peers can see the RST
            for sock in (self.client, server):
                if sock is None:
                    continue
                if outcome == "close":
                    sock.close()
                else:
                    _abort(sock)
            self.proxy._finished(self)

    def _connect(self) -> socket.socket | None:
        """Connect to the target without blocking; None if failed or stopped."""
        proxy = self.proxy
        infos = socket.getaddrinfo(proxy.target_host, proxy.target_port, type=socket.SOCK_STREAM)
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                with selectors.DefaultSelector() as sel:
                    sel.register(sock, selectors.EVENT_WRITE)
                    while not sel.select(_TICK) and not self._stopping():
                        pass
                if self._stopping():
                    sock.close()
                    return None
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                return sock
            sock.close()
        return None

    def _pump(self, client: socket.socket, server: socket.socket) -> str:
        """Forward bytes both ways until both sides are done or a fault hits."""
        peer = {client: server, server: client}
        outbuf = {client: bytearray(), server: bytearray()}  # bytes to write to the key
        eof: set[socket.socket] = set()  # sockets that sent us a FIN
        shut: set[socket.socket] = set()  # sockets we sent a FIN to
        masks = {client: 0, server: 0}
        with selectors.DefaultSelector() as sel:
            while True:
                if self.cut.is_set():
                    return "cut"
                if self.proxy._closing.is_set():
                    return "abort"
                if not self.proxy._flowing.wait(_TICK):
                    continue  # stalled: touch nothing, keep sockets open
                for sock in (client, server):
                    # Propagate a half-close once everything before it is delivered.
                    if peer[sock] in eof and not outbuf[sock] and sock not in shut:
                        sock.shutdown(socket.SHUT_WR)
                        shut.add(sock)
                if len(shut) == 2:
                    return "close"
                for sock in (client, server):
                    mask = 0
                    if sock not in eof and len(outbuf[peer[sock]]) < _CHUNK:
                        mask |= selectors.EVENT_READ
                    if outbuf[sock]:
                        mask |= selectors.EVENT_WRITE
                    if mask != masks[sock]:
                        if masks[sock] == 0:
                            sel.register(sock, mask)
                        elif mask == 0:
                            sel.unregister(sock)
                        else:
                            sel.modify(sock, mask)
                        masks[sock] = mask
                for key, events in sel.select(_TICK):
                    sock = client if key.fileobj is client else server
                    if events & selectors.EVENT_READ:
                        with contextlib.suppress(BlockingIOError):
                            data = sock.recv(_CHUNK)
                            if data:
                                outbuf[peer[sock]] += data
                            else:
                                eof.add(sock)
                    if events & selectors.EVENT_WRITE and self._write(sock, outbuf[sock]):
                        return "cut"

    def _write(self, sock: socket.socket, buf: bytearray) -> bool:
        """Send what *sock* accepts from *buf*; True if the connection must be cut."""
        size = len(buf)
        limit = self.limit
        to_client = sock is self.client
        if to_client and limit is not None:
            size = min(size, max(limit + 1 - self.sent, 0))
        try:
            n = sock.send(buf[:size])
        except BlockingIOError:
            return False
        del buf[:n]
        if to_client:
            self.sent += n
            return limit is not None and self.sent > limit
        return False


class Proxy:
    """TCP proxy on 127.0.0.1 that forwards to ``(target_host, target_port)``.

    The listening socket is bound in the constructor, so :attr:`port` is
    valid at once; :meth:`start` begins accepting.  Used as a context manager
    it is started on entry and closed on exit.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.connections = 0  # connections accepted so far
        self.cuts = 0  # connections cut by a fault so far
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._flowing = threading.Event()  # cleared while stalled
        self._flowing.set()
        self._cut_nbytes: int | None = None
        self._cut_times: int | None = None
        self._conns: set[_Conn] = set()
        self._accept_thread: threading.Thread | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start accepting connections in a background (daemon) thread."""
        if self._closing.is_set():
            raise RuntimeError("proxy is closed")
        if self._accept_thread is not None:
            raise RuntimeError("proxy already started")
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"fix-proxy-{self.port}-accept", daemon=True
        )
        self._accept_thread.start()

    def close(self) -> None:
        """Stop accepting, abort every live connection and close all sockets.

        Live connections are closed abortively (their peers get an RST); that
        does not count in :attr:`cuts`.  Idempotent; returns once all proxy
        threads have ended.
        """
        self._closing.set()
        if self._accept_thread is not None:
            self._accept_thread.join(_JOIN_TIMEOUT)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.thread.join(_JOIN_TIMEOUT)

    def __enter__(self) -> Proxy:
        if self._accept_thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults --------------------------------------------------------------

    def cut_after(self, nbytes: int, times: int | None = None) -> None:
        """Cut each new connection once more than *nbytes* went server -> client.

        Applies to the next *times* accepted connections (None: every new
        connection until :meth:`reset`).  The proxy forwards exactly
        ``nbytes + 1`` bytes to the client, then closes both sockets with
        SO_LINGER 0, so both the client and the server see an RST.
        """
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        if times is not None and times < 0:
            raise ValueError("times must be >= 0 or None")
        with self._lock:
            self._cut_nbytes = nbytes
            self._cut_times = times

    def stall(self) -> None:
        """Stop forwarding both ways on all live and new connections.

        Sockets stay open and nothing is read, so peers see neither data nor
        FIN/RST: a black-holed network.  New connections are still accepted
        (and connected to the target), but no byte flows on them either.
        """
        self._flowing.clear()

    def unstall(self) -> None:
        """Resume forwarding after :meth:`stall`."""
        self._flowing.set()

    def cut_all(self) -> None:
        """Abruptly cut (RST) every live connection; returns once they are closed."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.cut.set()
        for conn in conns:
            conn.thread.join(_JOIN_TIMEOUT)

    def reset(self) -> None:
        """Back to plain forwarding: no pending cuts, not stalled."""
        with self._lock:
            self._cut_nbytes = self._cut_times = None
            for conn in self._conns:
                conn.limit = None
        self._flowing.set()

    # -- internals -----------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            while not self._closing.is_set():
                if not sel.select(_TICK) or self._closing.is_set():
                    continue
                try:
                    client, _ = self._listener.accept()
                except OSError:  # BlockingIOError, or the client went away already
                    continue
                client.setblocking(False)
                with self._lock:
                    self.connections += 1
                    limit = self._cut_nbytes
                    if limit is not None and self._cut_times is not None:
                        if self._cut_times > 0:
                            self._cut_times -= 1
                        else:
                            limit = None
                    conn = _Conn(self, client, limit, self.connections)
                    self._conns.add(conn)
                    conn.thread.start()

    def _count_cut(self) -> None:
        with self._lock:
            self.cuts += 1

    def _finished(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
