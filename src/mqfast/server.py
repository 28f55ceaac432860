"""Lifecycle: build one worker (engine, app, compiled core, listeners), run it, stop it cleanly.

With ``--workers N`` a small supervisor forks N workers that share the port (SO_REUSEPORT); the
kernel spreads connections over them. The supervisor serves METRICS_ADDR: each scrape asks every
worker for its metric families over a socket pair made at fork (nothing is counted twice, nothing
runs per request) and answers with their merge (``metrics.PodMetrics``). PPROF_ADDR is per
process: worker *i* serves its own debug listener on that port + *i*. Workers get SIGTERM when
the supervisor dies (PR_SET_PDEATHSIG). SIGTERM: stop accepting, answer what is in flight, flush
the engine, exit 0 within ``MESSAGE_QUEUE_SHUTDOWN_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import gc
import logging
import os
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import quote

import uvloop
from prometheus_client import CollectorRegistry

from mqfast import __version__
from mqfast._core import Server, reseed_ids
from mqfast.access import PUBLIC_ROUTES
from mqfast.api import HEALTH_PAIRS, ROUTES, App
from mqfast.auth import Authenticator
from mqfast.config import Settings
from mqfast.crypto import Keyring
from mqfast.debug import install_gc_monitor, start_debug_server
from mqfast.errors import ConfigError, MqfastError
from mqfast.grants import GrantCache
from mqfast.groups import Groups, GroupStore, Policy, Unacked, dlq_name, now_ms
from mqfast.log import configure_logging
from mqfast.meta import MetaStore
from mqfast.meta.history import HistoryRecorder, TopicSample
from mqfast.metrics import (
    PodMetrics,
    build_registry,
    decode_families,
    encode_families,
    start_metrics_server,
)
from mqfast.sinks import Sink, describe_all

log = logging.getLogger("mqfast.server")

PRUNE_INTERVAL_S = 30.0
# Under the ServiceMonitor's 10 s scrape timeout: a worker slower than this to answer is
# reported with its previous answer.
WORKER_SCRAPE_TIMEOUT_S = 5.0
# The supervisor's scrape request (a sequence number) and a worker's answer (the sequence
# number, then the length of the msgpack body that follows).
_PR_SET_PDEATHSIG = 1
_ASK = struct.Struct("!I")
_ANSWER = struct.Struct("!II")


class Engine:
    """The storage engine named by ``MESSAGE_QUEUE_ENGINE``: messages, groups and metadata.

    ``embedded``: SQLite for all three. ``kafka``: messages in Kafka, leases and positions in
    Redis, metadata (topic settings, consumers, metric history) in PostgreSQL.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.recheck_s = float("inf")
        self.dependencies: dict[str, Callable[[], dict[str, object]]] = {}
        self._forget_in_core: Callable[[str], None] | None = None
        if settings.engine == "kafka":
            self._init_kafka(settings)
        else:
            self._init_embedded(settings)

    def _init_embedded(self, settings: Settings) -> None:
        from mqfast.meta.sqlite import SqliteMeta
        from mqfast.sinks.embedded import EmbeddedSink, write_lock
        from mqfast.sinks.embedded_groups import EmbeddedGroups

        # Encryption at rest: the data keys live in the engine's database (SqliteKeyStore).
        sink = EmbeddedSink(
            settings.data_dir,
            fsync=settings.fsync,
            retention_interval_s=settings.retention_interval_s,
            keyring=Keyring.from_settings(settings),
            idempotency_window_ms=settings.idempotency_window_ns // 1_000_000,
        )
        self.sink: Sink = sink
        groups = EmbeddedGroups(
            sink.open_connection,
            write_lock(sink.path),
            Policy.from_settings(settings),
            encryptor=sink.encryptor,
        )
        self.groups_store: GroupStore = groups
        self.meta: MetaStore = SqliteMeta(settings.data_dir)
        self._parts: list[Any] = [sink, groups, self.meta]

    def _init_kafka(self, settings: Settings) -> None:
        try:
            from mqfast.meta.postgres import PostgresMeta
            from mqfast.sinks.kafka import KafkaSink
            from mqfast.sinks.kafka_groups import KafkaGroups
        except ImportError as e:
            raise ConfigError(
                f"MESSAGE_QUEUE_ENGINE=kafka needs the cluster extras: "
                f"pip install 'mqfast[cluster]' ({e})"
            ) from None
        meta = PostgresMeta(postgres_dsn(settings))
        # Encryption at rest: the wrapped data keys live in PostgreSQL beside the topic flags.
        sink = KafkaSink(settings, meta, keyring=Keyring.from_settings(settings))
        groups = KafkaGroups(settings, sink, Policy.from_settings(settings))
        self.sink = sink
        self.groups_store = groups
        self.meta = meta
        self.recheck_s = groups.recheck_s
        self.dependencies = {"postgres": meta.health, "redis": groups.health}
        # PostgreSQL first: the engine reads its topic registry at start.
        self._parts = [meta, sink, groups]

        def changed(name: str) -> None:
            # Another replica created, changed or deleted ``name``: look it up again (but not
            # after this replica's own creation, already known: produce must not pay for it).
            known = sink.cached_topic(name)
            stored = meta.cached_topics().get(name)
            if known is not None and stored is not None and known.same_settings(stored):
                return
            sink.forget_topic(name)
            if self._forget_in_core is not None:
                self._forget_in_core(name)

        meta.on_topics_changed = changed

    def watch_topics(self, forget: Callable[[str], None]) -> None:
        """``forget(name)`` when another replica changes a topic (the core's topic cache)."""
        self._forget_in_core = forget

    async def start(self) -> None:
        for part in self._parts:  # embedded: the sink migrates the database first
            await part.start()

    async def close(self, timeout: float) -> None:
        # Reverse order: groups and the sink finish before the metadata store goes. Each part
        # gets a bounded time: a dependency that hangs must not keep the process alive.
        end = time.monotonic() + timeout
        for part in reversed(self._parts):
            started = time.monotonic()
            left = max(0.2, end - started)
            try:
                if part is self.sink:
                    await asyncio.wait_for(self.sink.close(max(0.1, left - 0.5)), left)
                else:
                    await asyncio.wait_for(part.close(), left)
            except TimeoutError:
                log.error("engine part did not close in time", extra={"part": type(part).__name__})
            took = time.monotonic() - started
            if took > 1.0:
                log.warning(
                    "slow engine close", extra={"part": type(part).__name__, "seconds": took}
                )


