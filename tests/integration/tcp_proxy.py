"""A small threaded TCP proxy that injects network faults between pymongo and a server.

Why: Tullius must survive connections that die mid-operation, and the worst
case for a task processor is "the write was applied but the acknowledgement
was lost". Killing the database cannot produce that case deterministically;
a proxy that understands just enough of the MongoDB wire protocol can.

Each client connection gets one daemon thread that relays whole wire messages
in both directions. Only that thread touches its sockets; other threads ask it
to reset through a wake-up socket and wait for it, so no socket is ever closed
under another thread's feet.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

OP_MSG = 2013
_HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
_MAX_MESSAGE = 64 * 1024 * 1024  # above MongoDB's 48 MB limit; larger means framing was lost
_CHECKSUM_PRESENT, _MORE_TO_COME = 1 << 0, 1 << 1
# Commands drivers send on their own (handshake, monitoring, session cleanup);
# drop_next_reply(None) skips them to catch the application's next command.
_HANDSHAKE = frozenset({"hello", "ismaster", "ping", "buildinfo"})
_BACKGROUND = _HANDSHAKE | {"endsessions", "saslstart", "saslcontinue"}  # compared lower-cased


@dataclass(frozen=True)
class WireMessage:
    """One client-to-server message, as passed to ``drop_next_reply`` predicates."""

    request_id: int
    response_to: int
    op_code: int
    flags: int
    command: str | None  # first key of the OP_MSG body document, e.g. "insert"
    raw: bytes


def parse_message(raw: bytes) -> WireMessage:
    """Decode the header and, for OP_MSG, the command name (first key of the kind-0 section)."""
    length, request_id, response_to, op_code = _HEADER.unpack_from(raw)
    flags, command = 0, None
    if op_code == OP_MSG and length >= 21:
        flags = struct.unpack_from("<I", raw, 16)[0]
        end, pos = length - (4 if flags & _CHECKSUM_PRESENT else 0), 20
        while pos + 5 < end:
            kind, size = raw[pos], struct.unpack_from("<i", raw, pos + 1)[0]
            if kind == 0:  # body: int32 document size, element type byte, then the cstring key
                command = raw[pos + 6 : raw.index(b"\0", pos + 6)].decode("utf-8", "replace")
                break
            if size < 4:
                break  # corrupt document sequence; give up on the name rather than loop
            pos += 1 + size
    return WireMessage(request_id, response_to, op_code, flags, command, raw)


def _split_messages(buf: bytearray) -> list[bytes]:
    """Remove and return the complete wire messages at the front of ``buf``."""
    out = []
    while len(buf) >= 16:
        length = struct.unpack_from("<i", buf)[0]
        if not 16 <= length <= _MAX_MESSAGE:
            raise ValueError(
                f"wire message length {length} is outside 16..{_MAX_MESSAGE}; not MongoDB traffic?"
            )
        if len(buf) < length:
            break
        out.append(bytes(buf[:length]))
        del buf[:length]
    return out


def _rst_close(sock: socket.socket) -> None:
    """Close so that the peer sees a reset (RST) instead of an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Connection:
    """A client/upstream socket pair and the thread that relays between them."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy, self.client, self.upstream = proxy, client, upstream
        self._wake_r, self._wake_w = socket.socketpair()
        self._reset_requested = False
        self.finished = threading.Event()
        self._drop_replies: dict[
            int, threading.Event
        ] = {}  # request id -> event set when its reply is dropped

    def start(self) -> None:
        threading.Thread(target=self._run, name="tcp-proxy-conn", daemon=True).start()

    def request_reset(self) -> None:
        self._reset_requested = True
        with contextlib.suppress(OSError):  # the thread may already have finished
            self._wake_w.send(b"!")

    def _run(self) -> None:
        reset = True
        bufs = {self.client: bytearray(), self.upstream: bytearray()}
        try:
            with selectors.DefaultSelector() as sel:
                for s in (self.client, self.upstream, self._wake_r):
                    sel.register(s, selectors.EVENT_READ)
                while not self._reset_requested:
                    for key, _ in sel.select():
                        src = key.fileobj
                        if src is self._wake_r:
                            continue
                        data = src.recv(256 * 1024)  # type: ignore[union-attr]
                        if not data:  # one side closed in order: close the other side in order too
                            reset = False
                            return
                        bufs[src] += data  # type: ignore[index]
                        for raw in _split_messages(bufs[src]):  # type: ignore[index]
                            if src is self.client:
                                msg = parse_message(raw)
                                fired = self.proxy._claim_drop(msg)
                                if fired is not None:
                                    self._drop_replies[msg.request_id] = fired
                                self.upstream.sendall(raw)
                            elif (
                                fired := self._drop_replies.pop(_HEADER.unpack_from(raw)[2], None)
                            ) is None:
                                self.client.sendall(raw)
                            else:
                                if self.proxy._down_after_drop:
                                    self.proxy._go_down(but=self)
                                fired.set()
                                return  # reply swallowed: reset the connection
        except (OSError, ValueError) as e:
            log.debug("tcp proxy connection ended: %r", e)
        finally:
            for s in (self.client, self.upstream):
                if reset:
                    _rst_close(s)
                else:
                    s.close()
            self._wake_r.close()
            self._wake_w.close()
            self.proxy._forget(self)
            self.finished.set()


class TcpProxy:
    """Relay ``127.0.0.1:<port>`` to an upstream server, with fault injection.

    ``reset_all()`` and ``set_down(True)`` return only after the affected
    connections are closed, so the client's next operation reliably sees them.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port: int | None = None
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._drop_rule: tuple[Callable[[WireMessage], bool], threading.Event] | None = None
        self._down = self._stopping = self._down_after_drop = False
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("TcpProxy.uri was read before start(); expected start() first")
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> TcpProxy:
        if self._listener is not None:
            raise RuntimeError(f"TcpProxy on port {self.port} is already started")
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)  # lets the accept loop notice stop()
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(
            target=self._accept_loop,
            args=(self._listener,),
            name=f"tcp-proxy-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed by stop()
            client.settimeout(None)
            if self._down:
                _rst_close(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _rst_close(client)  # looks like the real server being unreachable
                continue
            conn = _Connection(self, client, upstream)
            with self._lock:  # re-check under the lock: set_down() may have run meanwhile
                if not self._down:
                    self._conns.add(conn)
                    conn.start()
                    continue
            _rst_close(client)
            _rst_close(upstream)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _claim_drop(self, msg: WireMessage) -> threading.Event | None:
        """If ``msg`` matches the armed rule, disarm it and return its event."""
        if msg.op_code != OP_MSG or msg.flags & _MORE_TO_COME:
            return None  # no reply will come, so there is nothing to swallow
        with self._lock:
            if self._drop_rule is None:
                return None
            matcher, fired = self._drop_rule
            try:
                if not matcher(msg):
                    return None
            except Exception:
                log.exception("drop_next_reply predicate raised; treating it as no match")
                return None
            self._drop_rule = None
            return fired

    def drop_next_reply(
        self,
        matching: Callable[[WireMessage], bool] | str | bytes | None = None,
        *,
        then_down: bool = False,
    ) -> threading.Event:
        """Forward the next matching request, swallow its reply and reset that connection.

        With ``then_down``, the proxy goes down (as `set_down`) at that moment,
        before the client can try again: the write was applied, and the client
        can't reach the server to learn it until ``set_down(False)``.

        ``matching`` is a predicate on :class:`WireMessage`, or a command name
        such as ``"insert"`` (str or bytes); ``None`` matches the next command
        that is not a driver handshake or monitoring command. The returned
        event is set once a reply was swallowed: the server executed the
        command, but the client will never learn the outcome.
        """
        matcher: Callable[[WireMessage], bool]
        if matching is None:

            def matcher(m: WireMessage) -> bool:
                return (m.command or "").lower() not in _BACKGROUND

        elif isinstance(matching, (str, bytes)):
            name = matching.decode() if isinstance(matching, bytes) else matching

            def matcher(m: WireMessage) -> bool:
                return m.command == name

        elif callable(matching):
            matcher = matching
        else:
            raise TypeError(f"matching={matching!r}: expected a callable, a command name or None")
        fired = threading.Event()
        with self._lock:
            self._drop_rule = (matcher, fired)
            self._down_after_drop = then_down
        return fired

    def _go_down(self, but: _Connection) -> None:
        """`set_down` from a connection's own thread: reset every other connection
        without waiting for them (``but`` resets itself as its thread returns)."""
        with self._lock:
            self._down = True
            self._down_after_drop = False
            others = [c for c in self._conns if c is not but]
        for c in others:
            c.request_reset()

    def reset_all(self, timeout: float = 10) -> int:
        """Reset every open connection (clients see ECONNRESET); return how many there were."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.request_reset()
        for c in conns:
            if not c.finished.wait(timeout):
                raise TimeoutError(
                    f"a proxy connection was still open {timeout}s after reset_all()"
                )
        return len(conns)

    def set_down(self, down: bool) -> None:
        """While down, reset existing connections and every new one right after accept."""
        with self._lock:
            self._down = down
        if down:
            self.reset_all()

    def stop(self) -> None:
        """Stop accepting, reset every connection and release the port."""
        self._stopping = True
        if self._listener is not None:
            self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.reset_all()
        self._listener = self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
