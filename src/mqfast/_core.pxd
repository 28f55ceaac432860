# Declarations of every cdef class of the compiled core; the implementations live in the
# _*.pyx fragments that _core.pyx includes.

from libc.stdint cimport int64_t, uint64_t


cdef enum:
    # Routes and histogram buckets are fixed-size C arrays: the route table is small and static.
    MAX_ROUTES = 32
    N_BUCKETS = 17
    N_STATUS = 17
    # A batch handed to the engine is cut at this many deliveries even inside one loop tick,
    # so one transaction stays short and the first answers go out early.
    BATCH_CUT = 2048
    # Per connection: stop reading once this many responses are queued (pipelining abuse),
    # resume when it drains below the low-water mark.
    PIPELINE_HIGH = 256
    PIPELINE_LOW = 64
    # A produce body may be this many times MESSAGE_QUEUE_MAX_SIZE plus BODY_ENVELOPE bytes: the
    # limit is on the decoded content, and "\u0001" is six bytes of JSON for one of content.
    BODY_ESCAPE_FACTOR = 6
    BODY_ENVELOPE = 65536


cdef class TopicState:
    cdef readonly str name
    cdef readonly int partitions
    cdef bytes json_name          # b'"topic":"<name>"' ready to splice into a response
    cdef uint64_t next_rr
    cdef public uint64_t produced
    cdef public uint64_t failed
    cdef public uint64_t bytes_in
    cdef object producer        # the last principal allowed to produce here (skips the check)


cdef class Pending:
    cdef HttpProtocol conn
    cdef bytes payload
    cdef bint done
    cdef bint started
    cdef bint barrier       # not a produce: runs alone, after earlier answers, before later requests
    cdef bint close_after
    cdef bint http10
    cdef bint head          # a HEAD request: its answer carries no body
    cdef bint prefer_async
    cdef int route
    cdef int status
    cdef bytes method
    cdef bytes url
    cdef object body
    cdef list params
    cdef int64_t t0_ns
    cdef Py_ssize_t waiting
    cdef Delivery single
    cdef list deliveries
    cdef bytes authorization  # the raw Authorization header, None when absent
    cdef object principal     # auth.Principal once authenticated (None with auth off)
    cdef bint quota_checked   # the slow path already took this request's quota
    cdef object poll_end      # a consume's future, done when its client goes (POLL_END)
    cdef bytes idem_key       # the raw Idempotency-Key header, None when absent
    cdef bytes idem_digest    # with it on a batch: the digest of the request body

    @staticmethod
    cdef Pending new(HttpProtocol conn, int route, int64_t t0_ns)


cdef class Delivery:
    cdef readonly str topic
    # partition, timestamp_ms and message_id are rewritten by an engine that answers a retry
    # of an idempotent produce with the original message (``replayed``)
    cdef public int partition
    cdef readonly object key
    cdef readonly bytes value
    cdef readonly object headers
    cdef readonly int priority
    cdef public int64_t timestamp_ms
    cdef readonly int64_t expires_ms
    cdef public str message_id
    cdef public int64_t offset
    cdef public object error
    cdef public object idem       # IdemKey of an idempotent produce, None otherwise
    cdef public bint replayed     # the engine answered with the original of a retry
    cdef Pending owner
    cdef TopicState tstate

    @staticmethod
    cdef Delivery new(TopicState ts, int partition, object key, bytes value, object headers,
                      int priority, int64_t timestamp_ms, int64_t expires_ms, str message_id,
                      Pending owner)


cdef class Router:
    cdef dict exact
    cdef list templated
    cdef list templates
    cdef list methods
    cdef list allow         # the Allow header of each route ("GET, HEAD, POST")
    cdef list masks
    cdef readonly int produce_route
    cdef readonly int batch_route
    cdef readonly int consume_route  # a long-poll: cancelled when its connection goes

    cdef int match(self, bytes path, list params)


