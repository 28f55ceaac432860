# HttpProtocol: one keep-alive HTTP/1.1 connection. httptools (llhttp) parses; this class keeps
# the limits, routes, runs the produce path inline and answers pipelined requests in order.

cdef enum:
    ST_IDLE = 0
    ST_HEADERS = 1
    ST_BODY = 2
    ST_CLOSED = 3
    ST_LINGER = 4   # answered and shut down for writing; discarding input until the client closes
    ST_STREAM = 5   # an answer that stays open (GET /api/v1/messages/stream): no timeouts

cdef enum:
    METHOD_POST = 2     # the bits of _METHOD_BITS
    METHOD_HEAD = 16
    METHOD_OTHER = 128

cdef enum:
    # Lingering close (nginx's lingering_close): after an answer that closes the connection,
    # read and discard what the client still sends, so that closing with unread input does not
    # reset the connection and destroy the answer; bounded in time and in bytes (enough for an
    # oversized head or a refused body that the client sends anyway).
    LINGER_BYTES = 1048576
    LINGER_SECONDS = 2

cdef dict _REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict",
    413: b"Content Too Large", 415: b"Unsupported Media Type", 422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 503: b"Service Unavailable", 505: b"HTTP Version Not Supported",
}

cdef object _HttpParserCallbackError = httptools.HttpParserCallbackError
cdef object _HttpParserError = httptools.HttpParserError
cdef object _HttpParserUpgrade = httptools.HttpParserUpgrade
cdef object _DecodeError = msgspec.DecodeError
cdef object _MqfastError = _errors.MqfastError
cdef bytes _CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


cdef object _iscoroutine = __import__("inspect").isawaitable
cdef object _blake2b = hashlib.blake2b
cdef object _copy_context = contextvars.copy_context

# The future a consume's long-poll ends on early: done when its client shuts down sending or
# goes (eof_received, connection_lost). Set in the task's context by _call_app; read by
# mqfast.groups, which answers at once, empty, without leasing anything more.
POLL_END = contextvars.ContextVar("mqfast_poll_end", default=None)


cdef _fingerprint(object h, Delivery d, object ttl):
    # What the client sent of the message (the ttl as given, not the expiry it makes), so a
    # retry of the same request always matches.
    for part in (d.key, d.value, d.headers):
        if part is None:
            h.update(b"-;")
        else:
            h.update(b"%d;" % len(part))
            h.update(part)
    h.update(b"%d;%s;" % (d.priority, repr(ttl).encode()))


cdef str _scope(Pending p, str key):
    # per subject: one tenant's key never answers with another tenant's message
    principal = p.principal
    return (principal.subject if principal is not None else "") + "\x00" + key


cdef str _idempotency_header(bytes value):
    # The header's key, by the rule of a batch message's ``idempotency_key`` (messages.py).
    cdef const char* s = PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    if n == 0 or n > IDEMPOTENCY_KEY_MAX:
        raise _errors.BadRequest(
            f"the Idempotency-Key header must be 1 to {IDEMPOTENCY_KEY_MAX} characters "
            f"(got {n})", field="Idempotency-Key")
    for i in range(n):
        if s[i] < 33 or s[i] > 126:
            raise _errors.BadRequest(
                "the Idempotency-Key header must be visible ASCII characters (no spaces)",
                field="Idempotency-Key")
    return PyUnicode_DecodeASCII(s, n, NULL)
# A \uD800-\uDBFF escape (after an even run of backslashes) not followed by a \uDC00-\uDFFF one.
cdef object _LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*(\\u[dD][89abAB][0-9a-fA-F]{2})(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})")


cdef extern from "strings.h":
    int strncasecmp(const char* a, const char* b, size_t n) nogil


cdef extern from *:
    """
    /* httptools keeps no accessor for the size of the chunk being read. Its parser object
       (a Cython class: the vtable pointer first) holds its llhttp_t pointer first, and
       llhttp_t begins with these fields (httptools' parser/parser.pyx and cparser.pxd);
       llhttp_t.data points back at the object, which tells whether the layout is still the
       one expected (if not, a chunk is only refused once its bytes pass the limit). */
    typedef struct {
        int32_t _index; void* _span_pos0; void* _span_cb0; int32_t error;
        const char* reason; const char* error_pos; void* data; void* _current;
        uint64_t content_length;
    } mq_llhttp_head;
    typedef struct { PyObject_HEAD void* vtab; mq_llhttp_head* llhttp; } mq_httptools_parser;
    static int mq_llhttp_remaining(PyObject* parser, uint64_t* out) {
        mq_llhttp_head* h = ((mq_httptools_parser*)parser)->llhttp;
        if (h == NULL || h->data != (void*)parser) return 0;
        *out = h->content_length;
        return 1;
    }
    """
    bint mq_llhttp_remaining(object parser, uint64_t* out)


cdef inline bint _is_space(char c) noexcept nogil:
    return c == 32 or c == 9


cdef bint _is_json_media(bytes value):
    # application/json or application/<x>+json, in any case, optionally with parameters
    cdef const char* s = PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i = 0, j
    while i < n and _is_space(s[i]):
        i += 1
    if n - i < 16 or strncasecmp(s + i, b"application/", 12) != 0:
        return False
    i += 12
    j = i
    while j < n and s[j] != 59 and not _is_space(s[j]):  # 59: ';'
        j += 1
    if j - i < 4 or strncasecmp(s + j - 4, b"json", 4) != 0 or (j - i > 4 and s[j - 5] != 43):
        return False  # 43: '+'
    while j < n and _is_space(s[j]):
        j += 1
    return j == n or s[j] == 59


cdef bint _is_token(bytes value, const char* token, Py_ssize_t size):
    # ``value`` is ``token`` (any case) with optional surrounding whitespace
    cdef const char* s = PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    while n and _is_space(s[n - 1]):
        n -= 1
    while n and _is_space(s[0]):
        s += 1
        n -= 1
    return n == size and strncasecmp(s, token, size) == 0