def postgres_dsn(settings: Settings) -> str:
    """The PostgreSQL connection string from ``DB_*`` (the password is quoted, never logged)."""
    user = quote(settings.db_user, safe="")
    password = quote(settings.db_password, safe="")
    host = settings.db_host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return (
        f"postgresql://{user}:{password}@{host}:{settings.db_port}/"
        f"{quote(settings.db_name, safe='')}?sslmode={quote(settings.db_sslmode, safe='')}"
    )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The HTTP listener's TLS (``MESSAGE_QUEUE_TLS_*``): TLS 1.2+, client certificates when a
    client CA is given (``optional`` or ``required``); None when TLS is off."""
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            ctx.load_verify_locations(settings.tls_client_ca)
            ctx.verify_mode = (
                ssl.CERT_REQUIRED if settings.tls_client_auth == "required" else ssl.CERT_OPTIONAL
            )
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"MESSAGE_QUEUE_TLS_CERT/_KEY/_CLIENT_CA: cannot load the certificates ({e})"
        ) from None
    return ctx


def _side_port(addr: tuple[str, int] | None, index: int) -> tuple[str, int] | None:
    # Stacks, heap traces and profiles are of one process, so each worker gets its own debug
    # port (base + index).
    if addr is None:
        return None
    return addr[0], addr[1] + index if addr[1] else 0


def _fmt_addr(addr: tuple[str, int] | None) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "off"


async def _listen(
    var: str, addr: tuple[str, int], start: Awaitable[asyncio.Server]
) -> asyncio.Server:
    """``start`` (a listener on ``addr``), with a failure to bind naming the variable that chose
    the address: "address already in use" alone does not say which of three listeners it was."""
    try:
        return await start
    except OSError as e:
        raise ConfigError(f"{var}: cannot listen on {_fmt_addr(addr)}: {e.strerror or e}") from None


def _stored_grants(meta: MetaStore, auth: Authenticator, core: Server) -> GrantCache:
    """The grants of the metadata store, added to every principal verified; a change drops the
    subject's principals from both caches, so that its next request is verified again."""
    grants = GrantCache(meta)
    auth.stored_grants = grants.get

    def forget(subject: str) -> None:
        auth.forget_subject(subject)
        core.forget_subject(subject)

    grants.on_changed = forget
    return grants


