"""One frozen settings object, built once at start from the environment.

The variable names of the API contract keep their meaning; every setting mqfast adds uses the
``MESSAGE_QUEUE_`` prefix. An invalid value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from mqfast.errors import ConfigError

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


def _int(value: str, var: str, lo: int, hi: int) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ConfigError(f"{var}={value!r}: expected an integer") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{var}={value!r}: must be between {lo} and {hi}")
    return n


def _duration(value: str, var: str) -> int:
    try:
        return parse_duration(value, var)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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
    "MESSAGE_QUEUE_HOST",
    "MESSAGE_QUEUE_IDLE_TIMEOUT",
    "MESSAGE_QUEUE_KAFKA_UNSAFE_ACKS",
    "MESSAGE_QUEUE_LOG_LEVEL",
    "MESSAGE_QUEUE_MAX_BATCH",
    "MESSAGE_QUEUE_MAX_BATCH_BYTES",
    "MESSAGE_QUEUE_MAX_HEADER_BYTES",
    "MESSAGE_QUEUE_MAX_POLL",
    "MESSAGE_QUEUE_MAX_SIZE",
    "MESSAGE_QUEUE_META",
    "MESSAGE_QUEUE_METRICS_INTERVAL",
    "MESSAGE_QUEUE_PORT",
    "MESSAGE_QUEUE_RETENTION",
    "MESSAGE_QUEUE_RETENTION_INTERVAL",
    "MESSAGE_QUEUE_RETRY_BACKOFF",
    "MESSAGE_QUEUE_RETRY_BACKOFF_MAX",
    "MESSAGE_QUEUE_SHUTDOWN_TIMEOUT",
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
            "default_ttl_ns": _duration(e.get("MESSAGE_QUEUE_TTL", "24h"), "MESSAGE_QUEUE_TTL"),
            "default_retention_ns": _duration(
                e.get("MESSAGE_QUEUE_RETENTION", "168h"), "MESSAGE_QUEUE_RETENTION"
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

    def _validate(self) -> None:
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
        if self.header_timeout_s <= 0 or self.idle_timeout_s <= 0:
            raise ConfigError(
                "MESSAGE_QUEUE_HEADER_TIMEOUT and MESSAGE_QUEUE_IDLE_TIMEOUT must be > 0"
            )
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
