"""Encryption at rest: round trips, binding to topic/key/id, tampering, key rotation, settings."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import pytest

from mqfast.config import Settings
from mqfast.crypto import (
    HEADER,
    OVERHEAD,
    DecryptError,
    Encryptor,
    Keyring,
    MemoryKeyStore,
    PreparedOnly,
)
from mqfast.errors import ConfigError, MqfastError, Unavailable

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
KEY_C = bytes(range(200, 232))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def ring(*ids: str, active: str | None = None) -> Keyring:
    keys = {"a": KEY_A, "b": KEY_B, "c": KEY_C}
    return Keyring({i: keys[i] for i in ids}, active)


def reason(exc: pytest.ExceptionInfo[DecryptError]) -> str:
    return exc.value.reason


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "key", "message_id", "plaintext"),
    [
        ("orders", b"customer-42", "01HZY3K8ZJ6QW2M5V4N7PBR9XA", b'{"total": 12.5}'),
        ("orders", None, "m-1", b"no record key"),
        ("payments.eu", b"", "m-2", b"empty record key"),
        ("t", b"\x00\xff" * 10, "m-3", b""),  # empty payload
        ("big", b"k", "m-4", os.urandom(1 << 20)),  # 1 MiB
        ("ünïcödé-topic", "ключ".encode(), "id-ñ", b"\x00" * 7),
    ],
)
def test_round_trip(topic: str, key: bytes | None, message_id: str, plaintext: bytes) -> None:
    enc = Encryptor(ring("a"))
    ct, header = enc.encrypt(topic, key, message_id, plaintext)
    assert len(ct) == len(plaintext) + OVERHEAD
    if plaintext:
        assert plaintext not in ct
    assert enc.decrypt(topic, key, message_id, ct, header) == plaintext


def test_many_topics_share_nothing_and_a_fresh_process_decrypts_from_the_store() -> None:
    store = MemoryKeyStore()
    enc = Encryptor(ring("a"), store)
    sent = []
    for i in range(50):
        topic = f"topic-{i % 5}"
        key = None if i % 3 == 0 else f"k{i}".encode()
        pt = f"message {i}".encode() * i
        ct, header = enc.encrypt(topic, key, f"id-{i}", pt)
        sent.append((topic, key, f"id-{i}", pt, ct, header))
    assert len({h for *_, h in sent}) == 5  # one data key per topic
    assert len(store) == 5
    fresh = Encryptor(ring("a"), store)  # another process: nothing cached, same store
    for topic, key, mid, pt, ct, header in sent:
        assert fresh.decrypt(topic, key, mid, ct, header) == pt
        assert enc.decrypt(topic, key, mid, ct, header) == pt


def test_same_plaintext_encrypts_differently_each_time() -> None:
    enc = Encryptor(ring("a"))
    c1, _ = enc.encrypt("t", b"k", "id", b"same")
    c2, _ = enc.encrypt("t", b"k", "id", b"same")
    assert c1 != c2 and c1[:12] != c2[:12]


def test_no_key_and_empty_key_are_the_same_record_key() -> None:
    enc = Encryptor(ring("a"))
    ct, header = enc.encrypt("t", None, "id", b"x")
    assert enc.decrypt("t", b"", "id", ct, header) == b"x"


# ---- associated data ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "key", "message_id"),
    [
        ("orders2", b"key", "id-1"),  # another topic
        ("orders", b"key2", "id-1"),  # another record key
        ("orders", None, "id-1"),
        ("orders", b"key", "id-2"),  # another message id
        ("order", b"skey", "id-1"),  # the same bytes shifted between fields
        ("orders", b"keyid-", "1"),
        ("orders", b"ke", "yid-1"),
    ],
)
def test_associated_data_binds_topic_key_and_message_id(
    topic: str, key: bytes | None, message_id: str
) -> None:
    enc = Encryptor(ring("a"))
    ct, header = enc.encrypt("orders", b"key", "id-1", b"payload")
    with pytest.raises(DecryptError) as exc:
        enc.decrypt(topic, key, message_id, ct, header)
    assert reason(exc) == "tampered"


def test_a_message_moved_to_another_topic_fails_even_with_that_topics_header() -> None:
    enc = Encryptor(ring("a"))
    ct, _ = enc.encrypt("a", b"k", "id", b"payload")
    _, header_b = enc.encrypt("b", b"k", "id", b"other")
    with pytest.raises(DecryptError) as exc:
        enc.decrypt("a", b"k", "id", ct, header_b)
    assert reason(exc) == "tampered"


# ---- tampering ----------------------------------------------------------------------------------


def test_flipping_any_bit_is_tampered_never_another_exception() -> None:
    enc = Encryptor(ring("a"))
    pt = b"sixteen bytes!!!"
    ct, header = enc.encrypt("t", b"k", "id", pt)
    for i in range(len(ct)):
        for bit in range(8):
            bad = bytearray(ct)
            bad[i] ^= 1 << bit
            with pytest.raises(DecryptError) as exc:
                enc.decrypt("t", b"k", "id", bytes(bad), header)
            assert reason(exc) == "tampered", (i, bit)


def test_truncated_or_extended_ciphertext_is_tampered_or_malformed() -> None:
    enc = Encryptor(ring("a"))
    ct, header = enc.encrypt("t", b"k", "id", b"some payload")
    for n in range(len(ct)):
        with pytest.raises(DecryptError) as exc:
            enc.decrypt("t", b"k", "id", ct[:n], header)
        assert reason(exc) == ("malformed" if n < OVERHEAD else "tampered"), n
    with pytest.raises(DecryptError) as exc:
        enc.decrypt("t", b"k", "id", ct + b"\x00", header)
    assert reason(exc) == "tampered"


@pytest.mark.parametrize(
    "header",
    ["", "v1", "v1:a", "v2:a:x", "v1::x", "v1:a:", "v1:a:x:y", "garbage", ":::"],
)
def test_a_malformed_header_is_malformed(header: str) -> None:
    enc = Encryptor(ring("a"))
    ct, _ = enc.encrypt("t", None, "id", b"x")
    with pytest.raises(DecryptError) as exc:
        enc.decrypt("t", None, "id", ct, header)
    assert reason(exc) == "malformed"


def test_decrypt_error_is_an_mqfast_error_carrying_the_dead_letter_reason() -> None:
    enc = Encryptor(ring("a"))
    ct, header = enc.encrypt("t", None, "id", b"x")
    with pytest.raises(DecryptError) as exc:
        enc.decrypt("t", None, "other", ct, header)
    assert isinstance(exc.value, MqfastError)
    assert str(exc.value) == "decrypt_failed: tampered"


def test_a_tampered_wrapped_data_key_is_tampered() -> None:
    store = MemoryKeyStore()
    enc = Encryptor(ring("a"), store)
    ct, header = enc.encrypt("t", None, "id", b"x")
    ((dk, mk, wrapped),) = store.items()
    bad = bytearray(wrapped)
    bad[-1] ^= 1
    store.put(dk, mk, bytes(bad))
    with pytest.raises(DecryptError) as exc:
        Encryptor(ring("a"), store).decrypt("t", None, "id", ct, header)
    assert reason(exc) == "tampered"
    store.put(dk, mk, wrapped[:-1])
    with pytest.raises(DecryptError) as exc:
        Encryptor(ring("a"), store).decrypt("t", None, "id", ct, header)
    assert reason(exc) == "malformed"


def test_a_wrapped_key_copied_under_another_data_key_id_does_not_unwrap() -> None:
    store = MemoryKeyStore()
    enc = Encryptor(ring("a"), store)
    ct1, h1 = enc.encrypt("t1", None, "id", b"x")
    enc.encrypt("t2", None, "id", b"y")
    rows = {dk: (mk, w) for dk, mk, w in store.items()}
    dk1 = h1.split(":")[2]
    (dk2,) = set(rows) - {dk1}
    store.put(dk1, *rows[dk2])
    with pytest.raises(DecryptError) as exc:
        Encryptor(ring("a"), store).decrypt("t1", None, "id", ct1, h1)
    assert reason(exc) == "tampered"


# ---- unknown keys -------------------------------------------------------------------------------


def test_an_unknown_data_key_id_is_unknown_key() -> None:
    enc = Encryptor(ring("a"))
    ct, header = enc.encrypt("t", None, "id", b"x")
    other = Encryptor(ring("a"))  # its own empty store
    with pytest.raises(DecryptError) as exc:
        other.decrypt("t", None, "id", ct, header)
    assert reason(exc) == "unknown_key"
    v, mk, _ = header.split(":")
    with pytest.raises(DecryptError) as exc:
        enc.decrypt("t", None, "id", ct, f"{v}:{mk}:AAAAAAAAAAAAAAAA")
    assert reason(exc) == "unknown_key"


def test_an_unknown_master_key_id_is_unknown_key() -> None:
    store = MemoryKeyStore()
    ct, header = Encryptor(ring("a"), store).encrypt("t", None, "id", b"x")
    with pytest.raises(DecryptError) as exc:
        Encryptor(ring("b"), store).decrypt("t", None, "id", ct, header)
    assert reason(exc) == "unknown_key"


def test_another_key_under_the_same_master_key_id_is_tampered() -> None:
    store = MemoryKeyStore()
    ct, header = Encryptor(Keyring({"a": KEY_A}), store).encrypt("t", None, "id", b"x")
    with pytest.raises(DecryptError) as exc:
        Encryptor(Keyring({"a": KEY_B}), store).decrypt("t", None, "id", ct, header)
    assert reason(exc) == "tampered"


# ---- rotation -----------------------------------------------------------------------------------


def test_rotation_old_messages_decrypt_new_ones_use_the_new_master_key() -> None:
    store = MemoryKeyStore()
    old = Encryptor(ring("a"), store)
    before = [old.encrypt(f"t{i}", None, f"id{i}", f"old {i}".encode()) for i in range(3)]
    assert all(h.split(":")[1] == "a" for _, h in before)

    # Restart with B added and active; A stays to decrypt.
    new = Encryptor(ring("a", "b", active="b"), store)
    after = [new.encrypt(f"t{i}", None, f"id{i}", f"new {i}".encode()) for i in range(3)]
    assert all(h.split(":")[1] == "b" for _, h in after)
    for i, (ct, h) in enumerate(before):
        assert new.decrypt(f"t{i}", None, f"id{i}", ct, h) == f"old {i}".encode()
    for i, (ct, h) in enumerate(after):
        assert new.decrypt(f"t{i}", None, f"id{i}", ct, h) == f"new {i}".encode()

    # Before rewrap, dropping A loses the old messages.
    with pytest.raises(DecryptError) as exc:
        Encryptor(ring("b"), store).decrypt("t0", None, "id0", *before[0])
    assert reason(exc) == "unknown_key"

    assert new.rewrap() == (3, {})  # the three data keys under A; B's are already there
    assert {mk for _, mk, _ in store.items()} == {"b"}
    assert new.rewrap() == (0, {})

    only_b = Encryptor(ring("b"), store)
    for i, (ct, h) in enumerate(before):
        assert h.split(":")[1] == "a"  # the record still names the key of its time
        assert only_b.decrypt(f"t{i}", None, f"id{i}", ct, h) == f"old {i}".encode()
    for i, (ct, h) in enumerate(after):
        assert only_b.decrypt(f"t{i}", None, f"id{i}", ct, h) == f"new {i}".encode()


def test_rewrap_leaves_keys_it_cannot_unwrap_and_counts_the_rest() -> None:
    store = MemoryKeyStore()
    Encryptor(ring("c"), store).encrypt("t", None, "id", b"x")
    ct, h = Encryptor(ring("a"), store).encrypt("u", None, "id", b"y")
    enc = Encryptor(ring("a", "b"), store)  # c is unknown here
    assert enc.rewrap() == (1, {"unknown_key": 1})
    assert sorted(mk for _, mk, _ in store.items()) == ["b", "c"]
    assert Encryptor(ring("b"), store).decrypt("u", None, "id", ct, h) == b"y"


def test_rotate_after_makes_a_new_data_key() -> None:
    store = MemoryKeyStore()
    enc = Encryptor(ring("a"), store, rotate_after=3)
    out = [enc.encrypt("t", None, f"id{i}", bytes([i])) for i in range(7)]
    headers = [h for _, h in out]
    assert len(set(headers[0:3])) == 1 and len(set(headers[3:6])) == 1
    assert len({headers[0], headers[3], headers[6]}) == 3
    assert len(store) == 3
    fresh = Encryptor(ring("a"), store)
    for i, (ct, h) in enumerate(out):
        assert fresh.decrypt("t", None, f"id{i}", ct, h) == bytes([i])


# ---- an asynchronous key store (the Kafka engine's PostgreSQL) ----------------------------------


class AsyncStore:
    """An ``AsyncWrappedKeyStore`` in a dict, which can be made unreachable."""

    def __init__(self) -> None:
        self.rows = MemoryKeyStore()
        self.down = False
        self.puts = 0

    async def put_data_key(self, data_key_id: str, master_key_id: str, wrapped: bytes) -> None:
        await asyncio.sleep(0)
        if self.down:
            raise Unavailable("metadata store: down")
        self.puts += 1
        self.rows.put(data_key_id, master_key_id, wrapped)

    async def get_data_key(self, data_key_id: str) -> tuple[str, bytes] | None:
        await asyncio.sleep(0)
        if self.down:
            raise Unavailable("metadata store: down")
        return self.rows.get(data_key_id)


def test_prepare_stores_the_data_key_before_encrypt_may_use_it() -> None:
    store = AsyncStore()
    enc = Encryptor(ring("a"), PreparedOnly(), rotate_after=2)
    with pytest.raises(RuntimeError):  # used without prepare: a bug, never a key in memory only
        enc.encrypt("t", None, "id0", b"x")
    assert not enc.ready("t")

    async def prepare_twice_at_once() -> None:
        await asyncio.gather(enc.prepare("t", store), enc.prepare("t", store))

    asyncio.run(prepare_twice_at_once())
    assert enc.ready("t") and len(store.rows) >= 1
    out = [enc.encrypt("t", b"k", f"id{i}", b"m%d" % i) for i in range(2)]
    assert not enc.ready("t")  # rotate_after reached: the next message needs a new key
    store.down = True
    with pytest.raises(Unavailable):
        asyncio.run(enc.prepare("t", store))
    assert not enc.ready("t")  # nothing half-done

    # another process: loads the keys it does not know from the store, then decrypts
    other = Encryptor(ring("a"), PreparedOnly())
    _, header = out[0]
    assert not other.knows(header)
    with pytest.raises(Unavailable):  # the store is down: not the message's fault
        asyncio.run(other.load(header, store))
    store.down = False
    asyncio.run(other.load(header, store))
    assert other.knows(header)
    for i, (ct, h) in enumerate(out):
        assert other.decrypt("t", b"k", f"id{i}", ct, h) == b"m%d" % i


@pytest.mark.parametrize(
    ("header", "why"),
    [("v1:a:no-such-key", "unknown_key"), ("v2:a:x", "malformed"), ("v1::x", "malformed")],
)
def test_load_of_a_bad_header_is_a_decrypt_error(header: str, why: str) -> None:
    with pytest.raises(DecryptError) as exc:
        asyncio.run(Encryptor(ring("a"), PreparedOnly()).load(header, AsyncStore()))
    assert reason(exc) == why


def test_rotate_after_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Encryptor(ring("a"), rotate_after=0)


def test_the_decrypt_cache_is_bounded_and_refills_from_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mqfast.crypto

    monkeypatch.setattr(mqfast.crypto, "_CACHE_MAX", 4)
    store = MemoryKeyStore()
    enc = Encryptor(ring("a"), store, rotate_after=1)
    out = [enc.encrypt(f"t{i % 6}", None, f"id{i}", bytes([i])) for i in range(20)]
    for _ in range(2):
        for i, (ct, h) in enumerate(out):
            assert enc.decrypt(f"t{i % 6}", None, f"id{i}", ct, h) == bytes([i])
    assert len(enc._by_header) <= 4


# ---- no key material outside ------------------------------------------------------------------


def test_header_is_short_and_holds_no_key_material() -> None:
    store = MemoryKeyStore()
    enc = Encryptor(Keyring({"k1": KEY_A, "k2": KEY_B}), store)
    _, header = enc.encrypt("topic", b"key", "id", b"x")
    ((dk_id, mk, wrapped),) = store.items()
    assert header == f"v1:{mk}:{dk_id}" and mk == "k2" and len(header) < 40
    data_key = enc.keyring.unwrap(dk_id, mk, wrapped)
    raw = header.encode()
    for secret in (KEY_A, KEY_B, wrapped, data_key):
        for form in (secret, base64.b64encode(secret), base64.urlsafe_b64encode(secret)):
            assert form[:12] not in raw
        assert secret.hex()[:12].encode() not in raw
    assert HEADER == "mqfast-enc"


def test_keyring_repr_and_config_errors_do_not_show_keys() -> None:
    r = Keyring({"k1": KEY_A})
    assert b64(KEY_A) not in repr(r) and "k1" in repr(r)
    short = b64(KEY_A[:16])
    with pytest.raises(ConfigError) as exc:
        Keyring.from_settings(Settings(master_keys=f"k1:{short}"))
    assert short not in str(exc.value)


# ---- settings -----------------------------------------------------------------------------------


def test_no_master_key_means_no_keyring() -> None:
    assert Keyring.from_settings(Settings()) is None


def test_keys_from_the_environment_string() -> None:
    urlsafe_unpadded = base64.urlsafe_b64encode(KEY_B).decode().rstrip("=")
    s = Settings.from_env(
        {"MESSAGE_QUEUE_MASTER_KEYS": f" k1:{b64(KEY_A)} , k2:{urlsafe_unpadded}"}
    )
    r = Keyring.from_settings(s)
    assert r is not None
    assert r.ids() == ["k1", "k2"] and r.active_id == "k2"  # the last listed
    s2 = Settings.from_env(
        {
            "MESSAGE_QUEUE_MASTER_KEYS": f"k1:{b64(KEY_A)},k2:{b64(KEY_B)}",
            "MESSAGE_QUEUE_MASTER_KEY_ID": "k1",
        }
    )
    r2 = Keyring.from_settings(s2)
    assert r2 is not None and r2.active_id == "k1"
    # Keys parsed from settings are the keys given: B's data decrypts with a raw keyring of B.
    store = MemoryKeyStore()
    ct, h = Encryptor(r, store).encrypt("t", None, "id", b"x")
    assert Encryptor(Keyring({"k2": KEY_B}), store).decrypt("t", None, "id", ct, h) == b"x"


def test_keys_from_a_file_and_from_both(tmp_path: Path) -> None:
    f = tmp_path / "master.keys"
    f.write_text(
        "# master keys of mqfast\n"
        "\n"
        f"old:{b64(KEY_A)}\n"
        f"  new:{base64.urlsafe_b64encode(KEY_B).decode()}   # rotated 2024-06\n"
    )
    r = Keyring.from_settings(Settings(master_key_file=str(f)))
    assert r is not None and r.ids() == ["old", "new"] and r.active_id == "new"
    both = Keyring.from_settings(
        Settings(master_keys=f"env:{b64(KEY_C)}", master_key_file=str(f), master_key_id="env")
    )
    assert both is not None and both.ids() == ["env", "old", "new"] and both.active_id == "env"


def test_keys_from_the_secret_file_variable(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text(f"k1:{b64(KEY_A)}\nk2:{b64(KEY_B)}\n")
    r = Keyring.from_settings(Settings.from_env({"MESSAGE_QUEUE_MASTER_KEYS_FILE": str(f)}))
    assert r is not None and r.ids() == ["k1", "k2"]


@pytest.mark.parametrize(
    ("kw", "var", "words"),
    [
        ({"master_keys": "k1:not*base64"}, "MESSAGE_QUEUE_MASTER_KEYS", "not valid base64"),
        ({"master_keys": "k1:" + b64(KEY_A)[:-5]}, "MESSAGE_QUEUE_MASTER_KEYS", "29 bytes"),
        ({"master_keys": "k1:" + b64(KEY_A[:16])}, "MESSAGE_QUEUE_MASTER_KEYS", "16 bytes"),
        ({"master_keys": "k1:" + b64(KEY_A + b"x")}, "MESSAGE_QUEUE_MASTER_KEYS", "33 bytes"),
        ({"master_keys": "k1:"}, "MESSAGE_QUEUE_MASTER_KEYS", "0 bytes"),
        ({"master_keys": "k1:QUJD=RA"}, "MESSAGE_QUEUE_MASTER_KEYS", "not valid base64"),
        ({"master_keys": b64(KEY_A)}, "MESSAGE_QUEUE_MASTER_KEYS", "id:base64key"),
        ({"master_keys": ":" + b64(KEY_A)}, "MESSAGE_QUEUE_MASTER_KEYS", "key id ''"),
        ({"master_keys": "bad id:" + b64(KEY_A)}, "MESSAGE_QUEUE_MASTER_KEYS", "'bad id'"),
        (
            {"master_keys": f"k1:{b64(KEY_A)},k1:{b64(KEY_B)}"},
            "MESSAGE_QUEUE_MASTER_KEYS",
            "twice",
        ),
        (
            {"master_keys": f"k1:{b64(KEY_A)}", "master_key_id": "k9"},
            "MESSAGE_QUEUE_MASTER_KEY_ID",
            "'k9'",
        ),
        ({"master_key_id": "k1"}, "MESSAGE_QUEUE_MASTER_KEY_ID", "no master key"),
        (
            {"master_key_file": "/nonexistent/master.keys"},
            "MESSAGE_QUEUE_MASTER_KEY_FILE",
            "cannot read",
        ),
    ],
)
def test_bad_master_key_settings_name_the_variable(
    kw: dict[str, str], var: str, words: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        Keyring.from_settings(Settings(**kw))  # type: ignore[arg-type]
    assert var in str(exc.value) and words in str(exc.value)


def test_bad_lines_in_the_key_file_name_the_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# keys\nk1:{b64(KEY_A)}\nk2:{b64(KEY_B[:31])}\n")
    with pytest.raises(ConfigError) as exc:
        Keyring.from_settings(Settings(master_key_file=str(f)))
    assert "MESSAGE_QUEUE_MASTER_KEY_FILE" in str(exc.value) and "line 3" in str(exc.value)
    f.write_text(f"k1:{b64(KEY_A)}\n")
    with pytest.raises(ConfigError) as exc:  # the same id in the variable and in the file
        Keyring.from_settings(Settings(master_keys=f"k1:{b64(KEY_B)}", master_key_file=str(f)))
    assert "MESSAGE_QUEUE_MASTER_KEY_FILE" in str(exc.value) and "twice" in str(exc.value)


def test_keyring_constructor_checks_its_keys() -> None:
    with pytest.raises(ValueError):
        Keyring({})
    with pytest.raises(ValueError):
        Keyring({"a": KEY_A[:31]})
    with pytest.raises(ValueError):
        Keyring({"a:b": KEY_A})
    with pytest.raises(ValueError):
        Keyring({"a": KEY_A}, "b")
