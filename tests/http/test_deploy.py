"""The deployment files name paths and ports that exist: the Kubernetes manifest's probes, the
Dockerfile's HEALTHCHECK and the systemd unit, checked against a running daemon's server."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from payler import config
from payler.http.settings import resolve
from tests.http.conftest import Start

ROOT = Path(__file__).parents[2]


def manifests() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text()) if doc]


async def test_the_kubernetes_probes_name_the_server_s_paths_and_port(start_daemon: Start) -> None:
    [deployment] = [m for m in manifests() if m["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = resolve(None, {**env, "PAYLER_HTTP_TOKEN": "from-the-secret-0123456789"})
    assert settings is not None  # the manifest's variables start the server...
    assert not settings.loopback  # ...reachable by the kubelet (so a token is required)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.port
    assert "secretRef" in container["envFrom"][0]  # the token and URLs come from a Secret
    assert any(v["mountPath"] == "/data" for v in container["volumeMounts"])  # the SQLite spool
    daemon = await start_daemon()
    paths = (await daemon.client.get("/openapi.json")).json()["paths"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        http_get = container[probe]["httpGet"]
        assert http_get["port"] in ports
        assert http_get["path"] in paths
        assert (await daemon.client.get(http_get["path"])).status_code == 200
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.port
    assert annotations["prometheus.io/path"] in paths
    [service] = [m for m in manifests() if m["kind"] == "Service"]
    assert service["spec"]["ports"][0]["targetPort"] in ports


async def test_the_docker_healthcheck_probes_healthz(start_daemon: Start) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    [command] = re.findall(r"^\s+CMD (\[.*\])\s*$", dockerfile, flags=re.MULTILINE)
    argv = json.loads(command)
    [port] = re.findall(r"PAYLER_HTTP_PORT=(\d+)", dockerfile)
    assert "/healthz" in argv[-1]
    daemon = await start_daemon()
    argv[0] = "python3"
    done = await asyncio.to_thread(
        subprocess.run, argv, env={"PAYLER_HTTP_PORT": str(daemon.runtime.http.port)},
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert int(port) == 8000


def test_the_systemd_unit_runs_the_daemon_with_its_server(tmp_path: Path) -> None:
    unit = (ROOT / "deploy/payler.service").read_text()
    [exec_start] = re.findall(r"^ExecStart=(.*)$", unit, flags=re.MULTILINE)
    assert exec_start.split()[1:] == ["--config-file", "/etc/payler/configuration.yaml"]
    env = dict(re.findall(r"^Environment=(\w+)=(.*)$", unit, flags=re.MULTILINE))
    settings = resolve(None, env)
    assert settings is not None and settings.loopback and settings.port == 8000
    assert env["PAYLER_LOG_FORMAT"] in ("text", "json")
    # The configuration the unit points at is the repository's, which loads as it is.
    assert config.load(ROOT / "configuration.yaml", environ={}).workflows
