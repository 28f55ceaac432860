"""Encryption at rest: envelope encryption of message content with AES-256-GCM.

Three layers of keys, as in the AWS Encryption SDK's envelope model:

* **Master keys** come from the configuration (``MESSAGE_QUEUE_MASTER_KEYS``, its ``_FILE``
  variant, or ``MESSAGE_QUEUE_MASTER_KEY_FILE``) and never leave this process. They only wrap
  data keys. One of them is *active*: new data keys are wrapped with it; the others stay to unwrap
  data keys wrapped earlier, which is what makes rotation possible without downtime.
* **Data keys** are random 256-bit keys, one per topic and process start, replaced after
  ``rotate_after`` messages. Each is wrapped (AES-256-GCM under the master key) and put in a
  :class:`WrappedKeyStore` under a random *data key id*; the engine's metadata store persists them.
* **Messages** are encrypted with their topic's data key. The record carries the ciphertext and a
  short header ``mqfast-enc: v1:<master key id>:<data key id>``: never the wrapped key itself, so
  the overhead per message is 28 bytes of ciphertext plus a header of a few dozen bytes.

The associated data binds each ciphertext to its topic, record key and message id, so a message
cannot be replayed under another id or moved to another topic or key: decrypting it there fails
as ``tampered``. Every failure to decrypt is a :class:`DecryptError` with a machine-readable
``reason``; the engine dead-letters the message with it and goes on.

Nonces are 12 bytes from ``os.urandom`` per message rather than a counter: measured, the random
nonce costs about 0.2 µs more per message, and it buys safety that a counter does not have: no
state to share between threads, nothing to duplicate when a process forks with a live data key,
and no reliance on a data key being used by one process only. With random 96-bit nonces the
chance of any repeat under one data key after ``n`` messages is about ``n**2 / 2**97``; the
default ``rotate_after`` of ``2**24`` keeps it below ``2**-49`` (NIST SP 800-38D asks for at
most ``2**-32``, reached at ``2**32`` messages).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mqfast import errors

if TYPE_CHECKING:
    from mqfast.config import Settings

__all__ = [
    "HEADER",
    "AsyncWrappedKeyStore",
    "DecryptError",
    "DecryptReason",
    "Encryptor",
    "Keyring",
    "MemoryKeyStore",
    "PreparedOnly",
    "WrappedKeyStore",
    "bound_to",
    "open_message",
]

log = logging.getLogger("mqfast.crypto")

HEADER: Final = "mqfast-enc"
"""Record header naming the keys of an encrypted message: ``v1:<master key id>:<data key id>``."""
DLQ_TOPIC_HEADER: Final = "x-mqfast-dlq-topic"
DLQ_ID_HEADER: Final = "x-mqfast-dlq-message-id"
# Set on a dead-letter copy of an encrypted message that cannot be decrypted here: its content
# is then the stored ciphertext in base64 and ``mqfast-enc`` is left in, for an operator to
# recover it with the right key.
DLQ_ENCODING_HEADER: Final = "x-mqfast-dlq-content-encoding"
# Set on a redriven encrypted message: the topic and message id its ciphertext is bound to
# (redrive gives it a new id). Internal like mqfast-enc: removed before a client sees it.
ENC_TOPIC_HEADER: Final = "mqfast-enc-topic"
ENC_ID_HEADER: Final = "mqfast-enc-id"


KEY_BYTES: Final = 32  # AES-256
NONCE_BYTES: Final = 12  # the GCM nonce size that needs no extra GHASH pass
TAG_BYTES: Final = 16
OVERHEAD: Final = NONCE_BYTES + TAG_BYTES
"""Bytes a ciphertext is longer than its plaintext."""

_VERSION: Final = "v1"
_WRAP_FORMAT: Final = b"\x01"  # first byte of a wrapped data key: AES-256-GCM, random nonce
_WRAP_BYTES: Final = 1 + NONCE_BYTES + KEY_BYTES + TAG_BYTES
# A data key id: 12 random bytes in unpadded urlsafe base64. 96 bits make a collision between
# replicas creating keys at the same time negligible, and keep the header short.
_DATA_KEY_ID_BYTES: Final = 12
_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Unwrapped data keys kept in memory. A consumer reading old messages may meet many data keys
# (topics x restarts x rotations); past this many the oldest cached ones are dropped and unwrapped
# again on their next use.
_CACHE_MAX: Final = 4096

_VAR_KEYS: Final = "MESSAGE_QUEUE_MASTER_KEYS"
_VAR_FILE: Final = "MESSAGE_QUEUE_MASTER_KEY_FILE"
_VAR_ID: Final = "MESSAGE_QUEUE_MASTER_KEY_ID"

DecryptReason = Literal["tampered", "unknown_key", "malformed"]


class DecryptError(errors.MqfastError):
    """A message cannot be decrypted; the engine dead-letters it, the client never sees a 500.

    ``reason`` is one of ``"tampered"`` (authentication failed: the ciphertext, its topic, key or
    message id, or the wrapped data key was altered), ``"unknown_key"`` (the master or data key is
    not known here) or ``"malformed"`` (the header or the ciphertext does not have the expected
    shape). ``str(error)`` is the dead-letter reason, ``"decrypt_failed: <reason>"``; ``detail``
    says more for the logs and never holds key material.
    """

    reason: DecryptReason

    def __init__(self, reason: DecryptReason, detail: str = "") -> None:
        super().__init__(f"decrypt_failed: {reason}")
        self.reason = reason
        self.detail = detail


class WrappedKeyStore(Protocol):
    """Where wrapped data keys live, by data key id.

    ``put`` must be durable (and visible to every replica) before a message encrypted under that
    data key is acknowledged: :meth:`Encryptor.encrypt` calls it when it makes a data key, before
    it returns the first ciphertext under it. ``put`` of an existing id replaces the row (rewrap).
    """

    def put(self, data_key_id: str, master_key_id: str, wrapped: bytes) -> None:
        """Store (or replace) the wrapped data key ``data_key_id``."""
        ...

    def get(self, data_key_id: str) -> tuple[str, bytes] | None:
        """``(master key id, wrapped key)`` of ``data_key_id``, or ``None`` if unknown."""
        ...

    def items(self) -> list[tuple[str, str, bytes]]:
        """Every stored ``(data key id, master key id, wrapped key)``."""
        ...


class AsyncWrappedKeyStore(Protocol):
    """A :class:`WrappedKeyStore` reached asynchronously (the Kafka engine's PostgreSQL).

    Used through :meth:`Encryptor.prepare` and :meth:`Encryptor.load`, which do the I/O before
    the synchronous ``encrypt``/``decrypt`` need the key. Both raise ``Unavailable`` when the
    store cannot be reached; ``put_data_key`` is durable when it returns.
    """

    async def put_data_key(self, data_key_id: str, master_key_id: str, wrapped: bytes) -> None:
        """Store (or replace) the wrapped data key ``data_key_id``."""
        ...

    async def get_data_key(self, data_key_id: str) -> tuple[str, bytes] | None:
        """``(master key id, wrapped key)`` of ``data_key_id``, or ``None`` if unknown."""
        ...


class PreparedOnly:
    """The synchronous store of an :class:`Encryptor` whose keys come from an
    :class:`AsyncWrappedKeyStore`: every key must be made ready by ``prepare``/``load`` first.

    Reaching it is a bug in the engine (a key used before it was prepared); failing loudly is
    better than a data key kept only in memory, which would make messages unreadable later.
    """

    def put(self, data_key_id: str, master_key_id: str, wrapped: bytes) -> None:
        """Refuse: a data key made without ``Encryptor.prepare`` would not be persisted."""
        raise RuntimeError("data key made without Encryptor.prepare(): not persisted")

    def get(self, data_key_id: str) -> tuple[str, bytes] | None:
        """Refuse: ``Encryptor.load`` reads keys from the asynchronous store."""
        raise RuntimeError("data key looked up without Encryptor.load()")

    def items(self) -> list[tuple[str, str, bytes]]:
        """Nothing: the keys are in the asynchronous store."""
        return []


class MemoryKeyStore:
    """A :class:`WrappedKeyStore` in a dict: for tests and a single process without persistence."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[str, bytes]] = {}

    def put(self, data_key_id: str, master_key_id: str, wrapped: bytes) -> None:
        """Store (or replace) the wrapped data key ``data_key_id``."""
        self._rows[data_key_id] = (master_key_id, bytes(wrapped))

    def get(self, data_key_id: str) -> tuple[str, bytes] | None:
        """``(master key id, wrapped key)`` of ``data_key_id``, or ``None`` if unknown."""
        return self._rows.get(data_key_id)

    def items(self) -> list[tuple[str, str, bytes]]:
        """Every stored ``(data key id, master key id, wrapped key)``."""
        return [(dk, mk, w) for dk, (mk, w) in self._rows.items()]

    def __len__(self) -> int:
        return len(self._rows)


def _b64_key(text: str) -> bytes:
    """Standard or urlsafe base64, padded or not; ``ValueError`` otherwise."""
    s = text.strip().translate(_URLSAFE_TO_STD)
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


_URLSAFE_TO_STD: Final = str.maketrans("-_", "+/")


def _wrap_aad(data_key_id: str, master_key_id: str) -> bytes:
    # Binds a wrapped data key to its name and to the master key that wraps it, so a row of the
    # store copied under another id does not unwrap (RFC 3394 key wrap has no associated data).
    dk = data_key_id.encode()
    mk = master_key_id.encode()
    return b"".join((b"mqfast-dk-v1", _u32(len(dk)), dk, _u32(len(mk)), mk))


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _field(value: str) -> bytes:
    # surrogatepass: any str encodes (injectively), so building the associated data never raises.
    b = value.encode("utf-8", "surrogatepass")
    return len(b).to_bytes(4, "big") + b


def _aad(topic_field: bytes, key: bytes | None, message_id: str) -> bytes:
    """The associated data: topic, record key and message id, each with a 4-byte length first.

    The length prefixes make the encoding injective: no two different triples give the same bytes
    (``("a", b"bc", ...)`` and ``("ab", b"c", ...)`` differ). No key and an empty key are the same.
    """
    k = key or b""
    m = message_id.encode("utf-8", "surrogatepass")
    return b"".join((topic_field, len(k).to_bytes(4, "big"), k, len(m).to_bytes(4, "big"), m))


class Keyring:
    """The master keys, by id, and which one is active (wraps new data keys).

    Build it with :meth:`from_settings`; the constructor takes raw keys (tests, tools).
    ``repr`` shows ids only: key material never appears in logs or error messages.
    """

    __slots__ = ("_aeads", "_ids", "active_id")

    active_id: str

    def __init__(self, keys: Mapping[str, bytes], active_id: str | None = None) -> None:
        """``keys``: id to 32-byte key, in the order listed; ``active_id``: default the last."""
        if not keys:
            raise ValueError("a keyring needs at least one master key")
        for key_id, key in keys.items():
            if not _ID_RE.fullmatch(key_id):
                raise ValueError(f"master key id {key_id!r}: expected 1-64 of A-Z a-z 0-9 . _ -")
            if len(key) != KEY_BYTES:
                raise ValueError(f"master key {key_id!r}: {len(key)} bytes, expected {KEY_BYTES}")
        self._ids = list(keys)
        self._aeads = {key_id: AESGCM(bytes(key)) for key_id, key in keys.items()}
        active = self._ids[-1] if active_id is None else active_id
        if active not in self._aeads:
            raise ValueError(f"active master key id {active!r} is not among {self._ids}")
        self.active_id = active

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring | None:
        """The keyring configured in ``settings``, or ``None`` when no master key is configured.

        Keys come from ``settings.master_keys`` (``MESSAGE_QUEUE_MASTER_KEYS``: ``id:base64key``
        entries separated by commas or newlines) and then from the lines of
        ``settings.master_key_file`` (``MESSAGE_QUEUE_MASTER_KEY_FILE``: one ``id:base64key`` a
        line, ``#`` comments and blank lines ignored). Each key is 32 bytes in standard or urlsafe
        base64. The active key is ``settings.master_key_id`` (``MESSAGE_QUEUE_MASTER_KEY_ID``),
        default the last one listed. Raises :class:`~mqfast.errors.ConfigError` naming the
        variable on a bad id, bad base64, wrong length, duplicate id or unknown active id.
        """
        keys: dict[str, bytes] = {}
        entries = settings.master_keys.replace("\n", ",").split(",")
        _parse_entries(keys, ((None, e) for e in entries), _VAR_KEYS)
        path = settings.master_key_file.strip()
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise errors.ConfigError(f"{_VAR_FILE}={path!r}: cannot read it ({why})") from None
            _parse_entries(
                keys,
                ((n, line.split("#", 1)[0]) for n, line in enumerate(lines, 1)),
                f"{_VAR_FILE}={path!r}",
            )
        active = settings.master_key_id.strip()
        if not keys:
            if active:
                raise errors.ConfigError(
                    f"{_VAR_ID}={active!r}: no master key is configured "
                    f"(set {_VAR_KEYS} or {_VAR_FILE})"
                )
            return None
        if active and active not in keys:
            raise errors.ConfigError(
                f"{_VAR_ID}={active!r}: not among the master keys ({', '.join(keys)})"
            )
        return cls(keys, active or None)

    def ids(self) -> list[str]:
        """The master key ids, in the order listed."""
        return list(self._ids)

    def __contains__(self, master_key_id: object) -> bool:
        return master_key_id in self._aeads

    def __repr__(self) -> str:
        return f"Keyring(ids={self._ids!r}, active_id={self.active_id!r})"

    def wrap(self, data_key_id: str, data_key: bytes) -> tuple[str, bytes]:
        """Wrap ``data_key`` under the active master key: ``(master key id, wrapped)``."""
        nonce = os.urandom(NONCE_BYTES)
        aead = self._aeads[self.active_id]
        ct = aead.encrypt(nonce, data_key, _wrap_aad(data_key_id, self.active_id))
        return self.active_id, _WRAP_FORMAT + nonce + ct

    def unwrap(self, data_key_id: str, master_key_id: str, wrapped: bytes) -> bytes:
        """The data key ``data_key_id`` wrapped under ``master_key_id``; raises DecryptError."""
        aead = self._aeads.get(master_key_id)
        if aead is None:
            raise DecryptError(
                "unknown_key",
                f"data key {data_key_id!r} is wrapped by master key {master_key_id!r}, "
                "which is not configured",
            )
        if len(wrapped) != _WRAP_BYTES or wrapped[:1] != _WRAP_FORMAT:
            raise DecryptError("malformed", f"wrapped data key {data_key_id!r} has a bad shape")
        nonce = wrapped[1 : 1 + NONCE_BYTES]
        try:
            return aead.decrypt(
                nonce, wrapped[1 + NONCE_BYTES :], _wrap_aad(data_key_id, master_key_id)
            )
        except InvalidTag:
            raise DecryptError(
                "tampered",
                f"wrapped data key {data_key_id!r} does not authenticate under master key "
                f"{master_key_id!r} (altered, or another key under the same id)",
            ) from None


def _parse_entries(
    keys: dict[str, bytes], entries: Iterable[tuple[int | None, str]], where: str
) -> None:
    for line_no, raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        at = where if line_no is None else f"{where} line {line_no}"
        key_id, sep, encoded = entry.partition(":")
        key_id = key_id.strip()
        # Messages name the id, never the value: the value is a secret.
        if not sep:
            raise errors.ConfigError(f"{at}: expected id:base64key entries")
        if not _ID_RE.fullmatch(key_id):
            raise errors.ConfigError(
                f"{at}: master key id {key_id!r}: expected 1-64 of A-Z a-z 0-9 . _ - "
                "(starting with a letter or digit)"
            )
        if key_id in keys:
            raise errors.ConfigError(f"{at}: master key id {key_id!r} is listed twice")
        try:
            key = _b64_key(encoded)
        except ValueError:
            raise errors.ConfigError(
                f"{at}: master key {key_id!r} is not valid base64 (standard or urlsafe)"
            ) from None
        if len(key) != KEY_BYTES:
            raise errors.ConfigError(
                f"{at}: master key {key_id!r} is {len(key)} bytes, expected {KEY_BYTES} "
                "(e.g. `head -c32 /dev/urandom | base64`)"
            )
        keys[key_id] = key


class _DataKey:
    """The data key a topic's messages are encrypted with now."""

    __slots__ = ("aead", "count", "header", "topic_field")

    def __init__(self, aead: AESGCM, header: str, topic_field: bytes) -> None:
        self.aead = aead
        self.header = header
        self.topic_field = topic_field
        self.count = 0


class Encryptor:
    """Encrypts and decrypts message content; one per process, shared by every encrypted topic.

    ``wrapped_store`` holds the wrapped data keys (default: a fresh :class:`MemoryKeyStore`,
    which forgets them at exit: only for tests and throwaway data). ``rotate_after`` is the number
    of messages after which a topic gets a new data key.
    """

    def __init__(
        self,
        keyring: Keyring,
        wrapped_store: WrappedKeyStore | None = None,
        rotate_after: int = 2**24,
    ) -> None:
        if rotate_after < 1:
            raise ValueError(f"rotate_after={rotate_after}: must be at least 1")
        self.keyring = keyring
        self.store: WrappedKeyStore = MemoryKeyStore() if wrapped_store is None else wrapped_store
        self.rotate_after = rotate_after
        self._current: dict[str, _DataKey] = {}  # topic -> its data key for new messages
        self._by_header: dict[str, AESGCM] = {}  # unwrapped data keys, by header value
        self._topic_fields: dict[str, bytes] = {}

    def encrypt(
        self, topic: str, key: bytes | None, message_id: str, plaintext: bytes
    ) -> tuple[bytes, str]:
        """``(nonce || AES-256-GCM ciphertext || tag, value of the HEADER header)``.

        The first message of a topic (and the first after ``rotate_after`` messages) makes a new
        data key and puts it, wrapped, in the store before returning.
        """
        dk = self._current.get(topic)
        if dk is None or dk.count >= self.rotate_after:
            dk = self._new_data_key(topic)
        dk.count += 1
        nonce = os.urandom(NONCE_BYTES)
        ct = dk.aead.encrypt(nonce, plaintext, _aad(dk.topic_field, key, message_id))
        return nonce + ct, dk.header

    def decrypt(
        self, topic: str, key: bytes | None, message_id: str, ciphertext: bytes, header: str
    ) -> bytes:
        """The plaintext of a message ``encrypt`` returned, given the same topic, key and id.

        Raises :class:`DecryptError` and nothing else for a bad message or header; an error of
        the wrapped key store itself (database down) propagates as it is, since the message is
        not at fault then.
        """
        aead = self._by_header.get(header)
        if aead is None:
            aead = self._resolve(header)
        if len(ciphertext) < OVERHEAD:
            raise DecryptError(
                "malformed", f"ciphertext of {len(ciphertext)} bytes is shorter than {OVERHEAD}"
            )
        tf = self._topic_fields.get(topic)
        if tf is None:
            tf = self._topic_field(topic)
        try:
            return aead.decrypt(
                ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], _aad(tf, key, message_id)
            )
        except InvalidTag:
            raise DecryptError(
                "tampered", "authentication failed: ciphertext, topic, key or message id altered"
            ) from None

    def rewrap(self) -> tuple[int, dict[str, int]]:
        """Re-wrap every stored data key under the active master key: (how many, how many
        could not be, by reason).

        Run it after making a new master key active; once every replica runs with the new
        keyring and ``rewrap`` has returned, the old master key can be removed. Data keys whose
        master key is not configured here, or whose wrapping does not authenticate, are left
        alone and logged; those already under the active key are not counted.
        """
        rows, skipped = self.rewrapped(self.store.items())
        for row in rows:
            self.store.put(*row)
        if skipped:
            log.warning(
                "some data keys could not be re-wrapped",
                extra={
                    "active_master_key": self.keyring.active_id,
                    "rewrapped": len(rows),
                    "skipped": skipped,
                },
            )
        return len(rows), skipped

    def rewrapped(
        self, rows: Iterable[tuple[str, str, bytes]]
    ) -> tuple[list[tuple[str, str, bytes]], dict[str, int]]:
        """The ``(data key id, master key id, wrapped)`` rows not under the active master key,
        wrapped under it now, and how many could not be, by reason (for a store to write)."""
        active = self.keyring.active_id
        out: list[tuple[str, str, bytes]] = []
        skipped: dict[str, int] = {}
        for data_key_id, master_key_id, wrapped in rows:
            if master_key_id == active:
                continue
            try:
                data_key = self.keyring.unwrap(data_key_id, master_key_id, wrapped)
            except DecryptError as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                continue
            out.append((data_key_id, *self.keyring.wrap(data_key_id, data_key)))
        return out, skipped

    def ready(self, topic: str) -> bool:
        """True when ``encrypt`` for ``topic`` needs no new data key (so no store call)."""
        dk = self._current.get(topic)
        return dk is not None and dk.count < self.rotate_after

    async def prepare(self, topic: str, store: AsyncWrappedKeyStore) -> None:
        """Make ``ready(topic)`` true: a new data key, persisted in ``store`` first.

        Raises what ``store.put_data_key`` raises (``Unavailable``); nothing changes then.
        """
        if self.ready(topic):
            return
        data_key_id, master_key_id, wrapped, data_key = self._draft()
        await store.put_data_key(data_key_id, master_key_id, wrapped)
        if not self.ready(topic):  # a concurrent prepare may have finished first
            self._adopt(topic, data_key_id, master_key_id, data_key)

    def knows(self, header: str) -> bool:
        """True when the data key named by the header value ``header`` is in memory."""
        return header in self._by_header

    async def load(self, header: str, store: AsyncWrappedKeyStore) -> None:
        """Bring the data key named by ``header`` into memory from ``store``.

        Raises :class:`DecryptError` (malformed header, unknown or tampered key) or what
        ``store.get_data_key`` raises (``Unavailable``: the message is not at fault then).
        """
        if header in self._by_header:
            return
        data_key_id = self._data_key_id(header)
        row = await store.get_data_key(data_key_id)
        self._unwrap_row(header, data_key_id, row)

    def _draft(self) -> tuple[str, str, bytes, bytes]:
        data_key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
        data_key_id = base64.urlsafe_b64encode(os.urandom(_DATA_KEY_ID_BYTES)).decode()
        master_key_id, wrapped = self.keyring.wrap(data_key_id, data_key)
        return data_key_id, master_key_id, wrapped, data_key

    def _adopt(self, topic: str, data_key_id: str, master_key_id: str, data_key: bytes) -> _DataKey:
        header = f"{_VERSION}:{master_key_id}:{data_key_id}"
        aead = AESGCM(data_key)
        self._remember(header, aead)
        dk = _DataKey(aead, header, self._topic_field(topic))
        self._current[topic] = dk
        return dk

    def _new_data_key(self, topic: str) -> _DataKey:
        data_key_id, master_key_id, wrapped, data_key = self._draft()
        self.store.put(data_key_id, master_key_id, wrapped)
        return self._adopt(topic, data_key_id, master_key_id, data_key)

    def _topic_field(self, topic: str) -> bytes:
        tf = _field(topic)
        if len(self._topic_fields) >= _CACHE_MAX:
            self._topic_fields.clear()
        self._topic_fields[topic] = tf
        return tf

    def _resolve(self, header: object) -> AESGCM:
        data_key_id = self._data_key_id(header)
        return self._unwrap_row(str(header), data_key_id, self.store.get(data_key_id))

    @staticmethod
    def _data_key_id(header: object) -> str:
        if not isinstance(header, str):
            raise DecryptError("malformed", f"{HEADER} header is not text")
        parts = header.split(":")
        if len(parts) != 3 or parts[0] != _VERSION or not parts[1] or not parts[2]:
            raise DecryptError(
                "malformed", f"{HEADER} header is not {_VERSION}:<master key id>:<data key id>"
            )
        return parts[2]

    def _unwrap_row(self, header: str, data_key_id: str, row: tuple[str, bytes] | None) -> AESGCM:
        if row is None:
            raise DecryptError("unknown_key", f"data key {data_key_id!r} is not in the key store")
        # The store, not the header, says which master key wraps the data key now: rewrap moves
        # it to the active master key while old messages keep naming the one of their time.
        master_key_id, wrapped = row
        aead = AESGCM(self.keyring.unwrap(data_key_id, master_key_id, wrapped))
        self._remember(header, aead)
        return aead

    def _remember(self, header: str, aead: AESGCM) -> None:
        cache = self._by_header
        if len(cache) >= _CACHE_MAX:
            del cache[next(iter(cache))]  # the oldest entry (dicts keep insertion order)
        cache[header] = aead


