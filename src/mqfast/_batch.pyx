# The per-worker state shared by connections: topic cache, the batch handed to the engine once
# per loop tick, completion of deliveries, counters for /metrics and the timeout sweeper.

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
)
cdef int64_t _BUCKET_NS[N_BUCKETS]
for _i, _b in enumerate(LATENCY_BUCKETS):
    _BUCKET_NS[_i] = <int64_t>(_b * 1e9 + 0.5)

# Status codes get a slot each in a small per-route array; anything else lands in "other".
STATUS_CODES = (200, 201, 202, 400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 431, 500, 503)

cdef enum:
    # Dropped topics whose counters are kept for a re-creation; bounds memory under topic churn
    # (a name evicted past it restarts from 0, which the metric history reads as a restart).
    MAX_RETIRED_TOPICS = 4096


cdef inline int status_slot(int status) noexcept:
    if status == 200: return 0
    if status == 201: return 1
    if status == 202: return 2
    if status == 400: return 3
    if status == 401: return 4
    if status == 403: return 5
    if status == 404: return 6
    if status == 405: return 7
    if status == 409: return 8
    if status == 413: return 9
    if status == 415: return 10
    if status == 422: return 11
    if status == 429: return 12
    if status == 431: return 13
    if status == 500: return 14
    if status == 503: return 15
    return 16


_log = logging.getLogger("mqfast.http")


