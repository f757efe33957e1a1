"""A TCP fault-injection proxy for tests and soak runs: a bad network between two parties on 127.0.0.1.

`FaultProxy` owns one listening socket on loopback, one asyncio loop in a daemon thread, and every connection
it relays. It forwards raw bytes (TLS passes through untouched, so mutual TLS still holds end to end) and
injects faults:

- drop (`drop_rate`, per accepted connection): half of the dropped connections are reset at once, before the
  target is even dialled ("cannot connect"); the rest are reset after a random 1..`DROP_WITHIN_BYTES` relayed
  bytes (both directions counted), i.e. inside the TLS handshake or mid-request / mid-response.
- delay (`delay_s`, per chunk, each direction): each chunk is held `delay_s` before it is written. A queue per
  direction keeps byte order and makes this latency, not a bandwidth cap.
- cut (`cut_rate`, per client->server chunk): only a strict prefix of the chunk reaches the server, then both
  sides are closed: a request body cut mid-way.

Drops and relay errors close with a TCP reset (the peer sees ECONNRESET); a cut and a normal end close with FIN.
A half-close (EOF) is passed on to the other side; the connection ends when both directions have ended.

Decisions come from `random.Random(seed)`: each connection gets a child generator in accept order, so the
same traffic meets the same faults (chunk boundaries are the kernel's, so a cut's offset may still vary).
The proxy stops by itself after `max_lifetime_s`, so a forgotten one never runs forever.

By hand (bounded by --seconds):
    python -m tests.faultproxy --listen 127.0.0.1:9000 --target 127.0.0.1:8701 --drop 0.05 --delay 0.05 --cut 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from types import TracebackType
from typing import Literal

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024  # one read; a delay or a cut applies to one such chunk
QUEUE_CHUNKS = 64  # chunks held per direction while delayed; a full queue stops reading (backpressure)
DROP_WITHIN_BYTES = 16 * 1024  # a mid-stream drop fires within this many relayed bytes: a TLS handshake or so
CONNECT_TIMEOUT_S = 5.0  # dialling the target; on timeout the client is reset
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
STRAGGLER_TIMEOUT_S = 2.0  # at shutdown, how long to wait for handlers accepted just before the listener closed

# How one direction (or the whole connection) ended; anything but "eof" ends the connection at once.
End = Literal["eof", "cut", "drop", "error"]


@dataclass(frozen=True)
class ProxyStats:
    """Counters since start. Bytes are counted as they are handed to the receiving socket."""

    accepted: int = 0
    dropped_at_accept: int = 0  # reset before the target was dialled
    dropped_mid_stream: int = 0  # reset after some bytes were relayed
    cut: int = 0  # a client->server chunk forwarded as a strict prefix, then both sides closed
    connect_failed: int = 0  # the target refused or timed out; the client was reset
    bytes_to_server: int = 0
    bytes_to_client: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_at_accept + self.dropped_mid_stream


@dataclass
class _Conn:
    """Per-connection fault state, touched only on the proxy's loop."""

    rng: random.Random
    drop_budget: int | None  # relayed bytes left before a mid-stream drop; None = this connection is not dropped


@dataclass(frozen=True)
class _Chunk:
    due: float  # loop time before which the chunk is not written
    data: bytes
    end: End | None = None  # set on a direction's last chunk


