#!/usr/bin/env python3
"""Real Kafka, PostgreSQL and Redis on loopback, for tests, benchmarks and development.

No Docker exists where this project is built and tested, so the services run as plain
processes: Kafka's jars come from Maven Central (cached under ``~/.cache/mqfast``) and run on
the local JDK, PostgreSQL and Redis come from Debian's packages. Everything here is stdlib-only
so it runs before the project's own dependencies are installed.

Every service listens on 127.0.0.1 only, on ports picked below the kernel's ephemeral range (so
a stopped service can be started again on the same port without a client socket having taken
it), keeps its data and logs under the directory the caller gives, and is stopped by its PID.
Processes start in their own session; those started by the Python API die with the process
that started them (an ``atexit`` handler, and ``PR_SET_PDEATHSIG`` through ``setpriv`` for the
cases where ``atexit`` never runs). The CLI's ``up`` starts detached services instead.

CLI::

    python scripts/services.py up [--brokers 1|3] [--dir DIR] [--only kafka,postgres,redis]
    python scripts/services.py status [--dir DIR]
    python scripts/services.py down [--dir DIR]

``up`` prints ``export KEY=VALUE`` lines for mqfast (``eval "$(python scripts/services.py up)"``);
everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import glob
import grp
import hashlib
import json
import logging
import os
import pwd
import queue
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("mqfast.services")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".services"

# Newest first. A version that fails to resolve (registry refuses, network down) falls through
# to the next one; MQFAST_KAFKA_VERSION pins one.
KAFKA_VERSIONS: tuple[str, ...] = ("4.4.0", "4.3.1", "4.2.0", "4.1.2", "4.0.2")
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"
KAFKA_READY_MARK = "Kafka Server started"
PG_READY_MARK = "database system is ready to accept connections"
KAFKA_JVM_OPTS: tuple[str, ...] = (
    "-XX:+UseG1GC",
    "-Xms256m",
    "-Xmx512m",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    # No /tmp/hsperfdata_* files left behind, and a little less work at start.
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
)
PG_USER = PG_PASSWORD = PG_DATABASE = "mqfast"
LOG_TAIL_LINES = 40


class ServiceError(RuntimeError):
    """A service could not be installed, started or stopped."""

    # Set when a server died because one of its ports was taken meanwhile.
    port_clash = False


PORT_CLASH_ATTEMPTS = 3


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of ``pid``, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    """Whether ``pid`` runs and, if ``starttime`` is given, is still the same process.

    Zombies count as dead: the init process of some sandboxes never reaps orphans, and the
    start time guards against a PID that the kernel has since handed to someone else.
    """
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return starttime is None or stat[1] == starttime


def _signal_group(pid: int, sig: int) -> None:
    # Children start in their own session, so their PID is also their process group: this
    # reaches helpers they forked too (PostgreSQL backends, for instance).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait until our child ``pid`` exits, leaving it unreaped (WNOWAIT). True if it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def tail(paths: Iterable[Path], lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of each existing file, headed by its path."""
    out: list[str] = []
    for path in paths:
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            continue
        out.append(f"--- last {len(text)} lines of {path} ---")
        out.extend(text)
    return "\n".join(out) if out else "(no log written)"


def _run(
    cmd: Sequence[str],
    what: str,
    *,
    cwd: Path | None = None,
    timeout: float = 900,
    env: dict[str, str] | None = None,
    user: int | None = None,
    group: int | None = None,
) -> str:
    """Run a helper command to completion; on failure raise with the tail of its output."""
    try:
        done = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
            user=user,
            group=group,
            # Drop root's supplementary groups along with its uid.
            extra_groups=[] if user is not None else None,
        )
    except subprocess.TimeoutExpired as e:
        out = e.output if isinstance(e.output, str) else ""
        raise ServiceError(f"{what}: timed out after {timeout:.0f} s\n{_last(out)}") from e
    except OSError as e:
        raise ServiceError(f"{what}: cannot run {cmd[0]}: {e}") from e
    if done.returncode != 0:
        raise ServiceError(
            f"{what}: `{shlex.join(cmd)}` exited {done.returncode}\n{_last(done.stdout)}"
        )
    return done.stdout