cdef class Server:
    """Everything the connections of one worker share. Built by ``mqfast.server``."""

    def __init__(self, object loop, object sink, object app, list routes, object settings,
                 Py_ssize_t max_inflight=100000):
        self.loop = loop
        self.sink = sink
        self.app = app
        self.router = Router(routes)
        self.topics = {}
        self.retired = {}
        self.connections = set()
        self.batch = []
        self.flush_scheduled = False
        self.keyed = 0
        self.flush_cb = self._flush
        self.sweeper = None
        self.stored_hook = None
        self.auth = None
        self.quotas = None
        self.principals = {}
        self.public_routes = frozenset()
        self.date_header = http_date()
        self.shutting_down = False
        self.inflight = 0
        self.max_inflight = max_inflight
        self.max_size = settings.max_size
        # The content's limit applies to the decoded content; the body may be up to six times
        # as large (JSON writes a control character as a six-byte \u escape) plus the envelope.
        self.max_body = BODY_ESCAPE_FACTOR * settings.max_size + BODY_ENVELOPE
        self.max_batch_body = settings.max_batch_bytes
        self.max_batch_messages = settings.max_batch_messages
        self.max_header = settings.max_header_bytes
        self.default_ttl_ns = settings.default_ttl_ns
        self.header_timeout_ns = <int64_t>(settings.header_timeout_s * 1e9)
        self.idle_timeout_ns = <int64_t>(settings.idle_timeout_s * 1e9)
        self.produce_decoder = msgspec.json.Decoder(ProduceRequest)
        self.batch_decoder = msgspec.json.Decoder(BatchProduceRequest)
        self.headers_encoder = msgspec.json.Encoder()
        sink.bind(loop, self._on_done)

    def set_auth(self, object auth, object public_templates) -> None:
        """Require a verified token (``auth.Principal``) on every route but ``public_templates``;
        the app's ``authenticate(header)`` verifies on the slow path, the core caches."""
        self.auth = auth
        self.principals = {}
        self.public_routes = frozenset(
            i for i, t in enumerate(self.router.templates) if t in public_templates)

    def set_quotas(self, object quotas) -> None:
        """Per-subject produce quotas (``quota.Quotas``): checked locally on the hot path."""
        self.quotas = quotas if quotas is not None and quotas.enabled else None

    def forget_principals(self) -> None:
        """Drop every cached verification (keys rotated, grants changed)."""
        self.principals.clear()

    def forget_subject(self, str subject) -> None:
        """Drop the cached verifications of ``subject`` (its stored grants changed): its next
        request is verified again and gets the new grants. A scan, once per change."""
        stale = [h for h, p in self.principals.items() if p.subject == subject]
        for h in stale:
            del self.principals[h]

    def protocol(self) -> HttpProtocol:
        """Protocol factory for ``loop.create_server``."""
        return HttpProtocol(self)

    def start(self) -> None:
        """Start the once-a-second sweeper (timeouts, the cached Date header)."""
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(1.0, self._sweep)

    # ---- topics ---------------------------------------------------------------------------

    def set_topic(self, str name, int partitions) -> None:
        """Make ``name`` known to the hot path (created, or found in the engine)."""
        cdef TopicState ts = self.topics.get(name)
        cdef TopicState old
        if ts is None or ts.partitions != partitions:
            old = ts if ts is not None else self.retired.pop(name, None)
            ts = TopicState(name, partitions)
            if old is not None:
                # A topic's counters are cumulative for the life of the process, across a
                # delete and re-creation: /metrics counters never go back, and the metric
                # history's deltas stay right (a reset it cannot see would swallow produces).
                ts.produced = old.produced
                ts.failed = old.failed
                ts.bytes_in = old.bytes_in
            self.topics[name] = ts

    def drop_topic(self, str name) -> None:
        """Forget ``name``: the next produce to it goes through the slow path again."""
        self._retire(name)

    cdef void _retire(self, str name):
        cdef TopicState ts = self.topics.pop(name, None)
        if ts is None:
            return
        self.retired.pop(name, None)  # re-inserted last: the oldest retirements go first
        self.retired[name] = ts
        if len(self.retired) > MAX_RETIRED_TOPICS:
            del self.retired[next(iter(self.retired))]

    cdef TopicState topic_state(self, str name):
        return self.topics.get(name)

    # ---- the batch to the engine ----------------------------------------------------------

    cdef object enqueue(self, Delivery d):
        self.batch.append(d)
        self.inflight += 1
        if d.idem is not None:
            self.keyed += 1
        if len(self.batch) >= BATCH_CUT:
            self._flush()
        elif not self.flush_scheduled:
            self._schedule_flush()

    cdef void enqueue_all(self, list deliveries):
        # One request's deliveries in one engine batch, whatever BATCH_CUT: an engine settles
        # the messages that share an idempotency key (a batch's header) together.
        cdef Delivery d
        if self.batch and len(self.batch) + len(deliveries) > BATCH_CUT:
            self._flush()
        for d in deliveries:
            self.batch.append(d)
            self.inflight += 1
            if d.idem is not None:
                self.keyed += 1
        if len(self.batch) >= BATCH_CUT:
            self._flush()
        elif not self.flush_scheduled:
            self._schedule_flush()

    cdef void _schedule_flush(self):
        self.flush_scheduled = True
        self.loop.call_soon(self.flush_cb)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if not self.batch:
            return
        batch = self.batch
        self.batch = []
        keyed = self.keyed
        self.keyed = 0
        try:
            if keyed:
                self.sink.submit_keyed(batch)
            else:
                self.sink.submit(batch)
        except Exception as exc:
            _log.error("engine refused a batch", exc_info=True)
            err = _errors.Unavailable(f"storage engine unavailable: {exc}")
            for d in batch:
                (<Delivery>d).error = err
            self._on_done(batch)

    def _on_done(self, list batch) -> None:
        """Called by the engine on the loop once per submitted batch."""
        cdef Delivery d
        cdef Pending p
        cdef TopicState ts
        self.inflight -= len(batch)
        for d in batch:
            ts = d.tstate
            if d.error is None:
                if not d.replayed:
                    ts.produced += 1
                    ts.bytes_in += len(d.value)
            else:
                ts.failed += 1
                if isinstance(d.error, _errors.UnknownTopic):
                    self._retire(ts.name)
            p = d.owner
            if p is None:
                continue  # fire-and-forget: answered at enqueue
            d.owner = None
            p.waiting -= 1
            if p.waiting == 0:
                if p.conn is not None:
                    p.conn._complete(p)
                else:  # the client went away; nobody to answer
                    p.single = None
                    p.deliveries = None
        if self.stored_hook is not None:
            self.stored_hook(batch)

    def set_stored_hook(self, hook) -> None:
        """Call ``hook(batch)`` after each engine batch (wakes long-polling consumers)."""
        self.stored_hook = hook

    # ---- counters -------------------------------------------------------------------------

    cdef void record(self, int route, int status, int64_t t0_ns):
        cdef int64_t dt = now_ns() - t0_ns
        cdef int i = 0
        if route < 0 or route >= MAX_ROUTES:
            return
        while i < N_BUCKETS and dt > _BUCKET_NS[i]:
            i += 1
        self.hist[route][i] += 1
        self.hist_sum[route] += dt * 1e-9
        self.status_counts[route][status_slot(status)] += 1

    def stats(self) -> dict:
        """A snapshot of the counters, read by the metrics collector at scrape time."""
        routes = {}
        cdef int r, i
        for r in range(len(self.router.templates)):
            counts = [self.hist[r][i] for i in range(N_BUCKETS + 1)]
            status = {}
            for i in range(N_STATUS):
                if self.status_counts[r][i]:
                    key = str(STATUS_CODES[i]) if i < len(STATUS_CODES) else "other"
                    status[key] = self.status_counts[r][i]
            routes[self.router.templates[r]] = {
                "method": "|".join(self.router.methods[r]),
                "counts": counts,
                "sum_s": self.hist_sum[r],
                "status": status,
            }
        topics = {}
        cdef TopicState ts
        for name, ts in self.topics.items():
            topics[name] = {"produced": ts.produced, "failed": ts.failed, "bytes": ts.bytes_in}
        return {
            "latency_buckets": list(LATENCY_BUCKETS),
            "routes": routes,
            "topics": topics,
            "consumed": {},
            "connections": len(self.connections),
            "inflight": self.inflight,
            "engine_queue": len(self.batch),
        }

    # ---- lifecycle ------------------------------------------------------------------------

    def _sweep(self) -> None:
        cdef HttpProtocol c
        cdef int64_t now = now_ns()
        self.date_header = http_date()
        for c in list(self.connections):
            c._check_timeout(now)
        self.sweeper = self.loop.call_later(1.0, self._sweep)

    def begin_shutdown(self) -> None:
        """Stop taking new work: idle connections close now, busy ones after their answers."""
        cdef HttpProtocol c
        self.shutting_down = True
        for c in list(self.connections):
            c._shutdown()

    def busy(self) -> int:
        """Requests still waiting for an answer (in-flight deliveries plus open connections)."""
        self._flush()
        return self.inflight + len(self.connections)

    def stop(self) -> None:
        """Cancel the sweeper and close every connection (after the shutdown deadline)."""
        cdef HttpProtocol c
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()
