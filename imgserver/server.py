"""``imgserver serve``: the one module that wires the pieces together.

    Settings -> executor (LocalPool or DaskPool) -> Engine <- FastAPI app <- uvicorn
                                              <- DropFolder <- watchdog observer
                                              <- Housekeeper (retention, leftovers)
                                              <- Notifier (webhooks, on its own thread)

At start the open-file soft limit is raised to the hard limit (a systemd service starts
with 1024): clients holding connections open must not starve the engine of descriptors.
Connections are served by ``imgserver.http.connection``'s protocol, which closes one that has
not sent a whole request within ``--read-timeout`` seconds. With ``--tls-cert`` and
``--tls-key`` uvicorn serves HTTPS on the same port: TLS wraps the transport under that
protocol, which sees the same bytes, decrypted, and a TLS handshake gets ``--read-timeout``
seconds of its own. The pair is checked before anything starts.

Shutdown (SIGTERM or Ctrl-C): the engine stops accepting and releases ``wait=true``
clients, uvicorn closes its connections, the drop folder stops watching, the engine lets
running images finish and writes every status file, and the process exits 0. Images not
started stay in the outbox and run at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import ipaddress
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from types import FrameType

import uvicorn

from imgserver.access.gate import Gate
from imgserver.access.tokens import TokenFile
from imgserver.errors import ConfigError
from imgserver.executors.pool import LocalPool
from imgserver.http.app import create_app
from imgserver.http.connection import protocol
from imgserver.inbox import DropFolder
from imgserver.jobs.engine import Engine
from imgserver.jobs.housekeeping import Housekeeper
from imgserver.settings import Settings
from imgserver.webhooks import Notifier

logger = logging.getLogger("imgserver.server")

EXIT_OK, EXIT_CONFIG = 0, 2
#: Open files kept for the engine, the pool and the drop folder: HTTP connections may use
#: the rest of the limit, and are refused beyond it.
FILES_KEPT = 256


class _Server(uvicorn.Server):
    """uvicorn's server, telling the engine first when a stop signal arrives, and giving a
    TLS handshake ``handshake_timeout`` seconds."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None],
                 handshake_timeout: float) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._handshake_timeout = handshake_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # A connection reaches the protocol, and its --read-timeout clock, only once its TLS
        # handshake is over; until then asyncio's limit applies, 60 s by default, which
        # uvicorn does not set. A client silent from the start must not hold its socket
        # longer over HTTPS than over HTTP: the listening socket gets the same limit.
        loop = asyncio.get_running_loop()
        if not self.config.is_ssl or not isinstance(loop, asyncio.BaseEventLoop):
            await super().startup(sockets)
            return
        loop.create_server = functools.partial(  # type: ignore[method-assign]
            loop.create_server, ssl_handshake_timeout=self._handshake_timeout)
        try:
            await super().startup(sockets)
        finally:
            del loop.create_server  # the loop's own method again

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a caught SIGTERM after its shutdown, so the process would end by
        # the signal (exit -15). A service stopped on purpose, and cleanly, exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def build_executor(settings: Settings) -> Executor:
    """The executor images run on: the local process pool, or a Dask cluster."""
    if settings.executor == "dask":
        from imgserver.executors.batch import REPORT_INTERVAL
        from imgserver.executors.cluster import DaskPool  # imports distributed only when asked for

        if not settings.scheduler:
            raise ConfigError("--executor dask needs --scheduler tcp://HOST:PORT "
                              "(or IMGSERVER_SCHEDULER)")
        # A worker's reports of ended images may lag: by much less than a time limit.
        return DaskPool(settings.scheduler, settings.root, max_pixels=settings.max_pixels,
                        report_interval=min(REPORT_INTERVAL, settings.image_timeout / 10))
    pool = LocalPool(settings.workers, max_pixels=settings.max_pixels,
                     max_tasks_per_child=settings.max_tasks_per_child)
    pool.warm()
    return pool


@contextlib.contextmanager
def _single_instance(settings: Settings) -> Iterator[None]:
    """Hold a lock on the outbox: two servers on one outbox would run jobs twice."""
    settings.outbox.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.outbox / ".serve.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another 'imgserver serve' is using {settings.outbox}") from None
    try:
        yield
    finally:
        os.close(fd)


