"""``server.workers``: N gateway processes on one port, under one parent (docs/design.md §10).

The parent never serves a request. It starts N workers (``python -m gateway``
with the hidden ``--worker`` flag), each listening on the same port with
SO_REUSEPORT, so that the kernel spreads new connections among them; they
share the cache, single-flight and budget through Redis (hence
``redis.url``). The parent:

- on SIGTERM or SIGINT, sends SIGTERM to every worker, waits for them to
  finish their requests in flight (``server.shutdown_grace_s`` plus a
  margin, then SIGKILL), and exits 0 only if every worker exited 0;
- on SIGHUP, sends SIGHUP to every worker: each reloads its own config;
- starts again a worker that exits while the parent is not stopping, after
  a backoff (0.5 s, doubling up to 10 s; back to 0.5 s once a worker has
  lived 30 s);
- stops at once, with the worker's exit code, if a worker fails before all
  of them first serve (2: a bad config or store, 1: cannot listen), as the
  single process would.

A worker reports that it serves by writing one byte to a pipe the parent
gave it (``--ready-fd``), once its signal handlers are in place. On Linux a
worker gets SIGTERM when the parent dies (even of SIGKILL), so that no worker
outlives it holding the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.config import ConfigError, GatewayConfig
from gateway.ops.logs import log_event, set_level

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 0.5  # the first restart of a worker waits this long; each further one twice as long
RESTART_BACKOFF_MAX_S = 10.0
STEADY_AFTER_S = 30.0  # a worker that lived this long is restarted after the first backoff again
# Past server.shutdown_grace_s, the time a worker has to close its sockets, Redis link and store.
STOP_MARGIN_S = 5.0
READY = b"1"


@dataclass
class Worker:
    """One worker slot: the process now in it, and whether that process serves yet."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    serving: bool = False
    started_at: float = 0.0
    reload_pending: bool = False  # a SIGHUP came while the process was starting


_PR_SET_PDEATHSIG = 1  # prctl(2)