async def serve(
    settings: Settings,
    *,
    index: int = 0,
    reuse_port: bool = False,
    channel: socket.socket | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT, then shut it down gracefully.

    ``channel`` (a worker under the supervisor): answer the supervisor's metric scrapes over it
    instead of listening on METRICS_ADDR.
    """
    loop = asyncio.get_running_loop()
    install_gc_monitor()
    reseed_ids()
    engine = Engine(settings)
    sink = engine.sink
    groups = Groups(settings, engine.groups_store)
    groups.recheck_s = min(groups.recheck_s, engine.recheck_s)
    groups.lookup_consumer = engine.meta.get_consumer
    app = App(settings, sink, groups, engine.meta)
    app.dependencies = engine.dependencies
    auth = None
    if settings.auth_enabled:
        auth = Authenticator(settings)
        app.auth = auth
    elif not settings.loopback_only:
        log.warning(
            "authentication is off and the service is reachable from other machines "
            "(MESSAGE_QUEUE_INSECURE=1): anyone who can connect may produce, consume and "
            "manage topics",
            extra={"addr": f"{settings.host}:{settings.port}"},
        )
    core = Server(loop, sink, app, ROUTES, settings)
    core.set_stored_hook(groups.on_stored)
    quotas = None
    grants = None
    if auth is not None:
        core.set_auth(auth, PUBLIC_ROUTES)
        # A JWKS key withdrawn: tokens it signed must not live on in the core's cache.
        auth.on_keys_changed = core.forget_principals
        grants = _stored_grants(engine.meta, auth, core)
        app.grants = grants
        from mqfast.quota import Quotas, connect

        # One allowance for every replica through Redis with the Kafka engine; one process's
        # own buckets on the embedded engine.
        quotas = Quotas(settings, connect(settings) if settings.engine == "kafka" else None)
        core.set_quotas(quotas)
    engine.watch_topics(core.drop_topic)
    app.attach(core)
    await engine.start()
    if grants is not None:
        await grants.start()
    if auth is not None:
        await auth.start()
    if quotas is not None:
        await quotas.start()
    for cfg in await sink.list_topics():
        core.set_topic(cfg.name, cfg.partitions)
    consumer_counts = [0, 0]
    background = [
        loop.create_task(_maintain_groups(settings, engine, groups, consumer_counts)),
    ]
    recorder = HistoryRecorder(
        engine.meta,
        lambda: _sample(core, groups, sink, consumer_counts, app),
        settings.metrics_interval_s,
        worker=f"{os.uname().nodename}:{os.getpid()}",
    )
    recorder.start()

    listener = await _listen(
        "MESSAGE_QUEUE_PORT",
        (settings.host, settings.port),
        loop.create_server(
            core.protocol,
            settings.host,
            settings.port,
            reuse_port=reuse_port,
            backlog=4096,
            ssl=tls_context(settings),
        ),
    )
    core.start()
    side: list[asyncio.Server] = []
    metrics_addr = settings.metrics_addr if channel is None else None
    if metrics_addr is not None or channel is not None:
        registry = build_registry(
            lambda: groups.merge_stats(core.stats()),
            lambda: {
                "active_consumers": float(consumer_counts[0]),
                **({f"quota_{k}": v for k, v in quotas.stats().items()} if quotas else {}),
            },
            app.metric_levels,
        )
        if channel is not None:
            background.append(loop.create_task(_answer_scrapes(channel, registry)))
        elif metrics_addr is not None:
            side.append(
                await _listen(
                    "METRICS_ADDR", metrics_addr, start_metrics_server(*metrics_addr, registry)
                )
            )
    pprof_addr = _side_port(settings.pprof_addr, index)
    if pprof_addr is not None:
        side.append(await _listen("PPROF_ADDR", pprof_addr, start_debug_server(*pprof_addr)))

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Everything built so far lives as long as the process: move it out of the collector's
    # sight so that a full collection under load walks only what requests created.
    gc.collect()
    gc.freeze()
    app.ready = True
    log.info(
        "mqfast started",
        extra={
            "version": __version__,
            "engine": sink.name,
            "addr": f"{settings.host}:{settings.port}",
            "tls": bool(settings.tls_cert),
            "auth": settings.auth_enabled,
            "metrics_addr": "supervisor" if channel is not None else _fmt_addr(metrics_addr),
            "pprof_addr": _fmt_addr(pprof_addr),
            "worker": index,
            "pid": os.getpid(),
        },
    )
    await stop.wait()

    deadline = time.monotonic() + settings.shutdown_timeout_s
    log.info("shutting down: no new connections, finishing in-flight requests")
    # If stopping takes far longer than promised, leave every thread's stack in the log.
    faulthandler.dump_traceback_later(settings.shutdown_timeout_s + 15.0, exit=False)
    app.ready = False
    listener.close()
    groups.shutdown()
    core.begin_shutdown()
    # Open streams end (core.begin_shutdown) once their leases are released, before the engine
    # closes; one whose client left may still be releasing after its connection is gone.
    streams = app.streams
    while (core.busy() or (streams and streams.open)) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    unfinished = core.busy()
    core.stop()
    for task in background:
        task.cancel()
    # Whatever a dependency does, the process is gone a few seconds after the drain deadline:
    # every step below shares what is left of that budget.
    hard = deadline + 5.0

    async def step(what: str, coro: Coroutine[Any, Any, None], cap: float) -> None:
        left = max(0.2, min(cap, hard - time.monotonic()))
        try:
            await asyncio.wait_for(coro, left)
        except TimeoutError:
            log.warning("shutdown step did not finish in time", extra={"step": what})

    await step("metric history", recorder.stop(), 5.0)
    await step("audit log", app.audit.close(), 2.0)
    if quotas is not None:
        await step("quotas", quotas.close(), 2.0)
    if grants is not None:
        await step("grants", grants.close(), 2.0)
    if auth is not None:
        await step("authentication", auth.close(), 2.0)
    await step("engine", engine.close(max(0.5, hard - 2.0 - time.monotonic())), 60.0)
    for s in side:
        s.close()
    if unfinished:
        log.warning("stopped at the deadline with work unfinished", extra={"busy": unfinished})
    faulthandler.cancel_dump_traceback_later()
    log.info("mqfast stopped", extra={"worker": index})


async def _maintain_groups(
    settings: Settings, engine: Engine, groups: Groups, counts: list[int]
) -> None:
    """Mark silent consumers inactive and release their leases; keep the gauge current;
    forget long-complete messages."""
    timeout_ms = settings.consumer_timeout_ns // 1_000_000
    every = max(0.5, min(5.0, timeout_ms / 4000))
    failing = False
    last_prune = 0.0
    while True:
        await asyncio.sleep(every)
        try:
            if time.monotonic() - last_prune > PRUNE_INTERVAL_S:
                last_prune = time.monotonic()
                await engine.groups_store.prune(now_ms())
            for consumer in await engine.meta.sweep_inactive(now_ms(), timeout_ms):
                released = await engine.groups_store.release_consumer(consumer, now_ms())
                groups.forget_consumer(consumer)
                log.info(
                    "consumer inactive; leases released",
                    extra={"consumer_id": consumer, "released": released},
                )
            counts[0], counts[1] = await engine.meta.consumer_counts()
            failing = False
        except Exception:
            if not failing:
                log.exception("consumer sweep failed; retrying")
            failing = True


async def _sample(
    core: Server, groups: Groups, sink: Sink, consumers: list[int], app: App
) -> dict[str, TopicSample]:
    """Cumulative counters and current gauges per topic, for the metric history (and the
    groups' lags for ``/health``, from the same look at every topic)."""
    stats = groups.merge_stats(core.stats())
    sizes = {t.name: t for t in await sink.list_topics()}
    infos = await describe_all(sink, list(sizes))
    try:
        unacked: list[Unacked] | None = await groups.store.unacked(now_ms(), HEALTH_PAIRS)
    except MqfastError:  # Redis down: the history is still recorded, /health says "unknown"
        unacked = None
    app.note_group_health(infos, unacked, now_ms())
    out: dict[str, TopicSample] = {}
    for name, info in infos.items():
        if name.endswith(".dlq") and name[: -len(".dlq")] in sizes:
            continue  # reported as the dead-letter size of its origin
        t = stats["topics"].get(name, {})
        c = groups.topics.get(name)
        dlq = infos.get(dlq_name(name))
        out[name] = TopicSample(
            produced=t.get("produced", 0),
            consumed=c.consumed if c else 0,
            expired=c.expired if c else 0,
            failed=c.failed if c else 0,
            retried=c.retried if c else 0,
            queue_size=max((g.lag for g in info.consumer_groups), default=info.messages),
            dead_letter_size=dlq.messages if dlq is not None else 0,
            active_consumers=consumers[0],
            total_consumers=consumers[1],
            processing_ms=c.processing_ms if c else [],
        )
        if c:
            c.processing_ms = []
    return out


async def _answer_scrapes(channel: socket.socket, registry: CollectorRegistry) -> None:
    """Answer the supervisor's scrapes over ``channel`` with this worker's metric families, on
    the loop thread (they read counters the loop owns), until the supervisor goes away."""
    reader, writer = await asyncio.open_connection(sock=channel)
    try:
        while True:
            (seq,) = _ASK.unpack(await reader.readexactly(_ASK.size))
            body = encode_families(registry)
            writer.write(_ANSWER.pack(seq, len(body)) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def run_worker(
    settings: Settings,
    index: int = 0,
    reuse_port: bool = False,
    channel: socket.socket | None = None,
) -> int:
    """Run one worker in this process; returns the exit code."""
    try:
        uvloop.run(serve(settings, index=index, reuse_port=reuse_port, channel=channel))
    except ConfigError as e:
        log.error("invalid configuration", extra={"error": str(e)})
        return 2
    except OSError as e:
        log.error("cannot start", extra={"error": str(e)})
        return 1
    return 0


def run(settings: Settings) -> int:
    """Run the service with ``settings.workers`` processes; returns the exit code."""
    configure_logging(settings.log_level)
    if settings.workers == 1:
        return run_worker(settings)
    try:
        return uvloop.run(_supervise(settings))
    except ConfigError as e:
        log.error("invalid configuration", extra={"error": str(e)})
        return 2


class _Worker:
    """A worker process as the supervisor sees it; its end of the scrape channel, if any."""

    def __init__(self, index: int, pid: int, channel: socket.socket | None) -> None:
        self.index = index
        self.pid = pid
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._writer: asyncio.StreamWriter | None = None
        loop = asyncio.get_running_loop()
        self._connected: asyncio.Future[None] = loop.create_future()
        self._reading = loop.create_task(self._read(channel)) if channel is not None else None

    async def _read(self, channel: socket.socket) -> None:
        try:
            reader, self._writer = await asyncio.open_connection(sock=channel)
            self._connected.set_result(None)
            while True:
                seq, size = _ANSWER.unpack(await reader.readexactly(_ANSWER.size))
                body = await reader.readexactly(size)
                answer = self._waiting.pop(seq, None)
                if answer is not None and not answer.done():
                    answer.set_result(body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the worker exited
        finally:
            self.close()

    async def scrape(self, timeout: float) -> bytes | None:
        """The worker's metric families, or None when it does not answer within ``timeout``."""
        if self._reading is None or self._reading.done():
            return None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = answer
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._connected)
                assert self._writer is not None
                self._writer.write(_ASK.pack(seq))
                return await answer
        except (TimeoutError, ConnectionError):
            return None
        finally:
            self._waiting.pop(seq, None)

    def close(self) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(ConnectionError("worker gone"))
        self._waiting.clear()
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None and self._reading is not asyncio.current_task():
            self._reading.cancel()


def _stop_with_parent(parent: int) -> None:
    """Have the kernel send this worker SIGTERM (a graceful stop) when the supervisor dies, even
    by SIGKILL: a worker left behind would hold the ports with no one restarting it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


async def _supervise(settings: Settings) -> int:
    """Fork ``settings.workers`` workers, restart one that exits unexpectedly, serve the pod's
    merged metrics on METRICS_ADDR, and forward SIGTERM/SIGINT; returns the exit code."""
    loop = asyncio.get_running_loop()
    supervisor = os.getpid()
    children: dict[int, _Worker] = {}  # pid -> worker
    pod = PodMetrics() if settings.metrics_addr is not None else None
    listeners: list[asyncio.Server] = []
    stopping = False
    code = 0
    done = asyncio.Event()

    async def refresh() -> None:
        assert pod is not None
        workers = list(children.values())
        answers = await asyncio.gather(*(w.scrape(WORKER_SCRAPE_TIMEOUT_S) for w in workers))
        for w, body in zip(workers, answers, strict=True):
            if body is not None:
                pod.update(w.pid, decode_families(body))

    addr = settings.metrics_addr
    if pod is not None and addr is not None:
        registry = CollectorRegistry()
        registry.register(pod)
        listeners.append(
            await _listen("METRICS_ADDR", addr, start_metrics_server(*addr, registry, refresh))
        )

    def spawn(index: int) -> None:
        if stopping:
            return
        ours, theirs = socket.socketpair() if pod is not None else (None, None)
        pid = os.fork()
        if pid == 0:
            # The child: the supervisor's signal handling is not its own. The inherited
            # listener and channel descriptors stay open unused until it exits.
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            _stop_with_parent(supervisor)
            configure_logging(settings.log_level, worker=index)
            code = 70  # EX_SOFTWARE: the supervisor restarts it
            try:
                code = run_worker(settings, index, reuse_port=True, channel=theirs)
            except BaseException:
                # Never unwind into the supervisor's frames copied by fork: tearing down its
                # loop here would unregister the supervisor's descriptors from the epoll
                # instance both share, and the supervisor would stop seeing its signals.
                log.exception("worker failed", extra={"worker": index})
            finally:
                os._exit(code)
        if theirs is not None:
            theirs.close()
        children[pid] = _Worker(index, pid, ours)
        if pod is not None:
            pod.add(pid, index)
        # Readable once the child exits: no SIGCHLD handler (uvloop keeps SIGCHLD to itself).
        pidfd = os.pidfd_open(pid)
        loop.add_reader(pidfd, reap, pid, pidfd)

    def forward() -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not children:  # all had exited, their restart not due yet
            done.set()

    def reap(pid: int, pidfd: int) -> None:
        nonlocal code
        loop.remove_reader(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)  # readable pidfd: it has exited, this does not block
        worker = children.pop(pid)
        worker.close()
        if pod is not None:
            pod.retire(pid)
        rc = os.waitstatus_to_exitcode(status)
        if stopping:
            code = code or (rc if rc > 0 else 0)
        elif rc in (1, 2):
            # Could not start (bad configuration, port taken): restarting won't help.
            log.error("worker could not start; stopping", extra={"worker": worker.index, "rc": rc})
            forward()
            code = rc
        else:
            log.error(
                "worker exited unexpectedly; restarting it",
                extra={"worker": worker.index, "rc": rc},
            )
            if pod is not None:
                pod.restarts += 1
            loop.call_later(0.5, spawn, worker.index)
        if stopping and not children:
            done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forward)
    for i in range(settings.workers):
        spawn(i)
    log.info(
        "supervisor started",
        extra={
            "workers": settings.workers,
            "pid": os.getpid(),
            "metrics_addr": _fmt_addr(settings.metrics_addr),
        },
    )
    await done.wait()
    for listener in listeners:
        listener.close()
    return code


if __name__ == "__main__":  # pragma: no cover
    from mqfast.cli import main  # its configuration errors are JSON log lines too

    sys.exit(main(["serve"]))
