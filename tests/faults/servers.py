"""Servers of the fault suite's own, on free ports, that a scenario may stop, kill and restart.

The shared services (RabbitMQ on 5672, Redis on 6379) are never touched by a fault: a scenario
that restarts a broker or fails over a Redis does it to a server started here, from the
installed binaries, with its data in a directory of its own.

- :class:`RabbitNode`: a second RabbitMQ node (``rabbitmq-server`` with its own node name,
  ports, database and log directories, no plugins, the machine's Erlang cookie so that
  ``rabbitmqctl -n`` reaches it). Measured here: about 10 s to start, 2-3 s to stop.
- :class:`RedisServer`: a ``redis-server`` (append-only file, fsync on every write, so a stop
  and a start lose nothing that was acknowledged). Starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

#: Where the Erlang cookie of the machine's RabbitMQ lives (``rabbitmqctl`` uses it).
ERLANG_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
#: The RabbitMQ scripts themselves: the /usr/sbin wrappers would switch to the rabbitmq user.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
#: How long a RabbitMQ node may take to accept AMQP connections (about 10 s here).
RABBIT_START_TIMEOUT_S = 60.0
#: How long a RabbitMQ node may take to stop before it is killed.
RABBIT_STOP_TIMEOUT_S = 30.0
#: How long a Redis server may take to accept connections.
REDIS_START_TIMEOUT_S = 10.0

#: Start-up times measured in this session, by server kind (for the suite's report).
START_TIMES: dict[str, list[float]] = {}


def accepts_connections(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` right now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until_listening(
    port: int, process: subprocess.Popen[bytes], timeout_s: float, log: Path, name: str
) -> None:
    """Return once ``port`` accepts connections; RuntimeError with the server's log if the
    process exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not accepts_connections(port):
        if process.poll() is not None or time.monotonic() > deadline:
            what = f"exited ({process.returncode})" if process.returncode is not None else "hung"
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise RuntimeError(f"{name} {what} before listening on {port}:\n{tail}")
        time.sleep(0.05)  # a port that refuses at once: poll again shortly


def _stop_process(process: subprocess.Popen[bytes], sig: int, timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _record(kind: str, started: float) -> None:
    START_TIMES.setdefault(kind, []).append(time.monotonic() - started)


# -- RabbitMQ ----------------------------------------------------------------------------------


@dataclass
class RabbitNode:
    """A RabbitMQ node of the fault suite's own (see the module docstring).

    ``guest`` may connect (the collectors); :attr:`user` is payler's own user, so that the
    broker can close payler's connections and no others.
    """

    workdir: Path
    name: str = field(default_factory=lambda: f"payler-faults-{uuid.uuid4().hex[:8]}@localhost")
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    user: str = "payler-faults"
    password: str = field(default_factory=lambda: uuid.uuid4().hex)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The AMQP URL for test clients (guest)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def payler_url(self) -> str:
        """The AMQP URL payler connects with (its own user)."""
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    def _environment(self) -> dict[str, str]:
        home = self.workdir / "home"
        if not (home / ".erlang.cookie").exists():
            home.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ERLANG_COOKIE, home / ".erlang.cookie")
            (home / ".erlang.cookie").chmod(0o400)
        config = self.workdir / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n")
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")
        return {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self) -> None:
        """Start the node (its data kept from a previous run) and wait until it takes AMQP."""
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self._environment(),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest must not reach it first
            )
        wait_until_listening(
            self.port, self.process, RABBIT_START_TIMEOUT_S, self.log_path, "RabbitMQ node"
        )
        _record("rabbitmq", started)

    def stop(self) -> None:
        """Stop the node cleanly (SIGTERM: it closes its connections and syncs its queues)."""
        if self.process is not None:
            _stop_process(self.process, signal.SIGTERM, RABBIT_STOP_TIMEOUT_S)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ctl(self, *args: str, timeout_s: float = 60.0) -> str:
        """``rabbitmqctl -n <this node> args``: its output, or RuntimeError with its stderr."""
        done = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.decode()}")
        return done.stdout.decode()

    def add_payler_user(self) -> None:
        self.ctl("add_user", self.user, self.password)
        self.ctl("set_permissions", "-p", "/", self.user, ".*", ".*", ".*")

    def close_payler_connections(self) -> None:
        """Close every connection of payler's user, as the broker does (an operator, a
        policy, a node going into maintenance)."""
        self.ctl("close_all_user_connections", self.user, "fault suite: broker-side close")


@contextlib.contextmanager
def rabbit_node(workdir: Path) -> Iterator[RabbitNode]:
    """A started :class:`RabbitMQ node <RabbitNode>` with payler's user; stopped afterwards."""
    node = RabbitNode(workdir)
    try:
        node.start()
        node.add_payler_user()
        yield node
    finally:
        node.stop()


# -- Redis ---------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A ``redis-server`` of the fault suite's own (see the module docstring)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, *extra: str) -> None:
        """Start (or start again, on the same data) and wait until it takes connections."""
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.workdir), "--save", "", "--appendonly", "yes"]
        command += ["--appendfsync", "always", "--logfile", str(self.log_path), *extra]
        self.process = subprocess.Popen(
            command,
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until_listening(
            self.port, self.process, REDIS_START_TIMEOUT_S, self.log_path, "Redis server"
        )
        _record("redis", started)

    def stop(self) -> None:
        """Stop it (SIGTERM: the append-only file is flushed; nothing acknowledged is lost)."""
        if self.process is not None:
            _stop_process(self.process, signal.SIGTERM, 10.0)

    def cli(self, *args: str) -> str:
        """``redis-cli -p <port> args``: its output (RuntimeError on an error reply)."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            timeout=30,
            check=False,
        )
        out = done.stdout.decode().strip()
        if done.returncode != 0 or out.startswith(("ERR", "(error)")):
            raise RuntimeError(f"redis-cli {' '.join(args)}: {out} {done.stderr.decode()}")
        return out


@contextlib.contextmanager
def redis_servers(workdir: Path, count: int) -> Iterator[list[RedisServer]]:
    """``count`` started Redis servers of this test's own; stopped afterwards."""
    servers = [RedisServer(workdir / f"redis-{i}") for i in range(count)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
