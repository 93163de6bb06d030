"""A RabbitMQ node of a test's own, started from the installed server on free ports, so that a
test can raise an alarm or restart a broker without touching the shared one on 5672."""

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
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

#: The server script itself: the one on PATH switches to the rabbitmq user when run as root.
_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
_CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
#: A node boots in about 7 s on an idle machine; much more on a busy one.
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Node:
    """A running node: its AMQP URL (guest/guest) and ``rabbitmqctl`` aimed at it."""

    name: str
    url: str
    env: dict[str, str]

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [_command(_CTL, "rabbitmqctl"), "-n", self.name, *args],
            env=self.env, check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return done.stdout


def _command(path: str, name: str) -> str:
    return path if os.path.exists(path) else (shutil.which(name) or name)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def rabbitmq_node(workdir: Path) -> Iterator[Node]:
    """Start a node with its data, logs and Erlang cookie in ``workdir``; stop it after."""
    amqp_port, dist_port = free_port(), free_port()
    name = f"payler-test-{uuid.uuid4().hex[:8]}@localhost"
    (workdir / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{amqp_port}\n")
    (workdir / "enabled_plugins").write_text("[].\n")
    (workdir / "rabbitmq-env.conf").write_text("")  # not the system's (it names the shared node)
    env = {
        **os.environ,
        "HOME": str(workdir),  # the Erlang cookie: the node's and rabbitmqctl's
        "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(workdir / "log"),
        "RABBITMQ_PID_FILE": str(workdir / "node.pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        # A session of its own: stopping it signals the script and its Erlang VM, nothing else.
        process = subprocess.Popen(
            [_command(_SERVER, "rabbitmq-server")],
            env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listening(amqp_port):  # the AMQP listener opens last, once the node is up
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"RabbitMQ node {name} did not start:\n{log_path.read_text()}")
            time.sleep(0.2)  # polling a port that refuses at once: a short pause, not a wait
        yield Node(name, f"amqp://guest:guest@127.0.0.1:{amqp_port}/", env)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the script stops the node cleanly
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)
