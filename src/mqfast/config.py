"""One frozen settings object, built once at start from the environment.

The variable names of the API contract keep their meaning; every setting mqfast adds uses the
``MESSAGE_QUEUE_`` prefix. An invalid value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from mqfast.errors import ConfigError


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (IPv6 in brackets or not); a name that
    merely looks like one (``127.example.com``) is not."""
    h = host.strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


NS_PER_SECOND = 1_000_000_000
# Ten years: longer than any sane retention or TTL, short enough to catch unit mistakes
# (a TTL given in nanoseconds where seconds were meant, or the reverse).
MAX_DURATION_NS = 10 * 365 * 24 * 3600 * NS_PER_SECOND

_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": NS_PER_SECOND,
    "m": 60 * NS_PER_SECOND,
    "h": 3600 * NS_PER_SECOND,
    "d": 86400 * NS_PER_SECOND,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")


def parse_duration(value: int | str, what: str) -> int:
    """Parse a duration into integer nanoseconds.

    Accepts an integer of nanoseconds, a string of digits (nanoseconds, the contract's form) or a
    Go-style string such as ``"30s"``, ``"1h30m"``, ``"250ms"``. Raises ``ValueError`` with a
    message naming ``what`` when the value is malformed, negative or longer than ten years.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration, got a boolean")
    if isinstance(value, int):
        ns = value
    elif isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            ns = int(text)
        elif text.startswith("-"):
            raise ValueError(f"{what}: must not be negative, got {value!r}")
        else:
            ns = _parse_go_duration(text, what)
    else:
        raise ValueError(f"{what}: expected integer nanoseconds or a string such as '30s'")
    if ns < 0:
        raise ValueError(f"{what}: must not be negative, got {value!r}")
    if ns > MAX_DURATION_NS:
        raise ValueError(f"{what}: {value!r} is longer than ten years; durations are nanoseconds")
    return ns


def _parse_go_duration(text: str, what: str) -> int:
    pos = 0
    total = 0.0
    if not text:
        raise ValueError(f"{what}: empty duration")
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise ValueError(
                f"{what}: cannot parse {text!r}; use nanoseconds or a string such as '30s', '24h'"
            )
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return int(total)


def _parse_addr(value: str, default_host: str, var: str) -> tuple[str, int] | None:
    """``host:port`` or ``:port``; empty or ``off`` disables the listener."""
    if value.strip().lower() in ("", "off", "none", "disabled"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{var}={value!r}: expected host:port or :port")
    return (host.strip("[]") or default_host, int(port))


def _bool(value: str, var: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{var}={value!r}: expected true or false")


def _console(value: str) -> str:
    v = value.lower()
    if v == "auto":
        return v
    return "on" if _bool(v, "MESSAGE_QUEUE_CONSOLE (or auto)") else "off"


def _int(value: str, var: str, lo: int, hi: int) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ConfigError(f"{var}={value!r}: expected an integer") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{var}={value!r}: must be between {lo} and {hi}")
    return n


# A bare integer is nanoseconds (the contract's unit), so ``MESSAGE_QUEUE_TTL=24`` is 24 ns: every
# duration variable refuses a value (other than 0) below what it can sensibly mean.
_MIN_DURATION_NS = 1_000_000  # 1 ms: no timeout, interval or backoff of mqfast is shorter
MAX_IDEMPOTENCY_WINDOW_NS = 30 * 24 * 3600 * 1_000_000_000
_DURATION_FORMS = "a number with a unit ('500ms', '30s', '5m', '24h') or integer nanoseconds"


def _duration(value: str, var: str, minimum_ns: int = _MIN_DURATION_NS) -> int:
    try:
        ns = parse_duration(value, var)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if 0 < ns < minimum_ns:
        raise ConfigError(
            f"{var}={value!r} is {ns} ns, below the minimum of {_format_ns(minimum_ns)} "
            f"(a bare integer is nanoseconds); accepted forms: {_DURATION_FORMS}"
        )
    return ns


def _format_ns(ns: int) -> str:
    for unit in ("h", "m", "s", "ms", "us"):
        if ns % _UNITS[unit] == 0:
            return f"{ns // _UNITS[unit]}{unit}"
    return f"{ns}ns"


# Security settings of the Kafka client, by the variable that sets them.
KAFKA_SECURITY_VARS = {
    "KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "KAFKA_SASL_USERNAME": "sasl.username",
    "KAFKA_SASL_PASSWORD": "sasl.password",
    "KAFKA_SSL_CA_LOCATION": "ssl.ca.location",
    "KAFKA_SSL_CERTIFICATE_LOCATION": "ssl.certificate.location",
    "KAFKA_SSL_KEY_LOCATION": "ssl.key.location",
    "KAFKA_SSL_KEY_PASSWORD": "ssl.key.password",
}
KAFKA_OPT_PREFIX = "KAFKA_OPT_"


def kafka_options(env: Mapping[str, str]) -> dict[str, str]:
    """librdkafka settings from the environment.

    ``KAFKA_OPT_LINGER_MS=5`` sets ``linger.ms``: any librdkafka property, dots written as
    underscores (librdkafka property names have no underscores of their own).
    """
    out: dict[str, str] = {}
    for var, prop in KAFKA_SECURITY_VARS.items():
        value = env.get(var, "").strip()
        if value:
            out[prop] = value
    for var, value in env.items():
        if var.startswith(KAFKA_OPT_PREFIX) and len(var) > len(KAFKA_OPT_PREFIX):
            out[var[len(KAFKA_OPT_PREFIX) :].lower().replace("_", ".")] = value.strip()
    return out


# Every variable mqfast reads (besides ``KAFKA_OPT_*``); deployment files are checked against it.
ENV_VARS: tuple[str, ...] = (
    "DB_HOST",
    "DB_NAME",
    "DB_PASSWORD",
    "DB_PORT",
    "DB_SSLMODE",
    "DB_USER",
    "KAFKA_BROKERS",
    "MESSAGE_QUEUE_AUTO_CREATE_TOPICS",
    "MESSAGE_QUEUE_CONSUMER_TIMEOUT",
    "MESSAGE_QUEUE_DATA_DIR",
    "MESSAGE_QUEUE_DEFAULT_PARTITIONS",
    "MESSAGE_QUEUE_DELIVERY_LIMIT",
    "MESSAGE_QUEUE_ENGINE",
    "MESSAGE_QUEUE_FSYNC",
    "MESSAGE_QUEUE_HEADER_TIMEOUT",
    "MESSAGE_QUEUE_HEALTH_MAX_LAG",
    "MESSAGE_QUEUE_HEALTH_MAX_UNACKED_AGE",
    "MESSAGE_QUEUE_HOST",
    "MESSAGE_QUEUE_IDEMPOTENCY_WINDOW",
    "MESSAGE_QUEUE_IDLE_TIMEOUT",
    "MESSAGE_QUEUE_INSECURE",
    "MESSAGE_QUEUE_CONSOLE",
    "MESSAGE_QUEUE_JWT_ALGORITHMS",
    "MESSAGE_QUEUE_JWT_AUDIENCE",
    "MESSAGE_QUEUE_JWT_GRANTS_CLAIM",
    "MESSAGE_QUEUE_JWT_ISSUER",
    "MESSAGE_QUEUE_JWT_JWKS_COOLDOWN",
    "MESSAGE_QUEUE_JWT_JWKS_FILE",
    "MESSAGE_QUEUE_JWT_JWKS_URL",
    "MESSAGE_QUEUE_JWT_LEEWAY",
    "MESSAGE_QUEUE_JWT_PUBLIC_KEY_FILE",
    "MESSAGE_QUEUE_JWT_ROLES_CLAIM",
    "MESSAGE_QUEUE_JWT_SECRET",
    "MESSAGE_QUEUE_JWT_SECRET_FILE",
    "MESSAGE_QUEUE_JWT_SUBJECT_CLAIM",
    "MESSAGE_QUEUE_KAFKA_UNSAFE_ACKS",
    "MESSAGE_QUEUE_LOG_LEVEL",
    "MESSAGE_QUEUE_MASTER_KEYS",
    "MESSAGE_QUEUE_MASTER_KEYS_FILE",
    "MESSAGE_QUEUE_MASTER_KEY_FILE",
    "MESSAGE_QUEUE_MASTER_KEY_ID",
    "MESSAGE_QUEUE_MAX_BATCH",
    "MESSAGE_QUEUE_MAX_BATCH_BYTES",
    "MESSAGE_QUEUE_MAX_HEADER_BYTES",
    "MESSAGE_QUEUE_MAX_POLL",
    "MESSAGE_QUEUE_MAX_SIZE",
    "MESSAGE_QUEUE_META",
    "MESSAGE_QUEUE_METRICS_INTERVAL",
    "MESSAGE_QUEUE_PORT",
    "MESSAGE_QUEUE_QUOTA_BURST",
    "MESSAGE_QUEUE_QUOTA_BYTES",
    "MESSAGE_QUEUE_QUOTA_CLAIM",
    "MESSAGE_QUEUE_QUOTA_MESSAGES",
    "MESSAGE_QUEUE_QUOTA_REPLICAS",
    "MESSAGE_QUEUE_RETENTION",
    "MESSAGE_QUEUE_RETENTION_INTERVAL",
    "MESSAGE_QUEUE_RETRY_BACKOFF",
    "MESSAGE_QUEUE_RETRY_BACKOFF_MAX",
    "MESSAGE_QUEUE_SHUTDOWN_TIMEOUT",
    "MESSAGE_QUEUE_TLS_CERT",
    "MESSAGE_QUEUE_TLS_CLIENT_AUTH",
    "MESSAGE_QUEUE_TLS_CLIENT_CA",
    "MESSAGE_QUEUE_TLS_KEY",
    "MESSAGE_QUEUE_TTL",
    "MESSAGE_QUEUE_VISIBILITY_TIMEOUT",
    "MESSAGE_QUEUE_WORKERS",
    "METRICS_ADDR",
    "PPROF_ADDR",
    "REDIS_DB",
    "REDIS_HOST",
    "REDIS_PASSWORD",
    "REDIS_PORT",
    "REDIS_TLS",
    *KAFKA_SECURITY_VARS,
)


def _read_secret(e: Mapping[str, str], var: str) -> str:
    """``VAR`` or the content of the file named by ``VAR_FILE`` (Kubernetes secrets)."""
    value = e.get(var, "")
    path = e.get(var + "_FILE", "").strip()
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"{var}_FILE={path!r}: cannot read it ({exc.strerror})") from None
    return value


def _security(e: Mapping[str, str]) -> dict[str, object]:
    def f(name: str, default: str = "") -> str:
        return e.get(name, default).strip()

    algs = tuple(a.strip() for a in f("MESSAGE_QUEUE_JWT_ALGORITHMS").split(",") if a.strip())
    return {
        "insecure": _bool(f("MESSAGE_QUEUE_INSECURE", "0"), "MESSAGE_QUEUE_INSECURE"),
        "console": _console(f("MESSAGE_QUEUE_CONSOLE", "auto")),
        "jwt_secret": _read_secret(e, "MESSAGE_QUEUE_JWT_SECRET"),
        "jwt_public_key_file": f("MESSAGE_QUEUE_JWT_PUBLIC_KEY_FILE"),
        "jwt_jwks_url": f("MESSAGE_QUEUE_JWT_JWKS_URL"),
        "jwt_jwks_file": f("MESSAGE_QUEUE_JWT_JWKS_FILE"),
        "jwt_algorithms": algs,
        "jwt_issuer": f("MESSAGE_QUEUE_JWT_ISSUER"),
        "jwt_audience": f("MESSAGE_QUEUE_JWT_AUDIENCE"),
        "jwt_leeway_s": _duration(f("MESSAGE_QUEUE_JWT_LEEWAY", "30s"), "MESSAGE_QUEUE_JWT_LEEWAY")
        / NS_PER_SECOND,
        "jwt_jwks_cooldown_s": _duration(
            f("MESSAGE_QUEUE_JWT_JWKS_COOLDOWN", "60s"), "MESSAGE_QUEUE_JWT_JWKS_COOLDOWN"
        )
        / NS_PER_SECOND,
        "jwt_subject_claim": f("MESSAGE_QUEUE_JWT_SUBJECT_CLAIM", "sub") or "sub",
        "jwt_roles_claim": f("MESSAGE_QUEUE_JWT_ROLES_CLAIM", "roles") or "roles",
        "jwt_grants_claim": f("MESSAGE_QUEUE_JWT_GRANTS_CLAIM", "grants") or "grants",
        "tls_cert": f("MESSAGE_QUEUE_TLS_CERT"),
        "tls_key": f("MESSAGE_QUEUE_TLS_KEY"),
        "tls_client_ca": f("MESSAGE_QUEUE_TLS_CLIENT_CA"),
        "tls_client_auth": f("MESSAGE_QUEUE_TLS_CLIENT_AUTH", "optional").lower(),
        "quota_messages": _float(
            f("MESSAGE_QUEUE_QUOTA_MESSAGES", "0"), "MESSAGE_QUEUE_QUOTA_MESSAGES"
        ),
        "quota_bytes": _float(f("MESSAGE_QUEUE_QUOTA_BYTES", "0"), "MESSAGE_QUEUE_QUOTA_BYTES"),
        "quota_burst_s": _duration(
            f("MESSAGE_QUEUE_QUOTA_BURST", "1s"), "MESSAGE_QUEUE_QUOTA_BURST"
        )
        / NS_PER_SECOND,
        "quota_claim": f("MESSAGE_QUEUE_QUOTA_CLAIM", "sub") or "sub",
        "quota_replicas": _int(
            f("MESSAGE_QUEUE_QUOTA_REPLICAS", "1"), "MESSAGE_QUEUE_QUOTA_REPLICAS", 1, 1000
        ),
        "master_keys": _read_secret(e, "MESSAGE_QUEUE_MASTER_KEYS"),
        "master_key_file": f("MESSAGE_QUEUE_MASTER_KEY_FILE"),
        "master_key_id": f("MESSAGE_QUEUE_MASTER_KEY_ID"),
    }


def _float(value: str, var: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise ConfigError(f"{var}={value!r}: expected a number") from None
    if not n >= 0 or n == float("inf"):
        raise ConfigError(f"{var}={value!r}: must be a finite number >= 0")
    return n


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting mqfast reads; see README.md for the table of variables."""

    host: str = "127.0.0.1"
    port: int = 8087
    metrics_addr: tuple[str, int] | None = ("127.0.0.1", 9097)
    pprof_addr: tuple[str, int] | None = ("127.0.0.1", 6067)
    workers: int = 1
    engine: str = "embedded"
    data_dir: str = "./data"
    fsync: bool = False
    max_size: int = 1_048_576
    max_batch_messages: int = 1000
    max_batch_bytes: int = 16 * 1_048_576
    max_header_bytes: int = 16_384
    default_ttl_ns: int = 24 * 3600 * NS_PER_SECOND
    default_retention_ns: int = 7 * 24 * 3600 * NS_PER_SECOND
    default_partitions: int = 1
    # How long an Idempotency-Key is remembered (README "Idempotent produce").
    idempotency_window_ns: int = 24 * 3600 * NS_PER_SECOND
    auto_create_topics: bool = True
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 75.0
    shutdown_timeout_s: float = 30.0
    retention_interval_s: float = 30.0
    visibility_timeout_ns: int = 30 * NS_PER_SECOND
    delivery_limit: int = 5
    retry_backoff_ns: int = NS_PER_SECOND
    retry_backoff_max_ns: int = 300 * NS_PER_SECOND
    max_poll_ns: int = 300 * NS_PER_SECOND
    consumer_timeout_ns: int = 60 * NS_PER_SECOND
    metrics_interval_s: float = 10.0
    health_max_lag: int = 10_000  # /health lists a group further behind than this
    health_max_unacked_age_ns: int = 300 * NS_PER_SECOND  # ... or with a delivery this old
    log_level: str = "INFO"
    db_host: str = "localhost"
    db_port: int = 5432
    db_user: str = "postgres"
    db_password: str = field(default="postgres", repr=False)
    db_name: str = "necpgame"
    redis_host: str = "localhost"
    redis_port: int = 6379
    db_sslmode: str = "prefer"
    redis_password: str = field(default="", repr=False)
    redis_db: int = 0
    redis_tls: bool = False
    kafka_brokers: str = "localhost:9092"
    # librdkafka settings from KAFKA_* variables (security) and KAFKA_OPT_* (anything else).
    kafka_options: Mapping[str, str] = field(default_factory=dict, repr=False)
    kafka_unsafe_acks: bool = False
    # Where metadata lives: "sqlite" (beside the embedded engine) or "postgres".
    meta: str = "sqlite"
    # ---- security (README "Security") ----
    insecure: bool = False  # run without authentication on a non-loopback address
    # The web console at /console: "auto" serves it on a loopback listener or with
    # authentication on (never open to other machines by default), "on" or "off" decide.
    console: str = "auto"
    jwt_secret: str = field(default="", repr=False)  # HMAC secret (HS256/384/512)
    jwt_public_key_file: str = ""  # PEM public key (RS256, ES256, EdDSA)
    jwt_jwks_url: str = ""
    jwt_jwks_file: str = ""
    jwt_algorithms: tuple[str, ...] = ()  # allow-list; empty: derived from the keys given
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_s: float = 30.0
    jwt_jwks_cooldown_s: float = 60.0
    jwt_subject_claim: str = "sub"
    jwt_roles_claim: str = "roles"
    jwt_grants_claim: str = "grants"
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_client_auth: str = "optional"  # with tls_client_ca: "optional" or "required"
    quota_messages: float = 0.0  # per subject and second, 0: unlimited
    quota_bytes: float = 0.0
    quota_burst_s: float = 1.0
    quota_claim: str = "sub"
    quota_replicas: int = 1  # each replica's share when Redis is down
    master_keys: str = field(default="", repr=False)  # "id:base64key,..." (encryption at rest)
    master_key_file: str = ""
    master_key_id: str = ""  # the key new data keys are wrapped with

    @property
    def auth_enabled(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key_file or self.jwt_jwks_url
                    or self.jwt_jwks_file)  # fmt: skip

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); ``overrides`` win (CLI flags)."""
        e = os.environ if env is None else env
        d = cls()
        host = e.get("MESSAGE_QUEUE_HOST", d.host).strip() or d.host
        values: dict[str, object] = {
            "host": host,
            "port": _int(e.get("MESSAGE_QUEUE_PORT", str(d.port)), "MESSAGE_QUEUE_PORT", 0, 65535),
            "metrics_addr": _parse_addr(e.get("METRICS_ADDR", ":9097"), host, "METRICS_ADDR"),
            "pprof_addr": _parse_addr(e.get("PPROF_ADDR", ":6067"), host, "PPROF_ADDR"),
            "workers": _int(e.get("MESSAGE_QUEUE_WORKERS", "1"), "MESSAGE_QUEUE_WORKERS", 1, 256),
            "engine": e.get("MESSAGE_QUEUE_ENGINE", d.engine).strip().lower(),
            "data_dir": e.get("MESSAGE_QUEUE_DATA_DIR", d.data_dir),
            "fsync": _bool(e.get("MESSAGE_QUEUE_FSYNC", "0"), "MESSAGE_QUEUE_FSYNC"),
            "max_size": _int(
                e.get("MESSAGE_QUEUE_MAX_SIZE", str(d.max_size)),
                "MESSAGE_QUEUE_MAX_SIZE",
                1,
                1 << 30,
            ),
            "max_batch_messages": _int(
                e.get("MESSAGE_QUEUE_MAX_BATCH", str(d.max_batch_messages)),
                "MESSAGE_QUEUE_MAX_BATCH",
                1,
                100_000,
            ),
            "max_batch_bytes": _int(
                e.get("MESSAGE_QUEUE_MAX_BATCH_BYTES", str(d.max_batch_bytes)),
                "MESSAGE_QUEUE_MAX_BATCH_BYTES",
                1,
                1 << 30,
            ),
            "max_header_bytes": _int(
                e.get("MESSAGE_QUEUE_MAX_HEADER_BYTES", str(d.max_header_bytes)),
                "MESSAGE_QUEUE_MAX_HEADER_BYTES",
                1024,
                1 << 20,
            ),
            "default_ttl_ns": _duration(
                e.get("MESSAGE_QUEUE_TTL", "24h"), "MESSAGE_QUEUE_TTL", NS_PER_SECOND
            ),
            "default_retention_ns": _duration(
                e.get("MESSAGE_QUEUE_RETENTION", "168h"), "MESSAGE_QUEUE_RETENTION", NS_PER_SECOND
            ),
            "idempotency_window_ns": _duration(
                e.get("MESSAGE_QUEUE_IDEMPOTENCY_WINDOW", "24h"),
                "MESSAGE_QUEUE_IDEMPOTENCY_WINDOW",
                NS_PER_SECOND,
            ),
            "default_partitions": _int(
                e.get("MESSAGE_QUEUE_DEFAULT_PARTITIONS", "1"),
                "MESSAGE_QUEUE_DEFAULT_PARTITIONS",
                1,
                1024,
            ),
            "auto_create_topics": _bool(
                e.get("MESSAGE_QUEUE_AUTO_CREATE_TOPICS", "1"), "MESSAGE_QUEUE_AUTO_CREATE_TOPICS"
            ),
            "header_timeout_s": _duration(
                e.get("MESSAGE_QUEUE_HEADER_TIMEOUT", "10s"), "MESSAGE_QUEUE_HEADER_TIMEOUT"
            )
            / NS_PER_SECOND,
            "idle_timeout_s": _duration(
                e.get("MESSAGE_QUEUE_IDLE_TIMEOUT", "75s"), "MESSAGE_QUEUE_IDLE_TIMEOUT"
            )
            / NS_PER_SECOND,
            "shutdown_timeout_s": _duration(
                e.get("MESSAGE_QUEUE_SHUTDOWN_TIMEOUT", "30s"), "MESSAGE_QUEUE_SHUTDOWN_TIMEOUT"
            )
            / NS_PER_SECOND,
            "retention_interval_s": _duration(
                e.get("MESSAGE_QUEUE_RETENTION_INTERVAL", "30s"), "MESSAGE_QUEUE_RETENTION_INTERVAL"
            )
            / NS_PER_SECOND,
            "visibility_timeout_ns": _duration(
                e.get("MESSAGE_QUEUE_VISIBILITY_TIMEOUT", "30s"), "MESSAGE_QUEUE_VISIBILITY_TIMEOUT"
            ),
            "delivery_limit": _int(
                e.get("MESSAGE_QUEUE_DELIVERY_LIMIT", "5"), "MESSAGE_QUEUE_DELIVERY_LIMIT", 1, 1000
            ),
            "retry_backoff_ns": _duration(
                e.get("MESSAGE_QUEUE_RETRY_BACKOFF", "1s"), "MESSAGE_QUEUE_RETRY_BACKOFF"
            ),
            "retry_backoff_max_ns": _duration(
                e.get("MESSAGE_QUEUE_RETRY_BACKOFF_MAX", "5m"), "MESSAGE_QUEUE_RETRY_BACKOFF_MAX"
            ),
            "max_poll_ns": _duration(
                e.get("MESSAGE_QUEUE_MAX_POLL", "5m"), "MESSAGE_QUEUE_MAX_POLL"
            ),
            "consumer_timeout_ns": _duration(
                e.get("MESSAGE_QUEUE_CONSUMER_TIMEOUT", "60s"), "MESSAGE_QUEUE_CONSUMER_TIMEOUT"
            ),
            "metrics_interval_s": _duration(
                e.get("MESSAGE_QUEUE_METRICS_INTERVAL", "10s"), "MESSAGE_QUEUE_METRICS_INTERVAL"
            )
            / NS_PER_SECOND,
            "health_max_lag": _int(
                e.get("MESSAGE_QUEUE_HEALTH_MAX_LAG", str(d.health_max_lag)),
                "MESSAGE_QUEUE_HEALTH_MAX_LAG",
                1,
                1 << 62,
            ),
            "health_max_unacked_age_ns": _duration(
                e.get("MESSAGE_QUEUE_HEALTH_MAX_UNACKED_AGE", "5m"),
                "MESSAGE_QUEUE_HEALTH_MAX_UNACKED_AGE",
            ),
            "log_level": e.get("MESSAGE_QUEUE_LOG_LEVEL", d.log_level).strip().upper(),
            "db_host": e.get("DB_HOST", d.db_host),
            "db_port": _int(e.get("DB_PORT", str(d.db_port)), "DB_PORT", 1, 65535),
            "db_user": e.get("DB_USER", d.db_user),
            "db_password": e.get("DB_PASSWORD", d.db_password),
            "db_name": e.get("DB_NAME", d.db_name),
            "redis_host": e.get("REDIS_HOST", d.redis_host),
            "redis_port": _int(e.get("REDIS_PORT", str(d.redis_port)), "REDIS_PORT", 1, 65535),
            "db_sslmode": e.get("DB_SSLMODE", d.db_sslmode).strip(),
            "redis_password": e.get("REDIS_PASSWORD", d.redis_password),
            "redis_db": _int(e.get("REDIS_DB", "0"), "REDIS_DB", 0, 1023),
            "redis_tls": _bool(e.get("REDIS_TLS", "0"), "REDIS_TLS"),
            "kafka_brokers": e.get("KAFKA_BROKERS", d.kafka_brokers).strip(),
            "kafka_options": kafka_options(e),
            "kafka_unsafe_acks": _bool(
                e.get("MESSAGE_QUEUE_KAFKA_UNSAFE_ACKS", "0"), "MESSAGE_QUEUE_KAFKA_UNSAFE_ACKS"
            ),
        }
        values.update(_security(e))
        engine = str(values["engine"])
        values["meta"] = (
            e.get("MESSAGE_QUEUE_META", "postgres" if engine == "kafka" else "sqlite")
            .strip()
            .lower()
        )
        names = {f.name for f in fields(cls)}
        for k, v in overrides.items():
            if k not in names:
                raise ConfigError(f"unknown setting {k!r}")
            if v is not None:
                values[k] = v
        s = cls(**values)  # type: ignore[arg-type]
        s._validate()
        return s

    @property
    def loopback_only(self) -> bool:
        """True when the HTTP listener is reachable from this machine only."""
        return is_loopback(self.host)

    @property
    def console_enabled(self) -> bool:
        """Whether /console is served (see ``console``)."""
        if self.console == "auto":
            return self.loopback_only or self.auth_enabled
        return self.console == "on"

    def _validate(self) -> None:
        if not self.auth_enabled and not self.insecure and not self.loopback_only:
            raise ConfigError(
                f"MESSAGE_QUEUE_HOST={self.host!r} serves other machines but no authentication "
                "is configured: set MESSAGE_QUEUE_JWT_SECRET (or MESSAGE_QUEUE_JWT_PUBLIC_KEY_FILE,"
                " _JWKS_URL, _JWKS_FILE), or MESSAGE_QUEUE_INSECURE=1 to run it open"
            )
        if self.tls_client_auth not in ("optional", "required"):
            raise ConfigError(
                f"MESSAGE_QUEUE_TLS_CLIENT_AUTH={self.tls_client_auth!r}: "
                "expected optional or required"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("MESSAGE_QUEUE_TLS_CERT and MESSAGE_QUEUE_TLS_KEY go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("MESSAGE_QUEUE_TLS_CLIENT_CA needs MESSAGE_QUEUE_TLS_CERT")
        if self.engine not in ("embedded", "kafka"):
            raise ConfigError(
                f"MESSAGE_QUEUE_ENGINE={self.engine!r}: expected 'embedded' or 'kafka'"
            )
        if self.meta not in ("sqlite", "postgres"):
            raise ConfigError(f"MESSAGE_QUEUE_META={self.meta!r}: expected 'sqlite' or 'postgres'")
        if self.engine == "kafka" and self.meta == "sqlite":
            raise ConfigError(
                "MESSAGE_QUEUE_META=sqlite cannot be shared by Kafka replicas; use postgres"
            )
        if self.engine == "kafka" and not self.kafka_brokers:
            raise ConfigError("KAFKA_BROKERS is empty: expected host:port[,host:port...]")
        acks = self.kafka_options.get("acks", "all").lower()
        if acks not in ("all", "-1") and not self.kafka_unsafe_acks:
            raise ConfigError(
                f"KAFKA_OPT_ACKS={acks!r} breaks the promise that a 2xx means durable; "
                "set MESSAGE_QUEUE_KAFKA_UNSAFE_ACKS=1 to accept losing acknowledged messages"
            )
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(
                f"MESSAGE_QUEUE_LOG_LEVEL={self.log_level!r}: "
                "expected DEBUG, INFO, WARNING or ERROR"
            )
        if not 0 < self.idempotency_window_ns <= MAX_IDEMPOTENCY_WINDOW_NS:
            # every key is kept that long (SQLite, or Redis with the Kafka engine): bounded
            raise ConfigError(
                "MESSAGE_QUEUE_IDEMPOTENCY_WINDOW must be > 0 and at most 30 days "
                f"(got {_format_ns(self.idempotency_window_ns)})"
            )
        if self.header_timeout_s <= 0 or self.idle_timeout_s <= 0:
            raise ConfigError(
                "MESSAGE_QUEUE_HEADER_TIMEOUT and MESSAGE_QUEUE_IDLE_TIMEOUT must be > 0"
            )
        if self.health_max_unacked_age_ns <= 0:
            raise ConfigError("MESSAGE_QUEUE_HEALTH_MAX_UNACKED_AGE must be > 0")
        if self.visibility_timeout_ns <= 0:
            raise ConfigError("MESSAGE_QUEUE_VISIBILITY_TIMEOUT must be > 0")
        if self.metrics_interval_s <= 0 or self.consumer_timeout_ns <= 0:
            raise ConfigError(
                "MESSAGE_QUEUE_METRICS_INTERVAL and MESSAGE_QUEUE_CONSUMER_TIMEOUT must be > 0"
            )
        if self.retry_backoff_max_ns < self.retry_backoff_ns:
            raise ConfigError(
                "MESSAGE_QUEUE_RETRY_BACKOFF_MAX must be at least MESSAGE_QUEUE_RETRY_BACKOFF"
            )
        if self.max_batch_bytes < self.max_size:
            raise ConfigError(
                "MESSAGE_QUEUE_MAX_BATCH_BYTES must be at least MESSAGE_QUEUE_MAX_SIZE"
            )
