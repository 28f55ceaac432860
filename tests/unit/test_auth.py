"""JWT verification and topic permissions (``mqfast.auth``): the attack matrix of tokens that
must be refused with a 401 (never a 500), the key sources (secret, PEM, JWKS file, JWKS URL
served from a loopback ``http.server``), the verified-token cache and the permission rules.

Keys are generated here with ``cryptography``; tokens are signed with PyJWT, or by hand where
PyJWT refuses to build the hostile token (an HMAC signed with a public key).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from mqfast import auth
from mqfast.auth import (
    ACTIONS,
    Authenticator,
    Forbidden,
    Grant,
    Principal,
    Unauthorized,
    make_token,
)
from mqfast.config import Settings
from mqfast.errors import ConfigError, ErrorCode

T = TypeVar("T")

SECRET = "0123456789abcdef" * 4  # 64 bytes: long enough for HS512


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(asyncio.wait_for(coro, 30))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    c: dict[str, object] = {"sub": "svc-a", "iat": now, "nbf": now, "exp": now + 600}
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def hs_token(payload: bytes | dict[str, object], key: bytes, header: dict[str, object]) -> str:
    """An HMAC token built by hand, for the tokens PyJWT will not sign."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(body)}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    alg = str(header.get("alg", "HS256"))
    sig = hmac.new(key, signing_input.encode(), digest.get(alg, hashlib.sha256)).digest()
    return f"{signing_input}.{b64(sig)}"


