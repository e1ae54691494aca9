"""Socket-level help for the server: a client that left, seen without reading its connection, and
connections closed gracefully on one thread (the server's answers to them not lost to a reset)."""

from __future__ import annotations

import queue
import select
import selectors
import socket
import threading
import time

DRAIN_SECONDS = 2.0  # how long a closed connection's unread input is drained
TICK_SECONDS = 0.1  # how often the closer looks for connections past DRAIN_SECONDS


def client_left(sock: socket.socket) -> bool:
    """Whether the peer closed its end (EOF) or reset the connection; data it sent stays unread.
    Only for protocols where the client sends nothing more (HTTP/1.0 after the request body)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class Closer:
    """Closes connections gracefully on one thread: each gets a FIN, then what the client still sends
    is read and dropped until it closes too, or for DRAIN_SECONDS. (Closing a socket with unread
    input sends a reset, and a client can lose the answer it had not read yet.) At most `limit`
    sockets drain at once; beyond that the oldest is closed outright."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._new: queue.SimpleQueue[socket.socket | None] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tightfit-closer", daemon=True)
        self._thread.start()

    def close(self, sock: socket.socket, answer: bytes = b"") -> None:
        """Send `answer` (a few hundred bytes: the socket buffer takes it at once), then close."""
        try:
            sock.setblocking(False)
            if answer and sock.send(answer) != len(answer):
                raise BlockingIOError
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if self._stopped:  # a handler that finished after the server closed
            sock.close()
        else:
            self._new.put(sock)

    def stop(self) -> None:
        self._stopped = True
        self._new.put(None)
        self._thread.join()

    def _loop(self) -> None:
        draining: dict[socket.socket, float] = {}  # socket -> when to give up, oldest first
        with selectors.DefaultSelector() as selector:

            def drop(sock: socket.socket) -> None:
                selector.unregister(sock)
                del draining[sock]
                sock.close()

            while True:
                try:
                    sock = self._new.get(timeout=TICK_SECONDS) if draining else self._new.get()
                except queue.Empty:
                    sock = None
                else:
                    if sock is None:
                        break
                if sock is not None:
                    if len(draining) >= self._limit:
                        drop(next(iter(draining)))
                    selector.register(sock, selectors.EVENT_READ)
                    draining[sock] = time.monotonic() + DRAIN_SECONDS
                for key, _ in selector.select(timeout=0):
                    try:
                        if key.fileobj.recv(1 << 16):
                            continue
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        pass
                    drop(key.fileobj)
                now = time.monotonic()
                for sock in [s for s, until in draining.items() if until <= now]:
                    drop(sock)
            for sock in list(draining):
                drop(sock)
