# The per-message loops of the embedded engine's consumer groups (sinks/embedded_groups.py):
# a lease answers up to 1,000 messages and a batch acknowledgement settles as many, and in
# Python these loops were most of the store thread's time per message. The decisions (what to
# lease, how a run splits) stay in embedded_groups.py; these only walk rows and items.

from mqfast.messages import LeasedMessage as _LeasedMessage

cdef object _headers_json = msgspec.json.Decoder(dict[str, str])
cdef enum:
    _LEASED = 1  # embedded_groups.LEASED
    _DONE = 3  # embedded_groups.DONE


def offset_ranges(list offsets, Py_ssize_t gap):
    """Ascending ``offsets`` as ``(first, last)`` ranges, joining gaps of at most ``gap``."""
    cdef list out = []
    cdef Py_ssize_t n = len(offsets), i
    if n == 0:
        return out
    cdef int64_t lo = offsets[0], hi = lo, off
    for i in range(1, n):
        off = offsets[i]
        if off - hi <= gap:
            hi = off
        else:
            out.append((lo, hi))
            lo = hi = off
    out.append((lo, hi))
    return out


def lease_rows(
    list rows,
    dict by_partition,
    str topic,
    str consumer,
    object deadline,
    object now,
    dict where,
    list messages,
    dict fresh,
    set retried,
    object opener,
    object open_error,
    list failed,
):
    """Answer the message rows read for a lease (``EmbeddedGroups._deliver``).

    ``rows`` are ``(partition, offset, id, key, value, headers, timestamp, expires)``;
    ``by_partition[p][offset]`` is ``(delivery count so far, level, retry run or None)`` for
    the offsets picked (a row not in it was read with a range and is skipped). Each message
    answered goes to ``messages`` and ``where``; a never-leased one to ``fresh[(p, level)]`` as
    ``(offset, id)``, a retry's new state into its run's changes. ``opener(key, id, value,
    headers)`` decrypts (None: not encrypted); a message it refuses with ``open_error`` is not
    answered but appended to ``failed`` as ``(partition, offset, count, level, run, id,
    reason)``. Returns how many picked offsets had a row.
    """
    cdef Py_ssize_t seen = 0
    cdef dict chosen = None
    cdef object last_p = None
    cdef object pick, h, key, value, headers, p, off, mid, run, count, pri
    cdef tuple row, t
    cdef list offs
    for row in rows:
        p = row[0]
        if p is not last_p and p != last_p:
            chosen = <dict>by_partition[p]
            last_p = p
        off = row[1]
        pick = chosen.get(off)
        if pick is None:  # within the range read, not picked (another level)
            continue
        seen += 1
        t = <tuple>pick
        count, pri, run = t[0], t[1], t[2]
        mid = row[2]
        key = row[3]
        value = row[4]
        headers = row[5]
        h = _headers_json.decode(headers) if headers else {}
        if opener is not None:
            try:
                value = opener(key, mid, value, h)
            except open_error as e:
                failed.append((p, off, count, pri, run, mid, str(e)))
                continue
        if run is not None:
            run.changes[off] = (_LEASED, consumer, deadline, now, count + 1, None, 0, 0)
            retried.add(pri)
        else:
            k = (p, pri)
            offs = fresh.get(k)
            if offs is None:
                offs = fresh[k] = []
            offs.append((off, mid))
        where[mid] = (topic, p, off)
        messages.append(
            _LeasedMessage(
                mid,
                topic,
                p,
                off,
                (<bytes>key).decode("utf-8", "replace") if key is not None else None,
                (<bytes>value).decode("utf-8", "replace"),
                h,
                pri,
                row[6],
                count + 1,
                deadline,
                row[7],
            )
        )
    return seen


def settle_hints(list items, dict where, object topic):
    """Where this process leased the messages of ``items``: ``{id: (topic, partition,
    offset)}``, for those in ``topic`` (None: any)."""
    cdef dict hints = {}
    cdef object mid, hint
    for item in items:
        mid = item.message_id
        hint = where.get(mid)
        if hint is not None and (topic is None or (<tuple>hint)[0] == topic):
            hints[mid] = hint
    return hints


cdef object _run_at(dict runs, object t, object p, object off):
    for r in runs.get((t, p), ()):
        if r.first <= off <= r.last:
            return r
    return None


def settle_places(list items, dict hints, dict runs, dict place, list misses):
    """``place[id] = (run, offset)`` for the items whose hint lands in a run of ``runs``
    (per partition) that holds the id; the ids of the others go to ``misses``."""
    cdef object run = None, mid, hint, t, p, off
    for item in items:
        mid = item.message_id
        if mid in place:
            continue
        hint = hints.get(mid)
        if hint is None:
            misses.append(mid)
            continue
        t, p, off = <tuple>hint
        # the run of the item before: a batch is mostly a few runs
        if run is None or not (run.first <= off <= run.last and run.partition == p
                               and run.topic == t):
            run = _run_at(runs, t, p, off)
        if run is not None and run.id_lo <= mid <= run.id_hi:
            place[mid] = (run, off)
        else:
            misses.append(mid)


def settle_acks(
    list items,
    Py_ssize_t start,
    dict place,
    object consumer,
    object now,
    object authorize,
    dict shared,
    list results,
    object make_result,
):
    """Settle ``items[start:]`` while each is the common case: an acknowledgement, allowed
    by ``authorize``, of a live lease held by ``consumer`` (if named). Returns the index of the
    first item left to the caller (``len(items)``: none), so that items apply in order.

    ``shared[id(attributes)]`` holds ``(attributes, attributes once acknowledged)``: the
    offsets of a run acknowledged together share one tuple, so the run stays one row.
    """
    cdef Py_ssize_t i, n = len(items)
    cdef tuple a, seen, at
    cdef object run, off, t, mid, changes
    for i in range(start, n):
        item = items[i]
        mid = item.message_id
        at = place.get(mid)
        if at is None or item.action != "ack":
            return i
        run, off = at
        changes = run.changes
        a = changes.get(off, run.attrs)
        if not (a[0] == _LEASED and a[2] > now and (consumer is None or a[1] == consumer)):
            return i
        t = run.topic
        if authorize is not None and authorize(t) is not None:
            return i
        seen = shared.get(id(a))
        if seen is None:
            seen = shared[id(a)] = (a, (_DONE, None, now, a[3], a[4], None, 0, now))
        changes[off] = seen[1]
        results.append(make_result(mid, "acknowledged", t, a[4], float(max(0, now - a[3]))))
    return n
