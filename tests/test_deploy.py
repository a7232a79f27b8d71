"""compose.yaml, the Dockerfile and .dockerignore keep the deployment's promises (SECURITY.md): the API only
behind the TLS proxy, MRD clients required, pinned images, non-root hardened containers, Redis's AOF on a
local volume, workers given time to hand back their recons, and no data dir sent to the image build. The
Dockerfile's two variants (cpu, gpu) from hashed locks, dependencies before the source; start-up gated on
health checks; the workers' self-test (reconq.workers.selftest) before they start.

Read as files (no Docker engine needed); compose.yaml is also rendered by compose itself (`docker compose
config`, or Debian's docker-compose 1.29; skipped, with the reason, where neither is installed), the
workers' health check is run against compose's Redis ACL (deploy/redis-entrypoint.sh) and the self-test
is run on this machine (its GPU checks also against a fake cupy, NVML and cufinufft)."""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from reconq.core.constants import WORKER_HEARTBEAT, WORKERS_INDEX
from reconq.core.redisconn import free_port

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


def dockerfile_stages() -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The Dockerfile's global ARGs and its stages in order: name, base and instructions (continuation
    lines joined, comments dropped)."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.I)
            assert m, line
            stages.append({"name": m.group(2) or "", "from": m.group(1), "steps": []})
        elif not stages:
            if keyword == "ARG":
                name, _, value = rest.partition("=")
                args[name.strip()] = value.strip()
        else:
            stages[-1]["steps"].append((keyword, rest.strip()))
    return args, stages


