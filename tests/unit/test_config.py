"""Settings of the cluster deployment: Kafka client options, metadata store, durability guard."""

from __future__ import annotations

import pytest

from mqfast.config import ENV_VARS, KAFKA_SECURITY_VARS, Settings
from mqfast.errors import ConfigError
from mqfast.server import postgres_dsn
from mqfast.sinks.kafka import consumer_config, producer_config


def test_kafka_security_and_any_librdkafka_option_come_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "MESSAGE_QUEUE_ENGINE": "kafka",
            "KAFKA_BROKERS": "b1:9092,b2:9092,b3:9092",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": "mq",
            "KAFKA_SASL_PASSWORD": "secret",
            "KAFKA_SSL_CA_LOCATION": "/etc/ca.pem",
            "KAFKA_SSL_CERTIFICATE_LOCATION": "/etc/client.pem",
            "KAFKA_SSL_KEY_LOCATION": "/etc/client.key",
            "KAFKA_OPT_LINGER_MS": "5",
            "KAFKA_OPT_SESSION_TIMEOUT_MS": "9000",
        }
    )
    p = producer_config(s)
    assert p["bootstrap.servers"] == "b1:9092,b2:9092,b3:9092"
    assert p["security.protocol"] == "SASL_SSL"
    assert p["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (p["sasl.username"], p["sasl.password"]) == ("mq", "secret")
    assert p["ssl.ca.location"] == "/etc/ca.pem"
    assert p["ssl.certificate.location"] == "/etc/client.pem"
    assert p["ssl.key.location"] == "/etc/client.key"
    assert p["linger.ms"] == "5"  # KAFKA_OPT_* wins over the default
    assert "session.timeout.ms" not in p  # a consumer setting is not given to the producer
    c = consumer_config(s, "mqfast.g")
    assert c["session.timeout.ms"] == "9000" and "linger.ms" not in c
    assert c["security.protocol"] == "SASL_SSL"
    assert "sasl.password" not in repr(s)  # secrets stay out of logs


def test_the_producer_keeps_the_durability_promise_by_default() -> None:
    p = producer_config(Settings.from_env({"MESSAGE_QUEUE_ENGINE": "kafka"}))
    assert p["acks"] == "all"
    assert p["enable.idempotence"] is True
    assert p["compression.type"] == "lz4"


@pytest.mark.parametrize("acks", ["0", "1"])
def test_start_up_refuses_acks_other_than_all_without_the_explicit_opt_out(acks: str) -> None:
    env = {"MESSAGE_QUEUE_ENGINE": "kafka", "KAFKA_OPT_ACKS": acks}
    with pytest.raises(ConfigError, match="MESSAGE_QUEUE_KAFKA_UNSAFE_ACKS"):
        Settings.from_env(env)
    s = Settings.from_env({**env, "MESSAGE_QUEUE_KAFKA_UNSAFE_ACKS": "1"})
    assert producer_config(s)["acks"] == acks


def test_kafka_replicas_share_metadata_in_postgres_never_in_a_local_file() -> None:
    assert Settings.from_env({"MESSAGE_QUEUE_ENGINE": "kafka"}).meta == "postgres"
    assert Settings.from_env({}).meta == "sqlite"
    with pytest.raises(ConfigError, match="MESSAGE_QUEUE_META"):
        Settings.from_env({"MESSAGE_QUEUE_ENGINE": "kafka", "MESSAGE_QUEUE_META": "sqlite"})
    with pytest.raises(ConfigError, match="KAFKA_BROKERS"):
        Settings.from_env({"MESSAGE_QUEUE_ENGINE": "kafka", "KAFKA_BROKERS": " "})


def test_postgres_dsn_quotes_the_credentials() -> None:
    s = Settings.from_env(
        {
            "DB_HOST": "db.internal",
            "DB_PORT": "6432",
            "DB_USER": "mq user",
            "DB_PASSWORD": "p@ss:w/rd",
            "DB_NAME": "necpgame",
            "DB_SSLMODE": "require",
        }
    )
    assert postgres_dsn(s) == (
        "postgresql://mq%20user:p%40ss%3Aw%2Frd@db.internal:6432/necpgame?sslmode=require"
    )


def test_env_vars_lists_the_contract_variables() -> None:
    for name in ("DB_HOST", "DB_PASSWORD", "REDIS_HOST", "REDIS_PORT", "KAFKA_BROKERS"):
        assert name in ENV_VARS
    for name in KAFKA_SECURITY_VARS:
        assert name in ENV_VARS


@pytest.mark.parametrize(
    ("host", "open_without_auth"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("127.example.com", False),  # a name, not a loopback address
        ("myhost", False),
    ],
)
def test_only_a_loopback_listener_may_run_without_authentication(
    host: str, open_without_auth: bool
) -> None:
    if open_without_auth:
        assert Settings.from_env({"MESSAGE_QUEUE_HOST": host}).loopback_only
    else:
        with pytest.raises(ConfigError, match="MESSAGE_QUEUE_INSECURE"):
            Settings.from_env({"MESSAGE_QUEUE_HOST": host})
        assert not Settings.from_env(
            {"MESSAGE_QUEUE_HOST": host, "MESSAGE_QUEUE_INSECURE": "1"}
        ).loopback_only


@pytest.mark.parametrize(
    ("var", "value", "minimum"),
    [
        ("MESSAGE_QUEUE_TTL", "24", "1s"),  # 24 ns: every message would expire at once
        ("MESSAGE_QUEUE_TTL", "500ms", "1s"),
        ("MESSAGE_QUEUE_RETENTION", "168", "1s"),
        ("MESSAGE_QUEUE_VISIBILITY_TIMEOUT", "30", "1ms"),
        ("MESSAGE_QUEUE_RETRY_BACKOFF", "1", "1ms"),
        ("MESSAGE_QUEUE_CONSUMER_TIMEOUT", "60", "1ms"),
        ("MESSAGE_QUEUE_HEADER_TIMEOUT", "10", "1ms"),
        ("MESSAGE_QUEUE_METRICS_INTERVAL", "10", "1ms"),
        ("MESSAGE_QUEUE_JWT_LEEWAY", "30", "1ms"),
    ],
)
def test_a_duration_that_is_a_bare_small_integer_is_refused_with_the_accepted_forms(
    var: str, value: str, minimum: str
) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.from_env({var: value})
    message = str(e.value)
    assert message.startswith(f"{var}={value!r}"), message
    assert f"minimum of {minimum}" in message and "'30s'" in message and "nanoseconds" in message


def test_zero_keeps_its_meaning_and_real_durations_pass() -> None:
    s = Settings.from_env(
        {
            "MESSAGE_QUEUE_TTL": "0",  # never expires
            "MESSAGE_QUEUE_RETENTION_INTERVAL": "0",  # retention off
            "MESSAGE_QUEUE_JWT_LEEWAY": "0",
            "MESSAGE_QUEUE_RETRY_BACKOFF": "0",
            "MESSAGE_QUEUE_VISIBILITY_TIMEOUT": "1000000000",  # nanoseconds, the contract's form
        }
    )
    assert s.default_ttl_ns == 0 and s.retention_interval_s == 0 and s.jwt_leeway_s == 0
    assert s.visibility_timeout_ns == 1_000_000_000
    assert Settings.from_env({"MESSAGE_QUEUE_TTL": "1s"}).default_ttl_ns == 1_000_000_000


@pytest.mark.parametrize(
    ("env", "served"),
    [
        ({}, True),  # loopback
        ({"MESSAGE_QUEUE_HOST": "0.0.0.0", "MESSAGE_QUEUE_INSECURE": "1"}, False),
        ({"MESSAGE_QUEUE_HOST": "0.0.0.0", "MESSAGE_QUEUE_JWT_SECRET": "s" * 32}, True),
        (
            {
                "MESSAGE_QUEUE_HOST": "0.0.0.0",
                "MESSAGE_QUEUE_INSECURE": "1",
                "MESSAGE_QUEUE_CONSOLE": "on",
            },
            True,
        ),
        ({"MESSAGE_QUEUE_CONSOLE": "off"}, False),
        ({"MESSAGE_QUEUE_CONSOLE": "AUTO"}, True),
    ],
)
def test_the_console_is_off_by_default_on_an_open_non_loopback_listener(
    env: dict[str, str], served: bool
) -> None:
    assert Settings.from_env(env).console_enabled is served


def test_a_console_setting_other_than_auto_on_off_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="MESSAGE_QUEUE_CONSOLE"):
        Settings.from_env({"MESSAGE_QUEUE_CONSOLE": "maybe"})


def test_the_idempotency_window_takes_a_duration_bounded_by_1s_and_30_days() -> None:
    assert Settings.from_env({}).idempotency_window_ns == 24 * 3600 * 10**9
    assert Settings.from_env({"MESSAGE_QUEUE_IDEMPOTENCY_WINDOW": "90m"}).idempotency_window_ns == (
        90 * 60 * 10**9
    )
    for bad in ("0", "500ms", "721h", "soon"):
        with pytest.raises(ConfigError, match="MESSAGE_QUEUE_IDEMPOTENCY_WINDOW"):
            Settings.from_env({"MESSAGE_QUEUE_IDEMPOTENCY_WINDOW": bad})
