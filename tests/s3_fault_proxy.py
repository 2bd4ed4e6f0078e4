"""A small HTTP fault-injection proxy between an S3 client and a real S3 endpoint, for tests.

It listens on 127.0.0.1 (a free port) and forwards every request to the endpoint, unless a
:class:`Rule` picks it: then it answers ``503 SlowDown`` itself (an S3 error body, as S3 sends
when throttling), or resets the TCP connection (``SO_LINGER`` 0: an RST) before reading the
request's body (*mid-request*), or after forwarding the request and relaying half of the
endpoint's answer (*mid-response*: the request took effect, its answer was lost)::

    with S3FaultProxy(moto_url) as proxy:
        proxy.add(Rule("PUT", "partNumber=", "503", times=4))   # the next four part uploads
        ...AWS_ENDPOINT_URL=proxy.url...

Requests are parsed only as far as framing needs (the head; a ``Content-Length`` or chunked
body, relayed as received); each is forwarded on a fresh connection to the endpoint
(``Connection: close``), whose whole answer is relayed, saying ``Connection: close`` to the
client too (one request per client connection, the simplest framing). One thread per client
connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlparse

__all__ = ["Rule", "S3FaultProxy"]

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class Rule:
    """Requests whose method is ``method`` and whose target contains ``needle`` get ``how``
    (``"503"``, ``"reset-request"`` or ``"reset-response"``): the first ``skip`` of them are
    let through, then the next ``times`` (``None``: every one) are hit."""

    method: str
    needle: str
    how: str
    times: int | None = 1
    skip: int = 0
    hits: int = field(default=0, init=False)

    def take(self, method: str, target: str) -> bool:
        if method != self.method or self.needle not in target:
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


class S3FaultProxy:
    """The proxy (see the module); ``url`` is what clients use as their endpoint."""

    def __init__(self, endpoint: str) -> None:
        target = urlparse(endpoint)
        self._to = (target.hostname or "127.0.0.1", target.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self.log: list[tuple[str, str, str]] = []  # (method, target, what happened)

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def __enter__(self) -> S3FaultProxy:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()
        for t in list(self._threads):
            t.join(timeout=5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _pick(self, method: str, target: str) -> str | None:
        with self._lock:
            for rule in self._rules:
                if rule.take(method, target):
                    return rule.how
        return None

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        reader = _Reader(conn)
        try:
            while not self._closed.is_set():
                head = reader.until(b"\r\n\r\n")
                if not head:
                    return
                method, target = head.split(b" ", 2)[:2]
                how = self._pick(method.decode(), target.decode())
                self.log.append((method.decode(), target.decode(), how or "forwarded"))
                if how == "reset-request":
                    return _reset(conn)
                body = reader.body(head)
                if how == "503":
                    conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(SLOWDOWN), SLOWDOWN))
                    continue
                answer = self._forward(head, body)
                if how == "reset-response":
                    conn.sendall(answer[: len(answer) // 2])
                    return _reset(conn)
                conn.sendall(answer)
                return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _forward(self, head: bytes, body: bytes) -> bytes:
        lines = [
            line for line in head.split(b"\r\n")
            if line and not line.lower().startswith(b"connection:")
        ]  # fmt: skip
        request = b"\r\n".join([*lines, b"Connection: close", b"", b""]) + body
        with socket.create_connection(self._to, timeout=60) as up:
            up.sendall(request)
            chunks = []
            while data := up.recv(1 << 16):
                chunks.append(data)
        head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
        kept = [h for h in head.split(b"\r\n") if not h.lower().startswith(b"connection:")]
        return b"\r\n".join([*kept, b"Connection: close", b"", b""]) + rest  # one per connection


def _reset(conn: socket.socket) -> None:
    """Close ``conn`` with an RST, not a FIN."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


class _Reader:
    """Buffered reads from a socket: up to a delimiter, or a request's body."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.buf = conn, b""

    def _more(self) -> bool:
        data = self.conn.recv(1 << 16)
        self.buf += data
        return bool(data)

    def until(self, delimiter: bytes) -> bytes:
        while delimiter not in self.buf:
            if not self._more():
                return b""
        i = self.buf.index(delimiter) + len(delimiter)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise OSError("the client closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def body(self, head: bytes) -> bytes:
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            out = b""
            while True:
                size_line = self.until(b"\r\n")
                out += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (line := self.until(b"\r\n")) != b"\r\n":
                        out += line
                    return out + b"\r\n"
                out += self.exactly(size + 2)
        return self.exactly(int(headers.get(b"content-length", b"0")))