@dataclass
class Keys:
    rs: rsa.RSAPrivateKey
    es: ec.EllipticCurvePrivateKey
    es384: ec.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey
    rs_other: rsa.RSAPrivateKey

    def private(self, alg: str) -> Any:
        return {"RS256": self.rs, "PS256": self.rs, "ES256": self.es, "EdDSA": self.ed}[alg]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rs=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        es=ec.generate_private_key(ec.SECP256R1()),
        es384=ec.generate_private_key(ec.SECP384R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
        rs_other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def pem_of(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def jwk_of(key: Any, kid: str, alg: str | None = None) -> dict[str, object]:
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        d = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        d = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        d = OKPAlgorithm.to_jwk(pub, as_dict=True)
    d = dict(d)
    d["kid"] = kid
    d["use"] = "sig"
    if alg is not None:
        d["alg"] = alg
    return d


def write(tmp_path: Path, name: str, data: bytes | Mapping[str, object]) -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return str(path)


def hs_auth(**kw: Any) -> Authenticator:
    return Authenticator(Settings(jwt_secret=SECRET, **kw))


def hs(payload: dict[str, object], alg: str = "HS256", **headers: Any) -> str:
    return jwt.encode(payload, SECRET, algorithm=alg, headers=headers or None)


def refused(a: Authenticator, token: str, fragment: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as e:
        a.verify_sync(token)
    assert fragment in e.value.message, e.value.message
    assert e.value.status == 401 and e.value.code == ErrorCode.UNAUTHORIZED
    assert "\r" not in e.value.www_authenticate and "\n" not in e.value.www_authenticate
    assert e.value.extra_headers.startswith(b"www-authenticate: Bearer realm=")
    return e.value


# -- alg none and algorithm confusion ----------------------------------------------------------


def test_unsigned_token_is_refused() -> None:
    a = hs_auth()
    body = b64(json.dumps(claims()).encode())
    for alg in ("none", "None", "NONE"):
        header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        e = refused(a, f"{header}.{body}.", "alg none")
        assert e.reason == "bad_alg"
    refused(a, jwt.encode(claims(), "", algorithm="none"), "alg none")


@pytest.mark.parametrize("algs", [("HS256", "none"), ("none",), ("NONE", "HS256"), ("None",)])
def test_none_in_the_allow_list_stops_start_up(algs: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="never allowed"):
        hs_auth(jwt_algorithms=algs)


def test_allow_list_must_have_keys_and_known_names(tmp_path: Path, keys: Keys) -> None:
    pem = write(tmp_path, "rsa.pem", pem_of(keys.rs))
    with pytest.raises(ConfigError, match="RS256 has no key"):
        hs_auth(jwt_algorithms=("RS256",))
    with pytest.raises(ConfigError, match="HS256 needs MESSAGE_QUEUE_JWT_SECRET"):
        Authenticator(Settings(jwt_public_key_file=pem, jwt_algorithms=("HS256",)))
    with pytest.raises(ConfigError, match=r"ES256 has no key.*for RS256"):
        Authenticator(Settings(jwt_public_key_file=pem, jwt_algorithms=("ES256",)))
    with pytest.raises(ConfigError, match="unknown algorithm 'hs256'"):
        hs_auth(jwt_algorithms=("hs256",))
    with pytest.raises(ConfigError, match="needs a key"):
        Authenticator(Settings())


def test_short_or_asymmetric_secret_stops_start_up(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="HS256 needs at least 32"):
        Authenticator(Settings(jwt_secret="short"))
    with pytest.raises(ConfigError, match="HS512 needs at least 64"):
        Authenticator(Settings(jwt_secret="x" * 40, jwt_algorithms=("HS256", "HS512")))
    # Derived from a 40-byte secret: HS256 only, so an HS512 token is refused, not verified.
    a = Authenticator(Settings(jwt_secret="x" * 40))
    assert a.algorithms == ("HS256",)
    with pytest.raises(ConfigError, match="looks like a public or private key"):
        Authenticator(Settings(jwt_secret=pem_of(keys.rs).decode()))


def test_hs256_signed_with_the_public_key_is_refused(tmp_path: Path, keys: Keys) -> None:
    pem_bytes = pem_of(keys.rs)
    pem = write(tmp_path, "rsa.pem", pem_bytes)
    forged = hs_token(claims(), pem_bytes, {"alg": "HS256", "typ": "JWT"})
    # Only a public key configured: HS256 is not even allowed.
    e = refused(Authenticator(Settings(jwt_public_key_file=pem)), forged, "not allowed")
    assert e.reason == "bad_alg"
    # Both allowed: the HS token is checked with the secret only, never with the PEM.
    both = Authenticator(
        Settings(jwt_secret=SECRET, jwt_public_key_file=pem, jwt_algorithms=("HS256", "RS256"))
    )
    assert refused(both, forged, "signature").reason == "bad_signature"
    # The same with a JWKS (and a kid naming the RSA key).
    jwks = write(tmp_path, "jwks.json", {"keys": [jwk_of(keys.rs, "k1")]})
    with_set = Authenticator(
        Settings(jwt_secret=SECRET, jwt_jwks_file=jwks, jwt_algorithms=("HS256", "RS256"))
    )
    forged_kid = hs_token(claims(), pem_bytes, {"alg": "HS256", "kid": "k1"})
    refused(with_set, forged_kid, "signature")
    assert with_set.verify_sync(hs(claims(), kid="k1")).subject == "svc-a"


def test_symmetric_keys_of_a_jwks_are_never_used(tmp_path: Path) -> None:
    oct_key = {"kty": "oct", "kid": "s1", "k": b64(b"k" * 32)}
    only_oct = write(tmp_path, "oct.json", {"keys": [oct_key]})
    with pytest.raises(ConfigError, match="no usable signing key"):
        Authenticator(Settings(jwt_jwks_file=only_oct))
    with pytest.raises(ConfigError, match="HS256 needs MESSAGE_QUEUE_JWT_SECRET"):
        Authenticator(Settings(jwt_jwks_file=only_oct, jwt_algorithms=("HS256",)))


def test_key_type_must_match_the_algorithm(tmp_path: Path, keys: Keys) -> None:
    jwks = write(
        tmp_path,
        "jwks.json",
        {"keys": [jwk_of(keys.rs, "r"), jwk_of(keys.es, "e"), jwk_of(keys.es384, "e384")]},
    )
    a = Authenticator(Settings(jwt_jwks_file=jwks, jwt_algorithms=("RS256", "ES256", "ES384")))
    # An ES256 token naming the RSA key, and one naming the P-384 key.
    assert refused(a, jwt.encode(claims(), keys.es, "ES256", {"kid": "r"}), "not for ES256")
    refused(a, jwt.encode(claims(), keys.es, "ES256", {"kid": "e384"}), "not for ES256")
    assert a.verify_sync(jwt.encode(claims(), keys.es384, "ES384", {"kid": "e384"}))


# -- time and identity claims ------------------------------------------------------------------


def test_expired() -> None:
    a = hs_auth(jwt_leeway_s=30)
    now = int(time.time())
    assert refused(a, hs(claims(exp=now - 100)), "token expired").reason == "expired"
    assert 'error="invalid_token", error_description="token expired"' in (
        refused(a, hs(claims(exp=now - 31)), "expired").www_authenticate
    )
    # Within the leeway: accepted, but not cached (it is already past its exp).
    t = hs(claims(exp=now - 10))
    assert a.verify_sync(t).subject == "svc-a"
    assert a.cached(t) is None


def test_not_yet_valid() -> None:
    a = hs_auth(jwt_leeway_s=30)
    now = int(time.time())
    assert refused(a, hs(claims(nbf=now + 120)), "not valid yet").reason == "not_yet_valid"
    assert a.verify_sync(hs(claims(nbf=now + 10))).subject == "svc-a"


def test_issued_in_the_future() -> None:
    a = hs_auth(jwt_leeway_s=30)
    now = int(time.time())
    refused(a, hs(claims(iat=now + 3600)), "issued in the future")
    assert a.verify_sync(hs(claims(iat=now + 5))).subject == "svc-a"


def test_issuer() -> None:
    a = hs_auth(jwt_issuer="https://idp.example")
    refused(a, hs(claims(iss="https://evil.example")), "issuer is not accepted")
    refused(a, hs(claims()), "no 'iss'")
    refused(
        a,
        hs_token(claims(iss=["https://idp.example"]), SECRET.encode(), {"alg": "HS256"}),
        "issuer is not accepted",
    )
    assert a.verify_sync(hs(claims(iss="https://idp.example")))


def test_audience() -> None:
    a = hs_auth(jwt_audience="mqfast")
    refused(a, hs(claims(aud="other")), "audience is not accepted")
    refused(a, hs(claims(aud=["other", "more"])), "audience is not accepted")
    refused(a, hs(claims()), "no 'aud'")
    refused(a, hs(claims(aud=7)), "'aud' must be")
    assert a.verify_sync(hs(claims(aud="mqfast")))
    assert a.verify_sync(hs(claims(aud=["other", "mqfast"])))
    # Not configured: any well-formed aud is accepted.
    assert hs_auth().verify_sync(hs(claims(aud="anything")))


@pytest.mark.parametrize(
    ("over", "fragment", "reason"),
    [
        ({"exp": None}, "no 'exp'", "missing_claim"),
        ({"exp": "2000000000"}, "'exp' must be a number", "bad_claims"),
        ({"exp": True}, "'exp' must be a number", "bad_claims"),
        ({"exp": 10**400}, "'exp' must be a number", "bad_claims"),
        ({"exp": [1]}, "'exp' must be a number", "bad_claims"),
        ({"nbf": "0"}, "'nbf' must be a number", "bad_claims"),
        ({"iat": {}}, "'iat' must be a number", "bad_claims"),
        ({"sub": None}, "no 'sub'", "missing_claim"),
        ({"sub": ""}, "'sub' must be a non-empty string", "bad_claims"),
        ({"sub": 42}, "'sub' must be a non-empty string", "bad_claims"),
        ({"sub": ["a"]}, "'sub' must be a non-empty string", "bad_claims"),
        ({"roles": [1]}, "'roles' must be a list", "bad_claims"),
        ({"roles": {"admin": True}}, "'roles' must be a list", "bad_claims"),
    ],
)
def test_claims_of_the_wrong_type(over: dict[str, object], fragment: str, reason: str) -> None:
    a = hs_auth()
    c = claims()
    c.update(over)
    c = {k: v for k, v in c.items() if v is not None}
    assert refused(a, hs(c), fragment).reason == reason
    assert a.stats["failures"] == 1 and a.stats["failed_" + reason] == 1


def test_subject_and_quota_claims_are_configurable() -> None:
    a = hs_auth(jwt_subject_claim="client_id", quota_claim="tenant")
    p = a.verify_sync(hs(claims(sub=None, client_id="svc-b", tenant="acme")))
    assert (p.subject, p.quota_key) == ("svc-b", "acme")
    assert a.verify_sync(hs(claims(sub=None, client_id="svc-c"))).quota_key == "svc-c"
    refused(a, hs(claims(client_id="svc-b", tenant=["x"])), "'tenant' must be")
    refused(a, hs(claims()), "no 'client_id'")


# -- key ids -----------------------------------------------------------------------------------


@pytest.fixture
def jwks_file(tmp_path: Path, keys: Keys) -> str:
    return write(tmp_path, "jwks.json", {"keys": [jwk_of(keys.rs, "k1"), jwk_of(keys.ed, "k2")]})


def test_unknown_kid_with_a_jwks_file(jwks_file: str, keys: Keys, tmp_path: Path) -> None:
    a = Authenticator(Settings(jwt_jwks_file=jwks_file))
    assert a.verify_sync(jwt.encode(claims(), keys.rs, "RS256", {"kid": "k1"})).subject
    e = refused(a, jwt.encode(claims(), keys.rs, "RS256", {"kid": "k9"}), "unknown key id 'k9'")
    assert e.reason == "unknown_kid" and a.stats["failed_unknown_kid"] == 1
    # No kid: the one key that fits the algorithm, never a guess among several.
    assert a.verify_sync(jwt.encode(claims(sub="b"), keys.rs, "RS256")).subject == "b"
    jwks = {"keys": [jwk_of(keys.rs, "k1"), jwk_of(keys.rs_other, "k2")]}
    two = Authenticator(Settings(jwt_jwks_file=write(tmp_path, "two.json", jwks)))
    refused(two, jwt.encode(claims(), keys.rs, "RS256"), "no 'kid'")


@pytest.mark.parametrize(
    "kid", ["../k1", "/k1", "k1/", "k1/../k1", "..", "/etc/passwd", "file:///k1", "k1\x00", ""]
)
def test_kid_with_path_characters_matches_nothing(jwks_file: str, keys: Keys, kid: str) -> None:
    a = Authenticator(Settings(jwt_jwks_file=jwks_file))
    assert refused(a, jwt.encode(claims(), keys.rs, "RS256", {"kid": kid}), "unknown key id")


def test_kid_must_be_a_string(jwks_file: str, keys: Keys) -> None:
    a = Authenticator(Settings(jwt_jwks_file=jwks_file))
    header = b64(json.dumps({"alg": "RS256", "kid": ["k1"]}).encode())
    body = b64(json.dumps(claims()).encode())
    refused(a, f"{header}.{body}.{b64(b'x' * 256)}", "malformed token")


# -- malformed tokens --------------------------------------------------------------------------


def _seg(obj: object) -> str:
    return b64(obj if isinstance(obj, bytes) else json.dumps(obj).encode())


MALFORMED = {
    "one segment": "abc",
    "two segments": f"{_seg({'alg': 'HS256'})}.{_seg(claims())}",
    "four segments": hs(claims()) + ".abc",
    "empty segments": "..",
    "bad base64 header": "!!!." + _seg(claims()) + ".sig",
    "bad base64 signature": f"{_seg({'alg': 'HS256'})}.{_seg(claims())}.***",
    "header not json": f"{_seg(b'not json')}.{_seg(claims())}.c2ln",
    "header a list": f"{_seg(['HS256'])}.{_seg(claims())}.c2ln",
    "header without alg": f"{_seg({'typ': 'JWT'})}.{_seg(claims())}.c2ln",
    "alg not a string": f"{_seg({'alg': 1})}.{_seg(claims())}.c2ln",
    "unknown crit": hs_token(claims(), SECRET.encode(), {"alg": "HS256", "crit": ["exp"]}),
    "detached payload": hs_token(b"", SECRET.encode(), {"alg": "HS256", "b64": False}),
    "payload not json": hs_token(b"\xff not json", SECRET.encode(), {"alg": "HS256"}),
    "payload a list": hs_token(b"[1, 2]", SECRET.encode(), {"alg": "HS256"}),
    "payload NaN": hs_token(b'{"sub": "a", "exp": NaN}', SECRET.encode(), {"alg": "HS256"}),
    "payload deeply nested": hs_token(
        b'{"sub": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        SECRET.encode(),
        {"alg": "HS256"},
    ),
    "bad signature": hs(claims())[:-4] + "AAAA",
    "empty": "",
    "non-ascii": hs(claims()) + "é",
    "too long": "a" * 20_000,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_tokens_are_401(name: str) -> None:
    a = hs_auth()
    with pytest.raises(Unauthorized) as e:
        a.verify_sync(MALFORMED[name])
    assert e.value.message and "error_description=" in e.value.www_authenticate
    assert a.stats["failures"] == 1 and a.stats["verified"] == 0


def test_base64url_must_be_canonical_and_may_be_padded() -> None:
    a = hs_auth()
    token = hs(claims())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # A 32-byte MAC is 43 characters; the last one carries two unused bits.
    last = alphabet[alphabet.index(token[-1]) ^ 1]
    refused(a, token[:-1] + last, "not canonical")
    header = b64(json.dumps({"alg": "HS256"}).encode())
    header += "=" * (-len(header) % 4)
    padded_input = f"{header}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(SECRET.encode(), padded_input.encode(), hashlib.sha256).digest()
    assert a.verify_sync(f"{padded_input}.{b64(mac)}=").subject == "svc-a"
    refused(a, f"{padded_input}.{b64(mac)}===", "not base64url")


def test_a_big_token_within_16_kib() -> None:
    a = hs_auth()
    token = hs(claims(blob="x" * 10_000))
    assert 10_000 < len(token) <= auth.MAX_TOKEN_BYTES
    assert a.verify_sync(Authenticator.token_from_header(f"Bearer {token}")).subject == "svc-a"
    with pytest.raises(Unauthorized, match="longer than 16 KiB"):
        Authenticator.token_from_header(b"Bearer " + b"a" * 20 * 1024)
    with pytest.raises(Unauthorized, match="longer than 16 KiB"):
        a.verify_sync(hs(claims(blob="x" * 20_000)))


# -- asymmetric keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "PS256"])
def test_pem_happy_path(tmp_path: Path, keys: Keys, alg: str) -> None:
    private = keys.private(alg)
    pem = write(tmp_path, "key.pem", pem_of(private))
    algs = (alg,) if alg == "PS256" else ()
    a = Authenticator(Settings(jwt_public_key_file=pem, jwt_algorithms=algs))
    p = a.verify_sync(jwt.encode(claims(roles=["producer"]), private, alg))
    assert p.subject == "svc-a" and p.roles == {"producer"}
    # The kid is ignored without a key set.
    assert a.verify_sync(jwt.encode(claims(sub="b"), private, alg, {"kid": "x"})).subject == "b"
    # Another key of the same type does not verify.
    if alg in ("RS256", "PS256"):
        refused(a, jwt.encode(claims(), keys.rs_other, alg), "signature verification failed")


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_jwks_file_happy_path(tmp_path: Path, keys: Keys, alg: str) -> None:
    jwks = {
        "keys": [jwk_of(k, name) for name, k in (("r", keys.rs), ("e", keys.es), ("d", keys.ed))]
    }
    a = Authenticator(Settings(jwt_jwks_file=write(tmp_path, "jwks.json", jwks)))
    kid = {"RS256": "r", "ES256": "e", "EdDSA": "d"}[alg]
    token = jwt.encode(claims(), keys.private(alg), alg, {"kid": kid})
    assert a.verify_sync(token).subject == "svc-a"
    other = {"RS256": "e", "ES256": "d", "EdDSA": "r"}[alg]
    refused(a, jwt.encode(claims(), keys.private(alg), alg, {"kid": other}), "is not for")


def test_certificate_pem_and_bad_key_files(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        Authenticator(Settings(jwt_public_key_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="not a PEM public key"):
        Authenticator(Settings(jwt_public_key_file=write(tmp_path, "junk.pem", b"junk")))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="1024 bits"):
        Authenticator(Settings(jwt_public_key_file=write(tmp_path, "small.pem", pem_of(small))))
    with pytest.raises(ConfigError, match="not a JWK Set"):
        Authenticator(Settings(jwt_jwks_file=write(tmp_path, "set.json", {"keys": 1})))
    with pytest.raises(ConfigError, match="not JSON"):
        Authenticator(Settings(jwt_jwks_file=write(tmp_path, "set.json", b"{")))


def test_jwks_skips_keys_it_cannot_use(tmp_path: Path, keys: Keys) -> None:
    enc = jwk_of(keys.rs, "enc")
    enc["use"] = "enc"
    wrong_alg = jwk_of(keys.es, "wrong", alg="RS256")
    jwks = {
        "keys": [
            enc,
            wrong_alg,
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            5,
            jwk_of(keys.ed, "ok"),
        ]
    }
    a = Authenticator(Settings(jwt_jwks_file=write(tmp_path, "jwks.json", jwks)))
    refused(a, jwt.encode(claims(), keys.rs, "RS256", {"kid": "enc"}), "unknown key id")
    refused(a, jwt.encode(claims(), keys.es, "ES256", {"kid": "wrong"}), "unknown key id")
    assert a.verify_sync(jwt.encode(claims(), keys.ed, "EdDSA", {"kid": "ok"}))


# -- JWKS URL ----------------------------------------------------------------------------------


@dataclass
class JwksServer:
    url: str
    server: ThreadingHTTPServer
    keys: list[dict[str, object]] = field(default_factory=list)
    hits: int = 0

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    state: list[JwksServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            srv = state[0]
            srv.hits += 1
            body = json.dumps({"keys": srv.keys}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv = JwksServer(f"http://127.0.0.1:{server.server_address[1]}/jwks.json", server)
    state.append(srv)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield srv
    if thread.is_alive():
        srv.stop()
    thread.join(5)


def test_jwks_url_refreshes_once_per_cooldown(jwks_server: JwksServer, keys: Keys) -> None:
    jwks_server.keys = [jwk_of(keys.rs, "k1")]
    a = Authenticator(Settings(jwt_jwks_url=jwks_server.url, jwt_jwks_cooldown_s=60))

    def tok(kid: str, key: Any = keys.rs, sub: str = "svc-a") -> str:
        return jwt.encode(claims(sub=sub), key, "RS256", {"kid": kid})

    async def main() -> None:
        await a.start()
        try:
            assert jwks_server.hits == 1
            first = tok("k1")
            assert (await a.verify(first)).subject == "svc-a"
            # Rotation: k2 appears; the first token naming it triggers one refresh.
            jwks_server.keys = [jwk_of(keys.rs, "k1"), jwk_of(keys.rs_other, "k2")]
            assert (await a.verify(tok("k2", keys.rs_other))).subject == "svc-a"
            assert jwks_server.hits == 2
            assert a.cached(first) is not None  # k1 is still there: nothing dropped
            # Another unknown kid inside the cooldown: no fetch.
            with pytest.raises(Unauthorized, match="unknown key id 'k3'"):
                await a.verify(tok("k3"))
            assert jwks_server.hits == 2
            # verify_sync never fetches.
            with pytest.raises(Unauthorized, match="unknown key id 'k4'"):
                a.verify_sync(tok("k4"))
            assert jwks_server.hits == 2
        finally:
            await a.close()

    run(main())
    assert a.stats["jwks_fetches"] == 2


def test_concurrent_unknown_kids_share_one_fetch(jwks_server: JwksServer, keys: Keys) -> None:
    jwks_server.keys = [jwk_of(keys.rs, "k1")]
    a = Authenticator(Settings(jwt_jwks_url=jwks_server.url, jwt_jwks_cooldown_s=0))

    async def main() -> None:
        await a.start()
        try:
            jwks_server.keys = [jwk_of(keys.rs, "k1"), jwk_of(keys.es, "e1")]
            tokens = [
                jwt.encode(claims(sub=f"s{i}"), keys.es, "ES256", {"kid": "e1"}) for i in range(20)
            ]
            results = await asyncio.gather(*(a.verify(t) for t in tokens))
            assert [p.subject for p in results] == [f"s{i}" for i in range(20)]
            assert jwks_server.hits == 2
        finally:
            await a.close()

    run(main())


def test_jwks_url_down_keeps_the_last_good_keys(jwks_server: JwksServer, keys: Keys) -> None:
    jwks_server.keys = [jwk_of(keys.rs, "k1")]
    a = Authenticator(Settings(jwt_jwks_url=jwks_server.url, jwt_jwks_cooldown_s=0))
    changed: list[int] = []
    a.on_keys_changed = lambda: changed.append(1)

    async def main() -> None:
        await a.start()
        try:
            jwks_server.stop()
            with pytest.raises(Unauthorized, match="unknown key id 'k2'"):
                await a.verify(jwt.encode(claims(), keys.rs, "RS256", {"kid": "k2"}))
            assert a.stats["jwks_fetch_failures"] == 1
            assert await a.verify(jwt.encode(claims(), keys.rs, "RS256", {"kid": "k1"}))
        finally:
            await a.close()

    run(main())
    assert changed == []


def test_a_withdrawn_key_drops_the_cache(jwks_server: JwksServer, keys: Keys) -> None:
    jwks_server.keys = [jwk_of(keys.rs, "k1")]
    a = Authenticator(Settings(jwt_jwks_url=jwks_server.url, jwt_jwks_cooldown_s=0))
    changed: list[int] = []
    a.on_keys_changed = lambda: changed.append(1)
    t1 = jwt.encode(claims(), keys.rs, "RS256", {"kid": "k1"})

    async def main() -> None:
        await a.start()
        try:
            await a.verify(t1)
            assert a.cached(t1) is not None
            jwks_server.keys = [jwk_of(keys.rs_other, "k2")]
            await a.verify(jwt.encode(claims(), keys.rs_other, "RS256", {"kid": "k2"}))
            assert a.cached(t1) is None and changed == [1]
            with pytest.raises(Unauthorized, match="unknown key id 'k1'"):
                await a.verify(t1)
        finally:
            await a.close()

    run(main())


def test_jwks_url_at_start(jwks_server: JwksServer) -> None:
    url = jwks_server.url
    jwks_server.stop()
    with pytest.raises(ConfigError, match="cannot fetch the key set"):
        run(Authenticator(Settings(jwt_jwks_url=url)).start())

    async def with_secret() -> None:
        a = Authenticator(Settings(jwt_jwks_url=url, jwt_secret=SECRET))
        await a.start()  # logged, not fatal: the secret still verifies HS tokens
        try:
            assert (await a.verify(hs(claims()))).subject == "svc-a"
        finally:
            await a.close()

    run(with_secret())


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://idp.example/jwks.json", True),
        ("http://127.0.0.1:8080/jwks", True),
        ("http://[::1]/jwks", True),
        ("http://localhost/jwks", True),
        ("http://idp.example/jwks.json", False),
        ("http://10.0.0.1/jwks.json", False),
        ("file:///etc/passwd", False),
        ("ftp://idp.example/jwks", False),
        ("https:///jwks", False),
    ],
)
def test_jwks_url_scheme(url: str, ok: bool) -> None:
    if ok:
        Authenticator(Settings(jwt_jwks_url=url))
    else:
        with pytest.raises(ConfigError, match="MESSAGE_QUEUE_JWT_JWKS_URL"):
            Authenticator(Settings(jwt_jwks_url=url))


# -- the cache ---------------------------------------------------------------------------------


def test_cached_after_verify_and_not_after_exp(monkeypatch: pytest.MonkeyPatch) -> None:
    a = hs_auth(jwt_leeway_s=0)
    now = time.time()
    t = hs(claims(exp=int(now) + 100))
    assert a.cached(t) is None
    p = run(a.verify(t))
    assert a.cached(t) is p and a.stats["cache_hits"] == 1
    assert run(a.verify(t)) is p and a.stats["verified"] == 1
    monkeypatch.setattr(auth, "_time", lambda: now + 101)
    assert a.cached(t) is None
    assert t not in a._cache


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "CACHE_MAX", 10)
    monkeypatch.setattr(auth, "_CACHE_EVICT", 3)
    a = hs_auth()
    tokens = [hs(claims(sub=f"s{i}")) for i in range(25)]
    for t in tokens:
        a.verify_sync(t)
        assert len(a._cache) <= 10
    assert a.cached(tokens[-1]) is not None and a.cached(tokens[0]) is None


# -- permissions -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "producer", "consumer", "auditor"])
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("topic", ["orders", "a.b.c", None])
def test_role_matrix(role: str, action: str, topic: str | None) -> None:
    p = Principal("svc-a", roles=[role])
    expected = {
        "admin": True,
        "producer": action == "produce",
        "consumer": action == "consume",
        "auditor": False,
    }[role]
    assert p.allows(action, topic, "billing") is expected
    assert p.allows(action, topic) is expected


def test_grants_with_patterns_and_groups() -> None:
    p = Principal(
        "svc-a",
        grants=[
            Grant("orders.*", frozenset({"produce", "consume"}), frozenset({"billing"})),
            Grant("audit", frozenset({"consume"})),
            Grant("ops.?", frozenset({"admin"})),
        ],
    )
    assert p.allows("produce", "orders.eu")
    assert p.allows("produce", "orders.eu.paid")  # '*' crosses dots
    assert not p.allows("produce", "orders")
    assert not p.allows("produce", "Orders.eu")  # case-sensitive
    assert p.allows("consume", "orders.eu", "billing")
    assert not p.allows("consume", "orders.eu", "shipping")
    assert not p.allows("consume", "orders.eu")  # restricted to groups: a group is needed
    assert p.allows("consume", "audit", "anyone") and p.allows("consume", "audit")
    assert not p.allows("produce", "audit")
    assert p.allows("admin", "ops.1") and not p.allows("admin", "ops.12")
    assert not p.allows("admin")  # not cluster-wide
    assert not p.allows("produce") and not p.allows("consume", None, "billing")


def test_cluster_wide_admin() -> None:
    star = Principal("ops", grants=[Grant("*", frozenset({"admin"}))])
    assert star.allows("admin") and star.allows("admin", "anything")
    assert not star.allows("produce", "anything")
    assert Principal("root", roles=["admin"]).allows("admin")
    assert not Principal("p", roles=["producer", "consumer"]).allows("admin")
    produce_all = Principal("p", grants=[Grant("*", frozenset({"produce"}))])
    assert produce_all.allows("produce") and not produce_all.allows("admin")


def test_forbidden_names_the_missing_permission() -> None:
    p = Principal("svc-a", roles=["consumer"])
    with pytest.raises(Forbidden) as e:
        p.require("produce", "orders")
    assert e.value.status == 403 and e.value.code == ErrorCode.FORBIDDEN
    assert e.value.message == (
        "subject 'svc-a' may not produce to topic 'orders' "
        "(needs 'produce' on a pattern matching it)"
    )
    assert b'"code":"forbidden"' in e.value.to_body()
    with pytest.raises(Forbidden, match="cluster-wide administration"):
        p.require("admin")
    with pytest.raises(Forbidden, match="administer topic 'orders'"):
        p.require("admin", "orders")
    q = Principal("svc-b", grants=[Grant("t", frozenset({"consume"}), frozenset({"g1"}))])
    q.require("consume", "t", "g1")
    with pytest.raises(Forbidden, match="consume from topic 't' as group 'g2'"):
        q.require("consume", "t", "g2")
    with pytest.raises(ValueError, match="unknown action"):
        q.allows("delete", "t")


def test_answers_are_memoised_in_a_bounded_dict() -> None:
    p = Principal("svc-a", grants=[Grant("t.*", frozenset({"produce"}))])
    assert p.allows("produce", "t.1") and ("produce", "t.1", None) in p._memo
    for i in range(1000):
        p.allows("produce", f"t.{i}")
    assert len(p._memo) <= 64


GRANTS_OK: list[dict[str, object]] = [
    {"topics": "orders.*", "actions": ["produce", "consume"], "groups": ["billing"]},
    {"topics": "*", "actions": ["admin"]},
]


def test_grants_from_the_token() -> None:
    a = hs_auth()
    p = a.verify_sync(hs(claims(grants=GRANTS_OK, roles="producer auditor")))
    assert p.roles == {"producer", "auditor"}
    assert p.grants == (
        Grant("orders.*", frozenset({"produce", "consume"}), frozenset({"billing"})),
        Grant("*", frozenset({"admin"}), None),
    )
    assert p.allows("admin") and p.allows("consume", "orders.x", "billing")


@pytest.mark.parametrize(
    "grants",
    [
        "orders.*",
        {"topics": "*", "actions": ["produce"]},
        [1],
        [{"topics": "*"}],
        [{"actions": ["produce"]}],
        [{"topics": "", "actions": ["produce"]}],
        [{"topics": 5, "actions": ["produce"]}],
        [{"topics": "*", "actions": []}],
        [{"topics": "*", "actions": "produce"}],
        [{"topics": "*", "actions": ["delete"]}],
        [{"topics": "*", "actions": ["produce"], "groups": []}],
        [{"topics": "*", "actions": ["produce"], "groups": "billing"}],
        [{"topics": "*", "actions": ["produce"], "groups": [1]}],
        [{"topics": "*", "actions": ["produce"], "group": ["billing"]}],
        [{"topics": "*", "actions": ["produce"]}] * 300,
    ],
)
def test_malformed_grants_claim_is_401(grants: object) -> None:
    e = refused(hs_auth(), hs(claims(grants=grants)), "invalid grants claim")
    assert e.reason == "bad_claims"


# -- the Authorization header ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        (b"Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc.def.ghi", "abc.def.ghi"),
        ("BEARER abc.def.ghi", "abc.def.ghi"),
        ("Bearer  abc.def.ghi", "abc.def.ghi"),
        (" Bearer abc.def.ghi \t", "abc.def.ghi"),
    ],
)
def test_token_from_header(value: str | bytes, token: str) -> None:
    assert Authenticator.token_from_header(value) == token


@pytest.mark.parametrize(
    ("value", "fragment", "error"),
    [
        (None, "missing bearer token", None),
        ("", "scheme must be Bearer", None),
        ("Basic dXNlcjpwYXNz", "scheme must be Bearer", None),
        ("Bearerabc.def.ghi", "scheme must be Bearer", None),
        ("Bearer", "empty bearer token", "invalid_request"),
        ("Bearer    ", "empty bearer token", "invalid_request"),
        ("Bearer a b", "whitespace", "invalid_request"),
        (b"Bearer \xc3\xa9", "not ASCII", "invalid_request"),
        ("Bearer é", "not ASCII", "invalid_request"),
        ("Bearer " + "a" * (16 * 1024 + 1), "longer than 16 KiB", "invalid_request"),
        (b"Bearer " + b"a" * 20 * 1024, "longer than 16 KiB", "invalid_request"),
    ],
)
def test_token_from_header_refuses(
    value: str | bytes | None, fragment: str, error: str | None
) -> None:
    with pytest.raises(Unauthorized) as e:
        Authenticator.token_from_header(value)
    assert fragment in e.value.message
    if error is None:
        assert e.value.www_authenticate == 'Bearer realm="mqfast"'
    else:
        assert f'error="{error}"' in e.value.www_authenticate
    assert e.value.extra_headers == (
        b"www-authenticate: " + e.value.www_authenticate.encode() + b"\r\n"
    )


def test_challenge_is_header_safe() -> None:
    e = Unauthorized('bad "kid" \\ \r\nx-injected: 1 é')
    assert e.www_authenticate == (
        'Bearer realm="mqfast", error="invalid_token", '
        "error_description=\"bad 'kid' ? ??x-injected: 1 ?\""
    )
    body = json.loads(e.to_body())
    assert body == {
        "error": {"code": "unauthorized", "message": 'bad "kid" \\ \r\nx-injected: 1 é'}
    }


# -- issuing -----------------------------------------------------------------------------------


def test_make_token_round_trip() -> None:
    s = Settings(jwt_secret=SECRET, jwt_issuer="mqfast-cli", jwt_audience="mqfast")
    token = make_token(s, "svc-a", roles=["producer"], grants=list(GRANTS_OK), ttl_s=120)
    p = Authenticator(s).verify_sync(token)
    assert p.subject == "svc-a" and p.roles == {"producer"} and len(p.grants) == 2
    assert 100 < p.expires_at - time.time() <= 121
    body = jwt.decode(token, SECRET, algorithms=["HS256"], audience="mqfast")
    assert body["iss"] == "mqfast-cli" and {"iat", "nbf", "exp"} <= set(body)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    t512 = make_token(s, "svc-b", algorithm="HS512")
    assert jwt.get_unverified_header(t512)["alg"] == "HS512"
    assert Authenticator(s).verify_sync(t512).roles == frozenset()


def test_make_token_refuses(keys: Keys, tmp_path: Path) -> None:
    pem = write(tmp_path, "rsa.pem", pem_of(keys.rs))
    with pytest.raises(ConfigError, match="needs MESSAGE_QUEUE_JWT_SECRET"):
        make_token(Settings(jwt_public_key_file=pem), "svc-a")
    s = Settings(jwt_secret=SECRET)
    with pytest.raises(ConfigError, match="HMAC only"):
        make_token(s, "svc-a", algorithm="RS256")
    with pytest.raises(ConfigError, match="HMAC only"):
        make_token(s, "svc-a", algorithm="none")
    with pytest.raises(ConfigError, match="at least 64"):
        make_token(Settings(jwt_secret="x" * 40), "svc-a", algorithm="HS512")
    with pytest.raises(ConfigError, match="does not allow HS384"):
        make_token(Settings(jwt_secret=SECRET, jwt_algorithms=("HS256",)), "a", algorithm="HS384")
    with pytest.raises(ValueError, match="actions"):
        make_token(s, "svc-a", grants=[{"topics": "*", "actions": ["write"]}])
    with pytest.raises(ValueError, match="ttl_s"):
        make_token(s, "svc-a", ttl_s=0)
    with pytest.raises(ValueError, match="subject"):
        make_token(s, "")


def test_stats_count_by_reason() -> None:
    a = hs_auth()
    a.verify_sync(hs(claims()))
    for t in ("x", hs(claims(exp=1)), hs(claims(exp=1))):
        with pytest.raises(Unauthorized):
            a.verify_sync(t)
    assert a.stats["verified"] == 1 and a.stats["failures"] == 3
    assert a.stats["failed_malformed"] == 1 and a.stats["failed_expired"] == 2