def _last(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- ports

_HANDED_OUT: set[int] = set()
_PORT_LOCK = threading.Lock()


def _port_range() -> tuple[int, int]:
    # Ports in the ephemeral range can be taken by any outgoing connection while a service is
    # down for a restart test; below it only servers bind.
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low > 11000:
        return 10000, low - 1
    return 61000, 65535


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1, never handed out before by this process."""
    lo, hi = _port_range()
    rng = random.SystemRandom()
    held: list[socket.socket] = []
    try:
        with _PORT_LOCK:
            for _ in range(2000):
                if len(held) == count:
                    break
                port = rng.randint(lo, hi)
                if port in _HANDED_OUT:
                    continue
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                # Same option the servers use, so a port with TIME_WAIT leftovers still counts.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    s.close()
                    continue
                held.append(s)
                _HANDED_OUT.add(port)
            if len(held) < count:
                raise ServiceError(f"found only {len(held)} of {count} free ports in {lo}-{hi}")
            return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- services

_LIVE: list[Service] = []
_LIVE_LOCK = threading.Lock()


class _Spawner:
    """Starts attached children from one thread that lives as long as the process.

    The kernel sends the parent-death signal when the *thread* that forked a child exits, not
    the process: a service started from a worker thread (``asyncio.to_thread(pg.start)``)
    would die with that thread. This daemon thread is never joined, so it ends only when the
    process does, after the atexit handler has stopped everything gracefully.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def popen(self, cmd: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._pid != os.getpid():  # a fork inherited our state but not our thread
                self._reset()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="mqfast-services-spawner", daemon=True
                )
                self._thread.start()
        done: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((done, cmd, kwargs))
        return done.result()

    def _serve(self) -> None:
        while True:
            done, cmd, kwargs = self._jobs.get()
            try:
                done.set_result(subprocess.Popen(cmd, **kwargs))
            except BaseException as e:
                done.set_exception(e)


_SPAWNER = _Spawner()


def _pdeathsig_prefix(sig: str) -> list[str]:
    # setpriv execs in place, so the PID we record is still the service's own. Without it
    # (util-linux lacking) the atexit handler is the only guard.
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", sig, "--"] if setpriv else []


class Service:
    """One server process: started, checked, stopped and killed by its PID.

    ``start()`` after ``stop()`` or ``kill()`` runs it again on the same ports and data.
    """

    name: str = "service"
    stop_signal: ClassVar[int] = signal.SIGTERM
    # Sent by the kernel if the Python thread that started the process dies without cleanup.
    death_signal: ClassVar[str] = "KILL"
    ready_timeout: ClassVar[float] = 60.0

    def __init__(self, workdir: Path, *, detached: bool = False) -> None:
        self.workdir = workdir
        self.detached = detached
        self.log_path = workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._starttime: int | None = None
        self._log_offset = 0
        self._stop_offset = 0
        self._t0 = 0.0
        self.last_start_seconds = 0.0
        self.owner_pid = os.getpid()

    # -- to override
    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Ports and paths, for services.json and status output."""
        return {}

    def log_files(self) -> list[Path]:
        return [self.log_path]

    def _spawn_kwargs(self) -> dict[str, Any]:
        return {"cwd": self.workdir}

    # -- common
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def starttime(self) -> int | None:
        return self._starttime

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} {state} {self.describe()}>"

    def launch(self) -> None:
        """Start the process without waiting for it to be ready."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        cmd = self.command()
        if not self.detached:
            cmd = _pdeathsig_prefix(self.death_signal) + cmd
        log.info("starting %s: %s", self.name, shlex.join(cmd))
        self._t0 = time.monotonic()
        with open(self._stdout_path(), "ab") as out:
            kwargs: dict[str, Any] = dict(
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._spawn_kwargs(),
            )
            if self.detached:
                self._proc = subprocess.Popen(cmd, **kwargs)
            else:
                self._proc = _SPAWNER.popen(cmd, kwargs)
        stat = _proc_stat(self._proc.pid)
        self._starttime = stat[1] if stat else None
        self.owner_pid = os.getpid()
        if not self.detached:
            with _LIVE_LOCK:
                if self not in _LIVE:
                    _LIVE.append(self)

    def _stdout_path(self) -> Path:
        return self.log_path

    def start(self, wait: bool = True) -> None:
        """Start (again) on the same ports and data; by default wait until it answers."""
        self.launch()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the service answers; raise ServiceError with its log tail if it won't."""
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            if self._proc is None:
                raise ServiceError(f"{self.name} was never started")
            code = self._proc.poll()
            if code is not None:
                err = ServiceError(
                    f"{self.name} exited with code {code} before it was ready\n"
                    + tail(self.log_files())
                )
                err.port_clash = "Address already in use" in self._log_since_start()
                raise err
            if self.is_ready():
                break
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} (pid {self.pid}) not ready after {limit:.0f} s\n"
                    + tail(self.log_files())
                )
            time.sleep(0.1)
        self.last_start_seconds = time.monotonic() - self._t0
        log.info(
            "%s ready in %.1f s (pid %s) %s",
            self.name,
            self.last_start_seconds,
            self.pid,
            self.describe(),
        )

    def _log_since_start(self) -> str:
        return self._log_since(self._log_offset)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def waits_for_gone_peers(self) -> bool:
        """Whether, stopping after all its peers did, it only waits out a timeout for them."""
        return False

    def signal_stop(self) -> None:
        self._stop_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        if self.running and self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(self.stop_signal)

    def wait_exit(self, timeout: float) -> bool:
        """Wait for the process to exit; SIGKILL its group after ``timeout``. True if clean."""
        proc = self._proc
        if proc is None:
            return True
        clean = True
        if proc.returncode is None:
            clean = _wait_unreaped(proc.pid, timeout)
            if not clean:
                log.warning(
                    "%s (pid %d) did not stop in %.0f s: SIGKILL", self.name, proc.pid, timeout
                )
            # Anything left in its group goes too (e.g. PostgreSQL backends). Until we reap
            # it, the leader's PID cannot be reused, so the group is still ours.
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        self._forget()
        self._after_exit()
        return clean

    def _after_exit(self) -> None:
        """Called once the process has exited and been reaped."""

    def _forget(self) -> None:
        with _LIVE_LOCK:
            if self in _LIVE:
                _LIVE.remove(self)

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop by PID: the service's stop signal, then SIGKILL after ``timeout``."""
        if not self.running:
            self._forget()
            if self._proc is not None:
                self._after_exit()
            return
        log.info("stopping %s (pid %s)", self.name, self.pid)
        self.signal_stop()
        self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL the process (and its group) with no chance to clean up: a crash."""
        if self._proc is None:
            return
        log.info("killing %s (pid %s)", self.name, self.pid)
        if self._proc.returncode is None:  # not reaped yet, so the PID is still ours
            _signal_group(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._forget()
        self._after_exit()

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "starttime": self.starttime,
            "stop_signal": signal.Signals(self.stop_signal).name,
            "log": str(self.log_path),
            **self.describe(),
        }


def stop_all(services: Sequence[Service], timeout: float = 30) -> None:
    """Stop several services at once: signal all, then wait with one shared deadline.

    Kafka nodes must go together: a broker stopped last waits for a controller quorum that the
    ones stopped before it no longer provide.
    """
    running = [s for s in services if s.running]
    for s in running:
        log.info("stopping %s (pid %s)", s.name, s.pid)
        s.signal_stop()
    deadline = time.monotonic() + timeout
    pending = list(running)
    while pending:
        for s in [s for s in pending if s.pid is not None and _wait_unreaped(s.pid, 0)]:
            s.wait_exit(0)
            pending.remove(s)
        if len(pending) == 1 and len(running) > 1 and pending[0].waits_for_gone_peers():
            log.info("%s waits for peers that have all stopped: SIGKILL", pending[0].name)
            pending.pop().kill()
        if time.monotonic() >= deadline:
            for s in pending:
                s.wait_exit(0)
            break
        time.sleep(0.05)
    for s in services:
        s._forget()


@atexit.register
def _stop_everything() -> None:
    with _LIVE_LOCK:
        # A forked child that exits normally must not stop its parent's services.
        live = [s for s in _LIVE if s.owner_pid == os.getpid()]
    if live:
        stop_all(live, timeout=20)
    for path, owner in list(_SCRATCH.items()):
        if owner == os.getpid():
            shutil.rmtree(path, ignore_errors=True)


# Directories outside the caller's workdir that die with this process (see _pg_root).
_SCRATCH: dict[Path, int] = {}  # path: pid of the process that made it


# --------------------------------------------------------------------------- installation

_INSTALLED: set[str] = set()
_INSTALL_LOCK = threading.Lock()


def _as_root_prefix() -> list[str]:
    if os.geteuid() == 0:
        return []
    if (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False).returncode == 0
    ):
        return ["sudo", "-n"]
    raise ServiceError(
        "installing Debian packages needs root: run as root, allow passwordless sudo, or "
        "install them yourself (apt-get install postgresql redis-server openjdk-17-jre-headless "
        "maven)"
    )


def apt_install(packages: Sequence[str]) -> None:
    """``apt-get update`` then ``apt-get install -y`` as root, without starting the services.

    Debian's postgresql and redis-server start system instances on 5432/6379 when installed;
    they would be harmless (ours use other ports) but cost memory, so a policy-rc.d
    suppresses that for the duration when we can place one.
    """
    prefix = _as_root_prefix()
    policy = Path("/usr/sbin/policy-rc.d")
    placed = False
    if os.geteuid() == 0 and not policy.exists():
        policy.write_text("#!/bin/sh\n# placed by mqfast scripts/services.py\nexit 101\n")
        policy.chmod(0o755)
        placed = True
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    try:
        t0 = time.monotonic()
        log.info("apt-get update (to install %s)", " ".join(packages))
        _run([*prefix, *env, "apt-get", *lock, "update"], "apt-get update", timeout=900)
        log.info("apt-get install %s", " ".join(packages))
        _run(
            [
                *prefix,
                *env,
                "apt-get",
                *lock,
                "install",
                "-y",
                "--no-install-recommends",
                # Install what is missing; leave what is there as it is.
                "--no-upgrade",
                *packages,
            ],
            f"apt-get install {' '.join(packages)}",
            timeout=1800,
        )
        log.info("installed %s in %.0f s", " ".join(packages), time.monotonic() - t0)
    finally:
        if placed:
            policy.unlink(missing_ok=True)


def pg_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<ver>/bin holding a server, or None."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    if not found:
        return None

    def major(p: Path) -> float:
        try:
            return float(p.parent.name)
        except ValueError:
            return 0.0

    return max(found, key=major)


def redis_server() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").exists():
        return str(Path(home, "bin", "java"))
    return shutil.which("java")


def _java_major(exe: str) -> int:
    out = _run([exe, "-version"], "java -version", timeout=60)
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        raise ServiceError(f"cannot read the Java version from:\n{out}")
    first = int(m.group(1))
    # Java 8 and older said "1.8.0_x".
    return int(m.group(2) or 0) if first == 1 else first


def _missing_packages(wanted: Iterable[str]) -> list[str]:
    packages: list[str] = []
    if "kafka" in wanted:
        if java() is None:
            packages.append("openjdk-17-jre-headless")
        if shutil.which("mvn") is None:
            packages.append("maven")
    if "postgres" in wanted and pg_bin_dir() is None:
        packages.append("postgresql")
    if "redis" in wanted and redis_server() is None:
        packages.append("redis-server")
    return packages


def what_is_missing(kafka: bool = True, postgres: bool = True, redis: bool = True) -> list[str]:
    """What ensure_installed would fetch (Debian packages, Kafka jars); empty if nothing."""
    wanted = [n for n, on in (("kafka", kafka), ("postgres", postgres), ("redis", redis)) if on]
    missing = _missing_packages(wanted)
    if kafka and _cached_kafka_lib() is None:
        missing.append("Kafka jars")
    return missing


def chromium() -> tuple[str, str]:
    """Debian's ``chromium`` and ``chromium-driver`` (for the web console's browser test):
    their paths, installed first when one is missing."""
    with _INSTALL_LOCK:
        found = shutil.which("chromium"), shutil.which("chromedriver")
        if None in found:
            apt_install(["chromium", "chromium-driver"])
            found = shutil.which("chromium"), shutil.which("chromedriver")
        browser, driver = found
        if browser is None or driver is None:
            raise ServiceError("no chromium or chromedriver after installing them")
        return browser, driver


def ensure_installed(kafka: bool = True, postgres: bool = True, redis: bool = True) -> None:
    """Install what the chosen services need and is missing; cheap when all is there.

    Kafka needs Java 17+ and Maven (Debian packages) and its jars (Maven Central, cached);
    PostgreSQL and Redis come from Debian's postgresql and redis-server packages.
    """
    with _INSTALL_LOCK:
        wanted = {
            name
            for name, on in (("kafka", kafka), ("postgres", postgres), ("redis", redis))
            if on and name not in _INSTALLED
        }
        if not wanted:
            return
        packages = _missing_packages(wanted)
        if packages:
            apt_install(packages)
        if "kafka" in wanted:
            exe = java()
            if exe is None:
                raise ServiceError("no java after installing openjdk-17-jre-headless")
            if _java_major(exe) < 17:
                raise ServiceError(
                    f"Kafka 4 needs Java 17 or newer; {exe} is older (set JAVA_HOME to a newer JDK)"
                )
            kafka_lib()
        if "postgres" in wanted and pg_bin_dir() is None:
            raise ServiceError("no /usr/lib/postgresql/*/bin/postgres after installing postgresql")
        if "redis" in wanted and redis_server() is None:
            raise ServiceError("no redis-server after installing redis-server")
        _INSTALLED.update(wanted)


def promtool() -> str:
    """The path of ``promtool`` (rule and exposition linter), installing Debian's ``prometheus``
    package when it is missing: Debian 12 ships promtool in no smaller package. Installed with
    the service start suppressed, like the others."""
    with _INSTALL_LOCK:
        found = shutil.which("promtool")
        if found is None:
            apt_install(["prometheus"])
            found = shutil.which("promtool")
        if found is None:
            raise ServiceError("no promtool after installing prometheus")
        return found


# --------------------------------------------------------------------------- kafka jars


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mqfast"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.mqfast</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""


def _jar_version(lib: Path, artifact: str) -> str | None:
    for jar in lib.glob(f"{artifact}-*.jar"):
        m = re.fullmatch(re.escape(artifact) + r"-(\d[\w.\-]*)\.jar", jar.name)
        if m:
            return m.group(1)
    return None


def _resolve_kafka(version: str, dest: Path) -> None:
    """Fetch kafka_2.13:<version> with its runtime dependencies, plus the slf4j binding."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("mvn not found (apt-get install maven)")
    work = Path(tempfile.mkdtemp(prefix=f"kafka-{version}.", dir=dest.parent))
    try:
        (work / "pom.xml").write_text(_POM.format(version=version))
        lib = work / "lib"
        t0 = time.monotonic()
        log.info("resolving org.apache.kafka:kafka_2.13:%s from Maven Central", version)
        _run(
            [
                mvn,
                "-B",
                "-q",
                f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                f"-DoutputDirectory={lib}",
                "-DincludeScope=runtime",
            ],
            f"resolving Kafka {version} with Maven",
            cwd=work,
        )
        # The release tarball adds the slf4j binding; the pom does not, and without it the
        # broker logs nothing. It must match log4j-core and the slf4j API generation.
        log4j = _jar_version(lib, "log4j-core")
        slf4j = _jar_version(lib, "slf4j-api")
        if log4j is None or slf4j is None:
            raise ServiceError(f"Kafka {version} brought no log4j-core or slf4j-api jar")
        binding = "log4j-slf4j2-impl" if slf4j.startswith("2.") else "log4j-slf4j-impl"
        _run(
            [
                mvn,
                "-B",
                "-q",
                f"{DEPENDENCY_PLUGIN}:copy",
                f"-Dartifact=org.apache.logging.log4j:{binding}:{log4j}",
                f"-DoutputDirectory={lib}",
            ],
            f"resolving {binding} {log4j} with Maven",
            cwd=work,
        )
        jars = sorted(p.name for p in lib.glob("*.jar"))
        (work / "COMPLETE").write_text(json.dumps({"version": version, "jars": jars}, indent=1))
        (work / "pom.xml").unlink()
        # A crashed earlier attempt may have left an incomplete folder under the final name.
        if dest.exists():
            shutil.rmtree(dest)
        # Readers only ever see a complete folder: the rename is atomic.
        work.chmod(0o755)  # mkdtemp made it private; the jars are nothing secret
        os.rename(work, dest)
        log.info(
            "Kafka %s: %d jars cached in %s (%.1f s)",
            version,
            len(jars),
            dest,
            time.monotonic() - t0,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


_KAFKA_LIB: dict[str, Path] = {}


def kafka_lib(version: str | None = None) -> Path:
    """The folder of Kafka jars for ``java -cp 'lib/*'``, downloaded once and cached.

    Without ``version``: MQFAST_KAFKA_VERSION if set, else the newest of KAFKA_VERSIONS that
    is cached or resolves.
    """
    pinned = version or os.environ.get("MQFAST_KAFKA_VERSION")
    candidates = (pinned,) if pinned else KAFKA_VERSIONS
    key = ",".join(candidates)
    if key in _KAFKA_LIB:
        return _KAFKA_LIB[key]
    root = cache_root()
    errors: list[str] = []
    for v in candidates:
        dest = root / f"kafka-{v}"
        if not (dest / "COMPLETE").exists():
            # Two processes may get here at once; one downloads, the other finds it done.
            with _file_lock(root / f"kafka-{v}.lock"):
                if not (dest / "COMPLETE").exists():
                    try:
                        _resolve_kafka(v, dest)
                    except ServiceError as e:
                        log.warning("Kafka %s did not resolve: %s", v, str(e).splitlines()[0])
                        errors.append(str(e))
                        continue
        _KAFKA_LIB[key] = dest / "lib"
        return dest / "lib"
    raise ServiceError("no Kafka version resolved:\n" + "\n\n".join(errors))


def _cached_kafka_lib() -> Path | None:
    pinned = os.environ.get("MQFAST_KAFKA_VERSION")
    for v in (pinned,) if pinned else KAFKA_VERSIONS:
        if (cache_root() / f"kafka-{v}" / "COMPLETE").exists():
            return cache_root() / f"kafka-{v}" / "lib"
    return None


def kafka_version(lib: Path) -> str:
    return lib.parent.name.removeprefix("kafka-")


# --------------------------------------------------------------------------- kafka

_LOG4J2 = """\
status = warn
name = mqfast-kafka
# Log4j's own shutdown hook would stop logging before Kafka's shutdown does its work, and the
# shutdown is what we read when a stop is slow.
shutdownHook = disable
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
# The request and state-change loggers repeat what the broker log says, at length.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
"""


_CDS_LOCK = threading.Lock()
_CDS_DUMPING: set[Path] = set()


def _cds_archive(lib: Path, exe: str) -> Path:
    real = os.path.realpath(exe)
    st = os.stat(real)
    key = hashlib.sha256(f"{real}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    # Leftovers of dumps whose JVM was killed, or whose Python process went first.
    for old in lib.parent.glob("cds-*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink()
    return lib.parent / f"cds-{key}.jsa"


def _cluster_id() -> str:
    # Never one that opens with "-": kafka-storage would read it as an option (one id in 64
    # failed to format). Kafka's own Uuid.randomUuid() draws again for the same reason.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class KafkaNode(Service):
    """One combined broker+controller of a KRaft cluster."""

    ready_timeout = 120.0

    def __init__(
        self,
        workdir: Path,
        node_id: int,
        port: int,
        controller_port: int,
        lib: Path,
        log4j_config: Path,
        *,
        detached: bool = False,
    ) -> None:
        self.name = f"kafka-{node_id}"
        super().__init__(workdir, detached=detached)
        self.node_id = node_id
        self.host = "127.0.0.1"
        self.port = port
        self.controller_port = controller_port
        self.lib = lib
        self.log4j_config = log4j_config
        self.config_path = workdir / "server.properties"
        self.log_path = workdir / "server.log"
        self.stdout_path = workdir / "stdout.log"
        # (temporary file the JVM dumps into, archive it becomes) while this run dumps one.
        self._cds_dump: tuple[Path, Path] | None = None

    def _stdout_path(self) -> Path:
        return self.stdout_path

    def log_files(self) -> list[Path]:
        return [self.log_path, self.stdout_path]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def java_command(self, main: str, *args: str, dump_cds: bool = False) -> list[str]:
        exe = java()
        if exe is None:
            raise ServiceError("java not found")
        extra = shlex.split(os.environ.get("MQFAST_KAFKA_JVM_OPTS", ""))
        return [
            exe,
            *KAFKA_JVM_OPTS,
            *self._cds_options(exe, dump_cds),
            *extra,
            f"-Dkafka.logs.dir={self.workdir}",
            f"-Dlog4j2.configurationFile={self.log4j_config}",
            "-cp",
            f"{self.lib}/*",
            main,
            *args,
        ]

    def _cds_options(self, exe: str, dump: bool) -> list[str]:
        """Class-data sharing: a class archive of a previous run cuts start-up by about a third.

        The first broker run (not detached, so we see it exit) dumps the archive when it
        stops; later JVMs map it, and share those pages with each other. A JVM silently
        ignores an archive that does not match it, and the file name is keyed by the java
        binary so that an upgraded JDK makes a new one.
        """
        archive = _cds_archive(self.lib, exe)
        quiet = "-Xlog:cds*=error"  # dumping warns about every old-format class it skips
        if archive.exists():
            return [f"-XX:SharedArchiveFile={archive}", quiet]
        if not dump or self.detached:
            return []
        with _CDS_LOCK:
            if archive in _CDS_DUMPING:
                return []
            _CDS_DUMPING.add(archive)
        tmp = archive.with_name(f"{archive.name}.{os.getpid()}-{self.node_id}.tmp")
        self._cds_dump = (tmp, archive)
        return [f"-XX:ArchiveClassesAtExit={tmp}", quiet]

    def _after_exit(self) -> None:
        if self._cds_dump is None:
            return
        (dump, final), self._cds_dump = self._cds_dump, None
        code = self._proc.returncode if self._proc is not None else None
        # 143: the JVM ran its shutdown after SIGTERM, which is when it writes the archive.
        if code in (0, 143) and dump.exists() and dump.stat().st_size > 0:
            os.replace(dump, final)  # atomic: no JVM ever maps a half-written archive
            log.info("Kafka class-data archive written: %s", final)
        else:
            dump.unlink(missing_ok=True)
        with _CDS_LOCK:
            _CDS_DUMPING.discard(final)

    def command(self) -> list[str]:
        return self.java_command("kafka.Kafka", str(self.config_path), dump_cds=True)

    def is_ready(self) -> bool:
        return KAFKA_READY_MARK in self._log_since_start() and port_open(self.host, self.port)

    def waits_for_gone_peers(self) -> bool:
        # The raft leader, stopped with the whole cluster, resigns and then waits 5 s for a
        # successor among voters that have already exited. Its broker side has shut down
        # cleanly by then, and raft has fsynced its log: nothing is lost by not waiting.
        text = self._log_since(self._stop_offset)
        return "to SHUTDOWN (kafka.server.BrokerServer)" in text and "ResignedState" in text

    def describe(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "port": self.port, "controller_port": self.controller_port}


class Kafka:
    """A KRaft cluster of combined broker+controller nodes on loopback."""

    def __init__(self, workdir: Path, nodes: list[KafkaNode], version: str) -> None:
        self.workdir = workdir
        self.nodes = nodes
        self.version = version
        self.replication = min(3, len(nodes))
        self.last_start_seconds = 0.0

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.nodes)

    @property
    def running(self) -> bool:
        return all(n.running for n in self.nodes)

    def __repr__(self) -> str:
        return f"<Kafka {self.version} {self.bootstrap} {[n.running for n in self.nodes]}>"

    def node(self, node_id: int) -> KafkaNode:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(f"no Kafka node {node_id}")

    def start(self, timeout: float | None = None) -> None:
        """Start every stopped node (all at once: a quorum needs them together)."""
        t0 = time.monotonic()
        stopped = [n for n in self.nodes if not n.running]
        for n in stopped:
            n.launch()
        try:
            for n in stopped:
                n.wait_ready(timeout)
        except BaseException:
            stop_all(stopped)
            raise
        self.last_start_seconds = time.monotonic() - t0

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def stop(self, timeout: float = 30) -> None:
        stop_all(self.nodes, timeout)

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()

    def stop_node(self, node_id: int, timeout: float = 30) -> None:
        self.node(node_id).stop(timeout)

    def kill_node(self, node_id: int) -> None:
        self.node(node_id).kill()

    def start_node(self, node_id: int) -> None:
        self.node(node_id).start()


def _server_properties(node: KafkaNode, voters: list[KafkaNode], cluster_size: int) -> str:
    rf = min(3, cluster_size)
    isr = 2 if rf >= 3 else 1
    # Internal topics need few partitions: each costs files and start-up work, and tests make
    # few groups. One per broker keeps the coordinators spread for fault tests.
    internal_parts = cluster_size
    if cluster_size == 1:
        quorum = f"controller.quorum.bootstrap.servers=127.0.0.1:{node.controller_port}"
    else:
        quorum = "controller.quorum.voters=" + ",".join(
            f"{v.node_id}@127.0.0.1:{v.controller_port}" for v in voters
        )
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.listener.names": "CONTROLLER",
        "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:"
        f"{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(node.workdir / "data"),
        "num.partitions": "1",
        "default.replication.factor": str(rf),
        "min.insync.replicas": str(isr),
        "auto.create.topics.enable": "false",
        "group.initial.rebalance.delay.ms": "0",
        "offsets.topic.replication.factor": str(rf),
        "offsets.topic.num.partitions": str(internal_parts),
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(isr),
        "transaction.state.log.num.partitions": str(internal_parts),
        "share.coordinator.state.topic.replication.factor": str(rf),
        "share.coordinator.state.topic.min.isr": str(isr),
        "share.coordinator.state.topic.num.partitions": str(internal_parts),
        # Small segments and indexes: tests write little, and many topics stay cheap.
        "log.segment.bytes": str(16 * 1024 * 1024),
        "log.index.size.max.bytes": str(1024 * 1024),
        "offsets.topic.segment.bytes": str(16 * 1024 * 1024),
        "log.retention.hours": "24",
        "log.retention.check.interval.ms": "60000",
        "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
        "log.cleaner.threads": "1",
        # Sized for two cores.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "num.replica.fetchers": "1",
        "background.threads": "4",
        # A broker restarted in a 3-node cluster is refused (DUPLICATE_BROKER_REGISTRATION)
        # until its old session expires, even after a clean stop; and a killed one stays
        # leader until then. 4 s instead of 9 keeps fault tests quick.
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "4000",
    }
    return quorum + "\n" + "".join(f"{k}={v}\n" for k, v in props.items())


def start_kafka(workdir: Path, brokers: int = 1, *, detached: bool = False) -> Kafka:
    """Format and start a KRaft cluster of ``brokers`` combined nodes (1 or 3) under workdir."""
    if brokers < 1:
        raise ValueError("brokers must be >= 1")
    ensure_installed(kafka=True, postgres=False, redis=False)
    workdir = workdir.resolve()
    for attempt in range(PORT_CLASH_ATTEMPTS):
        try:
            return _start_kafka(workdir, brokers, detached)
        except ServiceError as e:
            if not e.port_clash or attempt == PORT_CLASH_ATTEMPTS - 1:
                raise
            log.warning("Kafka: a port was taken by another process meanwhile; new ports")
            for node_dir in workdir.glob("node-*"):
                shutil.rmtree(node_dir)
    raise AssertionError("unreachable")


def _start_kafka(workdir: Path, brokers: int, detached: bool) -> Kafka:
    lib = kafka_lib()
    version = kafka_version(lib)
    workdir.mkdir(parents=True, exist_ok=True)
    log4j = workdir / "log4j2.properties"
    log4j.write_text(_LOG4J2)
    ports = free_ports(2 * brokers)
    nodes = [
        KafkaNode(
            workdir / f"node-{i + 1}",
            i + 1,
            ports[2 * i],
            ports[2 * i + 1],
            lib,
            log4j,
            detached=detached,
        )
        for i in range(brokers)
    ]
    cluster_id = _cluster_id()
    (workdir / "cluster.id").write_text(cluster_id + "\n")
    log.info(
        "Kafka %s: formatting %d node(s), cluster id %s, in %s",
        version,
        brokers,
        cluster_id,
        workdir,
    )
    t0 = time.monotonic()
    formats: list[tuple[KafkaNode, subprocess.Popen[bytes], Path]] = []
    for n in nodes:
        n.workdir.mkdir(parents=True, exist_ok=True)
        n.config_path.write_text(_server_properties(n, nodes, brokers))
        args = ["format", "-t", cluster_id, "-c", str(n.config_path)]
        if brokers == 1:
            args.insert(1, "--standalone")
        out_path = n.workdir / "format.log"
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                n.java_command("kafka.tools.StorageTool", *args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=n.workdir,
            )
        formats.append((n, proc, out_path))
    for n, proc, out_path in formats:
        if proc.wait(timeout=120) != 0:
            raise ServiceError(f"formatting {n.name} failed\n{tail([out_path])}")
    kafka = Kafka(workdir, nodes, version)
    log.info(
        "Kafka %s: formatted in %.1f s; starting %s",
        version,
        time.monotonic() - t0,
        kafka.bootstrap,
    )
    kafka.start()
    kafka.last_start_seconds = time.monotonic() - t0
    log.info(
        "Kafka %s ready at %s in %.1f s (format and start)",
        version,
        kafka.bootstrap,
        kafka.last_start_seconds,
    )
    return kafka


# --------------------------------------------------------------------------- postgres


def _pg_os_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs under when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "mqfast-pg"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    log.info("creating system user mqfast-pg to run PostgreSQL")
    _run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "mqfast-pg"],
        "useradd mqfast-pg",
    )
    return pwd.getpwnam("mqfast-pg")


