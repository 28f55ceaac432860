# Small C helpers of the hot path: clocks, message ids, the key partitioner, name checks.

cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int64_t wall_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


# UUIDv7 (RFC 9562): 48-bit unix milliseconds, then 74 bits that must make ids unique and, within
# one process, increasing. A per-process random part (re-drawn after fork, see reseed_ids) and a
# counter give that without a syscall per id.
cdef uint64_t _id_random = 0
cdef uint64_t _id_counter = 0
cdef char* _HEX = b"0123456789abcdef"


def reseed_ids() -> None:
    """Draw a new random part for message ids; each worker process calls it after fork."""
    global _id_random, _id_counter
    _id_random = int.from_bytes(os.urandom(8), "little")
    _id_counter = int.from_bytes(os.urandom(4), "little")


reseed_ids()


cdef inline void _hex_into(char* out, uint64_t v, int nibbles) noexcept nogil:
    cdef int i
    for i in range(nibbles - 1, -1, -1):
        out[i] = _HEX[v & 0xF]
        v >>= 4


cdef str new_message_id(int64_t ms):
    global _id_counter
    cdef char buf[36]
    cdef uint64_t counter
    _id_counter += 1
    counter = _id_counter & 0xFFFFFFFF
    cdef uint64_t rand_a = (_id_random >> 52) & 0xFFF
    # variant 10, then 30 random bits, then the 32-bit counter
    cdef uint64_t rand_b = (<uint64_t>0x2 << 62) | ((_id_random & 0x3FFFFFFF) << 32) | counter
    _hex_into(buf, (<uint64_t>ms >> 16) & 0xFFFFFFFF, 8)
    buf[8] = b'-'
    _hex_into(buf + 9, <uint64_t>ms & 0xFFFF, 4)
    buf[13] = b'-'
    _hex_into(buf + 14, 0x7000 | rand_a, 4)
    buf[18] = b'-'
    _hex_into(buf + 19, rand_b >> 48, 4)
    buf[23] = b'-'
    _hex_into(buf + 24, rand_b & 0xFFFFFFFFFFFF, 12)
    return PyUnicode_DecodeASCII(buf, 36, NULL)


def message_id_at(int64_t ms) -> str:
    """A new message id for unix time ``ms`` (for tests and tools)."""
    return new_message_id(ms)


cdef inline uint32_t murmur2(const unsigned char* data, Py_ssize_t length) noexcept nogil:
    # Kafka's Java partitioner hash, so that a key lands in the same partition as it would
    # from a Java producer on the same topic.
    cdef uint32_t seed = 0x9747b28c
    cdef uint32_t m = 0x5bd1e995
    cdef int r = 24
    cdef uint32_t h = seed ^ <uint32_t>length
    cdef Py_ssize_t length4 = length // 4
    cdef Py_ssize_t i
    cdef uint32_t k
    for i in range(length4):
        k = (<uint32_t>data[i * 4] | (<uint32_t>data[i * 4 + 1] << 8)
             | (<uint32_t>data[i * 4 + 2] << 16) | (<uint32_t>data[i * 4 + 3] << 24))
        k *= m
        k ^= k >> r
        k *= m
        h *= m
        h ^= k
    cdef Py_ssize_t rest = length & 3
    cdef Py_ssize_t base = length & ~3
    if rest == 3:
        h ^= (<uint32_t>data[base + 2]) << 16
    if rest >= 2:
        h ^= (<uint32_t>data[base + 1]) << 8
    if rest >= 1:
        h ^= <uint32_t>data[base]
        h *= m
    h ^= h >> 13
    h *= m
    h ^= h >> 15
    return h


def partition_for_key(bytes key, int partitions) -> int:
    """The partition a key maps to (Kafka's murmur2 partitioner)."""
    return <int>((murmur2(<const unsigned char*>PyBytes_AS_STRING(key), len(key)) & 0x7FFFFFFF)
                 % <uint32_t>partitions)


cpdef str topic_name_error(str name):
    """None when ``name`` is a valid topic name (Kafka's rules), else the reason."""
    cdef Py_UCS4 c
    if len(name) == 0:
        return "topic name must not be empty"
    if len(name) > 249:
        return "topic name is longer than 249 characters"
    if name == "." or name == "..":
        return "topic name must not be '.' or '..'"
    for c in name:
        if not (
            (c >= u'a' and c <= u'z') or (c >= u'A' and c <= u'Z') or (c >= u'0' and c <= u'9')
            or c == u'.' or c == u'_' or c == u'-'
        ):
            return "topic name may contain only ASCII letters, digits, '.', '_' and '-'"
    return None


cdef int64_t duration_ns(object value, str field) except -2:
    """Integer nanoseconds from an int, a digit string or a Go-style string; -1 for None."""
    cdef int64_t ns
    if value is None:
        return -1
    if type(value) is int:
        if value < 0:
            raise _errors.BadRequest(f"{field}: must not be negative", field=field)
        if value > 315360000000000000:
            raise _errors.BadRequest(
                f"{field}: {value} ns is longer than ten years; durations are nanoseconds",
                field=field)
        return value
    try:
        return _parse_duration(value, field)
    except ValueError as e:
        raise _errors.BadRequest(str(e), field=field) from None


cdef list _DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
cdef list _MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                     "Dec"]


cdef bytes http_date():
    t = time.gmtime()
    return (
        f"date: {_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT\r\n"
    ).encode()