def _require_loopback(host: str, what: str) -> None:
    """Test traffic stays on loopback: only IP literals in 127.0.0.0/8 or ::1 are accepted, no names."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{what} {host!r} is not a loopback IP address; the fault proxy only relays on 127.0.0.1")


def _require_rate(name: str, rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {rate}")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer sees a TCP reset (ECONNRESET) rather than an orderly EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: abort() below is then a no-op too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _close(writers: list[asyncio.StreamWriter | None], *, reset: bool) -> None:
    # Close every transport synchronously first, so a cancellation while waiting below cannot leak one.
    live = [w for w in writers if w is not None]
    for writer in live:
        if reset:
            _reset(writer)
        else:
            writer.close()
    for writer in live:
        with contextlib.suppress(OSError):  # the error that ended the connection, already handled
            await writer.wait_closed()


class FaultProxy:
    """Relay TCP from `listen_host:listen_port` to `target`, injecting drops, delays and cuts (see module doc).

    Example:
        with FaultProxy(("127.0.0.1", 8701), drop_rate=0.1, delay_s=0.05, seed=1) as proxy:
            talk_to(proxy.address)          # "127.0.0.1:<port>"
            assert proxy.stats().accepted > 0
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        drop_rate: float = 0.0,
        delay_s: float = 0.0,
        cut_rate: float = 0.0,
        seed: int = 0,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        max_lifetime_s: float = 600.0,
    ) -> None:
        _require_loopback(target[0], "target")
        _require_loopback(listen_host, "listen host")
        _require_rate("drop_rate", drop_rate)
        _require_rate("cut_rate", cut_rate)
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        if max_lifetime_s <= 0:
            raise ValueError(f"max_lifetime_s must be > 0, got {max_lifetime_s}")
        self._target = (target[0], int(target[1]))
        self._drop_rate = drop_rate
        self._delay_s = delay_s
        self._cut_rate = cut_rate
        self._listen = (listen_host, int(listen_port))
        self._max_lifetime_s = max_lifetime_s
        self._rng = random.Random(seed)

        self._lock = threading.Lock()  # guards the counters, read from the caller's thread
        self._counts = {f.name: 0 for f in fields(ProxyStats)}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # set once listening, or once startup failed
        self._startup_error: Exception | None = None
        self._port: int | None = None
        # Loop-side state, touched only on the proxy's own loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- caller's side -------------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start the loop thread; return once listening. Raises the bind error (e.g. port in use) if any."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy.start() called twice")
        self._thread = threading.Thread(target=self._run, name=f"faultproxy->{self._target[1]}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"fault proxy did not start listening within {START_TIMEOUT_S} s")
        if self._startup_error is not None:
            self._thread.join(STOP_TIMEOUT_S)
            raise self._startup_error
        return self

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy has no port before start()")
        return self._port

    @property
    def address(self) -> str:
        host = self._listen[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(**self._counts)

    def stop(self) -> None:
        """Close the listener and every relayed connection (with a reset), and join the thread. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        loop, stop_requested = self._loop, self._stop_requested
        if loop is not None and stop_requested is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended: an earlier stop() or max_lifetime_s
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"fault proxy did not stop within {STOP_TIMEOUT_S} s")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # -- the loop thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # before listening: re-raised by start(); after: only logged, nobody to raise to
            if self._ready.is_set():
                log.exception("fault proxy loop failed")
            else:
                self._startup_error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        server = await asyncio.start_server(self._serve, *self._listen)
        self._port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            await asyncio.wait_for(self._stop_requested.wait(), self._max_lifetime_s)
        except asyncio.TimeoutError:
            log.warning("fault proxy %s stopping by itself after max_lifetime_s=%s", self.address, self._max_lifetime_s)
        await self._shutdown(server)

    async def _shutdown(self, server: asyncio.Server) -> None:
        self._closing = True  # handlers that start from now on close their client and return
        server.close()
        # Cancel each running handler once (its cleanup awaits; a second cancel would interrupt it), then wait for
        # every other task, including handlers accepted just before the listener closed: cancelling one of those
        # before its first step would skip its cleanup and leak the client's transport.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STRAGGLER_TIMEOUT_S
        current = asyncio.current_task()
        cancelled: set[asyncio.Task[None]] = set()
        while True:
            for task in self._handlers - cancelled:
                task.cancel()
                cancelled.add(task)
            others = asyncio.all_tasks() - {current}
            if not others or loop.time() > deadline:
                break
            await asyncio.wait(others, timeout=0.05)
        await server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """The listener's callback: track the handler so shutdown can cancel it."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(client_reader, client_writer)
        except asyncio.CancelledError:
            # Only _shutdown cancels us, and _handle has closed both sides by now. End normally: on Python 3.11
            # asyncio's done-callback calls task.exception() on a cancelled handler and logs an error.
            pass
        finally:
            self._handlers.discard(task)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """One accepted connection: decide its drop, dial the target, relay until both directions end."""
        server_writer: asyncio.StreamWriter | None = None
        end: End = "error"  # also what a shutdown (cancellation) looks like: reset both sides
        try:
            if self._closing:
                return
            self._count("accepted")
            conn = self._new_conn()
            if conn is None:
                end = "drop"
                self._count("dropped_at_accept")
                return
            try:
                server_reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(*self._target), CONNECT_TIMEOUT_S
                )
            except (OSError, asyncio.TimeoutError):
                self._count("connect_failed")
                return
            server_writer = upstream
            end = await self._relay(conn, client_reader, client_writer, server_reader, upstream)
            if end == "drop":
                self._count("dropped_mid_stream")
            elif end == "cut":
                self._count("cut")
        finally:
            await _close([client_writer, server_writer], reset=end in ("drop", "error"))

    def _new_conn(self) -> _Conn | None:
        """Draw this connection's faults; None means drop it now."""
        rng = random.Random(self._rng.getrandbits(64))
        if rng.random() >= self._drop_rate:
            return _Conn(rng, drop_budget=None)
        if rng.random() < 0.5:
            return None
        return _Conn(rng, drop_budget=rng.randint(1, DROP_WITHIN_BYTES))

    async def _relay(
        self,
        conn: _Conn,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        server_reader: asyncio.StreamReader,
        server_writer: asyncio.StreamWriter,
    ) -> End:
        """Pump both directions; return "eof" once both ended cleanly, else the first other ending."""
        pumps = {
            asyncio.create_task(self._pump(conn, client_reader, server_writer, upstream=True)),
            asyncio.create_task(self._pump(conn, server_reader, client_writer, upstream=False)),
        }
        try:
            while pumps:
                done, pumps = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                ends = [task.result() for task in done]
                for end in ends:
                    if end != "eof":
                        return end
            return "eof"
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> End:
        """One direction: a feeder reads chunks into a queue; this writes each once due, in order."""
        queue: asyncio.Queue[_Chunk] = asyncio.Queue(QUEUE_CHUNKS)
        feeder = asyncio.create_task(self._feed(conn, reader, queue, upstream=upstream))
        loop = asyncio.get_running_loop()
        counter = "bytes_to_server" if upstream else "bytes_to_client"
        try:
            while True:
                chunk = await queue.get()
                wait = chunk.due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if chunk.data:
                    self._count(counter, len(chunk.data))  # before write: a reader in another thread may be faster
                    writer.write(chunk.data)
                    await writer.drain()
                if chunk.end is not None:
                    if chunk.end == "eof" and writer.can_write_eof():
                        writer.write_eof()  # pass the half-close on; the other direction may still be talking
                    return chunk.end
        except OSError:  # the receiving side reset or vanished
            return "error"
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    async def _feed(
        self, conn: _Conn, reader: asyncio.StreamReader, queue: asyncio.Queue[_Chunk], *, upstream: bool
    ) -> None:
        """Read chunks, decide cut and mid-stream drop per chunk, and queue them with their due time."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await reader.read(CHUNK_BYTES)
            except OSError:
                await queue.put(_Chunk(loop.time(), b"", "error"))
                return
            due = loop.time() + self._delay_s
            if not data:
                await queue.put(_Chunk(due, b"", "eof"))
                return
            end: End | None = None
            if upstream and self._cut_rate > 0 and conn.rng.random() < self._cut_rate:
                data, end = data[: conn.rng.randrange(len(data))], "cut"  # strictly fewer bytes, maybe none
            if conn.drop_budget is not None:
                if len(data) >= conn.drop_budget:
                    data, end = data[: conn.drop_budget], "drop"
                conn.drop_budget -= len(data)
            await queue.put(_Chunk(due, data, end))
            if end is not None:
                return


# -- by hand ---------------------------------------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faultproxy",
        description="Relay TCP on loopback with injected drops, delays and body cuts; stops after --seconds.",
    )
    parser.add_argument("--listen", type=_host_port, default=("127.0.0.1", 0), help="HOST:PORT to listen on (loopback)")
    parser.add_argument("--target", type=_host_port, required=True, help="HOST:PORT to relay to (loopback)")
    parser.add_argument("--drop", type=float, default=0.0, help="probability a connection is reset, [0, 1]")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to each chunk, each direction")
    parser.add_argument("--cut", type=float, default=0.0, help="probability a client->server chunk is cut, [0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed for the fault decisions")
    parser.add_argument("--seconds", type=float, default=60.0, help="run this long, then print the counters and exit")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    try:
        proxy = FaultProxy(
            args.target, drop_rate=args.drop, delay_s=args.delay, cut_rate=args.cut, seed=args.seed,
            listen_host=args.listen[0], listen_port=args.listen[1], max_lifetime_s=args.seconds + 1.0,
        )
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with proxy:
        log.info("relaying %s -> %s:%d for %s s", proxy.address, *args.target, args.seconds)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.seconds)
    stats = proxy.stats()
    print(" ".join(f"{name}={value}" for name, value in {**asdict(stats), "dropped": stats.dropped}.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
