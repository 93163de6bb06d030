"""A real local Redis Cluster for tests: ``redis-server`` in cluster mode, never the shared Redis.

Three masters and a replica each (six processes on free ports, data in a directory of their own,
no persistence), joined with ``redis-cli --cluster create ... --cluster-replicas 1``. A short
``cluster-node-timeout`` (1 s) makes a replica take over from a killed master within seconds.
:class:`LocalCluster` starts it, waits (boundedly) until every node reports ``cluster_state:ok``
and every replica is in sync, kills a node, restarts it, and stops everything.
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port
from tests.faults.servers import wait_until_listening

#: How long a node may take to listen, and the cluster to be whole (it takes 1-3 s here).
START_TIMEOUT_S = 10.0
CLUSTER_READY_TIMEOUT_S = 30.0
#: How long a master may be unreachable before its replica takes over (ms).
NODE_TIMEOUT_MS = 1000


@dataclass
class Node:
    """One ``redis-server`` of the cluster."""

    workdir: Path
    port: int = field(default_factory=free_port)
    # The cluster bus port, set explicitly: port + 10000 (the default) may be taken or > 65535.
    bus_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self) -> None:
        """Start (again: its nodes.conf makes it rejoin the cluster) and wait until it listens."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port)]
        command += ["--cluster-config-file", "nodes.conf"]
        command += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        command += ["--dir", str(self.workdir), "--save", "", "--appendonly", "no"]
        command += ["--repl-diskless-sync-delay", "0", "--logfile", str(self.log_path)]
        self.process = subprocess.Popen(
            command, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        wait_until_listening(self.port, self.process, START_TIMEOUT_S, self.log_path, "Redis node")

    def kill(self) -> None:
        """kill -9: no shutdown, no last replication."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cli(self, *args: str) -> str:
        """``redis-cli -p <port> args``: its output."""
        done = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return done.stdout.decode(errors="replace").strip()

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict; ``cluster``: ``CLUSTER INFO`` (the cluster's state)."""
        command = ("CLUSTER", "INFO") if section == "cluster" else ("INFO", section)
        lines = self.cli(*command).splitlines()
        return dict(line.strip().split(":", 1) for line in lines if ":" in line)


class LocalCluster:
    """Three masters with a replica each, on free ports under ``workdir``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [Node(workdir / f"node-{i}") for i in range(masters * 2)]
        self.masters = masters

    def url(self, **query: str | int) -> str:
        """A ``redis+cluster://`` URL naming every node (any reachable one is enough)."""
        hosts = ",".join(node.address for node in self.nodes)
        options = "&".join(f"{name}={value}" for name, value in query.items())
        return f"redis+cluster://{hosts}" + (f"?{options}" if options else "")

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        command = ["redis-cli", "--cluster", "create", *(node.address for node in self.nodes)]
        command += ["--cluster-replicas", "1", "--cluster-yes"]
        created = subprocess.run(
            command,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout!r}")
        self.wait_until_ready()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def running_nodes(self) -> list[Node]:
        return [node for node in self.nodes if node.running]

    def wait_until_ready(self, timeout_s: float = CLUSTER_READY_TIMEOUT_S) -> None:
        """Until every running node says ``cluster_state:ok`` and knows all the others, there
        are ``masters`` masters, and every running replica's link to its master is up."""
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if time.monotonic() > deadline:
                states = {n.address: n.info("cluster").get("cluster_state") for n in self.nodes}
                raise RuntimeError(f"the Redis Cluster is not ready in {timeout_s} s: {states}")
            time.sleep(0.1)  # a cluster's state, polled: no event to await from another process

    def _ready(self) -> bool:
        running = self.running_nodes()
        for node in running:
            cluster = node.info("cluster")
            if cluster.get("cluster_state") != "ok":
                return False
            if int(cluster.get("cluster_known_nodes", 0)) < len(self.nodes):
                return False
        roles = [node.info("replication") for node in running]
        if sum(role.get("role") == "master" for role in roles) != self.masters:
            return False
        return all(
            role.get("master_link_status") == "up" for role in roles if role.get("role") == "slave"
        )

    def master_of_slot(self, slot: int) -> Node:
        """The node that serves ``slot`` as a master, as a running node sees it now."""
        # CLUSTER NODES: id ip:port@bus flags master ping pong epoch link slot-range...
        for line in self.running_nodes()[0].cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            if "master" not in flags or "fail" in flags:
                continue
            port = int(fields[1].split("@")[0].rpartition(":")[2])
            for ranges in fields[8:]:
                start, _, end = ranges.partition("-")
                if start.isdigit() and int(start) <= slot <= int(end or start):
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no master serves slot {slot}")

    def replica_of(self, master: Node) -> Node:
        """A running replica of ``master``."""
        for node in self.running_nodes():
            info = node.info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port:
                return node
        raise RuntimeError(f"{master.address} has no running replica")


__all__ = ["NODE_TIMEOUT_MS", "LocalCluster", "Node"]