cpdef object decode_json(object decoder, object body):
    """Decode a request body with ``decoder``; every failure is a 400 naming the field."""
    if not body:
        raise _errors.MalformedJson("request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except _DecodeError as e:
        m = _LONE_SURROGATE.search(body)
        if m is not None and not isinstance(e, msgspec.ValidationError):
            # msgspec reports a high surrogate without its low half as "truncated"
            raise _errors.MalformedJson(
                f"request body is not valid JSON: {m.group(1).decode()} at byte "
                f"{m.start(1)} is a lone UTF-16 surrogate; a \\uD800-\\uDBFF escape "
                "must be followed by a \\uDC00-\\uDFFF escape") from None
        raise _errors.from_decode_error(e) from None
    except UnicodeDecodeError:
        raise _errors.MalformedJson("request body is not valid UTF-8") from None


cdef object _parse_failure(object exc):
    """The error to answer for what httptools' ``feed_data`` raised."""
    if isinstance(exc, _HttpParserCallbackError):
        ctx = exc.__context__
        if isinstance(ctx, _MqfastError):
            return ctx  # one of the checks of the callbacks
        _log.error("internal error while parsing a request", exc_info=ctx or exc)
        return _errors.MqfastError("internal error")
    if isinstance(exc, _HttpParserUpgrade):
        return _errors.MalformedHttp("protocol upgrade is not supported")
    return _errors.MalformedHttp(f"malformed HTTP request: {exc}")


cdef bytes http_response(Server server, int status, bytes body, bint close, bytes extra,
                         bint http10_keepalive, bint head=False):
    # ``head``: the answer to a HEAD request, its Content-Length that of the body it omits.
    # Every answer is JSON but the console's files, whose ``extra`` opens with their type.
    reason = _REASONS.get(status, b"Unknown")
    conn = b"connection: close\r\n" if close else (
        b"connection: keep-alive\r\n" if http10_keepalive else b"")
    typed = extra is not None and extra.startswith(b"content-type:")
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        server.date_header,
        b"content-length: %d\r\n" % len(body) if typed else
        b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
        conn,
        extra if extra is not None else b"",
        b"\r\n",
        b"" if head else body,
    ))


cdef int delivery_json(Delivery d, char* out, int cap, bint stored):
    # A stored (or accepted, offset null) message as JSON, formatted in C: topic names are
    # [a-zA-Z0-9._-] and ids hex, so nothing needs escaping.
    cdef const char* mid = PyUnicode_AsUTF8(d.message_id)
    cdef bytes tname = d.tstate.json_name
    if stored:
        return snprintf(out, cap,
                        b'{"message_id":"%s",%s,"partition":%d,"offset":%lld,"timestamp":%lld}',
                        mid, PyBytes_AS_STRING(tname), d.partition, <long long>d.offset,
                        <long long>d.timestamp_ms)
    return snprintf(out, cap,
                    b'{"message_id":"%s",%s,"partition":%d,"offset":null,"timestamp":%lld}',
                    mid, PyBytes_AS_STRING(tname), d.partition, <long long>d.timestamp_ms)


cdef bytes results_json(list deliveries, bint stored, Py_ssize_t* failed):
    # Batch answers without a dict per message: bytes and bytearray are not tracked by the
    # garbage collector, dicts are, and a 100-message batch would otherwise make 200 of them.
    cdef char item[768]
    cdef int n
    cdef Delivery d
    cdef bytearray out = bytearray(b'{"results":[')
    cdef Py_ssize_t bad = 0, i = 0
    for d in deliveries:
        if i:
            out += b","
        i += 1
        if d.error is None:
            n = delivery_json(d, item, sizeof(item), stored)
            out += PyBytes_FromStringAndSize(item, n)
        else:
            bad += 1
            err = d.error if isinstance(d.error, _MqfastError) else (
                _errors.MqfastError("internal error"))
            out += b'{"message_id":"%s",%s,"error":{"code":"%s","message":%s}}' % (
                d.message_id.encode("ascii"), d.tstate.json_name, str(err.code).encode(),
                msgspec.json.encode(err.message))
    if stored:
        out += b'],"succeeded":%d,"failed":%d}' % (len(deliveries) - bad, bad)
    else:
        out += b'],"succeeded":0,"failed":0,"accepted":%d}' % len(deliveries)
    failed[0] = bad
    return bytes(out)


cdef bytes produce_ok(Server server, Delivery d, int status, bint close, bint http10_keepalive):
    # The produce answer is the hottest write: formatted in C, one bytes object allocated.
    cdef char body[768]
    cdef char head[256]
    cdef int n, h
    cdef bytes date = server.date_header
    n = delivery_json(d, body, sizeof(body), status != 202)
    h = snprintf(head, sizeof(head),
                 b"HTTP/1.1 %d %s\r\n%scontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n",
                 status, b"OK" if status == 200 else b"Accepted", PyBytes_AS_STRING(date), n,
                 b"connection: close\r\n" if close else (
                     b"connection: keep-alive\r\n" if http10_keepalive else b""))
    cdef bytes out = PyBytes_FromStringAndSize(NULL, h + n)
    cdef char* buf = PyBytes_AS_STRING(out)
    memcpy(buf, head, h)
    memcpy(buf + h, body, n)
    return out


@cython.final
cdef class _AppDone:
    """Done-callback of an app coroutine: answers the request's slot (slow routes only), or,
    for the slow-path token verification (``auth``), starts the request or answers 401."""
    cdef HttpProtocol conn
    cdef Pending p
    cdef bint auth

    def __cinit__(self, HttpProtocol conn, Pending p, bint auth=False):
        self.conn = conn
        self.p = p
        self.auth = auth

    def __call__(self, task):
        cdef HttpProtocol conn = self.conn
        cdef Pending p = self.p
        self.conn = None
        self.p = None
        p.poll_end = None
        if task.cancelled():
            conn._fail(p, _errors.ShuttingDown("request cancelled: the server is stopping"))
        elif task.exception() is not None:
            conn._fail(p, task.exception())
        elif self.auth:
            conn._authenticated(p, task.result())
        else:
            conn._answer(p, task.result())
        conn._write_ready()