cdef class Server:
    cdef object loop
    cdef readonly object sink
    cdef object app
    cdef readonly Router router
    cdef dict topics
    cdef dict retired         # name -> last dropped TopicState (a re-creation continues it)
    cdef set connections
    cdef list batch
    cdef bint flush_scheduled
    cdef Py_ssize_t keyed     # deliveries of the current batch that carry an idempotency key
    cdef object flush_cb
    cdef object sweeper
    cdef object stored_hook
    cdef object auth          # auth.Authenticator, None when authentication is off
    cdef object quotas        # quota.Quotas when per-subject produce quotas are on
    cdef dict principals      # raw Authorization header -> Principal (verified, not expired)
    cdef object public_routes # route indexes answered without authentication
    cdef bytes date_header
    cdef readonly bint shutting_down
    cdef readonly Py_ssize_t inflight
    cdef Py_ssize_t max_inflight
    cdef Py_ssize_t max_body
    cdef Py_ssize_t max_batch_body
    cdef Py_ssize_t max_batch_messages
    cdef Py_ssize_t max_header
    cdef Py_ssize_t max_size
    cdef int64_t default_ttl_ns
    cdef int64_t header_timeout_ns
    cdef int64_t idle_timeout_ns
    cdef object produce_decoder
    cdef object batch_decoder
    cdef object headers_encoder
    cdef uint64_t hist[MAX_ROUTES][N_BUCKETS + 1]
    cdef double hist_sum[MAX_ROUTES]
    cdef uint64_t status_counts[MAX_ROUTES][N_STATUS]

    cdef void record(self, int route, int status, int64_t t0_ns)
    cdef TopicState topic_state(self, str name)
    cdef void _retire(self, str name)
    cdef object enqueue(self, Delivery d)
    cdef void enqueue_all(self, list deliveries)
    cdef void _schedule_flush(self)


cdef class RequestHead:
    cdef Py_ssize_t max_header
    cdef bytes url
    cdef Py_ssize_t header_bytes
    cdef Py_ssize_t content_length
    cdef bint has_content_length
    cdef bint has_transfer_encoding
    cdef bint has_host
    cdef bint expect_continue
    cdef bint prefer_async
    cdef bytes authorization
    cdef bytes idempotency_key
    cdef bytes content_type   # the raw Content-Type header, None when absent
    cdef bint json_body       # Content-Type is application/json or application/*+json
    cdef bytes content_coding # a Content-Encoding other than identity, None when absent
    cdef bint http10

    cdef _reset_head(self)
    cdef _check_head(self, object parser)
    cdef object _media_error(self)


cdef class HttpProtocol(RequestHead):
    cdef Server server
    cdef object transport
    cdef object parser
    cdef object pending
    cdef object body
    cdef int state
    cdef int64_t state_since_ns
    cdef int64_t t0_ns
    cdef Py_ssize_t coarse_header_bytes
    cdef Py_ssize_t body_len          # while lingering: the bytes discarded
    cdef Py_ssize_t body_limit
    cdef int route
    cdef int method
    cdef str peer             # "ip:port" of the client, for the audit log
    cdef bint closing
    cdef bint peer_eof        # the client shut down its sending side (or closed)
    cdef bint reading_paused
    cdef bint writing_paused
    cdef object stream        # the open stream of a streaming answer (mqfast.stream), or None
    cdef bint stream_chunked
    cdef list out
    cdef list params

    cdef _reset_request(self)
    cdef _dispatch(self)
    cdef bint _may_start(self, Pending p)
    cdef _start(self, Pending p)
    cdef Pending _new_pending(self, int status)
    cdef _respond_now(self, Pending p, int status, bytes body, bytes extra)
    cdef _fail(self, Pending p, object exc)
    cdef _produce(self, Pending p)
    cdef _produce_batch(self, Pending p)
    cdef bint _within_quota(self, Pending p, object req, bint batch, bint prefer_async,
                            Py_ssize_t messages, Py_ssize_t nbytes)
    cdef Delivery _delivery(self, TopicState ts, str content, object key, object headers,
                            int priority, object ttl, str where, Pending p)
    cdef _make_idem(self, Pending p, Delivery d, str key, object ttl, str field)
    cdef _call_app(self, Pending p)
    cdef bint _authenticate(self, Pending p)
    cdef _end_polls(self)
    cdef _complete(self, Pending p)
    cdef _write_ready(self)
    cdef _abort_with(self, object exc)
    cdef _linger(self)
    cdef _open_stream(self, Pending p, object stream)
    cdef _begin_stream(self)