def raise_open_file_limit() -> int:
    """Raise the soft limit of open files to the hard limit; return the soft limit in force.

    Code that waits with select() cannot use descriptors above 1023: the one here that does
    (watchdog's inotify loop) opens its own at start, before any connection is taken.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _kernel_file_limit()
    if soft == resource.RLIM_INFINITY or soft >= target:
        return target if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    logger.info("open-file limit raised from %d to %d", soft, target)
    return target


def _kernel_file_limit() -> int:
    # With no hard limit, the kernel's own ceiling applies (fs.nr_open, 1048576 by default).
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1 << 20


class _Encrypted(Exception):
    """The TLS key asks for a password."""


def _no_password() -> bytes:
    raise _Encrypted  # never OpenSSL's prompt on a terminal a service does not have


def check_tls(settings: Settings) -> None:
    """Check ``--tls-cert`` and ``--tls-key``: both or neither, readable, a certificate and
    its own unencrypted key; a ConfigError that names the file and the reason otherwise."""
    cert, key = settings.tls_cert, settings.tls_key
    if not cert and not key:
        return
    if not key:
        raise ConfigError("--tls-cert is set but --tls-key (IMGSERVER_TLS_KEY) is not: "
                          "HTTPS needs the certificate's private key too")
    if not cert:
        raise ConfigError("--tls-key is set but --tls-cert (IMGSERVER_TLS_CERT) is not: "
                          "HTTPS needs the certificate too")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot read {flag} {path!r}: {exc.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _Encrypted:
        raise ConfigError(f"--tls-key {key!r} is encrypted: give the server an unencrypted "
                          f"key, readable by its user only") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"--tls-key {key!r} is not the private key of --tls-cert "
                              f"{cert!r}") from None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
        except ssl.SSLError:
            raise ConfigError(f"--tls-cert {cert!r} holds no PEM certificate") from None
        raise ConfigError(f"--tls-key {key!r} holds no PEM private key that goes with "
                          f"--tls-cert {cert!r}: {exc}") from None
    except OSError as exc:  # a file replaced or removed meanwhile
        raise ConfigError(f"cannot load --tls-cert {cert!r} and --tls-key {key!r}: "
                          f"{exc.strerror or exc}") from None


def serve(settings: Settings) -> int:
    """Run the HTTP API until SIGTERM or Ctrl-C; return the exit code."""
    files = raise_open_file_limit()
    try:
        check_tls(settings)
        with _single_instance(settings):
            executor = build_executor(settings)
            try:
                return _serve(settings, executor, files)
            finally:
                executor.shutdown()
    except ConfigError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG


def gate_for(settings: Settings) -> Gate:
    """Who may use the server: the tokens configured, or, with none, everyone, which only
    a loopback address or ``--allow-anonymous`` permits (ConfigError otherwise)."""
    tokens = TokenFile(Path(settings.tokens)) if settings.tokens else None
    if tokens is not None:
        tokens.read()  # a tokens file that cannot be read stops the start, saying why
    gate = Gate(settings.token, tokens)
    if gate.open and not _loopback(settings.host) and not settings.allow_anonymous:
        raise ConfigError(
            f"refusing to serve {settings.host} with no token: anyone who can reach it could "
            f"read, submit and cancel jobs. Give tokens (--tokens FILE, see 'imgserver token "
            f"add', or IMGSERVER_TOKEN), or serve anyway with --allow-anonymous")
    return gate


#: Allocations between two collections of the youngest generation (CPython's default is
#: 700: a job makes thousands of short-lived objects, so the default collects many times per
#: job, each time walking every object still young).
YOUNG_GENERATION = 20_000
#: Seconds a thread may keep the interpreter while another waits for it (CPython's default
#: is 5 ms). The server's threads hand each job to each other (the loop, the thread that
#: stores it, the pool's reader); the one with news waits less behind the one with work.
#: Under 8 clients of one-image jobs, alternating with the default: 1.06-1.14x the jobs/s in
#: three runs of four, no change in the fourth.
SWITCH_INTERVAL = 0.001


def _tune_interpreter() -> None:
    """Leave the objects made at start-up (modules, the app and its routes, the schema) out
    of every collection from now on, collect the youngest generation less often, and pass
    the interpreter between threads sooner."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION, middle, old)
    sys.setswitchinterval(SWITCH_INTERVAL)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _serve(settings: Settings, executor: Executor, files: int) -> int:
    gate = gate_for(settings)
    engine = Engine(settings, executor)
    engine.start()
    drop_folder = DropFolder(engine, settings.inbox)
    housekeeper = Housekeeper(engine)
    notifier = Notifier(engine) if settings.notify_secret else None
    app = create_app(engine, settings, gate)
    drop_folder.on_result = app.state.metrics.inbox_file
    if notifier is not None:
        notifier.on_result = app.state.metrics.notification

    def stopping() -> None:
        engine.stop_accepting()
        app.state.hub.stop()  # event streams end, so that their connections can close

    try:
        housekeeper.start()
        if notifier is not None:
            notifier.start()
        drop_folder.start()
        connections = max(files - FILES_KEPT, files // 2)
        # The access log is the app's own (it names each request's token): not uvicorn's.
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                timeout_graceful_shutdown=10, access_log=False,
                                http=protocol(settings.read_timeout, connections),
                                ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
        server = _Server(config, on_exit=stopping, handshake_timeout=settings.read_timeout)
        logger.info("serving %s on %s://%s:%d (drop folder %s, outbox %s)", settings.root,
                    "https" if settings.tls_cert else "http", settings.host, settings.port,
                    settings.inbox, settings.outbox)
        _tune_interpreter()
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
            return EXIT_CONFIG
        if not server.started:
            return EXIT_CONFIG
    finally:
        drop_folder.stop()
        housekeeper.stop()
        engine.close()
        if notifier is not None:
            notifier.stop()
    return EXIT_OK