@cython.final
cdef class _Resume:
    """After the slow path made the request's topics known (``quota`` False), or asked for
    more of the subject's allowance (``quota`` True: the task's result is the Retry-After,
    0 when granted), run the produce again."""
    cdef HttpProtocol conn
    cdef Pending p
    cdef object request
    cdef bint batch
    cdef bint prefer_async
    cdef bint quota

    def __cinit__(self, HttpProtocol conn, Pending p, object request, bint batch,
                  bint prefer_async, bint quota=False):
        self.conn = conn
        self.p = p
        self.request = request
        self.batch = batch
        self.prefer_async = prefer_async
        self.quota = quota

    def __call__(self, task):
        cdef HttpProtocol conn = self.conn
        cdef Pending p = self.p
        self.conn = None
        self.p = None
        try:
            if task.cancelled():
                raise _errors.ShuttingDown("request cancelled: the server is stopping")
            if task.exception() is not None:
                raise task.exception()
            if self.quota:
                wait = task.result()
                if wait > 0:
                    exc = _errors.RateLimited(
                        f"subject {p.principal.subject!r} is over its produce quota; "
                        f"retry in {wait:.2f}s")
                    exc.extra_headers = b"retry-after: %d\r\n" % max(1, <int>(wait + 0.999))
                    raise exc
                p.quota_checked = True
            if self.batch:
                conn._enqueue_batch(p, self.request, self.prefer_async, False)
            else:
                conn._enqueue_one(p, self.request, self.prefer_async, False)
        except BaseException as exc:
            conn._fail(p, exc)
        conn._write_ready()


cdef class RequestHead:
    """The rules for a request's head, one copy for the main listener (``HttpProtocol``) and the
    side listeners (``parse_request_head``): size, framing headers, codings, version, Host."""

    cdef _reset_head(self):
        self.url = None
        self.header_bytes = 0
        self.content_length = 0
        self.has_content_length = False
        self.has_transfer_encoding = False
        self.has_host = False
        self.expect_continue = False
        self.prefer_async = False
        self.authorization = None
        self.idempotency_key = None
        self.content_type = None
        self.json_body = False
        self.content_coding = None
        self.http10 = False

    def on_url(self, bytes url):
        self.url = url if self.url is None else self.url + url
        self.header_bytes += len(url)
        if self.header_bytes > self.max_header:
            raise _errors.HeadersTooLarge(
                f"request line and headers exceed {self.max_header} bytes")

    def on_header(self, bytes name, bytes value):
        # Names are compared in C, without a lowered copy: this runs for every header.
        cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
        cdef const char* s = PyBytes_AS_STRING(name)
        self.header_bytes += n + PyBytes_GET_SIZE(value) + 4
        if self.header_bytes > self.max_header:
            raise _errors.HeadersTooLarge(
                f"request line and headers exceed {self.max_header} bytes")
        if n == 4:
            if strncasecmp(s, b"host", 4) == 0:
                if self.has_host:
                    raise _errors.MalformedHttp("duplicate Host header")
                self.has_host = True
        elif n == 12:
            if strncasecmp(s, b"content-type", 12) == 0:
                if self.content_type is not None:
                    raise _errors.MalformedHttp("duplicate Content-Type header")
                self.content_type = value
                self.json_body = _is_json_media(value)
        elif n == 14:
            if strncasecmp(s, b"content-length", 14) == 0:
                if self.has_content_length:
                    raise _errors.MalformedHttp("duplicate Content-Length header")
                if self.has_transfer_encoding:
                    raise _errors.MalformedHttp(
                        "both Content-Length and Transfer-Encoding are present")
                self.has_content_length = True
                v = value.strip()
                if not v.isdigit() or len(v) > 18:
                    raise _errors.MalformedHttp("invalid Content-Length header")
                self.content_length = int(v)  # checked against the route's limit when routed
        elif n == 17:
            if strncasecmp(s, b"transfer-encoding", 17) == 0:
                if self.has_content_length:
                    raise _errors.MalformedHttp(
                        "both Content-Length and Transfer-Encoding are present")
                if self.has_transfer_encoding:
                    raise _errors.MalformedHttp("duplicate Transfer-Encoding header")
                if not _is_token(value, b"chunked", 7):
                    raise _errors.TransferCodingNotImplemented(
                        f"Transfer-Encoding {value.decode('latin-1')!r} is not supported; "
                        "send the body with Content-Length or Transfer-Encoding: chunked")
                self.has_transfer_encoding = True
        elif n == 16:
            if strncasecmp(s, b"content-encoding", 16) == 0 and not _is_token(
                    value, b"identity", 8):
                self.content_coding = value  # refused once the body is read (keeps framing)
        elif n == 13:
            if strncasecmp(s, b"authorization", 13) == 0:
                self.authorization = value
        elif n == 15:
            if strncasecmp(s, b"idempotency-key", 15) == 0:
                if self.idempotency_key is not None:
                    raise _errors.BadRequest("duplicate Idempotency-Key header",
                                             field="Idempotency-Key")
                self.idempotency_key = value
        elif n == 6:
            if strncasecmp(s, b"expect", 6) == 0:
                if _is_token(value, b"100-continue", 12):
                    self.expect_continue = True
            elif strncasecmp(s, b"prefer", 6) == 0:
                if b"respond-async" in value.lower():
                    self.prefer_async = True

    cdef _check_head(self, object parser):
        """The checks that need the whole head: the version, then the Host header."""
        version = parser.get_http_version()
        self.http10 = version == "1.0"
        if not self.http10 and version != "1.1":
            raise _errors.VersionNotSupported(
                f"HTTP/{version} is not supported; use HTTP/1.1 (or HTTP/1.0)")
        if not self.has_host and not self.http10:
            raise _errors.MalformedHttp("missing Host header")

    cdef object _media_error(self):
        """Why the body may not be read as JSON (415), or None."""
        if self.content_coding is not None:
            return _errors.UnsupportedMediaType(
                f"Content-Encoding {self.content_coding.decode('latin-1')!r} is not supported; "
                "send the body uncompressed (identity)")
        if self.content_type is None:
            return _errors.UnsupportedMediaType(
                "the Content-Type header is missing; send Content-Type: application/json")
        return _errors.UnsupportedMediaType(
            f"Content-Type {self.content_type.decode('latin-1')!r} is not supported; "
            "send Content-Type: application/json")


