"""compose.yaml, the Dockerfile and .dockerignore keep the deployment's promises (SECURITY.md): the API only
behind the TLS proxy, MRD clients required, pinned images, non-root hardened containers, Redis's AOF on a
local volume, workers given time to hand back their recons, and no data dir sent to the image build.

Read as files (no Docker engine needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECONQ_SERVICES = ("gateway", "api", "worker-gpu0", "worker-cpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def networks_of(service: dict[str, Any]) -> list[str]:
    nets = service.get("networks", ["default"])
    return list(nets) if isinstance(nets, (list, dict)) else []


def published_container_ports(service: dict[str, Any]) -> set[int]:
    found = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            found.add(int(entry["target"]))
        else:
            found.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return found


def published_host_ports(service: dict[str, Any]) -> set[str]:
    return {str(e["published"]) if isinstance(e, dict) else str(e).split("/")[0].rsplit(":", 2)[-2]
            for e in service.get("ports", []) if isinstance(e, dict) or ":" in str(e)}


def test_the_api_is_published_nowhere_and_only_on_internal_networks(compose, services):
    for name, service in services.items():
        assert 9080 not in published_container_ports(service), f"{name} publishes the API's port 9080"
        assert "9080" not in published_host_ports(service), f"{name} publishes on host port 9080"
    api = services["api"]
    assert "ports" not in api
    nets = networks_of(api)
    assert nets, "the api names its networks"
    for net in nets:
        assert compose["networks"][net].get("internal") is True, f"the api is on {net}, not an internal network"


def test_the_proxy_terminates_tls_and_is_the_trusted_proxy(compose, services):
    proxy = services["proxy"]
    assert published_container_ports(proxy) and "443" in published_host_ports(proxy)
    address = proxy["networks"]["web"]["ipv4_address"]
    subnet = compose["networks"]["web"]["ipam"]["config"][0]["subnet"]
    assert address.rsplit(".", 1)[0] == subnet.split("/")[0].rsplit(".", 1)[0]
    env = services["api"]["environment"]
    assert env["RECONQ_BEHIND_TLS_PROXY"] == "true"
    assert yaml.safe_load(env["RECONQ_TRUSTED_PROXIES"]) == [address]
    assert re.fullmatch(r'\["\$\{RECONQ_SERVER_NAME:\?[^}]+\}"\]', env["RECONQ_ALLOWED_HOSTS"])
    caddyfile = (ROOT / "deploy" / "Caddyfile").read_text(encoding="utf-8")
    assert "tls /run/secrets/tls_cert /run/secrets/tls_key" in caddyfile
    assert "reverse_proxy api:9080" in caddyfile
    assert {"tls_cert", "tls_key"} <= set(proxy["secrets"])


def test_every_image_is_pinned_by_version(services):
    for name, service in services.items():
        image = service["image"]
        repo, _, tag = image.split("@")[0].rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: image {image} has no version tag"
        assert re.match(r"\d+\.\d+", tag), f"{name}: image {image} is not pinned to a version"


def test_the_gateway_requires_its_allowed_clients_and_its_health_check_is_no_client(services):
    gateway = services["gateway"]
    value = gateway["environment"]["RECONQ_MRD_ALLOWED_CLIENTS"]
    assert value.startswith("${RECONQ_MRD_ALLOWED_CLIENTS:?"), "the allow-list must be a required variable"
    check = " ".join(gateway["healthcheck"]["test"])
    assert "/proc/net/tcp" in check and "create_connection" not in check


def test_every_container_is_hardened_and_non_root(services):
    for name, service in services.items():
        user = str(service.get("user", ""))
        assert user and user.split(":")[0] not in ("0", "root"), f"{name} runs as root"
        assert service.get("cap_drop") == ["ALL"], f"{name} keeps capabilities"
        assert "no-new-privileges:true" in service.get("security_opt", []), f"{name} lacks no-new-privileges"
        assert service.get("read_only") is True, f"{name}: root file system is writable"
        assert any(str(t).startswith("/tmp") for t in service.get("tmpfs", [])), f"{name} has no /tmp"
    for name in RECONQ_SERVICES:
        assert services[name]["user"] == "10001:10001", f"{name} is not the image's user"


def test_start_up_is_gated_on_health_checks(services):
    for name in RECONQ_SERVICES:
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name
    for name in ("gateway", "api", "redis"):
        assert services[name]["healthcheck"]["test"], name
    assert services["proxy"]["depends_on"]["api"] == {"condition": "service_healthy"}


def test_redis_keeps_its_aof_on_a_named_local_volume(compose, services):
    redis = services["redis"]
    mounts = [str(v).split(":") for v in redis["volumes"]]
    data = [m for m in mounts if len(m) >= 2 and m[1] == "/data"]
    assert len(data) == 1 and data[0][0] in compose["volumes"], "Redis's /data is not a named volume"
    assert "appendonly" in " ".join(redis["command"])
    assert not redis.get("ports"), "Redis publishes a port"


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(value)))


def test_workers_get_time_to_hand_back_their_recons(services):
    workers = [name for name in services if name.startswith("worker")]
    assert "worker-cpu" in workers and any(n.startswith("worker-gpu") for n in workers)
    for name in workers:
        service = services[name]
        grace = float(service["environment"]["RECONQ_WORKER_STOP_GRACE_S"])
        assert _seconds(service["stop_grace_period"]) > grace + 15, f"{name}: stop_grace_period too short"
    cpu = services["worker-cpu"]
    assert cpu["command"] == ["worker", "--cpu", "1"] and "deploy" not in cpu


def test_plugin_code_runs_in_workers_only(services):
    for name in ("gateway", "api"):
        assert services[name]["environment"]["RECONQ_LOAD_PLUGINS_AT_SUBMIT"] == "false", name


def test_the_dockerfile_builds_a_pinned_non_root_image_from_the_hashed_lock():
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert bases and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", bases[0])
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "--require-hashes" in text and "-r /tmp/requirements.lock" in text
    assert re.search(r"pip install --no-deps .*\s\.", text), "the project itself is installed with --no-deps"
    # the dependencies' layer comes before any source is copied
    assert text.index("requirements.lock") < text.index("COPY reconq ")


def test_the_lock_file_pins_every_default_dependency_with_hashes():
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", text, re.M))
    blocks = re.split(r"^(?=[A-Za-z0-9_.-]+==)", text, flags=re.M)[1:]
    assert len(blocks) == len(pins) and all("--hash=sha256:" in b for b in blocks)
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for req in project["dependencies"]:
        name = re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower().replace("_", "-")
        assert name in {k.lower() for k in pins}, f"{name} is not in requirements.lock"
    assert "cupy-cuda12x" not in {k.lower() for k in pins}  # the default install only


def test_dockerignore_keeps_data_and_environments_out_of_the_build_context():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    for needed in ("reconq-data", "reconq-demo", "test-artifacts", ".venv", ".git", "build", "**/*.h5",
                   "**/__pycache__"):
        assert needed in lines, f".dockerignore lets {needed} into the build context"


def test_the_gateway_and_api_read_plugin_names_without_running_plugin_code(tmp_path):
    from reconq.core.settings import load_settings
    from reconq.recon.plugins import PluginError
    from reconq.services import plugin_names

    ran = tmp_path / "plugin-code-ran"
    (tmp_path / "mine.py").write_text(f"open({str(ran)!r}, 'w').close()\nPIPELINE_NAME = 'my_recon'\n")
    (tmp_path / "by_file_name.py").write_text("def recon(twix, params, progress):\n    return None\n")
    (tmp_path / "_helper.py").write_text("raise SystemExit('never imported')\n")
    settings = load_settings(plugin_dir=tmp_path)
    assert {"my_recon", "by_file_name"} <= plugin_names(settings)
    assert not ran.exists(), "a plugin's code ran where only its name was needed"
    (tmp_path / "computed.py").write_text("PIPELINE_NAME = 'a' + 'b'\n")
    with pytest.raises(PluginError, match="PIPELINE_NAME must be a string literal"):
        plugin_names(settings)
    (tmp_path / "computed.py").write_text("PIPELINE_NAME = 'sense'\n")
    with pytest.raises(PluginError, match="would replace a built-in"):
        plugin_names(settings)
