# Pooled hot-path objects (Cython's freelist wants literal sizes, hence no named constants). They are no_gc: none of them is ever part of a cycle that outlives a
# request (Pending <-> Delivery links are cut when the answer is written), so the collector never
# has to track them, and a produce request allocates no GC-tracked object of ours.


# Live pooled objects, for the tests' leak check (a few nanoseconds per object).
cdef Py_ssize_t _live_pending = 0
cdef Py_ssize_t _live_deliveries = 0


def debug_counters() -> dict:
    """Pooled objects alive now; zero when every request has been answered and released."""
    return {"pending": _live_pending, "deliveries": _live_deliveries}


@cython.final
@cython.freelist(16)  # topics are few; created on the slow path
cdef class TopicState:
    """What the hot path knows of a topic: its partition count and its counters."""

    def __init__(self, str name, int partitions):
        self.name = name
        self.partitions = partitions
        self.json_name = f'"topic":"{name}"'.encode()
        self.next_rr = 0
        self.produced = 0
        self.failed = 0
        self.bytes_in = 0
        self.producer = None

    def __repr__(self) -> str:
        return f"TopicState({self.name!r}, {self.partitions})"


@cython.final
@cython.no_gc
@cython.freelist(1024)  # response slots in flight: 256 connections with some pipelining
cdef class Pending:
    """One request's place in its connection's response order (pipelining answers in order)."""

    def __dealloc__(self):
        global _live_pending
        _live_pending -= 1

    @staticmethod
    cdef Pending new(HttpProtocol conn, int route, int64_t t0_ns):
        global _live_pending
        cdef Pending p = Pending.__new__(Pending)
        _live_pending += 1
        p.conn = conn
        p.route = route
        p.t0_ns = t0_ns
        p.done = False
        p.started = False
        p.barrier = False
        p.close_after = False
        p.http10 = False
        p.head = False
        p.prefer_async = False
        p.waiting = 0
        p.status = 0
        p.authorization = None
        p.principal = None
        p.poll_end = None
        p.quota_checked = False
        p.idem_key = None
        p.idem_digest = None
        return p


@cython.final
@cython.no_gc
@cython.freelist(4096)  # deliveries in flight: a few engine batches at full load
cdef class Delivery:
    """One message on its way to the engine; the engine sets ``offset`` or ``error``."""

    def __dealloc__(self):
        global _live_deliveries
        _live_deliveries -= 1

    @staticmethod
    cdef Delivery new(TopicState ts, int partition, object key, bytes value, object headers,
                      int priority, int64_t timestamp_ms, int64_t expires_ms, str message_id,
                      Pending owner):
        global _live_deliveries
        cdef Delivery d = Delivery.__new__(Delivery)
        _live_deliveries += 1
        d.tstate = ts
        d.topic = ts.name
        d.partition = partition
        d.key = key
        d.value = value
        d.headers = headers
        d.priority = priority
        d.timestamp_ms = timestamp_ms
        d.expires_ms = expires_ms
        d.message_id = message_id
        d.offset = -1
        d.error = None
        d.idem = None
        d.replayed = False
        d.owner = owner
        return d