def follow_the_parent() -> None:
    """In a worker: be sent SIGTERM when the parent dies (Linux only), as if the parent had stopped it.

    A parent that died before this call is found out by ``report_serving``.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def report_serving(ready_fd: int) -> None:
    """In a worker: tell the parent that it serves (one byte on its pipe); stop if the parent is gone."""
    try:
        os.write(ready_fd, READY)
    except BrokenPipeError:
        log_event(log, logging.ERROR, "the parent of the workers is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        os.close(ready_fd)


def reserve_port(host: str) -> socket.socket:
    """A socket bound to a free port of ``host`` with SO_REUSEPORT, and not listening.

    It holds the port for the workers, which bind it with SO_REUSEPORT too,
    across their restarts. The kernel hands connections only to listening
    sockets, so it never takes one.
    """
    family, kind, proto, _name, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def pid_file(path: str) -> Iterator[None]:
    """``server.pid_file``: this process's pid in ``path`` while the block runs ("": no file).

    Written once the caller handles SIGHUP, so that ``kill -HUP "$(cat FILE)"``
    never meets a process that would die of it; replaced whole (a reader sees
    the old pid or the new, never half a file). Removed at exit unless another
    process has written its own pid there since. A file that cannot be written
    is logged, and the gateway serves on: signals still reach it by other means.
    """
    if not path:
        yield
        return
    target = Path(path)
    pid = str(os.getpid())
    try:
        temporary = target.with_name(f".{target.name}.{pid}")
        temporary.write_text(pid + "\n", encoding="ascii")
        os.replace(temporary, target)
    except OSError as exc:
        log_event(log, logging.ERROR, "could not write server.pid_file", path=path, error=exc.strerror or str(exc))
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if target.read_text(encoding="ascii").strip() == pid:
                target.unlink()


def describe_exit(code: int) -> str:
    """``asyncio``'s return code as an operator reads it: ``exit 2``, ``SIGKILL``."""
    if code >= 0:
        return f"exit {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class Supervisor:
    """Starts, restarts, signals and stops the workers; see the module docstring."""

    def __init__(
        self, config: GatewayConfig, load: Callable[[], GatewayConfig], config_path: Path, host: str, port: int
    ) -> None:
        self._load = load
        self._config_path = config_path
        self._host = host
        self._port = port
        self._grace_s = config.server.shutdown_grace_s
        self._pid_file = config.server.pid_file  # the parent's pid: it is the one to signal
        self._workers = [Worker(index) for index in range(config.server.workers)]
        self._stopping = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def run(self) -> int:
        """Start every worker, keep them running until SIGTERM or SIGINT, stop them; the exit code."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop)
        loop.add_signal_handler(signal.SIGINT, self._stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        with pid_file(self._pid_file):
            return await self._run()

    async def _run(self) -> int:
        started = await asyncio.gather(*(self._start(worker) for worker in self._workers))
        if not all(started) and not self._stopping.is_set():
            return await self._abandon_start()
        if not self._stopping.is_set():
            pids = [worker.proc.pid for worker in self._workers if worker.proc is not None]
            log_event(
                log, logging.INFO, "serving", url=self.url, workers=len(self._workers), pid=os.getpid(), pids=pids
            )
        keepers = [asyncio.ensure_future(self._keep(worker)) for worker in self._workers]
        await self._stopping.wait()
        code = await self._drain()
        await asyncio.gather(*keepers)
        return code

    async def _start(self, worker: Worker) -> bool:
        """Start a process in ``worker``'s slot; whether it came to serve (False: it exited first)."""
        worker.serving = False
        read_end, write_end = os.pipe()
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *self._command(worker.index, write_end), stdin=asyncio.subprocess.DEVNULL, pass_fds=(write_end,)
            )
        except OSError as exc:
            os.close(read_end)
            log_event(log, logging.ERROR, "worker could not be started", worker=worker.index, error=str(exc))
            worker.proc = None
            return False
        finally:
            os.close(write_end)
        worker.started_at = asyncio.get_running_loop().time()
        if self._stopping.is_set():  # the stop came while the process was being created
            self._signal(worker, signal.SIGTERM)
        if not await self._ready(read_end):
            return False
        worker.serving = True
        log_event(log, logging.INFO, "worker serving", worker=worker.index, pid=worker.proc.pid)
        if worker.reload_pending:
            worker.reload_pending = False
            self._signal(worker, signal.SIGHUP)
        return True

    def _command(self, index: int, ready_fd: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(self._config_path),
            "--host",
            self._host,
            "--port",
            str(self._port),
            "--worker",
            str(index),
            "--ready-fd",
            str(ready_fd),
        ]

    @staticmethod
    async def _ready(read_end: int) -> bool:
        """Whether the worker wrote its byte on the pipe (end of file: it exited before it served)."""
        reader = asyncio.StreamReader()
        transport, _protocol = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb")
        )
        try:
            return await reader.read(len(READY)) == READY
        finally:
            transport.close()

    async def _keep(self, worker: Worker) -> None:
        """Start ``worker`` again each time its process exits, until the parent stops."""
        backoff_s = RESTART_BACKOFF_S
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            if worker.proc is not None:
                await worker.proc.wait()
            if self._stopping.is_set():
                return
            if loop.time() - worker.started_at >= STEADY_AFTER_S:
                backoff_s = RESTART_BACKOFF_S
            ended = {"pid": worker.proc.pid, "exit": describe_exit(self._exit_code(worker))} if worker.proc else {}
            log_event(
                log,
                logging.WARNING,
                "worker exited unexpectedly; restarting it",
                worker=worker.index,
                restart_in_s=backoff_s,
                **ended,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff_s)
            if self._stopping.is_set():
                return
            backoff_s = min(backoff_s * 2, RESTART_BACKOFF_MAX_S)
            await self._start(worker)

    async def _abandon_start(self) -> int:
        """A worker failed before all served: stop the others; its exit code (1 if it has none)."""
        worker = next(w for w in self._workers if not w.serving)
        log_event(log, logging.ERROR, "a worker failed to start; stopping the others", worker=worker.index)
        failed = worker.proc
        self._stop()
        await self._drain()
        code = failed.returncode if failed is not None else None
        return code if code is not None and code > 0 else 1

    def _signal(self, worker: Worker, signum: int) -> None:
        if worker.proc is not None and worker.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it exited; the keeper has yet to hear of it
                worker.proc.send_signal(signum)

    def _stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        log_event(log, logging.INFO, "stopping: the workers finish their requests in flight", grace_s=self._grace_s)
        for worker in self._workers:
            self._signal(worker, signal.SIGTERM)

    def _reload(self) -> None:
        # The parent's own part of the config: the stop's bound and its log level.
        try:
            config = self._load()
        except ConfigError:
            pass  # each worker refuses it too, and logs what is wrong
        else:
            self._grace_s = config.server.shutdown_grace_s
            set_level(config.logging.level)
            if config.server.workers != len(self._workers):
                log_event(
                    log,
                    logging.WARNING,
                    "server.workers changes at the next start",
                    workers=len(self._workers),
                    configured=config.server.workers,
                )
        for worker in self._workers:
            if worker.serving:
                self._signal(worker, signal.SIGHUP)
            else:  # a starting process may not handle SIGHUP yet; it gets it once it serves
                worker.reload_pending = True

    async def _drain(self) -> int:
        """Wait for the workers to exit (SIGKILL past the bound); 0 if every one drained cleanly, else 1."""
        running = [worker for worker in self._workers if worker.proc is not None and worker.proc.returncode is None]
        waits = [asyncio.ensure_future(worker.proc.wait()) for worker in running if worker.proc is not None]
        if waits:
            await asyncio.wait(waits, timeout=self._grace_s + STOP_MARGIN_S)
        for worker in running:
            if worker.proc is not None and worker.proc.returncode is None:
                log_event(log, logging.ERROR, "worker did not stop in time; killing it", worker=worker.index)
                self._signal(worker, signal.SIGKILL)
        await asyncio.gather(*waits)
        exits = {str(worker.index): describe_exit(self._exit_code(worker)) for worker in running}
        clean = all(self._drained(worker) for worker in running)
        log_event(log, logging.INFO if clean else logging.ERROR, "stopped", workers=exits)
        return 0 if clean else 1

    @staticmethod
    def _exit_code(worker: Worker) -> int:
        """The exit code of ``worker``'s process, which has exited."""
        proc = worker.proc
        assert proc is not None
        assert proc.returncode is not None
        return proc.returncode

    def _drained(self, worker: Worker) -> bool:
        # A worker still starting had nothing in flight: ended by the SIGTERM it is clean too.
        code = self._exit_code(worker)
        return code == 0 or (not worker.serving and code == -signal.SIGTERM)


async def supervise(
    config: GatewayConfig, load: Callable[[], GatewayConfig], config_path: Path, host: str | None, port: int | None
) -> int:
    """Run ``config.server.workers`` workers on one port until SIGTERM or SIGINT; the exit code."""
    host = host or config.server.host
    port = config.server.port if port is None else port
    reservation = None
    if port == 0:
        try:
            reservation = reserve_port(host)
        except OSError as exc:
            print(f"cohere-gateway: cannot listen: {exc.strerror or exc}", file=sys.stderr)
            return 1
        port = reservation.getsockname()[1]
    try:
        return await Supervisor(config, load, config_path, host, port).run()
    finally:
        if reservation is not None:
            reservation.close()
