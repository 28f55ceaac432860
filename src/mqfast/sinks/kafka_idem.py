"""Idempotency keys of the Kafka engine, in Redis where every replica sees them.

One Redis string per key (topic, subject and the client's key, hashed into the name), with a
TTL of the idempotency window, so memory is bounded by the keys produced within one window
(about 200 bytes each). Its value is one of

- ``P|fingerprint|partition|message_id|timestamp|deadline``: a replica is producing the
  message (pending) and will know its outcome by ``deadline`` (librdkafka reports every
  message within ``message.timeout.ms``);
- ``D|fingerprint|partition|offset|message_id|timestamp``: the message is stored (done).

A produce claims its key in one script call (``claim``: set pending if absent, else return
what is there). A retry that finds a pending key waits for it to become done; one that finds a
pending key past its deadline (the producing replica died, or the outcome came back unknown)
takes it over and looks for the message in Kafka itself, by its id, from its timestamp on: if
it is there the key becomes done with its position, else the retry produces it. A client that
retries every unknown outcome with its key therefore ends with exactly one copy.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Final

from mqfast import errors
from mqfast.messages import IdemKey
from mqfast.sinks import Delivery

PREFIX: Final = "mqfast:idem:"
# How long past librdkafka's message.timeout.ms a pending key is trusted: a request already on
# the wire when its producer died may still be appended by the broker meanwhile.
PENDING_GRACE_MS: Final = 5_000
# After an unknown outcome the owner shortens its key's deadline to this, so a retry resolves
# it soon (by looking in Kafka) instead of waiting for the full deadline.
UNKNOWN_GRACE_MS: Final = 2_000

# KEYS: the keys; ARGV: ttl ms, then one pending value per key. Returns, per key, "" when it
# was absent (now pending: produce it) or the value found.
CLAIM: Final = """
local out = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v then
    out[i] = v
  else
    redis.call('SET', k, ARGV[i + 1], 'PX', ARGV[1])
    out[i] = ''
  end
end
return out
"""
# KEYS[1]; ARGV: expected value, new value ('' deletes), ttl ms. 1 when swapped.
SWAP: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""


def redis_names(batch: list[Delivery]) -> list[tuple[Delivery, str]]:
    """The keyed deliveries of ``batch`` with the Redis name of each one's key (scoped by
    topic and subject; the i-th message under a batch's header key is ``<key>#i``)."""
    out: list[tuple[Delivery, str]] = []
    seen: dict[int, int] = {}
    for d in batch:
        idem = d.idem
        if idem is None:
            continue
        name = f"{d.topic}\x00{idem.scope}"
        if idem.count > 1:
            i = seen.get(id(idem), 0)
            seen[id(idem)] = i + 1
            name = f"{name}#{i}"
        out.append((d, PREFIX + hashlib.blake2b(name.encode(), digest_size=20).hexdigest()))
    return out


def pending_value(d: Delivery, deadline_ms: int) -> str:
    idem = d.idem
    assert idem is not None
    return f"P|{idem.fingerprint.hex()}|{d.partition}|{d.message_id}|{d.timestamp_ms}|{deadline_ms}"


def done_value(fingerprint: bytes, partition: int, offset: int, mid: str, ts: int) -> str:
    return f"D|{fingerprint.hex()}|{partition}|{offset}|{mid}|{ts}"


class Found:
    """A key's value as read back."""

    __slots__ = (
        "deadline_ms",
        "done",
        "fingerprint",
        "message_id",
        "offset",
        "partition",
        "raw",
        "timestamp_ms",
    )

    def __init__(self, raw: str) -> None:
        parts = raw.split("|")
        self.raw = raw
        self.done = parts[0] == "D"
        self.fingerprint = bytes.fromhex(parts[1])
        self.partition = int(parts[2])
        if self.done:
            self.offset = int(parts[3])
            self.message_id = parts[4]
            self.timestamp_ms = int(parts[5])
            self.deadline_ms = 0
        else:
            self.offset = -1
            self.message_id = parts[3]
            self.timestamp_ms = int(parts[4])
            self.deadline_ms = int(parts[5])

    def matches(self, idem: IdemKey) -> bool:
        return self.fingerprint == idem.fingerprint

    def replay(self, d: Delivery) -> None:
        """Answer ``d`` with the stored original."""
        d.partition = self.partition
        d.offset = self.offset
        d.message_id = self.message_id
        d.timestamp_ms = self.timestamp_ms
        d.replayed = True


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def redis_unavailable(e: BaseException) -> errors.Unavailable:
    return errors.Unavailable(
        f"redis (idempotency keys) unavailable: {e}; nothing was written, retry later"
    )


def decode(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