def _can_traverse(path: Path, user: pwd.struct_passwd) -> bool:
    groups = {user.pw_gid} | {g.gr_gid for g in _all_groups() if user.pw_name in g.gr_mem}
    for p in [path, *path.parents]:
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return False
    return True


def _all_groups() -> list[grp.struct_group]:
    return list(grp.getgrall())


class Postgres(Service):
    """A PostgreSQL cluster of its own: 127.0.0.1 only, password login for ``mqfast``."""

    name = "postgres"
    # SIGTERM is a "smart" shutdown that waits for every client to leave; SIGINT is "fast".
    stop_signal = signal.SIGINT
    death_signal = "QUIT"
    ready_timeout = 60.0

    def __init__(self, workdir: Path, port: int, *, detached: bool = False) -> None:
        super().__init__(workdir, detached=detached)
        bin_dir = pg_bin_dir()
        if bin_dir is None:
            raise ServiceError("PostgreSQL is not installed (ensure_installed(postgres=True))")
        self.bin_dir = bin_dir
        self.host = "127.0.0.1"
        self.port = port
        self.user = PG_USER
        self.password = PG_PASSWORD
        self.database = PG_DATABASE
        self.os_user = _pg_os_user()
        # Set when the cluster had to live outside workdir; deleted by destroy() or at exit.
        self.scratch: Path | None = None
        self.root = self._pg_root()
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "run"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def _pg_root(self) -> Path:
        """Where the cluster's files live: in workdir if the server's account can reach it.

        As root, the caller's workdir often sits under a 0700 root-owned folder (pytest's
        tmp_path does): then the cluster lives in a fresh /tmp folder, linked from workdir as
        ``pgroot``, and removed when this process exits (unless detached).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        root = self.workdir / "pgroot"
        socket_path_len = len(str(root / "run" / f".s.PGSQL.{self.port}"))
        if root.is_symlink():
            if root.resolve().is_dir():
                return root.resolve()
            root.unlink()  # its scratch folder is gone with the process that made it
        if (self.os_user is None or _can_traverse(self.workdir, self.os_user)) and (
            socket_path_len < 100
        ):
            root.mkdir(exist_ok=True)
            return root
        outside = Path(tempfile.mkdtemp(prefix="mqfast-pg-"))
        os.chmod(outside, 0o755)  # mkdtemp's 0700 would shut out the server's account
        root.symlink_to(outside, target_is_directory=True)
        self.scratch = outside
        if not self.detached:
            _SCRATCH[outside] = os.getpid()
        return outside

    def _spawn_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"cwd": self.root}
        if self.os_user is not None:
            kw.update(user=self.os_user.pw_uid, group=self.os_user.pw_gid, extra_groups=[])
        return kw

    def _as_server_user(self, cmd: list[str], what: str) -> str:
        u = self.os_user
        return _run(
            cmd,
            what,
            cwd=self.root,
            timeout=300,
            user=u.pw_uid if u else None,
            group=u.pw_gid if u else None,
        )

    def _init_cluster(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        for d in (self.root, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
            if self.os_user is not None:
                os.chown(d, self.os_user.pw_uid, self.os_user.pw_gid)
        t0 = time.monotonic()
        log.info(
            "postgres: initdb %s (as %s)",
            self.data_dir,
            self.os_user.pw_name if self.os_user else "current user",
        )
        # --no-sync: a cluster that exists only for tests need not survive a power cut
        # between initdb and its first checkpoint.
        out = self._as_server_user(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
            "initdb",
        )
        (self.workdir / "initdb.log").write_text(out)
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write(
                "\n# mqfast scripts/services.py\n"
                "max_connections = 200\n"
                "shared_buffers = 64MB\n"
                "password_encryption = 'scram-sha-256'\n"
                "logging_collector = off\n"
                "log_destination = 'stderr'\n"
                "log_line_prefix = '%m [%p] %q%u@%d '\n"
            )
        # Only the socket (reachable by the server's account and root) trusts; TCP needs the
        # password, as in production.
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        log.info("postgres: initdb done in %.1f s", time.monotonic() - t0)

    def command(self) -> list[str]:
        # Address, port and socket on the command line, not in postgresql.conf: they belong to
        # this object, whatever cluster the data directory already holds.
        return [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-c",
            "listen_addresses=127.0.0.1",
        ]

    def is_ready(self) -> bool:
        return PG_READY_MARK in self._log_since_start() and port_open(self.host, self.port)

    def launch(self) -> None:
        self._init_cluster()
        super().launch()

    def wait_ready(self, timeout: float | None = None) -> None:
        super().wait_ready(timeout)
        self._bootstrap()

    def _bootstrap(self) -> None:
        marker = self.root / "mqfast-bootstrapped"
        if marker.exists():
            return
        self.psql(
            f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'",
            f"CREATE DATABASE {self.database} OWNER {self.user}",
        )
        marker.write_text("role and database created\n")
        log.info("postgres: created role and database %s", self.database)

    def psql(self, *statements: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket (trusted), returning psql's output."""
        cmd = [
            str(self.bin_dir / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database,
        ]
        for s in statements:
            cmd += ["-c", s]
        return _run(cmd, "psql", timeout=60)

    def describe(self) -> dict[str, Any]:
        return {"port": self.port, "data": str(self.data_dir)}

    def destroy(self) -> None:
        """Stop and delete the cluster's files (also outside workdir)."""
        self.stop()
        target = self.root
        shutil.rmtree(target, ignore_errors=True)
        _SCRATCH.pop(target, None)
        link = self.workdir / "pgroot"
        if link.is_symlink():
            link.unlink()


def start_postgres(workdir: Path, *, detached: bool = False) -> Postgres:
    """initdb and start PostgreSQL under workdir, with role/database/password ``mqfast``."""
    ensure_installed(kafka=False, postgres=True, redis=False)
    workdir = workdir.resolve()
    for attempt in range(PORT_CLASH_ATTEMPTS):
        pg = Postgres(workdir, free_ports(1)[0], detached=detached)
        try:
            pg.start()
            return pg
        except ServiceError as e:
            pg.destroy()  # the port is written into its configuration: begin anew
            if not e.port_clash or attempt == PORT_CLASH_ATTEMPTS - 1:
                raise
            log.warning("postgres: port %d was taken by another process meanwhile", pg.port)
        except BaseException:
            pg.destroy()
            raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- redis


class Redis(Service):
    """A redis-server with an append-only file, so a kill keeps what it acknowledged."""

    name = "redis"
    ready_timeout = 30.0

    def __init__(self, workdir: Path, port: int, *, detached: bool = False) -> None:
        super().__init__(workdir, detached=detached)
        exe = redis_server()
        if exe is None:
            raise ServiceError("redis-server is not installed (ensure_installed(redis=True))")
        self.exe = exe
        self.host = "127.0.0.1"
        self.port = port
        self.config_path = workdir / "redis.conf"
        self.data_dir = workdir / "data"
        self._write_config()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "# mqfast scripts/services.py\n"
            "bind 127.0.0.1\n"
            f"port {self.port}\n"
            "protected-mode yes\n"
            "daemonize no\n"
            "supervised no\n"
            f"pidfile {self.workdir / 'redis.pid'}\n"
            'logfile ""\n'
            f"dir {self.data_dir}\n"
            "appendonly yes\n"
            "appendfsync everysec\n"
            # The AOF is the durability under test; RDB snapshots would only fork.
            'save ""\n'
        )

    def command(self) -> list[str]:
        return [self.exe, str(self.config_path)]

    def is_ready(self) -> bool:
        return self.ping()

    def ping(self) -> bool:
        """True if the server answers PING with PONG (not LOADING or an error)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def describe(self) -> dict[str, Any]:
        return {"port": self.port}


def start_redis(workdir: Path, *, detached: bool = False) -> Redis:
    ensure_installed(kafka=False, postgres=False, redis=True)
    workdir = workdir.resolve()
    for attempt in range(PORT_CLASH_ATTEMPTS):
        r = Redis(workdir, free_ports(1)[0], detached=detached)
        try:
            r.start()
            return r
        except ServiceError as e:
            r.stop()
            if not e.port_clash or attempt == PORT_CLASH_ATTEMPTS - 1:
                raise
            log.warning("redis: port %d was taken by another process meanwhile", r.port)
        except BaseException:
            r.stop()
            raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- environment


def env_for(kafka: Kafka | None, pg: Postgres | None, redis: Redis | None) -> dict[str, str]:
    """The variables mqfast reads to reach these services."""
    env: dict[str, str] = {}
    if kafka is not None:
        env["KAFKA_BROKERS"] = kafka.bootstrap
    if pg is not None:
        env.update(
            DB_HOST=pg.host,
            DB_PORT=str(pg.port),
            DB_USER=pg.user,
            DB_PASSWORD=pg.password,
            DB_NAME=pg.database,
            # Our cluster has no TLS; saying so skips the client's SSL probe.
            DB_SSLMODE="disable",
        )
    if redis is not None:
        env.update(REDIS_HOST=redis.host, REDIS_PORT=str(redis.port))
    return env


# --------------------------------------------------------------------------- CLI

STATE_FILE = "services.json"
KINDS = ("kafka", "postgres", "redis")


def _read_state(d: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((d / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    return data


def _alive_records(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in state.get("processes", []) if pid_alive(p["pid"], p.get("starttime"))]


def _down(d: Path, timeout: float = 30) -> int:
    state = _read_state(d)
    if state is None:
        log.info("nothing to stop: no %s in %s", STATE_FILE, d)
        return 0
    procs = state.get("processes", [])
    live = _alive_records(state)
    for p in live:
        log.info("stopping %s (pid %d)", p["name"], p["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(p["pid"], signal.Signals[p["stop_signal"]])
    deadline = time.monotonic() + timeout
    for p in live:
        left = max(0.0, deadline - time.monotonic())
        while left > 0 and pid_alive(p["pid"], p.get("starttime")):
            time.sleep(0.05)
            left = deadline - time.monotonic()
        if pid_alive(p["pid"], p.get("starttime")):
            log.warning("%s (pid %d) did not stop in %.0f s: SIGKILL", p["name"], p["pid"], timeout)
            _signal_group(p["pid"], signal.SIGKILL)
    for path in state.get("scratch", []):
        shutil.rmtree(path, ignore_errors=True)
    (d / STATE_FILE).unlink()
    log.info("stopped %d of %d recorded processes", len(live), len(procs))
    return 0


def _status(d: Path) -> int:
    state = _read_state(d)
    if state is None:
        print(f"no services recorded in {d}")
        return 1
    ok = True
    for p in state.get("processes", []):
        alive = pid_alive(p["pid"], p.get("starttime"))
        ok &= alive
        ports = ", ".join(f"{k}={p[k]}" for k in ("port", "controller_port") if k in p)
        print(
            f"{p['name']:<10} pid {p['pid']:<8} {'running' if alive else 'STOPPED':<8} "
            f"{ports}  log {p['log']}"
        )
    for k, v in state.get("env", {}).items():
        print(f"export {k}={shlex.quote(v)}")
    return 0 if ok else 1


def _up(d: Path, brokers: int, only: Sequence[str]) -> int:
    state = _read_state(d)
    if state is not None:
        live = _alive_records(state)
        if live:
            names = ", ".join(f"{p['name']} (pid {p['pid']})" for p in live)
            log.error(
                "services already running from %s: %s; run `down --dir %s` first",
                d / STATE_FILE,
                names,
                d,
            )
            return 1
        _down(d)
    d.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        if kind in only:
            shutil.rmtree(d / kind, ignore_errors=True)
    ensure_installed(kafka="kafka" in only, postgres="postgres" in only, redis="redis" in only)
    kafka: Kafka | None = None
    pg: Postgres | None = None
    redis: Redis | None = None
    try:
        # Detached: no parent-death signal, since this process exits right after.
        if "kafka" in only:
            kafka = start_kafka(d / "kafka", brokers, detached=True)
        if "postgres" in only:
            pg = start_postgres(d / "postgres", detached=True)
        if "redis" in only:
            redis = start_redis(d / "redis", detached=True)
    except BaseException:
        # All or nothing: a half-started set would only confuse the next `up`.
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.destroy()
        if kafka is not None:
            kafka.stop()
        raise
    services: list[Service] = []
    if kafka is not None:
        services += kafka.nodes
    services += [s for s in (pg, redis) if s is not None]
    env = env_for(kafka, pg, redis)
    state = {
        "dir": str(d),
        "kafka_version": kafka.version if kafka else None,
        "processes": [s.record() for s in services],
        "scratch": [str(pg.scratch)] if pg is not None and pg.scratch else [],
        "env": env,
    }
    tmp = d / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(d / STATE_FILE)
    log.info("services running; stop them with: %s down --dir %s", sys.argv[0], d)
    for k, v in env.items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="services.py", description="Local Kafka, PostgreSQL and Redis for mqfast."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="install what is missing, start, print export lines")
    up.add_argument("--brokers", type=int, choices=(1, 3), default=1)
    up.add_argument(
        "--only", default=",".join(KINDS), help="comma-separated subset of kafka,postgres,redis"
    )
    inst = sub.add_parser("install", help="install what the services need, start nothing")
    inst.add_argument("--only", default=",".join(KINDS), help="as for up")
    for p in (
        up,
        sub.add_parser("down", help="stop what `up` started"),
        sub.add_parser("status", help="show what `up` started"),
    ):
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s services: %(message)s"
    )
    only: list[str] = []
    if args.cmd in ("up", "install"):
        only = [x.strip() for x in args.only.split(",") if x.strip()]
        if not only or set(only) - set(KINDS):
            parser.error(f"--only takes a subset of {','.join(KINDS)}, got {args.only!r}")
    try:
        if args.cmd == "install":
            missing = what_is_missing(*(k in only for k in KINDS))
            log.info("to install: %s", ", ".join(missing) if missing else "nothing")
            ensure_installed(*(k in only for k in KINDS))
            return 0
        d: Path = args.dir.resolve()
        if args.cmd == "up":
            return _up(d, args.brokers, only)
        if args.cmd == "down":
            return _down(d)
        return _status(d)
    except ServiceError as e:
        log.error("%s", e)
        return 1
    except BrokenPipeError:
        # `status | head` closing early is not an error worth a traceback.
        return 0


if __name__ == "__main__":
    sys.exit(main())
