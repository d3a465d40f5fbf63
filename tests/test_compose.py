"""The container deployment (Dockerfile, docker-compose.yml), checked without a Docker engine.

The YAML is parsed and held to the compose rules we can check here: declared networks and
volumes, one image, every command a valid `edge` invocation naming a component of the lab
configuration baked into the image, addresses inside their networks' subnets, Expressway-E never
on the inside network, and nothing `docker stack deploy` rejects. Where the docker client is
installed, `docker stack config` (the swarm loader, no engine needed) must accept the file too.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from edge.cli import certs_generate, run_cmd
from edge.config import LabConfig, load_config
from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
CONFIG_PATH = "/etc/edge/lab.toml"
TOP_LEVEL = {"version", "services", "networks", "volumes", "configs", "secrets"}
# Service keys of the compose file format 3.x that `docker stack deploy` understands (build and
# restart are accepted and ignored there; build needs image: beside it).
STACK_SERVICE_KEYS = {
    *("image", "build", "command", "entrypoint", "environment", "networks", "volumes", "ports"),
    *("deploy", "depends_on", "restart", "healthcheck", "configs", "secrets", "labels", "logging"),
    *("working_dir", "user", "stop_grace_period", "stop_signal", "hostname", "extra_hosts"),
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def image_config() -> LabConfig:
    """The lab.toml the Dockerfile bakes: its `edge config show --set ...` overrides, loaded."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    run = next(line for line in text.splitlines() if "edge config show" in line)
    args = shlex.split(run.split("edge config show", 1)[1].split(">", 1)[0])
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert overrides, run
    return load_config(None, overrides=overrides, environ={})


def test_top_level_structure(compose: dict[str, Any]) -> None:
    unknown = {k for k in compose if k not in TOP_LEVEL and not k.startswith("x-")}
    assert not unknown, unknown
    assert str(compose["version"]).startswith("3."), "docker stack deploy wants a 3.x file"
    assert set(compose["services"]) == {"certs", "dns", "ucm1", "imp1", "cuc1", "expc", "expe"}
    assert set(compose["networks"]) == {"inside", "dmz", "outside"}


def test_services_reference_declared_networks_and_volumes(compose: dict[str, Any]) -> None:
    volumes = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        unknown = set(svc) - STACK_SERVICE_KEYS
        assert not unknown, f"{name}: keys {unknown}"
        assert svc["image"] == "mra-edge-lab:latest", f"{name}: one image for every service"
        nets = svc["networks"]
        assert set(nets) <= set(compose["networks"]), name
        for mount in svc.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount["source"]
            assert source in volumes, f"{name}: volume {source} not declared"
        assert "state" in {m.split(":", 1)[0] for m in svc.get("volumes", [])}, f"{name}: shared state"
        for dep in svc.get("depends_on", []):
            assert isinstance(dep, str) and dep in compose["services"], f"{name}: depends_on {dep!r}"
        if name != "certs":
            assert "certs" in svc["depends_on"]


def test_every_command_is_a_valid_edge_invocation(compose: dict[str, Any], image_config: LabConfig) -> None:
    components = {name for name, _ in image_config.components()}
    assert components == set(compose["services"]) - {"certs"}
    for name, svc in compose["services"].items():
        cmd = svc["command"]
        assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd), name
        if name == "certs":
            assert cmd[:2] == ["certs", "generate"]
            certs_generate.make_context("certs generate", cmd[2:])
        else:
            assert cmd == ["run", name, "--config", CONFIG_PATH]
            ctx = run_cmd.make_context("run", cmd[1:])  # click parses it as `edge run` would
            assert ctx.params["component"] == name and ctx.params["config_path"] == CONFIG_PATH
            assert image_config.component_name(name) == name
    with pytest.raises(click.UsageError):
        run_cmd.make_context("run", ["--no-such-option"])


def test_certs_is_one_shot(compose: dict[str, Any]) -> None:
    certs = compose["services"]["certs"]
    assert certs["restart"] == "no"
    assert certs["deploy"]["restart_policy"]["condition"] == "none"


def _addresses(svc: dict[str, Any]) -> dict[str, str]:
    nets = svc["networks"]
    if isinstance(nets, list):  # short syntax: no fixed addresses
        return {net: "" for net in nets}
    return {net: (opts or {}).get("ipv4_address", "") for net, opts in nets.items()}


def test_network_placement_and_addresses(compose: dict[str, Any], image_config: LabConfig) -> None:
    subnets = {
        name: ipaddress.ip_network(net["ipam"]["config"][0]["subnet"])
        for name, net in compose["networks"].items()
    }
    services = compose["services"]
    assert set(services["expe"]["networks"]) == {"dmz", "outside"}, "E is never on the inside network"
    assert set(services["expc"]["networks"]) == {"inside", "dmz"}
    for name in ("dns", "ucm1", "imp1", "cuc1"):
        assert set(services[name]["networks"]) == {"inside"}
    for name, svc in services.items():
        for net, addr in _addresses(svc).items():
            if addr:
                assert ipaddress.ip_address(addr) in subnets[net], f"{name}: {addr} not in {net}"
    cfg = image_config
    e = cfg.expe[0]
    assert _addresses(services["expe"]) == {"outside": e.external_address, "dmz": e.internal_address}
    assert _addresses(services["expc"])["inside"] == cfg.expc.address
    assert _addresses(services["dns"])["inside"] == cfg.dns.address
    for node in (*cfg.ucm, *cfg.imp, *cfg.cuc):
        assert _addresses(services[node.name])["inside"] == node.address
    # The split-horizon DNS gives the internal view to the dmz and inside networks only.
    assert {ipaddress.ip_network(n) for n in cfg.dns.internal_clients} == {subnets["dmz"], subnets["inside"]}
    assert cfg.lab.state_dir == "/var/lib/edge"


def test_dockerfile(image_config: LabConfig) -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["edge"\]$', text, re.M)
    for src in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.findall(
        r'"(\w+)\*"', pyproject.split("[tool.setuptools.packages.find]", 1)[1].split("\n\n")[0]
    )
    for pkg in packages:
        if (REPO / pkg).is_dir():
            assert re.search(rf"^COPY {pkg} ", text, re.M), f"package {pkg} is not copied into the image"


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker client not installed")
def test_docker_stack_loader_accepts_the_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["docker", "stack", "config", "-c", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0 and "unknown command" in proc.stderr:
        pytest.skip("this docker client has no `stack config`")
    assert proc.returncode == 0, proc.stderr
    merged = yaml.safe_load(proc.stdout)
    assert set(merged["services"]["expe"]["networks"]) == {"dmz", "outside"}