@cython.final
cdef class _SideHead(RequestHead):
    """A request head checked for a side listener, which reads no body."""
    cdef bint complete

    def on_headers_complete(self):
        self.complete = True


cpdef tuple parse_request_head(bytes head, Py_ssize_t max_header):
    """Check a side listener's request head (up to its blank line) by the main listener's
    rules: ``(method, target)``, or an ``MqfastError`` (400, 431, 501, 505)."""
    cdef _SideHead h = _SideHead()
    h.max_header = max_header
    h._reset_head()
    parser = httptools.HttpRequestParser(h)
    try:
        parser.feed_data(head)
    except (_HttpParserError, _HttpParserUpgrade) as e:
        raise _parse_failure(e) from None
    if not h.complete:
        raise _errors.MalformedHttp("incomplete request head")
    h._check_head(parser)
    return parser.get_method(), h.url or b"/"


cdef class HttpProtocol(RequestHead):
    """One client connection (asyncio.Protocol)."""

    def __init__(self, Server server):
        self.server = server
        self.max_header = server.max_header
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending = collections.deque()
        self.out = []
        self.params = []
        self.state = ST_IDLE
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        self.stream = None
        self._reset_request()

    cdef _reset_request(self):
        self._reset_head()
        self.body = None
        self.coarse_header_bytes = 0
        self.body_len = 0
        self.body_limit = self.server.max_body
        self.route = -1
        self.method = METHOD_OTHER
        if self.params:
            self.params = []

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""
        self.state_since_ns = now_ns()
        self.server.connections.add(self)

    def connection_lost(self, exc):
        cdef Pending p
        self.state = ST_CLOSED
        self.server.connections.discard(self)
        # Answers still owed go nowhere now; cut the links so nothing keeps this object alive.
        # A long-poll still waiting ends (as in eof_received).
        self._end_polls()
        for p in self.pending:
            p.conn = None
        self.pending.clear()
        self.transport = None
        if self.stream is not None:
            stream = self.stream
            self.stream = None
            stream.connection_lost()

    def pause_writing(self):
        self.writing_paused = True
        if self.stream is not None:
            # The stream stops sending; reading goes on, so that the client's close is seen.
            self.stream.pause_writing()
        else:
            self._pause_reading()

    def resume_writing(self):
        self.writing_paused = False
        if self.stream is not None:
            self.stream.resume_writing()
        self._maybe_resume_reading()

    def _pause_reading(self):
        # never while lingering: that would leave the client's bytes unread at the close
        if not self.reading_paused and self.transport is not None and self.state != ST_LINGER:
            self.reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self):
        if (self.reading_paused and not self.writing_paused
                and len(self.pending) < PIPELINE_LOW and self.transport is not None
                and not self.closing):
            self.reading_paused = False
            self.transport.resume_reading()

    def data_received(self, data):
        if self.state == ST_LINGER:
            self.body_len += len(data)
            if self.body_len > LINGER_BYTES:
                self.transport.close()
            return
        if self.closing or self.state == ST_CLOSED:
            return
        if self.state == ST_HEADERS:
            # A header trickled over many packets is only reported when it ends; count raw
            # bytes too so memory stays bounded while it trickles.
            self.coarse_header_bytes += len(data)
            if self.coarse_header_bytes > self.server.max_header:
                self._abort_with(_errors.HeadersTooLarge(
                    f"request header block exceeds {self.server.max_header} bytes"))
                self._write_ready()
                return
        try:
            self.parser.feed_data(data)
        except (_HttpParserError, _HttpParserUpgrade) as e:
            self._abort_with(_parse_failure(e))
        self._write_ready()

    def eof_received(self):
        # The client shut down its sending side (half-close): what it sent completely is still
        # answered, then the connection closes. Returning true keeps the transport open (plain
        # TCP; TLS closes regardless), and the last answer owed carries the close.
        cdef Pending last
        self.peer_eof = True
        if not self.pending or self.transport is None:
            return None
        self._end_polls()
        last = self.pending[len(self.pending) - 1]  # wraparound is off in the core
        last.close_after = True
        self.closing = True
        return True

    cdef _end_polls(self):
        # A long-poll still waiting answers now, empty, and leases nothing more: most clients
        # that shut down sending have closed the socket (the difference shows only at the
        # next write), and a poll left waiting would lease messages to nobody until their
        # visibility timeout ran out. It is not cancelled: a cancel could land in the middle
        # of a lease in the engine, and a client that only half-closed still gets its answer.
        cdef Pending p
        for p in self.pending:
            if p.poll_end is not None and not p.poll_end.done():
                p.poll_end.set_result(None)

    # ---- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self):
        self._reset_request()
        self.state = ST_HEADERS
        self.t0_ns = now_ns()
        self.state_since_ns = self.t0_ns

    def on_headers_complete(self):
        cdef Server server = self.server
        cdef Py_ssize_t declared = self.content_length if self.has_content_length else 0
        self.state = ST_BODY
        self.state_since_ns = now_ns()
        self.method = _METHOD_BITS.get(self.parser.get_method(), METHOD_OTHER)
        self._check_head(self.parser)
        url = self.url or b"/"
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        self.route = server.router.match(path, self.params)
        self.body_limit = (server.max_batch_body if self.route == server.router.batch_route
                           else server.max_body)
        if declared > self.body_limit:
            raise _errors.PayloadTooLarge(
                f"request body of {declared} bytes exceeds the limit of {self.body_limit} bytes")
        if self.expect_continue and self.transport is not None:
            if self.pending:  # after the answers still owed, in order
                p = Pending.new(self, -1, 0)
                p.payload = _CONTINUE
                p.done = p.started = True
                self.pending.append(p)
            else:
                self.transport.write(_CONTINUE)

    def on_chunk_header(self):
        # Refuse a chunk that cannot fit at once, not after waiting for its bytes.
        cdef uint64_t size
        if (mq_llhttp_remaining(self.parser, &size)
                and size > <uint64_t>(self.body_limit - self.body_len)):
            raise _errors.PayloadTooLarge(
                f"a chunk of {size} bytes exceeds the request body limit of "
                f"{self.body_limit} bytes")

    def on_body(self, bytes chunk):
        # The body's deadline runs from the end of the headers: a trickle does not extend it.
        self.body_len += len(chunk)
        if self.body_len > self.body_limit:
            raise _errors.PayloadTooLarge(
                f"request body exceeds the limit of {self.body_limit} bytes")
        if self.body is None:
            self.body = chunk
        elif type(self.body) is bytes:
            self.body = bytearray(self.body)
            self.body += chunk
        else:
            self.body += chunk

    def on_message_complete(self):
        self.state = ST_IDLE
        self.state_since_ns = now_ns()
        self._dispatch()

    # ---- dispatch -------------------------------------------------------------------------

    cdef Pending _new_pending(self, int status):
        cdef Pending p = Pending.new(self, self.route, self.t0_ns)
        self.pending.append(p)
        if len(self.pending) > PIPELINE_HIGH:
            self._pause_reading()
        return p

    cdef _dispatch(self):
        # The request moves into its slot: the parser's fields are reused by the next one.
        cdef Server server = self.server
        cdef Pending p = self._new_pending(0)
        cdef int route = self.route
        if not self.parser.should_keep_alive() or server.shutting_down:
            p.close_after = True
        p.http10 = self.http10
        p.head = self.method == METHOD_HEAD
        p.prefer_async = self.prefer_async
        p.authorization = self.authorization
        p.idem_key = self.idempotency_key
        p.url = self.url or b"/"
        p.body = self.body
        p.method = self.parser.get_method()
        p.barrier = route != server.router.produce_route and route != server.router.batch_route
        if self.params:
            p.params = self.params
            self.params = []
        try:
            if route < 0:
                raise _errors.NotFound(
                    f"no such endpoint: {p.url.split(b'?')[0].decode('latin-1')}")
            if not (self.method & <int>server.router.masks[route]):
                allowed = server.router.allow[route]
                self._respond_now(
                    p, 405,
                    _errors.MethodNotAllowed(
                        f"method not allowed here; allowed: {allowed}").to_body(),
                    b"allow: %s\r\n" % allowed.encode())
                return
            # Every body is JSON (415 otherwise): a web page cannot POST to the API as a
            # "simple" cross-site request (text/plain, a form), and nothing coded is stored.
            if (self.content_coding is not None or self.method == METHOD_POST
                    and not self.json_body and (p.body is not None
                                                or self.content_type is not None)):
                raise self._media_error()
        except BaseException as exc:
            self._fail(p, exc)
            return
        if self._may_start(p):
            self._start(p)

    cdef bint _may_start(self, Pending p):
        # Pipelined requests run in order of arrival as far as it matters: produces run
        # together (one engine batch keeps their order), anything else waits until every
        # earlier request is answered, and later requests wait for it (RFC 9112 §9.3.2).
        cdef Pending q
        cdef Py_ssize_t i, n = len(self.pending)
        if n == 1:
            return True  # alone on the connection: the common case, no iteration
        for i in range(n):
            q = self.pending[i]
            if q is p:
                return True
            if not q.done and (q.barrier or p.barrier or not q.started):
                return False
        return True

    cdef _start(self, Pending p):
        cdef Server server = self.server
        cdef int route = p.route
        p.started = True
        try:
            if server.auth is not None and p.principal is None and not self._authenticate(p):
                return  # verified on the slow path, then started again
            if route == server.router.produce_route:
                self._produce(p)
            elif route == server.router.batch_route:
                self._produce_batch(p)
            else:
                self._call_app(p)
        except BaseException as exc:
            self._fail(p, exc)

    cdef bint _authenticate(self, Pending p):
        """True when ``p`` may go on now; False when the slow path verifies its token first."""
        cdef Server server = self.server
        if p.route in server.public_routes:
            return True
        hdr = p.authorization
        if hdr is not None:
            principal = server.principals.get(hdr)
            if principal is not None:
                if principal.expires_at > wall_ms() * 0.001:
                    p.principal = principal
                    return True
                del server.principals[hdr]
        task = server.loop.create_task(server.app.authenticate(hdr, self.peer))
        task.add_done_callback(_AppDone(self, p, True))
        return False

    def _authenticated(self, Pending p, object principal):
        cdef Server server = self.server
        p.principal = principal
        if not principal.revoked:  # else built before its subject's grants changed: not kept
            if len(server.principals) >= 100_000:
                server.principals.clear()  # bounded; verified again on the next request
            server.principals[p.authorization] = principal
        self._start(p)

    cdef _respond_now(self, Pending p, int status, bytes body, bytes extra):
        p.status = status
        p.payload = http_response(self.server, status, body, p.close_after, extra,
                                  p.http10 and not p.close_after, p.head)
        p.done = True
        p.started = True
        p.body = None
        p.params = None

    cdef _fail(self, Pending p, object exc):
        if not isinstance(exc, _MqfastError):
            _log.error("internal error handling a request", exc_info=exc)
            exc = _errors.MqfastError("internal error")
        if exc.status == 403 and p.principal is not None:
            # refused on the hot path (produce): the audit log records every refusal
            self.server.app.forbidden(exc, p.principal, self.server.router.templates[p.route],
                                      self.peer)
        self._respond_now(p, exc.status, exc.to_body(), exc.extra_headers)

    def _answer(self, Pending p, object result):
        if type(result) is not tuple:
            self._open_stream(p, result)
            return
        status, body, extra = result
        self._respond_now(p, status, body, extra)

    cdef _open_stream(self, Pending p, object stream):
        # An answer that stays open: the head now, then what the stream sends (started once
        # the head is written, _write_ready). Chunked, so that the client tells the end from a
        # lost connection (HTTP/1.0: the body ends with the connection). Nothing after it on
        # this connection is answered: requests pipelined behind it are dropped at the close.
        if p.conn is None or self.transport is None:
            return  # the connection closed before: the stream never starts
        self.stream_chunked = not p.http10
        p.status = 200
        p.payload = b"".join((
            b"HTTP/1.1 200 OK\r\n", self.server.date_header,
            b"content-type: text/event-stream\r\ncache-control: no-store\r\n",
            b"transfer-encoding: chunked\r\n" if self.stream_chunked else b"",
            b"connection: close\r\nx-accel-buffering: no\r\n\r\n"))
        p.done = True
        p.started = True
        p.close_after = True
        p.body = None
        p.params = None
        self.closing = True  # input is discarded from now on
        if not p.head:
            self.stream = stream

    cdef _begin_stream(self):
        self.state = ST_STREAM
        self.state_since_ns = now_ns()
        if self.reading_paused:  # keep reading: the client's close must be seen at once
            self.reading_paused = False
            self.transport.resume_reading()
        self.stream.start(self)
        if self.writing_paused:
            self.stream.pause_writing()
        if self.server.shutting_down:
            self.stream.shutdown()

    def stream_send(self, bytes data):
        """Send ``data`` (whole events) on the open stream."""
        if self.state != ST_STREAM or self.transport is None:
            return
        if self.stream_chunked:
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)

    def stream_end(self):
        """End the open stream cleanly (the last chunk) and close the connection."""
        if self.state != ST_STREAM or self.transport is None:
            return
        self.stream = None
        if self.stream_chunked:
            self.transport.write(b"0\r\n\r\n")
        self._linger()

    cdef _abort_with(self, object exc):
        # The framing is lost: answer after what is already queued, then close.
        cdef Pending p = Pending.new(self, self.route, self.t0_ns or now_ns())
        self.pending.append(p)
        p.close_after = True
        self.closing = True
        self._fail(p, exc)

    cdef _call_app(self, Pending p):
        cdef Server server = self.server
        url = p.url
        q = url.find(b"?")
        query = b"" if q < 0 else url[q + 1:]
        body = bytes(p.body) if p.body is not None else b""
        # HEAD runs the GET handler; the answer drops the body (_respond_now)
        result = server.app.handle(server.router.templates[p.route],
                                   "GET" if p.head else p.method.decode(),
                                   p.params or [], query, body, p.principal, self.peer)
        if _iscoroutine(result):
            if p.route == server.router.consume_route:
                # The long-poll sees POLL_END in its context: done when its client goes.
                p.poll_end = server.loop.create_future()
                if self.peer_eof:
                    p.poll_end.set_result(None)
                ctx = _copy_context()
                ctx.run(POLL_END.set, p.poll_end)
                task = server.loop.create_task(result, context=ctx)
            else:
                task = server.loop.create_task(result)
            task.add_done_callback(_AppDone(self, p))
        else:
            self._answer(p, result)

    # ---- produce --------------------------------------------------------------------------

    cdef _produce(self, Pending p):
        cdef Server server = self.server
        if server.inflight >= server.max_inflight:
            raise _errors.Unavailable("too many messages in flight; retry shortly")
        body = p.body
        p.body = None
        req = decode_json(server.produce_decoder, body)
        if p.idem_key is not None:
            # the request's fingerprint: its body byte for byte (the IETF draft's), one digest
            p.idem_digest = _blake2b(body, digest_size=16).digest()
        self._enqueue_one(p, req, p.prefer_async, True)

    def _enqueue_one(self, Pending p, object req, bint prefer_async, bint may_resolve):
        cdef Server server = self.server
        cdef TopicState ts = server.topic_state(req.topic)
        cdef str idem = None
        if p.idem_key is not None:
            idem = _idempotency_header(p.idem_key)
            prefer_async = False  # answered with the outcome: a retry gets the same answer
        principal = p.principal
        if principal is not None and (ts is None or ts.producer is not principal):
            # One principal at a time is remembered per topic: a producer sending one token
            # again and again pays a pointer comparison, not a permission lookup.
            principal.require("produce", req.topic)
            if ts is not None:
                ts.producer = principal
        if ts is None:
            if not may_resolve:
                raise _errors.UnknownTopic(f"unknown topic {req.topic!r}", field="topic")
            # Validate before the topic is created: a rejected request leaves no trace.
            self._prevalidate(req.topic, req.content, req.ttl, "")
            task = server.loop.create_task(server.app.resolve_topics([req.topic], principal))
            task.add_done_callback(_Resume(self, p, req, False, prefer_async))
            return
        cdef Delivery d = self._delivery(ts, req.content, req.key, req.headers, req.priority,
                                         req.ttl, "", p)
        # After validation: a request refused as bad input spends none of the allowance.
        if server.quotas is not None and p.principal is not None and not self._within_quota(
                p, req, False, prefer_async, 1, len(d.value)):
            return  # decided on the slow path (the delivery is made again then)
        if idem is not None:
            d.idem = IdemKey(_scope(p, idem), p.idem_digest, "Idempotency-Key", 1)
        if prefer_async:
            d.owner = None
            server.enqueue(d)
            p.status = 202
            p.payload = produce_ok(server, d, 202, p.close_after,
                                   p.http10 and not p.close_after)
            p.done = True
            return
        p.single = d
        p.waiting = 1
        server.enqueue(d)

    cdef bint _within_quota(self, Pending p, object req, bint batch, bint prefer_async,
                            Py_ssize_t messages, Py_ssize_t nbytes):
        """True when the subject's local allowance covers the request; else the slow path asks
        for more (one Redis round trip per refill, not per request) and resumes or answers
        429."""
        cdef Server server = self.server
        key = p.principal.quota_key
        if p.quota_checked or server.quotas.try_take(key, messages, nbytes):
            return True
        task = server.loop.create_task(server.quotas.acquire(key, messages, nbytes))
        task.add_done_callback(_Resume(self, p, req, batch, prefer_async, True))
        return False

    cdef Delivery _delivery(self, TopicState ts, str content, object key, object headers,
                            int priority, object ttl, str where, Pending p):
        cdef Server server = self.server
        cdef bytes value = content.encode("utf-8")
        cdef bytes key_b = None
        cdef int partition
        cdef int64_t ttl_ns
        cdef int64_t ts_ms
        if len(value) > server.max_size:
            raise _errors.PayloadTooLarge(
                f"{where}content is {len(value)} bytes; the limit (MESSAGE_QUEUE_MAX_SIZE) is "
                f"{server.max_size}", field=f"{where}content")
        if key is not None:
            key_b = (<str>key).encode("utf-8")
            partition = <int>((murmur2(<const unsigned char*>PyBytes_AS_STRING(key_b),
                                       len(key_b)) & 0x7FFFFFFF) % <uint32_t>ts.partitions)
        else:
            partition = <int>(ts.next_rr % <uint64_t>ts.partitions)
            ts.next_rr += 1
        ttl_ns = duration_ns(ttl, f"{where}ttl")
        if ttl_ns < 0:
            ttl_ns = server.default_ttl_ns
        ts_ms = wall_ms()
        return Delivery.new(
            ts, partition, key_b, value,
            server.headers_encoder.encode(headers) if headers else None,
            priority, ts_ms, ts_ms + ttl_ns // 1000000 if ttl_ns > 0 else 0,
            new_message_id(ts_ms), p)

    cdef _make_idem(self, Pending p, Delivery d, str key, object ttl, str field):
        h = _blake2b(digest_size=16)
        _fingerprint(h, d, ttl)
        d.idem = IdemKey(_scope(p, key), h.digest(), field, 1)

    def _prevalidate(self, str topic, str content, object ttl, str where, str topic_field=None):
        """The checks of ``_delivery`` that need no topic, for requests that may create one."""
        reason = topic_name_error(topic)
        if reason is not None:
            field = topic_field or f"{where}topic"
            raise _errors.BadRequest(f"{reason} (got {topic!r})", field=field)
        cdef Py_ssize_t n = len(content.encode("utf-8"))
        if n > self.server.max_size:
            raise _errors.PayloadTooLarge(
                f"{where}content is {n} bytes; the limit (MESSAGE_QUEUE_MAX_SIZE) is "
                f"{self.server.max_size}", field=f"{where}content")
        duration_ns(ttl, f"{where}ttl")

    cdef _produce_batch(self, Pending p):
        cdef Server server = self.server
        body = p.body
        p.body = None
        req = decode_json(server.batch_decoder, body)
        if p.idem_key is not None:
            # a batch's header key stands for the request: its body byte for byte (the IETF
            # draft's fingerprint), one digest, not one per message
            p.idem_digest = _blake2b(body, digest_size=16).digest()
        n = len(req.messages)
        if n == 0:
            raise _errors.BadRequest("messages must not be empty", field="messages")
        if n > server.max_batch_messages:
            raise _errors.BadRequest(
                f"batch has {n} messages; at most {server.max_batch_messages} are allowed "
                "(MESSAGE_QUEUE_MAX_BATCH)", field="messages")
        if server.inflight + n > server.max_inflight:
            raise _errors.Unavailable("too many messages in flight; retry shortly")
        self._enqueue_batch(p, req, p.prefer_async, True)

    def _enqueue_batch(self, Pending p, object req, bint prefer_async, bint may_resolve):
        cdef Server server = self.server
        cdef str hkey = None
        if p.idem_key is not None:
            hkey = _idempotency_header(p.idem_key)
        cdef list deliveries = []
        cdef TopicState ts
        cdef Delivery d
        cdef Py_ssize_t i
        default_topic = req.topic
        missing = None
        principal = p.principal
        allowed = None  # the last topic checked: a batch is mostly one topic
        for i, m in enumerate(req.messages):
            topic = m.topic if m.topic is not None else default_topic
            if topic is None:
                raise _errors.BadRequest(
                    f"messages[{i}].topic is missing and the batch has no default topic",
                    field=f"messages[{i}].topic")
            if principal is not None and topic != allowed:
                principal.require("produce", topic)
                allowed = topic
            if server.topic_state(topic) is None:
                if missing is None:
                    missing = []
                if topic not in missing:
                    missing.append(topic)
        if missing is not None and may_resolve:
            # Validate everything before any topic is created: a rejected batch leaves no trace.
            for i, m in enumerate(req.messages):
                topic = m.topic if m.topic is not None else default_topic
                where = f"messages[{i}]."
                self._prevalidate(topic, m.content, m.ttl, where,
                                  where + "topic" if m.topic is not None else "topic")
        if missing is not None:
            if not may_resolve:
                raise _errors.UnknownTopic(f"unknown topic {missing[0]!r}", field="topic")
            task = server.loop.create_task(server.app.resolve_topics(missing, principal))
            task.add_done_callback(_Resume(self, p, req, True, prefer_async))
            return
        # Build every delivery before enqueuing any: a bad message rejects the whole batch and
        # nothing of it is written (nor any of the subject's allowance spent).
        cdef Py_ssize_t nbytes = 0
        cdef bint keyed = False
        cdef list group = None  # the messages the header keys, as one
        for i, m in enumerate(req.messages):
            topic = m.topic if m.topic is not None else default_topic
            ts = server.topic_state(topic)
            d = self._delivery(ts, m.content, m.key, m.headers, m.priority, m.ttl,
                               f"messages[{i}].", None if prefer_async else p)
            nbytes += len(d.value)
            deliveries.append(d)
            mkey = m.idempotency_key
            if mkey is not None:
                self._make_idem(p, d, mkey, m.ttl, f"messages[{i}].idempotency_key")
                keyed = True
            elif hkey is not None:
                if group is None:
                    group = []
                group.append(d)
        if group is not None:
            # one key for the batch's messages without their own: a retry answers them all
            # as the first time, another batch under the key is refused whole
            k = IdemKey(_scope(p, hkey), p.idem_digest, "Idempotency-Key", len(group))
            for d in group:
                d.idem = k
            keyed = True
        if keyed and prefer_async:
            prefer_async = False  # answered with the outcome: a retry gets the same answer
            for d in deliveries:
                d.owner = p
        if server.quotas is not None and p.principal is not None and not self._within_quota(
                p, req, True, prefer_async, len(deliveries), nbytes):
            return  # decided on the slow path (the deliveries are made again then)
        cdef Py_ssize_t failed = 0
        if prefer_async:
            for d in deliveries:
                server.enqueue(d)
            self._respond_now(p, 202, results_json(deliveries, False, &failed), None)
            return
        p.deliveries = deliveries
        p.waiting = len(deliveries)
        if keyed:
            server.enqueue_all(deliveries)
            return
        for d in deliveries:
            server.enqueue(d)

    # ---- completion and writing -----------------------------------------------------------

    cdef _complete(self, Pending p):
        """All of ``p``'s deliveries are settled: build its answer and write what is ready."""
        cdef Delivery d
        cdef Py_ssize_t failed = 0
        if p.single is not None:
            d = p.single
            p.single = None
            d.owner = None
            if d.error is None:
                p.status = 200
                p.payload = produce_ok(self.server, d, 200, p.close_after,
                                       p.http10 and not p.close_after)
                p.done = True
            else:
                self._fail(p, d.error)
        else:
            for d in p.deliveries:
                d.owner = None
            body = results_json(p.deliveries, True, &failed)
            if failed == len(p.deliveries):
                d = p.deliveries[0]
                if all(isinstance(x.error, _MqfastError) and x.error.status < 500
                       for x in p.deliveries):
                    self._fail(p, d.error)  # refused, not unavailable (a reused key)
                else:
                    self._fail(p, _errors.Unavailable(
                        f"no message of the batch was stored: {d.error}"))
            else:
                self._respond_now(p, 200, body, None)
            p.deliveries = None
        if self.state != ST_CLOSED:
            self._write_ready()

    cdef _write_ready(self):
        cdef Pending p
        cdef Server server = self.server
        cdef bytes first = None
        cdef list chunks = None  # only with pipelining: most writes carry one answer
        cdef bint close = False
        cdef bint again = True
        cdef Py_ssize_t i
        pending = self.pending
        while again and not close:
            while pending:
                p = pending[0]
                if not p.done:
                    break
                pending.popleft()
                server.record(p.route, p.status, p.t0_ns)
                if first is None:
                    first = p.payload
                elif chunks is None:
                    chunks = [first, p.payload]
                else:
                    chunks.append(p.payload)
                p.payload = None
                p.conn = None
                if p.close_after:
                    close = True
                    break
            # requests that waited for an earlier answer may run now
            again = False
            if not close and self.transport is not None and pending:
                i = 0
                while i < len(pending):
                    p = pending[i]
                    if not p.started and self._may_start(p):
                        self._start(p)
                        again = True
                    i += 1
                again = again and pending and (<Pending>pending[0]).done
        if first is None or self.transport is None:
            return
        self.transport.write(first if chunks is None else b"".join(chunks))
        if close:
            for p in pending:
                p.conn = None
            pending.clear()
            if self.stream is not None:
                self._begin_stream()
                return
            self._linger()
            return
        if not pending:
            self.state_since_ns = now_ns()
        if self.reading_paused:
            self._maybe_resume_reading()

    # ---- timeouts and shutdown ------------------------------------------------------------

    cdef _linger(self):
        """Close after the answer: shut down writing once it is flushed, then discard input until
        the client closes, LINGER_BYTES arrived or LINGER_SECONDS passed (the sweeper)."""
        cdef object transport = self.transport
        self.closing = True
        if not transport.can_write_eof():  # TLS: close_notify instead
            self.state = ST_CLOSED
            transport.close()
            return
        self.state = ST_LINGER
        self.state_since_ns = now_ns()
        self.body_len = 0  # counts the discarded bytes now
        transport.write_eof()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def _check_timeout(self, int64_t now):
        if self.transport is None:
            return
        if self.state == ST_HEADERS or self.state == ST_BODY:
            # One deadline for the head, then one for the whole body: a trickle does not
            # extend either (slowloris).
            if now - self.state_since_ns > self.server.header_timeout_ns:
                body = _errors.RequestTimeout(
                    "request not received in time; closing the connection").to_body()
                self.transport.write(http_response(self.server, 408, body, True, None, False))
                self._linger()
        elif self.state == ST_LINGER:
            if now - self.state_since_ns > LINGER_SECONDS * 1000000000:
                self.transport.close()
        elif self.state == ST_IDLE and not self.pending:
            if now - self.state_since_ns > self.server.idle_timeout_ns:
                self.transport.close()

    def _shutdown(self):
        cdef Pending last
        if self.transport is None:
            return
        if self.stream is not None and self.state == ST_STREAM:
            self.stream.shutdown()  # it releases its leases, then ends the answer
            return
        if self.state == ST_LINGER or self.state == ST_IDLE and not self.pending:
            self.transport.close()
        elif self.pending:
            last = self.pending[len(self.pending) - 1]  # wraparound is off in the core
            last.close_after = True
