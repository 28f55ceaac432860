"""JWT authentication and topic-level authorisation.

``Authenticator`` turns a bearer token into a ``Principal`` (the subject, its roles and grants),
``Principal.require`` says whether that subject may produce to, consume from or administer a
topic. Verification is the slow path: the compiled core keeps the principals of the
``Authorization`` headers it has seen (a dict lookup per request, dropped by ``on_keys_changed``)
and awaits ``verify`` only for a header it has not; ``verify`` keeps its own cache by token.

Rules, all enforced here rather than left to defaults of the library:

* an explicit allow-list of algorithms; ``none`` is refused at start-up and at verification;
* a key is only ever used with the algorithm family of its type: HMAC tokens are checked with
  ``MESSAGE_QUEUE_JWT_SECRET`` alone, never with PEM or JWKS material (the HS/RS confusion);
* ``exp`` is required, ``nbf`` and ``iat`` are checked with the configured leeway, ``iss`` and
  ``aud`` when configured; the subject claim must be a non-empty string;
* a ``kid`` is an opaque dictionary key, never part of a path or URL;
* anything malformed is a 401 with an ``error_description`` saying what, never a 500.

PyJWT provides the signature algorithms and reads JWKs. The compact form is parsed here (one regular
expression and strict base64url, about 15 µs cheaper per token than PyJWT's parser, which tests
each character in Python) and the claim checks are written out so that every claim has one strict
type and one message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import logging
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final, TypeAlias

import jwt
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import Algorithm, ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from mqfast import errors
from mqfast.config import Settings, is_loopback

__all__ = [
    "ACTIONS",
    "Authenticator",
    "Forbidden",
    "Grant",
    "Principal",
    "Unauthorized",
    "make_token",
    "parse_grants",
]

log = logging.getLogger("mqfast.auth")

ACTIONS: Final = ("produce", "consume", "admin")
ROLES: Final = ("admin", "producer", "consumer")

MAX_TOKEN_BYTES: Final = 16 * 1024
# A bearer header is "Bearer " plus the token; anything longer is refused before decoding it.
_MAX_HEADER_BYTES: Final = MAX_TOKEN_BYTES + 64
CACHE_MAX: Final = 100_000  # verified tokens kept; ~1 KiB each with the principal
_CACHE_EVICT: Final = CACHE_MAX // 16  # evicted at once, so eviction is not a scan per insert
_MEMO_MAX: Final = 64  # permission answers per principal: (action, topic, group) triples
_MAX_GRANTS: Final = 256
_MAX_NAME: Final = 1024  # subject, role, pattern, group: longer is not a name, it is an attack
_JWKS_MAX_BYTES: Final = 1 << 20
_JWKS_TIMEOUT_S: Final = 5.0
_JWKS_MAX_KEYS: Final = 256
_JWKS_REFRESH_S: Final = 300.0  # background refresh; key rotation announces new keys ahead
_MIN_RSA_BITS: Final = 2048

_HMAC_ALGS: Final = ("HS256", "HS384", "HS512")
_HMAC_MIN_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2
_RSA_ALGS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGS: Final[dict[str, type[ec.EllipticCurve]]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_OKP_ALGS: Final = ("EdDSA",)
SUPPORTED_ALGORITHMS: Final = (*_HMAC_ALGS, *_RSA_ALGS, *_EC_ALGS, *_OKP_ALGS)
_DEFAULT_PUBLIC_ALGS: Final = ("RS256", "ES256", "EdDSA")

_REALM: Final = "mqfast"
_time = time.time

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


# ---- errors ------------------------------------------------------------------------------------


def _header_safe(text: str) -> str:
    # RFC 6750 §3: error_description is %x20-21 / %x23-5B / %x5D-7E, so neither '"' nor '\'
    # nor anything that could end the header line.
    out = "".join(
        c if " " <= c <= "~" and c not in '"\\' else ("'" if c == '"' else "?") for c in text
    )
    return out[:200]


class Unauthorized(errors.MqfastError):
    """No valid bearer token: 401 with a ``WWW-Authenticate`` challenge (RFC 6750).

    ``error`` is the RFC 6750 error code (``invalid_token`` or ``invalid_request``), or ``None``
    when the request carried no bearer credentials at all, which gets the bare challenge.
    ``reason`` is a short stable name for the failure, used to count failures by kind.
    """

    status = 401
    code = errors.ErrorCode.UNAUTHORIZED

    def __init__(
        self, description: str, *, error: str | None = "invalid_token", reason: str = "invalid"
    ) -> None:
        super().__init__(description)
        self.reason = reason
        challenge = f'Bearer realm="{_REALM}"'
        if error is not None:
            challenge += f', error="{error}", error_description="{_header_safe(description)}"'
        self.www_authenticate = challenge
        self.extra_headers = b"www-authenticate: " + challenge.encode("ascii") + b"\r\n"


class Forbidden(errors.MqfastError):
    """A valid token whose roles and grants do not cover the request: 403."""

    status = 403
    code = errors.ErrorCode.FORBIDDEN

    def __init__(self, message: str, *, field: str | None = None, target: str = "") -> None:
        super().__init__(message, field=field)
        self.target = target  # what was refused (a topic; "" cluster-wide), for the audit log


# ---- grants and principals ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission on the topics matching ``topics`` (``fnmatchcase``: ``*``, ``?``, ``[...]``).

    ``*`` matches dots too: ``orders.*`` covers ``orders.eu.paid``. ``groups`` limits
    ``consume`` to those consumer groups; ``None`` allows any group.
    """

    topics: str
    actions: frozenset[str]
    groups: frozenset[str] | None = None