def stage_chain(stages: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    """The stages the final image of ``variant`` is built on, base first."""
    by_name = {s["name"]: s for s in stages if s["name"]}
    chain = [stages[-1]]
    while (parent := chain[-1]["from"].replace("${VARIANT}", variant)) in by_name:
        chain.append(by_name[parent])
    return chain[::-1]


def test_the_dockerfile_builds_a_pinned_non_root_image_from_the_hashed_lock():
    args, stages = dockerfile_stages()
    assert re.fullmatch(r"python:3\.12\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", args["PYTHON_IMAGE"]), \
        "the locks are for Python 3.12: the base must stay a pinned 3.12"
    assert args["VARIANT"] == "cpu"
    names = {s["name"] for s in stages}
    for stage in stages:  # every stage grows from the one pinned base (or from another stage of this file)
        assert stage["from"] == "${PYTHON_IMAGE}" or stage["from"].replace("${VARIANT}", "cpu") in names, stage
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert not re.search(r"^\s*FROM\s+(nvidia/|.*:latest)", text, re.M | re.I)
    for variant in ("cpu", "gpu"):
        steps = [step for stage in stage_chain(stages, variant) for step in stage["steps"]]
        users = [rest for keyword, rest in steps if keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{variant}: the image runs as root"
        installs = [rest for keyword, rest in steps if keyword == "RUN" and "pip install" in rest]
        locks = [re.search(r"-r (\S+)", rest).group(1) for rest in installs if " -r " in rest]
        assert locks == (["/tmp/requirements.lock"] + (["/tmp/requirements-gpu.lock"] if variant == "gpu" else [])), \
            f"{variant}: installs {locks}"
        for rest in installs:
            if " -r " in rest:  # wheels only, each checked against its hash, nothing beyond the lock
                assert {"--require-hashes", "--no-deps", "--only-binary=:all:"} <= set(rest.split()), rest
        # ReconQ itself: its own wheel, --no-deps, from no index (nothing unpinned comes with it)
        assert re.search(r"pip install --no-deps --no-index /tmp/wheels/reconq-\*\.whl", installs[-1])
        assert steps[-1] == ("CMD", '["--help"]') and ("ENTRYPOINT", '["reconq"]') in steps


def test_the_dependencies_are_installed_before_any_source_is_copied():
    _, stages = dockerfile_stages()
    by_name = {s["name"]: s for s in stages}
    wheel = by_name["wheel"]
    copies = [rest for keyword, rest in wheel["steps"] if keyword == "COPY"]
    assert {c.split()[0] for c in copies} >= {"reconq", "core", "api", "gateway", "workers", "recon", "scheduler",
                                             "parametermaps", "pyproject.toml"}
    # the source reaches the image through the wheel stage only, which grows from the dependencies' stage
    assert wheel["from"] == "deps-cpu"
    for stage in stages:
        if stage is not wheel:
            assert not [rest for keyword, rest in stage["steps"] if keyword in ("COPY", "ADD")], \
                f"stage {stage['name']} copies files: only the wheel stage copies the source"
    for variant in ("cpu", "gpu"):
        chain = stage_chain(stages, variant)
        assert wheel not in chain, "the source's stage is not a base of the image: a source change rebuilds no " \
                                   "dependency layer"
        steps = [step for stage in chain for step in stage["steps"]]
        lock_at = max(i for i, (k, rest) in enumerate(steps) if k == "RUN" and " -r /tmp/requirements" in rest)
        wheel_at = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "from=wheel" in rest)
        assert lock_at < wheel_at, f"{variant}: ReconQ's layer comes before a dependency layer"
    # the lock files reach the build as bind mounts: a change of one rebuilds its own layer
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "--mount=type=bind,source=requirements.lock," in text
    assert "--mount=type=bind,source=requirements-gpu.lock," in text


def test_the_gpu_variant_tells_the_nvidia_runtime_what_it_needs_and_finds_the_cuda_wheels():
    args, stages = dockerfile_stages()
    by_name = {s["name"]: s for s in stages}
    env: dict[str, str] = {}
    for stage in stage_chain(stages, "gpu"):
        for keyword, rest in stage["steps"]:
            if keyword == "ENV":
                env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    # cufinufft's library links libcudart.so.12 and libcufft.so.11 by name only: the wheels' folders
    python = "python" + re.match(r"python:(\d+\.\d+)", args["PYTHON_IMAGE"]).group(1)
    site = f"/opt/venv/lib/{python}/site-packages/nvidia"
    assert set(env["LD_LIBRARY_PATH"].split(":")) >= {f"{site}/cuda_runtime/lib", f"{site}/cufft/lib"}
    assert "CUPY_CACHE_DIR" in env and env["CUPY_CACHE_DIR"].startswith("/tmp/")  # a read-only root
    cpu_env = " ".join(rest for stage in stage_chain(stages, "cpu") for k, rest in stage["steps"] if k == "ENV")
    assert "NVIDIA_" not in cpu_env, "the CPU image asks the NVIDIA runtime for nothing"
    assert by_name["deps-gpu"]["from"] == "deps-cpu", "the GPU image shares the CPU packages' layer"


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


# --- the GPU lock -----------------------------------------------------------------------------------------


def lock_blocks(name: str) -> dict[str, tuple[str, frozenset[str]]]:
    """A lock file's packages: name -> (version, hashes); every block must be pinned and hashed."""
    text = (ROOT / name).read_text(encoding="utf-8")
    found = {}
    for block in re.split(r"^(?=[A-Za-z0-9_.-]+==)", text, flags=re.M)[1:]:
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+) \\$", block, re.M)
        assert m, f"{name}: a block is not `name==version \\`: {block[:60]!r}"
        hashes = frozenset(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
        assert hashes, f"{name}: {m.group(1)} has no hash"
        found[m.group(1).lower()] = (m.group(2), hashes)
    return found


def test_the_gpu_lock_is_the_cpu_lock_plus_the_gpu_extra_at_the_same_versions():
    import tomllib

    cpu, gpu = lock_blocks("requirements.lock"), lock_blocks("requirements-gpu.lock")
    for name, (version, hashes) in cpu.items():
        assert name in gpu, f"{name} is in requirements.lock but not in requirements-gpu.lock"
        assert gpu[name][0] == version, f"{name}: {version} for the CPU image, {gpu[name][0]} for the GPU one"
        assert gpu[name][1] == hashes, f"{name}: the two locks hold different files"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for req in project["optional-dependencies"]["gpu"]:
        name = re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower()
        assert name in gpu, f"{name} (the [gpu] extra) is not in requirements-gpu.lock"
    # cupy's [ctk]: the CUDA libraries cupy and cufinufft load come as NVIDIA's wheels
    assert {"nvidia-cuda-runtime-cu12", "nvidia-cufft-cu12", "nvidia-cuda-nvrtc-cu12"} <= set(gpu)
    assert gpu["cufinufft"][0] == gpu["finufft"][0], "cufinufft and finufft come from one FINUFFT release"
    assert set(gpu) - set(cpu) <= {n for n in gpu if n.startswith(("cupy", "cuda-", "nvidia-", "cufinufft"))}


# --- compose: images, self-tests, health checks -------------------------------------------------------------


def test_gpu_workers_use_the_gpu_image_and_the_rest_the_cpu_image(services):
    for name, service in services.items():
        if name.startswith("worker-gpu"):
            assert service["image"].split(":")[0] == "reconq-gpu", name
            assert service["build"]["args"]["VARIANT"] == "gpu", name
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices and all(d["driver"] == "nvidia" and d["capabilities"] == ["gpu"] and d["device_ids"]
                                   for d in devices), name
        elif name in RECONQ_SERVICES:
            assert service["image"].split(":")[0] == "reconq", name
            assert service["build"]["args"]["VARIANT"] == "cpu", name
    tags = {services[n]["image"].split(":")[1] for n in services if n in RECONQ_SERVICES}
    assert len(tags) == 1, f"the services run different releases: {tags}"


def unescaped(value: str) -> str:
    """A compose string as the container gets it ($$ is a literal $)."""
    return value.replace("$$", "$")


def test_workers_run_the_self_test_before_the_worker_starts(services, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # this venv's python
    (bin_dir / "reconq").write_text('#!/bin/sh\necho "reconq $*" > "$RAN"\n')
    for tool in ("python", "reconq"):
        (bin_dir / tool).chmod(0o755)
    has_gpu_stack = importlib.util.find_spec("cupy") is not None
    for name in ("worker-cpu", "worker-gpu0"):
        entrypoint = services[name]["entrypoint"]
        script = unescaped(entrypoint[2])
        assert entrypoint[:2] == ["/bin/sh", "-c"] and "exec reconq \"$@\"" in script, name
        assert ("selftest --gpu" in script) == name.startswith("worker-gpu"), name
        # the script as the container runs it: the self-test, then the worker with compose's command
        ran = tmp_path / f"{name}.ran"
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RAN": str(ran), "HOME": str(tmp_path)}
        proc = subprocess.run([*entrypoint[:2], script, *entrypoint[3:], *services[name]["command"]],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        if name == "worker-cpu" or has_gpu_stack:
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert ran.read_text().split() == ["reconq", *services[name]["command"]], name
        else:  # no GPU stack here: the self-test fails and the worker never starts
            assert proc.returncode == 1 and "reconq selftest: FAILED" in proc.stdout, proc.stdout + proc.stderr
            assert not ran.exists(), f"{name}: the worker started after a failed self-test"


def test_start_up_is_gated_on_real_health_checks(services):
    for name in RECONQ_SERVICES:
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name
    for name in ("api", "worker-gpu0", "worker-cpu"):
        assert services[name]["depends_on"]["gateway"] == {"condition": "service_healthy"}, name
    assert services["proxy"]["depends_on"]["api"] == {"condition": "service_healthy"}
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert rule == {"condition": "service_healthy"}, f"{name} starts on {dependency} without its health"
            assert services[dependency]["healthcheck"]["test"], f"{name} waits on {dependency}, which has no check"
    for name in ("redis", *RECONQ_SERVICES):  # the proxy: nothing waits on it, and Caddy exits when it cannot serve
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["test"][1:], name
        assert _seconds(check["interval"]) > 0 and check["retries"] >= 1, name
    # the API's check fails on any answer but 200 (urlopen raises on 503) and on none
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "urllib.request.urlopen('http://127.0.0.1:9080/api/health'" in api_check and "timeout=" in api_check
    assert "start_period" in services["worker-gpu0"]["healthcheck"]


def test_the_api_gets_the_staff_credentials(services):
    env = services["api"]["environment"]
    assert env["RECONQ_STAFF_PASSWORDS"].startswith("${RECONQ_STAFF_PASSWORDS:?")
    # passed through from .env or the environment when set (a `${...:-{}}` default is broken in compose 1.29)
    assert "RECONQ_STAFF_TOKENS" in env and env["RECONQ_STAFF_TOKENS"] is None


@pytest.fixture
def worker_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """redis-server with compose's ACL users (deploy/redis-entrypoint.sh); yields its port and the worker's
    password file."""
    if shutil.which("redis-server") is None or shutil.which("sha256sum") is None:
        pytest.skip("needs redis-server and sha256sum (the Makefile installs redis-server)")
    folder = tmp_path / "secrets"
    folder.mkdir(mode=0o700)
    for role in ("gateway", "api", "worker"):
        (folder / f"redis_{role}_password").write_text(secrets.token_hex(16) + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(REDIS_SECRETS_DIR=str(folder), REDIS_ACL_FILE=str(tmp_path / "acl" / "users.acl"))
    proc = subprocess.Popen(["/bin/sh", str(ROOT / "deploy" / "redis-entrypoint.sh"), "--port", str(port),
                             "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "", "--appendonly", "no"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port, username="worker", password=(folder / "redis_worker_password").read_text()
                            .strip(), socket_connect_timeout=0.5).ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        yield port, folder / "redis_worker_password"
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_worker_health_check_is_a_live_heartbeat_read_as_the_worker(services, worker_redis, tmp_path):
    port, password_file = worker_redis
    check = services["worker-cpu"]["healthcheck"]
    assert check == services["worker-gpu0"]["healthcheck"]
    assert check["test"][:3] == ["CMD", "python", "-c"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONQ_")}
    env.update(RECONQ_REDIS_URL=f"redis://worker@127.0.0.1:{port}/0", RECONQ_REDIS_PASSWORD_FILE=str(password_file),
               RECONQ_DATA_DIR=str(tmp_path / "data"), RECONQ_NODE_NAME="node-a")

    def healthy() -> bool:
        proc = subprocess.run([sys.executable, "-c", unescaped(check["test"][3])], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode == 0

    worker = redis.Redis(port=port, username="worker", password=password_file.read_text().strip())
    assert not healthy(), "healthy with no worker"
    worker.sadd(WORKERS_INDEX, "node-b:7", "node-a:42")
    worker.set(WORKER_HEARTBEAT + "node-b:7", "{}", px=20_000)
    assert not healthy(), "another node's heartbeat counted"
    worker.set(WORKER_HEARTBEAT + "node-a:42", "{}", px=20_000)
    assert healthy(), "a live heartbeat of this node is not healthy"
    worker.delete(WORKER_HEARTBEAT + "node-a:42")  # its key expired: the process is gone or cut off
    assert not healthy()


# --- compose.yaml rendered by compose itself ------------------------------------------------------------------

COMPOSE_VARIABLES = {
    "RECONQ_DATA_DIR": "/srv/reconq",
    "RECONQ_STAFF_PASSWORDS": '{"alice": "scrypt$16384$8$1$c2FsdA$aGFzaA"}',
    "RECONQ_SERVER_NAME": "recon.example.org",
    "RECONQ_MRD_ALLOWED_CLIENTS": '["10.1.2.15","10.1.2.16"]',
    "RECONQ_STAFF_TOKENS": '{"pacs": "sha256$abc"}',
}


def compose_command() -> list[str]:
    """`docker compose` (the v2 plugin) where it works, else Debian's `docker-compose` (1.29); skips the test
    when neither is there."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("docker-compose (Debian) is not installed; the Makefile installs it for make test")


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    """A copy of compose.yaml and deploy/ with dummy secret files (compose checks that they exist)."""
    shutil.copy(ROOT / "compose.yaml", tmp_path / "compose.yaml")
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    (tmp_path / "secrets").mkdir(mode=0o700)
    for name in ("redis_gateway_password", "redis_api_password", "redis_worker_password", "tls_cert.pem",
                 "tls_key.pem"):
        (tmp_path / "secrets" / name).write_text("dummy\n")
    return tmp_path


def run_compose(folder: Path, variables: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # none of the caller's RECONQ_* or COMPOSE_* variables; HOME and DOCKER_CONFIG kept (where the v2 plugin is)
    env = {k: os.environ[k] for k in ("PATH", "HOME", "DOCKER_CONFIG") if k in os.environ}
    env.update(LANG="C.UTF-8", **variables)
    return subprocess.run([*compose_command(), "-f", "compose.yaml", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120)


def test_compose_accepts_the_file_and_renders_the_deployment(compose_dir):
    checked = run_compose(compose_dir, COMPOSE_VARIABLES, "config", "-q")
    assert checked.returncode == 0, checked.stderr
    rendered = run_compose(compose_dir, COMPOSE_VARIABLES, "config")
    assert rendered.returncode == 0, rendered.stderr
    config = yaml.safe_load(rendered.stdout)
    services = config["services"]
    assert set(services) == {"redis", "gateway", "api", "proxy", "worker-gpu0", "worker-cpu"}
    gpu = services["worker-gpu0"]
    assert gpu["image"].startswith("reconq-gpu:") and gpu["build"]["args"]["VARIANT"] == "gpu"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["device_ids"] == ["0"]
    assert "selftest --gpu" in " ".join(gpu["entrypoint"]) and gpu["command"] == ["worker", "--gpus", "all"]
    assert "deploy" not in services["worker-cpu"] and services["worker-cpu"]["image"].startswith("reconq:")
    for name, service in services.items():
        if name != "proxy":
            assert service["healthcheck"]["test"], f"{name} has no health check"
        for dependency, rule in service.get("depends_on", {}).items():
            assert rule["condition"] == "service_healthy", f"{name} -> {dependency}"
    assert set(services["proxy"]["depends_on"]) == {"api"}
    assert set(services["api"]["depends_on"]) == {"redis", "gateway"}
    api_env = services["api"]["environment"]
    assert api_env["RECONQ_STAFF_TOKENS"].replace("$$", "$") == COMPOSE_VARIABLES["RECONQ_STAFF_TOKENS"]
    assert api_env["RECONQ_ALLOWED_HOSTS"] == '["recon.example.org"]'
    assert services["gateway"]["environment"]["RECONQ_MRD_ALLOWED_CLIENTS"] == '["10.1.2.15","10.1.2.16"]'


def test_compose_refuses_to_render_without_a_required_variable(compose_dir):
    for missing in ("RECONQ_MRD_ALLOWED_CLIENTS", "RECONQ_STAFF_PASSWORDS", "RECONQ_DATA_DIR"):
        variables = {k: v for k, v in COMPOSE_VARIABLES.items() if k != missing}
        proc = run_compose(compose_dir, variables, "config", "-q")
        assert proc.returncode != 0 and missing in proc.stderr, (missing, proc.stderr)
    # the staff tokens are optional: unset, the API gets none (and no mangled value)
    variables = {k: v for k, v in COMPOSE_VARIABLES.items() if k != "RECONQ_STAFF_TOKENS"}
    proc = run_compose(compose_dir, variables, "config")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["services"]["api"]["environment"].get("RECONQ_STAFF_TOKENS") is None


# --- the start-up self-test ------------------------------------------------------------------------------------


def run_selftest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECONQ_", "CUDA_"))}
    return subprocess.run([sys.executable, "-m", "reconq.workers.selftest", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_selftest_passes_on_this_cpu_machine_quickly(tmp_path):
    started = time.monotonic()
    proc = run_selftest(tmp_path)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["numpy", "finufft", "mrd"], lines
    assert all(line.startswith("ok ") for line in lines)
    assert took < 10, f"the CPU self-test took {took:.1f} s"


def test_the_gpu_selftest_fails_loudly_in_one_line_without_the_gpu_stack(tmp_path):
    if importlib.util.find_spec("cupy") is not None or importlib.util.find_spec("pynvml") is not None:
        pytest.skip("cupy or pynvml is installed here: the failure without them cannot be shown")
    proc = run_selftest(tmp_path, "--gpu")
    assert proc.returncode == 1
    [line] = proc.stdout.splitlines()
    assert re.fullmatch(r"reconq selftest: FAILED nvml: .+; .+", line), line
    assert "VARIANT=gpu" in line and "Traceback" not in proc.stderr


def test_the_selftest_imports_no_broker_and_no_other_layer(tmp_path):
    probe = ("import sys, reconq.workers.selftest as s; s.main([]); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('celery', 'kombu', 'redis', 'fastapi', 'reconq')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "['reconq', 'reconq.workers', 'reconq.workers.selftest']"


class _Runtime:
    """cupy.cuda.runtime on two fake H200s."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def getDeviceCount(self) -> int:
        if self.fail:
            raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        return 2

    def runtimeGetVersion(self) -> int:
        return 12090

    def driverGetVersion(self) -> int:
        return 12080

    def getDeviceProperties(self, index: int) -> dict[str, Any]:
        return {"name": b"NVIDIA H200", "totalGlobalMem": 150_000_000_000}


def fake_gpu_stack(monkeypatch: pytest.MonkeyPatch, *, fft_error: float = 0.0, runtime_fails: bool = False) -> None:
    """cupy, pynvml and cufinufft as numpy and finufft: the GPU checks' own logic, run on the CPU."""
    import contextlib
    import importlib.machinery
    import types

    import finufft
    import numpy as np

    class ElementwiseKernel:
        def __init__(self, inputs: str, outputs: str, body: str, name: str) -> None:
            assert body == "y = a * x + b"

        def __call__(self, x: Any, a: Any, b: Any) -> Any:
            return a * x + b

    class NVMLError(Exception):
        pass

    # sys.modules may hold any object: `import cupy` returns it
    cupy = types.SimpleNamespace(
        __version__="14.2.0", asarray=np.asarray, asnumpy=np.asarray, ElementwiseKernel=ElementwiseKernel,
        fft=types.SimpleNamespace(fftn=lambda a: np.fft.fftn(a) * (1 + fft_error)),
        linalg=types.SimpleNamespace(solve=np.linalg.solve, eigh=np.linalg.eigh),
        cuda=types.SimpleNamespace(runtime=_Runtime(runtime_fails), Device=lambda i: contextlib.nullcontext()))
    memory = types.SimpleNamespace(total=150_000_000_000, used=600_000_000)
    pynvml = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: memory, nvmlSystemGetDriverVersion=lambda: "570.124.06")
    cufinufft = types.SimpleNamespace(  # a spec: importlib.util.find_spec finds it installed
        __spec__=importlib.machinery.ModuleSpec("cufinufft", None), __version__="2.5.1",
        nufft2d1=finufft.nufft2d1, nufft2d2=finufft.nufft2d2)
    for name, module in (("cupy", cupy), ("pynvml", pynvml), ("cufinufft", cufinufft)):
        monkeypatch.setitem(sys.modules, name, module)


def test_the_gpu_selftest_checks_each_part_of_the_gpu_stack(monkeypatch, capsys):
    from reconq.workers import selftest

    fake_gpu_stack(monkeypatch)
    assert selftest.main(["--gpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "nvml:"], ["ok", "cupy"], ["ok", "cupy"],
                                                    ["ok", "cufinufft"], ["ok", "numpy"], ["ok", "finufft"],
                                                    ["ok", "mrd"]], lines
    assert "2 device(s): 0: NVIDIA H200, 140 GiB" in lines[0]
    assert "cupy 14.2.0: CUDA runtime 12.9, driver's CUDA 12.8, 2 device(s), device 0: NVIDIA H200, 140 GiB" in lines[1]
    assert lines[2].endswith("device(s) 0, 1")


def test_the_gpu_selftest_names_what_is_wrong(monkeypatch, capsys):
    from reconq.workers import selftest

    fake_gpu_stack(monkeypatch, fft_error=1e-2)
    assert selftest.main(["--gpu"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("reconq selftest: FAILED cupy-kernels: device 0: cuFFT: relative error 1.00e-02 "
                              "above 1e-04; ")
    assert len(out) == 3  # nvml and cupy passed, nothing after the failure ran
    fake_gpu_stack(monkeypatch, runtime_fails=True)
    assert selftest.main(["--gpu"]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("reconq selftest: FAILED cupy: CUDA is unusable (RuntimeError: cudaErrorInsufficient")
    assert "driver 525 or newer" in last