def bound_to(topic: str, message_id: str, headers: dict[str, str]) -> tuple[str, str]:
    """The topic and message id the ciphertext of a message with ``headers`` is bound to."""
    t = headers.get(ENC_TOPIC_HEADER)
    i = headers.get(ENC_ID_HEADER)
    if t is not None and i is not None:
        return t, i  # redriven
    t = headers.get(DLQ_TOPIC_HEADER)
    i = headers.get(DLQ_ID_HEADER)
    if t is not None and i is not None:
        return t, i  # a dead-letter copy
    return topic, message_id


def open_message(
    encryptor: Encryptor | None,
    topic: str,
    key: bytes | None,
    message_id: str,
    value: bytes,
    headers: dict[str, str],
    key_error: DecryptError | None = None,
) -> bytes:
    """The plaintext of a message stored in the encrypted topic ``topic``.

    Removes ``mqfast-enc`` from ``headers``. A dead-letter copy (``x-mqfast-dlq-topic`` set)
    is decrypted with its origin's topic and message id. Raises :class:`DecryptError` for the
    topic's own messages; a dead-letter copy that does not decrypt is returned as stored
    (base64, ``mqfast-enc`` kept, ``x-mqfast-dlq-content-encoding: base64``) rather than
    dead-lettered again. ``Unavailable`` when no master key is configured. ``key_error``: what
    :meth:`Encryptor.load` raised for the message's header (the message fails with it).
    """
    if encryptor is None:
        raise errors.Unavailable(
            f"topic {topic!r} is encrypted and no master key is configured "
            "(MESSAGE_QUEUE_MASTER_KEYS or MESSAGE_QUEUE_MASTER_KEY_FILE)"
        )
    hv = headers.get(HEADER)
    bound = bound_to(topic, message_id, headers)
    try:
        if hv is None:
            raise DecryptError("malformed", f"no {HEADER} header")
        if key_error is not None:
            raise key_error
        try:
            plain = encryptor.decrypt(bound[0], key, bound[1], value, hv)
        except DecryptError:
            if bound == (topic, message_id):
                raise
            # Produced directly with look-alike headers: bound to where it is.
            plain = encryptor.decrypt(topic, key, message_id, value, hv)
    except DecryptError:
        if DLQ_TOPIC_HEADER not in headers:
            raise
        headers[DLQ_ENCODING_HEADER] = "base64"
        return base64.b64encode(value)
    del headers[HEADER]
    headers.pop(ENC_TOPIC_HEADER, None)
    headers.pop(ENC_ID_HEADER, None)
    return plain