def _name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_NAME


def parse_grants(raw: object) -> tuple[Grant, ...]:
    """Validate a grants claim: a list of ``{"topics", "actions"[, "groups"]}`` objects.

    Raises ``ValueError`` naming the first fault; unknown keys are faults too, so that a typo
    (``"group"`` for ``"groups"``) cannot silently widen a grant.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError("expected a list of grant objects")
    if len(raw) > _MAX_GRANTS:
        raise ValueError(f"more than {_MAX_GRANTS} grants")
    out: list[Grant] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ValueError(f"grant {i} is not an object")
        unknown = set(item) - {"topics", "actions", "groups"}
        if unknown:
            raise ValueError(f"grant {i} has unknown keys {sorted(map(str, unknown))}")
        topics = item.get("topics")
        if not _name(topics):
            raise ValueError(f"grant {i}: 'topics' must be a non-empty pattern string")
        actions = item.get("actions")
        if (
            not isinstance(actions, list)
            or not actions
            or not all(isinstance(a, str) and a in ACTIONS for a in actions)
        ):
            raise ValueError(
                f"grant {i}: 'actions' must be a non-empty list of {', '.join(ACTIONS)}"
            )
        groups = item.get("groups")
        if groups is not None and (
            not isinstance(groups, list)
            or not groups
            or len(groups) > _MAX_GRANTS
            or not all(_name(g) for g in groups)
        ):
            raise ValueError(f"grant {i}: 'groups' must be a non-empty list of group ids")
        out.append(
            Grant(
                str(topics),
                frozenset(actions),
                None if groups is None else frozenset(str(g) for g in groups),
            )
        )
    return tuple(out)


class Principal:
    """The subject of one verified token, with what it may do.

    Built-in roles: ``admin`` (everything, including cluster-wide administration),
    ``producer`` (produce to any topic), ``consumer`` (consume any topic in any group). Other
    roles are kept but grant nothing. ``topic=None`` asks about every topic at once: for
    ``admin`` that is cluster-wide administration (topic management, consumer registration,
    audit), which only the admin role or a grant on ``*`` with ``admin`` allows.
    """

    __slots__ = ("_memo", "expires_at", "grants", "quota_key", "revoked", "roles", "subject")

    def __init__(
        self,
        subject: str,
        roles: Iterable[str] = (),
        grants: Iterable[Grant] = (),
        expires_at: float = math.inf,
        quota_key: str | None = None,
    ) -> None:
        self.subject = subject
        self.roles = frozenset(roles)
        self.grants = tuple(grants)
        self.expires_at = expires_at
        self.quota_key = subject if quota_key is None else quota_key
        # Set when the subject's stored grants changed after this was built: a cache of
        # principals must not keep it (see Authenticator.forget_subject).
        self.revoked = False
        self._memo: dict[tuple[str, str | None, str | None], bool] = {}

    def __repr__(self) -> str:
        return (
            f"Principal(subject={self.subject!r}, roles={sorted(self.roles)!r}, "
            f"grants={self.grants!r}, expires_at={self.expires_at!r})"
        )

    def allows(self, action: str, topic: str | None = None, group: str | None = None) -> bool:
        """Whether ``action`` on ``topic`` (as consumer group ``group``) is permitted."""
        key = (action, topic, group)
        answer = self._memo.get(key)
        if answer is None:
            answer = self._decide(action, topic, group)
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[key] = answer
        return answer

    def require(self, action: str, topic: str | None = None, group: str | None = None) -> None:
        """Raise ``Forbidden`` naming the missing permission unless ``allows(...)``."""
        if not self.allows(action, topic, group):
            raise Forbidden(self._denial(action, topic, group), target=topic or "")

    def _decide(self, action: str, topic: str | None, group: str | None) -> bool:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
        roles = self.roles
        if "admin" in roles:
            return True
        if (action == "produce" and "producer" in roles) or (
            action == "consume" and "consumer" in roles
        ):
            return True
        for g in self.grants:
            if action not in g.actions:
                continue
            if topic is None:
                if g.topics != "*":
                    continue
            elif not fnmatchcase(topic, g.topics):
                continue
            if action == "consume" and g.groups is not None and group not in g.groups:
                continue
            return True
        return False

    def _denial(self, action: str, topic: str | None, group: str | None) -> str:
        who = f"subject {self.subject!r} may not"
        if action == "admin" and topic is None:
            return (
                f"{who} perform cluster-wide administration "
                "(needs the 'admin' role or 'admin' on topics '*')"
            )
        if topic is None:
            return f"{who} {action} on every topic (needs {action!r} on topics '*')"
        what = {
            "produce": f"produce to topic {topic!r}",
            "consume": f"consume from topic {topic!r}",
            "admin": f"administer topic {topic!r}",
        }.get(action, f"{action} on topic {topic!r}")
        if action == "consume" and group is not None:
            what += f" as group {group!r}"
            need = f"needs 'consume' on a pattern matching it, for group {group!r}"
        else:
            need = f"needs {action!r} on a pattern matching it"
        return f"{who} {what} ({need})"


# ---- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    key: PublicKey
    algs: frozenset[str]  # the allowed algorithms this key may verify


def _key_algs(key: PublicKey) -> tuple[str, ...]:
    """The algorithms a public key can verify, by its type (and curve)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return tuple(a for a, curve in _EC_ALGS.items() if isinstance(key.curve, curve))
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return _OKP_ALGS
    return ()


def _read_key_file(var: str, path: str) -> bytes:
    """The content of a key file named by ``var``: at most 1 MiB, ConfigError otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(_JWKS_MAX_BYTES + 1)
    except OSError as e:
        raise errors.ConfigError(f"{var}={path!r}: cannot read it ({e.strerror})") from None
    if len(data) > _JWKS_MAX_BYTES:
        raise errors.ConfigError(f"{var}={path!r}: larger than 1 MiB")
    return data


def _load_pem(path: str) -> PublicKey:
    var = "MESSAGE_QUEUE_JWT_PUBLIC_KEY_FILE"
    data = _read_key_file(var, path)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            loaded: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            loaded = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise errors.ConfigError(
            f"{var}={path!r}: not a PEM public key or certificate ({e})"
        ) from None
    if not isinstance(
        loaded,
        rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):  # fmt: skip
        raise errors.ConfigError(
            f"{var}={path!r}: {type(loaded).__name__} is not an RSA, EC or Ed25519/Ed448 key"
        )
    if isinstance(loaded, ec.EllipticCurvePublicKey) and not _key_algs(loaded):
        raise errors.ConfigError(f"{var}={path!r}: EC curve {loaded.curve.name} is not supported")
    if isinstance(loaded, rsa.RSAPublicKey) and loaded.key_size < _MIN_RSA_BITS:
        raise errors.ConfigError(
            f"{var}={path!r}: RSA key of {loaded.key_size} bits; at least {_MIN_RSA_BITS} needed"
        )
    return loaded


def _parse_jwks(data: bytes, allowed: frozenset[str]) -> tuple[list[_Key], list[str]]:
    """The usable signing keys of a JWK Set, and why each other key was skipped.

    Raises ``ValueError`` when the document is not a JWK Set at all. Symmetric (``oct``) keys
    are never taken from a key set: HMAC tokens are checked with the configured secret only.
    """
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWK Set (expected an object with a "keys" list)')
    keys: list[_Key] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for i, jwk in enumerate(doc["keys"][:_JWKS_MAX_KEYS]):
        label = f"key {i}"
        if not isinstance(jwk, dict):
            skipped.append(f"{label}: not an object")
            continue
        kid = jwk.get("kid")
        if kid is not None:
            if not isinstance(kid, str):
                skipped.append(f"{label}: kid is not a string")
                continue
            label = f"key {kid[:64]!r}"
            if kid in seen:
                skipped.append(f"{label}: duplicate kid")
                continue
        use = jwk.get("use")
        ops = jwk.get("key_ops")
        if (use is not None and use != "sig") or (
            ops is not None and (not isinstance(ops, list) or "verify" not in ops)
        ):
            skipped.append(f"{label}: not a signature verification key")
            continue
        kty = jwk.get("kty")
        parser: Callable[[Any], Any]
        if kty == "RSA":
            parser = RSAAlgorithm.from_jwk
        elif kty == "EC":
            parser = ECAlgorithm.from_jwk
        elif kty == "OKP":
            parser = OKPAlgorithm.from_jwk
        else:
            skipped.append(f"{label}: key type {str(kty)[:16]!r} is not used")
            continue
        try:
            obj = parser(jwk)
            if hasattr(obj, "public_key"):  # a private JWK: only its public half is kept
                obj = obj.public_key()
        except Exception as e:  # PyJWT raises several types for a malformed JWK
            skipped.append(f"{label}: invalid ({type(e).__name__}: {e})")
            continue
        algs = set(_key_algs(obj)) & allowed
        alg = jwk.get("alg")
        if alg is not None:
            algs &= {alg} if isinstance(alg, str) else set()
        if isinstance(obj, rsa.RSAPublicKey) and obj.key_size < _MIN_RSA_BITS:
            skipped.append(f"{label}: RSA key of {obj.key_size} bits")
            continue
        if not algs:
            skipped.append(f"{label}: fits no allowed algorithm")
            continue
        if kid is not None:
            seen.add(kid)
        keys.append(_Key(kid, obj, frozenset(algs)))
    if len(doc["keys"]) > _JWKS_MAX_KEYS:
        skipped.append(f"keys beyond the first {_JWKS_MAX_KEYS} ignored")
    return keys, skipped


def _check_jwks_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is https, or http to a loopback address."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return
    raise ValueError(f"{url!r}: expected an https URL (http only to a loopback address)")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        _check_jwks_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_jwks(url: str) -> bytes:
    """GET ``url`` (blocking; run in a thread): at most 1 MiB, about 5 s in all."""
    handlers: list[urllib.request.BaseHandler] = [_CheckedRedirects()]
    if is_loopback(urllib.parse.urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))  # a proxy cannot reach our loopback
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(
        url,
        headers={"Accept": "application/jwk-set+json, application/json", "User-Agent": "mqfast"},
    )
    deadline = time.monotonic() + _JWKS_TIMEOUT_S
    chunks: list[bytes] = []
    size = 0
    with opener.open(request, timeout=_JWKS_TIMEOUT_S) as resp:
        while True:
            chunk = resp.read(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > _JWKS_MAX_BYTES:
                raise ValueError("key set larger than 1 MiB")
            if time.monotonic() > deadline:
                raise TimeoutError(f"key set not received within {_JWKS_TIMEOUT_S:g} s")
            chunks.append(chunk)
    return b"".join(chunks)


# ---- verification ------------------------------------------------------------------------------


# Three base64url segments; up to two '=' of padding are tolerated (some issuers, AWS ALB, add
# them). One pass over the token instead of a per-character test in Python.
_COMPACT = re.compile(r"([A-Za-z0-9_-]*={0,2})\.([A-Za-z0-9_-]*={0,2})\.([A-Za-z0-9_-]*={0,2})")


def _b64(segment: str, what: str) -> bytes:
    data = segment.rstrip("=")
    if (len(data) != len(segment) and len(segment) % 4) or len(data) % 4 == 1:
        raise Unauthorized(f"malformed token: {what} is not base64url", reason="malformed")
    try:
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise Unauthorized(
            f"malformed token: {what} is not base64url", reason="malformed"
        ) from None
    # Unused trailing bits must be zero: one token, one spelling (no signature malleability).
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != data.encode("ascii"):
        raise Unauthorized(
            f"malformed token: {what} is not canonical base64url", reason="malformed"
        )
    return raw


@dataclass(slots=True)
class _Parsed:
    token: str
    alg: str
    kid: str | None
    payload: str  # still base64url: decoded once the signature holds
    signature: bytes


def _number(claims: Mapping[str, object], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            seconds = float(value)
            if math.isfinite(seconds):
                return seconds
    raise Unauthorized(f"claim {name!r} must be a number of seconds", reason="bad_claims")


class Authenticator:
    """Verifies bearer tokens against the configured keys and caches the results until ``exp``.

    Keys: ``MESSAGE_QUEUE_JWT_SECRET`` (HMAC only), ``MESSAGE_QUEUE_JWT_PUBLIC_KEY_FILE`` (one
    PEM public key or certificate), ``MESSAGE_QUEUE_JWT_JWKS_FILE`` (read once) and
    ``MESSAGE_QUEUE_JWT_JWKS_URL`` (fetched at ``start``, every five minutes, and on an unknown
    ``kid`` at most once per ``MESSAGE_QUEUE_JWT_JWKS_COOLDOWN``). With a key set configured, a
    token with a ``kid`` must name a key of it; without one the ``kid`` is ignored.

    ``on_keys_changed`` (optional) is called when a refresh removed or replaced keys: the token
    cache here is dropped then, and so should be any cache of principals built on top of it.

    ``stored_grants`` (optional, ``grants.GrantCache.get``) gives the grants kept in the metadata
    store for a subject; they are added to the claim grants of each principal verified. When
    they change, ``forget_subject`` drops that subject's principals from the cache.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stats: dict[str, int] = {"verified": 0, "failures": 0}
        self._hits = 0  # verifications answered from the cache
        self.on_keys_changed: Callable[[], None] | None = None
        self.stored_grants: Callable[[str], tuple[Grant, ...]] | None = None
        self._cache: dict[str, Principal] = {}
        self._secret = settings.jwt_secret.encode("utf-8") if settings.jwt_secret else b""
        self._pem: _Key | None = None
        self._file_keys: list[_Key] = []
        self._url_keys: list[_Key] = []
        self._by_kid: dict[str, _Key] = {}
        self._no_kid: list[_Key] = []
        self._jwks_url = settings.jwt_jwks_url
        self._fetch_task: asyncio.Task[bool] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._next_kid_refresh = -math.inf
        self._last_fetch_ok = False
        self._last_fetch_error = ""
        if not settings.auth_enabled:
            raise errors.ConfigError(
                "authentication needs a key: set MESSAGE_QUEUE_JWT_SECRET, "
                "MESSAGE_QUEUE_JWT_PUBLIC_KEY_FILE, MESSAGE_QUEUE_JWT_JWKS_FILE or "
                "MESSAGE_QUEUE_JWT_JWKS_URL"
            )
        if self._jwks_url:
            try:
                _check_jwks_url(self._jwks_url)
            except ValueError as e:
                raise errors.ConfigError(f"MESSAGE_QUEUE_JWT_JWKS_URL={e}") from None
        pem = _load_pem(settings.jwt_public_key_file) if settings.jwt_public_key_file else None
        self.algorithms = self._allow_list(pem)
        allowed = frozenset(self.algorithms)
        defaults = jwt.algorithms.get_default_algorithms()
        self._algs: dict[str, Algorithm] = {a: defaults[a] for a in self.algorithms}
        if self._secret:
            self._check_secret()
        if pem is not None:
            self._pem = _Key(None, pem, frozenset(_key_algs(pem)) & allowed)
        if settings.jwt_jwks_file:
            self._file_keys = self._load_jwks_file(settings.jwt_jwks_file, allowed)
        self._rebuild()

    # ---- configuration --------------------------------------------------------------------

    def _allow_list(self, pem: PublicKey | None) -> tuple[str, ...]:
        s = self.settings
        var = "MESSAGE_QUEUE_JWT_ALGORITHMS"
        have_set = bool(s.jwt_jwks_file or s.jwt_jwks_url)
        pem_algs = _key_algs(pem) if pem is not None else ()
        if not s.jwt_algorithms:
            algs: list[str] = []
            if self._secret:
                algs += [a for a in _HMAC_ALGS if len(self._secret) >= _HMAC_MIN_BYTES[a]]
                if not algs:  # too short even for HS256: _check_secret says so
                    algs.append("HS256")
            if pem is not None:
                algs.append(pem_algs[0])
            if have_set:
                algs += [a for a in _DEFAULT_PUBLIC_ALGS if a not in algs]
            return tuple(algs)
        out: list[str] = []
        for a in s.jwt_algorithms:
            if a.lower() == "none":
                raise errors.ConfigError(f"{var}: 'none' (unsigned tokens) is never allowed")
            if a not in SUPPORTED_ALGORITHMS:
                raise errors.ConfigError(
                    f"{var}: unknown algorithm {a!r}; expected some of "
                    f"{', '.join(SUPPORTED_ALGORITHMS)} (names are case-sensitive)"
                )
            if a in _HMAC_ALGS:
                if not self._secret:
                    raise errors.ConfigError(f"{var}: {a} needs MESSAGE_QUEUE_JWT_SECRET")
            elif not have_set and a not in pem_algs:
                raise errors.ConfigError(
                    f"{var}: {a} has no key: "
                    + (
                        f"the key in MESSAGE_QUEUE_JWT_PUBLIC_KEY_FILE is for {pem_algs[0]}"
                        if pem_algs
                        else "set MESSAGE_QUEUE_JWT_PUBLIC_KEY_FILE or a JWKS"
                    )
                )
            if a not in out:
                out.append(a)
        return tuple(out)

    def _check_secret(self) -> None:
        var = "MESSAGE_QUEUE_JWT_SECRET"
        for a in self.algorithms:
            if a not in _HMAC_ALGS:
                continue
            need = _HMAC_MIN_BYTES[a]
            if len(self._secret) < need:
                raise errors.ConfigError(
                    f"{var} is {len(self._secret)} bytes; {a} needs at least {need} (RFC 7518 §3.2)"
                )
            try:
                self._algs[a].prepare_key(self._secret)
            except jwt.InvalidKeyError:
                raise errors.ConfigError(
                    f"{var} looks like a public or private key; it must be a random secret "
                    "(put public keys in MESSAGE_QUEUE_JWT_PUBLIC_KEY_FILE)"
                ) from None

    @staticmethod
    def _load_jwks_file(path: str, allowed: frozenset[str]) -> list[_Key]:
        var = "MESSAGE_QUEUE_JWT_JWKS_FILE"
        data = _read_key_file(var, path)
        try:
            keys, skipped = _parse_jwks(data, allowed)
        except ValueError as e:
            raise errors.ConfigError(f"{var}={path!r}: {e}") from None
        if skipped:
            log.warning("JWKS keys skipped", extra={"jwks_file": path, "skipped": skipped})
        if not keys:
            raise errors.ConfigError(f"{var}={path!r}: no usable signing key ({skipped})")
        return keys

    def _rebuild(self) -> None:
        by_kid: dict[str, _Key] = {}
        no_kid: list[_Key] = []
        for k in itertools.chain(self._file_keys, self._url_keys):
            if k.kid is None:
                no_kid.append(k)
            else:
                by_kid[k.kid] = k  # the fetched set, later in the chain, wins over the file
        self._by_kid = by_kid
        self._no_kid = no_kid

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch the JWKS URL once and start refreshing it in the background."""
        if not self._jwks_url:
            return
        if not await self._fetch():
            if not (self._secret or self._pem or self._file_keys):
                raise errors.ConfigError(
                    f"MESSAGE_QUEUE_JWT_JWKS_URL={self._jwks_url!r}: cannot fetch the key set "
                    f"and no other key is configured ({self._last_fetch_error})"
                )
        if self._refresh_task is None:
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        """Stop the background refresh."""
        for task in (self._refresh_task, self._fetch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresh_task = self._fetch_task = None

    async def _refresh_loop(self) -> None:
        while True:
            pause = (
                _JWKS_REFRESH_S
                if self._last_fetch_ok
                else max(self.settings.jwt_jwks_cooldown_s, 5.0)
            )
            await asyncio.sleep(min(pause, _JWKS_REFRESH_S))
            await self._fetch()

    def _fetch(self) -> asyncio.Future[bool]:
        """The fetch under way, or a new one; callers share it and never cancel it."""
        if self._fetch_task is None:
            self._fetch_task = asyncio.get_running_loop().create_task(self._fetch_and_install())
        return asyncio.shield(self._fetch_task)

    async def _fetch_and_install(self) -> bool:
        url = self._jwks_url
        try:
            data = await asyncio.to_thread(_fetch_jwks, url)
            keys, skipped = _parse_jwks(data, frozenset(self.algorithms))
            if not keys:
                raise ValueError(f"no usable signing key ({skipped})")
        except Exception as e:  # URLError, HTTPError, timeouts, a malformed set: keep old keys
            self._last_fetch_ok = False
            self._last_fetch_error = f"{type(e).__name__}: {e}"
            self._stats["jwks_fetch_failures"] = self._stats.get("jwks_fetch_failures", 0) + 1
            log.warning(
                "JWKS fetch failed; keeping the last good keys",
                extra={"jwks_url": url, "reason": self._last_fetch_error},
            )
            return False
        finally:
            self._fetch_task = None
        self._stats["jwks_fetches"] = self._stats.get("jwks_fetches", 0) + 1
        if skipped:
            log.warning("JWKS keys skipped", extra={"jwks_url": url, "skipped": skipped})
        old = {(k.kid, k.algs): k.key for k in self._url_keys}
        new = {(k.kid, k.algs): k.key for k in keys}
        self._url_keys = keys
        self._last_fetch_ok = True
        self._rebuild()
        if old and any(new.get(ident) != key for ident, key in old.items()):
            self._cache.clear()  # a key was withdrawn: tokens it signed must be checked again
            if self.on_keys_changed is not None:
                self.on_keys_changed()
        return True

    async def _refresh_for_kid(self) -> None:
        if self._fetch_task is None:
            now = time.monotonic()
            if now < self._next_kid_refresh:
                return
            self._next_kid_refresh = now + self.settings.jwt_jwks_cooldown_s
        await self._fetch()

    # ---- the cache ------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Counters (a snapshot): ``verified``, ``cache_hits``, ``failures`` and
        ``failed_<reason>`` by kind, ``jwks_fetches``, ``jwks_fetch_failures``."""
        return {**self._stats, "cache_hits": self._hits}

    def cached(self, token: str) -> Principal | None:
        """The principal of an already verified, unexpired ``token``; ``None`` otherwise."""
        p = self._cache.get(token)
        if p is None:
            return None
        if p.expires_at > _time():
            self._hits += 1
            return p
        del self._cache[token]
        return None

    def forget_subject(self, subject: str) -> None:
        """Drop the cached principals of ``subject`` (its stored grants changed): a scan of the
        cache, once per change, never per request."""
        stale = [token for token, p in self._cache.items() if p.subject == subject]
        for token in stale:
            # One may be on its way into the core's cache (verified, its answer not handed
            # over yet): marked, the core does not keep it.
            self._cache.pop(token).revoked = True

    def _remember(self, token: str, p: Principal) -> None:
        cache = self._cache
        if len(cache) >= CACHE_MAX:
            for old in list(itertools.islice(cache, _CACHE_EVICT)):
                del cache[old]
        cache[token] = p

    # ---- verification ---------------------------------------------------------------------

    async def verify(self, token: str) -> Principal:
        """Verify ``token`` (refreshing the JWKS on an unknown ``kid``); raise ``Unauthorized``."""
        p = self.cached(token)
        if p is not None:
            return p
        try:
            parsed = self._parse(token)
            key = self._select_key(parsed)
            if key is None and self._jwks_url:
                await self._refresh_for_kid()
                key = self._select_key(parsed)
            return self._finish(parsed, key)
        except Unauthorized as e:
            self._count_failure(e)
            raise

    def verify_sync(self, token: str) -> Principal:
        """``verify`` without any JWKS refresh (tests, the CLI)."""
        p = self.cached(token)
        if p is not None:
            return p
        try:
            parsed = self._parse(token)
            return self._finish(parsed, self._select_key(parsed))
        except Unauthorized as e:
            self._count_failure(e)
            raise

    def _count_failure(self, e: Unauthorized) -> None:
        stats = self._stats
        stats["failures"] += 1
        name = "failed_" + e.reason
        stats[name] = stats.get(name, 0) + 1

    def _parse(self, token: str) -> _Parsed:
        if not isinstance(token, str) or not token:
            raise Unauthorized("empty token", reason="malformed")
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthorized("token longer than 16 KiB", reason="malformed")
        if not token.isascii():
            raise Unauthorized("token is not ASCII", reason="malformed")
        if token.count(".") != 2:
            raise Unauthorized(
                "malformed token: expected three dot-separated segments", reason="malformed"
            )
        m = _COMPACT.fullmatch(token)
        if m is None:
            raise Unauthorized("malformed token: a segment is not base64url", reason="malformed")
        header_seg, payload_seg, signature_seg = m.groups()
        try:
            header = msgspec.json.decode(_b64(header_seg, "header"))
        except (msgspec.DecodeError, RecursionError):
            raise Unauthorized("malformed token: header is not JSON", reason="malformed") from None
        if not isinstance(header, dict):
            raise Unauthorized("malformed token: header is not a JSON object", reason="malformed")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise Unauthorized("token header has no 'alg'", reason="bad_alg")
        if alg.lower() == "none":
            raise Unauthorized("unsigned tokens (alg none) are refused", reason="bad_alg")
        if alg not in self._algs:
            raise Unauthorized(f"algorithm {alg[:16]!r} is not allowed", reason="bad_alg")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("malformed token: 'kid' is not a string", reason="malformed")
        if "crit" in header:
            # RFC 7515 §4.1.11: extensions listed as critical must be understood; none are.
            raise Unauthorized("token uses critical header extensions", reason="malformed")
        return _Parsed(token, alg, kid, payload_seg, _b64(signature_seg, "signature"))

    def _select_key(self, parsed: _Parsed) -> bytes | PublicKey | None:
        """The key for ``parsed``; ``None`` when its ``kid`` is not (yet) in the key set."""
        alg = parsed.alg
        if alg in _HMAC_ALGS:
            return self._secret  # the allow-list holds HS* only with a secret configured
        kid = parsed.kid
        if kid is not None and (self._jwks_url or self._file_keys):
            k = self._by_kid.get(kid)
            if k is None:
                return None
            if alg not in k.algs:
                raise Unauthorized(f"key {kid[:64]!r} is not for {alg}", reason="bad_key")
            return k.key
        if self._pem is not None:
            if alg not in self._pem.algs:
                raise Unauthorized(f"the configured public key is not for {alg}", reason="bad_key")
            return self._pem.key
        fitting = [k for k in itertools.chain(self._no_kid, self._by_kid.values()) if alg in k.algs]
        if len(fitting) == 1:
            return fitting[0].key
        raise Unauthorized(
            "token header has no 'kid' and the key set has several keys", reason="unknown_kid"
        )

    def _finish(self, parsed: _Parsed, key: bytes | PublicKey | None) -> Principal:
        if key is None:
            raise Unauthorized(f"unknown key id {str(parsed.kid)[:64]!r}", reason="unknown_kid")
        token = parsed.token
        signing_input = token[: token.rindex(".")].encode("ascii")
        try:
            ok = self._algs[parsed.alg].verify(signing_input, key, parsed.signature)
        except Exception:  # a signature of the wrong shape for the key: same answer
            ok = False
        if not ok:
            raise Unauthorized("signature verification failed", reason="bad_signature")
        try:
            claims = msgspec.json.decode(_b64(parsed.payload, "payload"))
        except (msgspec.DecodeError, RecursionError):
            raise Unauthorized("malformed token: payload is not JSON", reason="malformed") from None
        if not isinstance(claims, dict):
            raise Unauthorized("malformed token: payload is not a JSON object", reason="malformed")
        p = self._principal(claims)
        self._stats["verified"] += 1
        if p.expires_at > _time():  # within the leeway past exp: valid, but not worth caching
            self._remember(token, p)
        return p

    def _principal(self, claims: dict[str, Any]) -> Principal:
        s = self.settings
        now = _time()
        leeway = s.jwt_leeway_s
        exp = _number(claims, "exp")
        if exp is None:
            raise Unauthorized("token has no 'exp' claim", reason="missing_claim")
        if exp <= now - leeway:
            raise Unauthorized("token expired", reason="expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise Unauthorized("token not valid yet (nbf)", reason="not_yet_valid")
        iat = _number(claims, "iat")
        if iat is not None and iat > now + leeway:
            raise Unauthorized("token issued in the future (iat)", reason="not_yet_valid")
        if s.jwt_issuer:
            iss = claims.get("iss")
            if iss is None:
                raise Unauthorized("token has no 'iss' claim", reason="bad_issuer")
            if iss != s.jwt_issuer:
                raise Unauthorized("token issuer is not accepted", reason="bad_issuer")
        aud = claims.get("aud")
        if aud is not None and not (
            isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
        ):
            raise Unauthorized(
                "claim 'aud' must be a string or a list of strings", reason="bad_claims"
            )
        if s.jwt_audience:
            if aud is None:
                raise Unauthorized("token has no 'aud' claim", reason="bad_audience")
            if s.jwt_audience != aud and (isinstance(aud, str) or s.jwt_audience not in aud):
                raise Unauthorized("token audience is not accepted", reason="bad_audience")
        subject = claims.get(s.jwt_subject_claim)
        if subject is None:
            raise Unauthorized(
                f"token has no {s.jwt_subject_claim!r} claim", reason="missing_claim"
            )
        if not _name(subject):
            raise Unauthorized(
                f"claim {s.jwt_subject_claim!r} must be a non-empty string", reason="bad_claims"
            )
        roles = claims.get(s.jwt_roles_claim)
        if roles is None:
            roles = []
        elif isinstance(roles, str):
            roles = roles.split()
        elif not isinstance(roles, list) or not all(_name(r) for r in roles):
            raise Unauthorized(
                f"claim {s.jwt_roles_claim!r} must be a list of role names", reason="bad_claims"
            )
        try:
            grants = parse_grants(claims.get(s.jwt_grants_claim))
        except ValueError as e:
            raise Unauthorized(f"invalid grants claim: {e}", reason="bad_claims") from None
        if self.stored_grants is not None:
            grants += self.stored_grants(subject)  # a union: see mqfast.grants
        quota_key = claims.get(s.quota_claim, subject)
        if isinstance(quota_key, int) and not isinstance(quota_key, bool):
            quota_key = str(quota_key)
        if not _name(quota_key):
            raise Unauthorized(
                f"claim {s.quota_claim!r} must be a non-empty string", reason="bad_claims"
            )
        return Principal(subject, roles, grants, exp, quota_key)

    # ---- the Authorization header ---------------------------------------------------------

    @staticmethod
    def token_from_header(value: bytes | str | None) -> str:
        """The token of an ``Authorization: Bearer <token>`` value; raise ``Unauthorized``."""
        if value is None:
            raise Unauthorized("missing bearer token", error=None, reason="missing")
        if len(value) > _MAX_HEADER_BYTES:
            raise Unauthorized(
                "authorization header longer than 16 KiB",
                error="invalid_request",
                reason="malformed",
            )
        if isinstance(value, bytes | bytearray):
            try:
                value = bytes(value).decode("ascii")
            except UnicodeDecodeError:
                raise Unauthorized(
                    "authorization header is not ASCII", error="invalid_request", reason="malformed"
                ) from None
        elif not value.isascii():
            raise Unauthorized(
                "authorization header is not ASCII", error="invalid_request", reason="malformed"
            )
        scheme, _, rest = value.strip(" \t").partition(" ")
        if scheme.lower() != "bearer":
            # RFC 6750 §3.1: no error code when the client used another scheme (or none).
            raise Unauthorized("authorization scheme must be Bearer", error=None, reason="missing")
        token = rest.strip(" \t")
        if not token:
            raise Unauthorized("empty bearer token", error="invalid_request", reason="malformed")
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthorized(
                "bearer token longer than 16 KiB", error="invalid_request", reason="malformed"
            )
        if any(c in token for c in " \t\r\n"):
            raise Unauthorized(
                "bearer token contains whitespace", error="invalid_request", reason="malformed"
            )
        return token


# ---- issuing -----------------------------------------------------------------------------------


def make_token(
    settings: Settings,
    subject: str,
    roles: list[str] | None = None,
    grants: list[dict[str, object]] | None = None,
    ttl_s: float = 3600,
    algorithm: str | None = None,
) -> str:
    """An HMAC-signed token for ``mqfast token``, with ``iat``, ``nbf``, ``exp`` (and ``iss``,
    ``aud`` when configured). Raises ``ConfigError`` without ``MESSAGE_QUEUE_JWT_SECRET`` or with
    an algorithm that is not HMAC or not allowed, ``ValueError`` for bad arguments."""
    secret = settings.jwt_secret.encode("utf-8")
    if not secret:
        raise errors.ConfigError("issuing tokens needs MESSAGE_QUEUE_JWT_SECRET")
    if algorithm is None:
        algorithm = next((a for a in settings.jwt_algorithms if a in _HMAC_ALGS), "HS256")
    if algorithm not in _HMAC_ALGS:
        raise errors.ConfigError(
            f"tokens are issued with HMAC only ({', '.join(_HMAC_ALGS)}), not {algorithm!r}"
        )
    if settings.jwt_algorithms and algorithm not in settings.jwt_algorithms:
        raise errors.ConfigError(f"MESSAGE_QUEUE_JWT_ALGORITHMS does not allow {algorithm}")
    if len(secret) < _HMAC_MIN_BYTES[algorithm]:
        raise errors.ConfigError(
            f"MESSAGE_QUEUE_JWT_SECRET is {len(secret)} bytes; {algorithm} needs at least "
            f"{_HMAC_MIN_BYTES[algorithm]} (RFC 7518 §3.2)"
        )
    if not _name(subject):
        raise ValueError("subject must be a non-empty string")
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError("ttl_s must be a positive number of seconds")
    if roles is not None and not all(_name(r) for r in roles):
        raise ValueError("roles must be non-empty strings")
    if grants is not None:
        parse_grants(grants)
    now = int(_time())
    claims: dict[str, object] = {
        settings.jwt_subject_claim: subject,
        "iat": now,
        "nbf": now,
        "exp": now + max(1, math.ceil(ttl_s)),
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if roles:
        claims[settings.jwt_roles_claim] = list(roles)
    if grants:
        claims[settings.jwt_grants_claim] = list(grants)
    return jwt.encode(claims, secret, algorithm=algorithm)
