"""The one settings class, read from ``RECONQ_*`` environment variables.

Entry points build a :class:`Settings` with :func:`load_settings` and pass it down; nothing in ReconQ
builds one at import time. A ``RECONQ_`` variable that names no setting is an error, so a mistyped
setting is never silently dropped.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

ENV_PREFIX = "RECONQ_"


class SettingsError(ValueError):
    """A setting is unknown or has a value that cannot be used."""


class Settings(BaseSettings):
    """Every tunable of ReconQ. Environment variables are ``RECONQ_<NAME>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    data_dir: Path = Field(Path("reconq-data"), description="Root of scans, results and the private Redis")
    redis_url: str | None = Field(
        None, description="Redis to use; when unset, `reconq up`/`demo` start a private redis-server"
    )
    redis_server_bin: str = Field("redis-server", description="redis-server binary for the private Redis")
    redis_timeout_s: float = Field(3.0, gt=0, description="How long one Redis call (a connect, a reply) may take "
                                   "before Redis counts as unreachable: bounds what an outage costs an MRD session")
    redis_password_file: Path | None = Field(
        None, description="File holding the password of the Redis user in RECONQ_REDIS_URL (a Docker secret); "
                          "read at start"
    )
    redis_ca_file: Path | None = Field(
        None, description="CA certificate(s), PEM, that the Redis server's certificate is verified against; "
                          "required with a rediss:// URL"
    )

    mrd_host: str = Field("127.0.0.1", description="Address the MRD gateway listens on")
    mrd_port: int = Field(9002, ge=0, le=65535, description="MRD gateway TCP port (0: any free port)")
    http_host: str = Field("127.0.0.1", description="Address of the HTTP API")
    http_port: int = Field(9080, ge=0, le=65535, description="HTTP API port")

    default_pipeline: str = Field("cartesian", description="Pipeline for sessions that name no config")
    inputs_wait_s: float = Field(1800.0, ge=0, description="How long a job waits for a scan it needs")
    inputs_poll_s: float = Field(10.0, gt=0, description="How often a waiting job looks for its inputs")
    reconcile_interval_s: float = Field(60.0, gt=0, description="How often the gateway queues complete "
                                        "scans that have no job (after a Redis outage)")
    plugin_dir: Path | None = Field(None, description="Folder of recon plugins (*.py defining recon())")
    load_plugins_at_submit: bool = Field(
        True, description="The gateway and the API import the plugins' code (their estimates at submit); false: "
        "they read the plugins' names only, without running their code, and workers estimate plugin jobs"
    )
    sequence_dir: Path | None = Field(
        None, description="Folder of Pulseq .seq files scans' trajectories come from (default: <data dir>/sequences)"
    )
    parameter_map: Path | None = Field(None, description="Site ParameterMap (YAML) extending the default")
    retrieve_configs: list[str] = Field(
        default_factory=lambda: ["retrieve", "reconq_retrieve"],
        description="Config names that make a session a retrieval scan",
    )
    retrieve_wait_s: float = Field(600.0, ge=0, description="How long a retrieval scan waits for a job")
    retrieve_poll_s: float = Field(2.0, gt=0, description="Progress TEXT interval while a retrieval waits")
    retrieve_repeat_s: float = Field(10.0, ge=0, description="A progress TEXT that says the same as the last "
                                     "one is sent again only after this long")
    retrieve_protocol_suffixes: list[str] = Field(
        default_factory=lambda: ["_retrieve", "_retrieval"],
        description="Endings stripped from a retrieval scan's protocol name before it is matched",
    )
    retrieve_protocol_prefixes: list[str] = Field(
        default_factory=list, description="Beginnings stripped from a retrieval scan's protocol name before matching",
    )

    write_batch_bytes: int = Field(8 << 20, ge=1 << 16, description="Raw-file writer batch size")
    write_sync_bytes: int = Field(
        64 << 20, ge=1 << 16, description="Bytes of a streaming scan written between fsyncs (crash-readable points)"
    )
    max_image_bytes: int = Field(256 << 20, ge=1024, description="Largest IMAGE a client may send")
    max_header_bytes: int = Field(1 << 20, ge=1024, description="Largest HEADER/CONFIG_TEXT accepted")
    max_text_bytes: int = Field(1 << 20, ge=1024, description="Largest TEXT accepted")
    max_acquisition_bytes: int = Field(64 << 20, ge=1024, description="Largest single readout accepted")
    max_connections: int = Field(64, ge=1, description="Concurrent MRD sessions")
    idle_timeout_s: float = Field(300.0, gt=0, description="A silent client is dropped after this")
    mrd_allowed_clients: list[str] = Field(
        default_factory=list, description="Addresses or networks (CIDR, IPv4 or IPv6) that may open MRD sessions, "
        'e.g. ["10.1.2.0/24","fd00::7"]; empty: loopback clients only, and a gateway listening beyond loopback '
        "refuses to start",
    )
    mrd_max_sessions_per_client: int = Field(8, ge=1, description="Concurrent MRD sessions from one client address")
    mrd_opening_timeout_s: float = Field(30.0, gt=0, description="A client that has not sent its config and "
                                         "HEADER this long after connecting is dropped, freeing its session slot")
    mrd_session_bytes_factor: float = Field(4.0, ge=0, description="A scan may bring this many times the bytes "
                                            "its header's encoding describes, plus mrd_session_bytes_floor; 0: no cap")
    mrd_session_bytes_floor: int = Field(256 << 20, ge=0, description="Bytes every scan may bring beyond its "
                                         "header's share (noise, calibration, waveforms)")
    min_free_bytes: int = Field(1 << 30, ge=0, description="Refuse new scans below this free space")
    disk_floor_bytes: int = Field(
        256 << 20, ge=0, description="A scan streaming in is stopped (kept, incomplete, the scanner told) before "
        "a write would leave less free space than this: the disk never fills up under the raw-file writer"
    )

    # Retention: 0 keeps forever. A scan is purged only once every job on it has ended (done, failed,
    # cancelled); results and job records by the time their job ended.
    keep_raw_days: float = Field(0.0, ge=0, description="Raw scans are deleted this many days after the last job "
                                 "on them ended (0: kept forever); a scan with a job not ended is never touched")
    keep_results_days: float = Field(0.0, ge=0, description="Result images are deleted this many days after their "
                                     "job ended (0: kept forever)")
    keep_jobs_days: float = Field(0.0, ge=0, description="Job records are deleted from Redis this many days after "
                                  "the job ended, once its scan's raw data and results are gone (0: kept forever)")
    purge_interval_s: float = Field(3600.0, gt=0, description="How often the gateway applies the keep_* settings")

    dicom_uid_root: str = Field("", pattern=r"^$|^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$", max_length=40,
                                description="UID root (an organisation's registered OID) for the DICOM UIDs ReconQ "
                                "makes; empty: pydicom's root")

    queue: str = Field("routine", description="Queue for scans from the scanner")
    visibility_timeout_s: int = Field(
        6 * 3600, ge=60, description="Redis broker visibility timeout; above the longest recon"
    )
    worker_concurrency: int = Field(1, ge=1, description="Worker processes started by `reconq worker`")
    job_time_limit_s: int = Field(4 * 3600, ge=1, description="Hard time limit of one recon task")

    # GPU scheduling
    simulated_gpus: list[float] = Field(
        default_factory=list,
        description="Simulated GPU inventory, memory per GPU in GB (e.g. [80,80,24,24]); empty: NVML",
    )
    node_name: str = Field("", description="Name of this machine in GPU ids (default: the host name)")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often workers publish heartbeats")
    heartbeat_ttl_s: float = Field(
        20.0, gt=0, description="A worker silent this long is dead; its GPU reservations are reclaimed"
    )
    dispatch_poll_s: float = Field(
        1.0, gt=0, description="How often an idle GPU worker looks for waiting jobs that now fit its GPU"
    )
    backfill_limit_s: float = Field(
        300.0, ge=0, description="A job waiting for GPU memory this long stops smaller jobs from overtaking it"
    )
    workers_per_gpu: str = Field(
        "", description="Worker processes per GPU for `reconq worker`: N, one count per GPU named (12,12,4,4), "
                        "or auto (one per `slot_gb` of the GPU's memory, at most `max_workers_per_gpu`); "
                        "when set it replaces --per-gpu",
    )
    slot_gb: float = Field(6.0, gt=0, description="A typical job's GPU memory: `auto` starts one worker per this")
    max_workers_per_gpu: int = Field(12, ge=1, description="The most worker processes `auto` starts on one GPU")
    max_gpu_oom: int = Field(3, ge=0, description="GPU out-of-memory errors a job may have before it fails")
    redis_retry_s: float = Field(60.0, ge=0, description="How long a worker tries again to record a job's "
                                                         "outcome while Redis is unavailable")
    worker_stop_grace_s: float = Field(30.0, ge=0, description="On SIGTERM, how long a worker lets a running "
                                       "recon finish before it hands the job back to its queue")
    max_attempts: int = Field(3, ge=1, description="Runs of a job that may end with their worker (killed, "
                                                  "crashed) before the job fails: a poison job ends")
    oom_estimate_factor: float = Field(1.5, ge=1.0, description="Estimate multiplier after a GPU OOM")
    gpu_forget_s: float = Field(
        600.0, gt=0, description="A GPU unseen this long no longer counts when deciding a job fits no GPU"
    )
    admission_control: bool = Field(
        True, description="GPU memory reservations; false only to benchmark placement without them"
    )
    enable_test_pipelines: bool = Field(
        False, description="Register the `sleep` test pipelines in workers (tests and benchmarks only)"
    )

    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object a log line (time, level, logger, job_id, scan_id, worker, "
        "message); `text`: plain lines, ` [job <id>]` on those logged during a job"
    )
    environment: Literal["development", "production"] = Field(
        "production", description="`development` accepts placeholder sign-in secrets (with a warning)"
    )
    staff_passwords: dict[str, str | dict[str, str]] = Field(
        default_factory=dict,
        description='Staff sign-in by password: JSON {"name": "scrypt$..."} (full rights: admin) or {"name": '
        '{"hash": "scrypt$...", "role": "viewer|technologist|admin"}}; hashes from `python -m reconq.api.auth`',
    )
    staff_tokens: dict[str, str | dict[str, str]] = Field(
        default_factory=dict,
        description='Staff API tokens: JSON {"name": "sha256$..."} (admin) or {"name": {"hash": "sha256$...", '
        '"role": ...}}; hashes from `python -m reconq.api.auth --token`',
    )
    dashboard_public_read: bool = Field(
        False, description="Let anyone who reaches the API view jobs (read-only, patient identifiers masked)"
    )
    session_ttl_s: int = Field(8 * 3600, ge=60, description="How long a dashboard sign-in lasts")
    # HTTP security (reconq.api.middleware, reconq.api.auth)
    session_idle_s: int = Field(30 * 60, ge=60, description="A dashboard session unused this long is signed out")
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) the API serves HTTPS with (with tls_key)")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    behind_tls_proxy: bool = Field(False, description="A reverse proxy terminates TLS in front of the API: "
                                   "HSTS and Secure cookies as with tls_cert")
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"], description="Addresses whose "
                                       "X-Forwarded-For/-Proto the API believes (uvicorn's forwarded_allow_ips)")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host names the API answers to "
                                     "(*.example.org allowed), beside http_host and the loopback names")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest HTTP request body (413 past it)")
    max_signin_body_bytes: int = Field(64 << 10, ge=1024, description="Largest body of POST /api/auth/signin")
    signin_window_s: int = Field(60, ge=1, description="Window of the per-address and per-(name, address) "
                                 "sign-in limits")
    signin_max_per_address: int = Field(20, ge=1, description="Failed sign-ins (any name, or tokens) one client "
                                        "address may make per window")
    signin_max_per_name: int = Field(10, ge=1, description="Failed sign-ins as one name from one address per window")
    signin_name_window_s: int = Field(900, ge=1, description="Window of the per-name limit over all addresses")
    signin_max_per_name_global: int = Field(100, ge=1, description="Failed sign-ins as one name from all addresses "
                                            "per name window; past it only addresses it signed in from may try")

    @property
    def sequence_folder(self) -> Path:
        """The folder of Pulseq ``.seq`` files: ``sequence_dir``, else ``<data_dir>/sequences``."""
        return self.sequence_dir if self.sequence_dir is not None else self.data_dir / "sequences"


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment and explicit overrides (which win).

    Raises :class:`SettingsError` naming every ``RECONQ_`` variable that is not a setting.
    """
    known = {name.upper() for name in Settings.model_fields}
    unknown = sorted(
        key for key in os.environ if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :] not in known
    )
    if unknown:
        guesses = []
        for key in unknown:
            close = difflib.get_close_matches(key, [ENV_PREFIX + k for k in known], n=1, cutoff=0.7)
            if close:
                guesses.append(f"{key}: did you mean {close[0]}?")
        raise SettingsError(
            f"unknown setting(s) {', '.join(unknown)}; "
            + (" ".join(guesses) + " " if guesses else "")
            + "known settings are " + ", ".join(ENV_PREFIX + k for k in sorted(known))
        )
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = str(err["loc"][0]) if err.get("loc") else ""
            variable = ENV_PREFIX + field.upper() if field in Settings.model_fields else field
            given = os.environ.get(variable)
            shown = "" if given is None or _secret(field) else f"={given!r}"
            source = f" (setting {field})" if field else ""
            problems.append(f"{variable}{shown}{source}: {err['msg'].lower()}")
        raise SettingsError("; ".join(problems) + " (see `reconq settings` for what each setting takes)") from None
    except PydanticSettingsError as e:  # a list or dict setting whose value is not JSON
        m = re.search(r'field "(\w+)"', str(e))
        if m is None:
            raise SettingsError(str(e)) from None
        variable = ENV_PREFIX + m.group(1).upper()
        raise SettingsError(f"{variable} is not valid JSON: give a JSON list or object, e.g. "
                            f'{variable}=\'[80,24]\' or \'{{"name": "..."}}\' (see `reconq settings`)') from None


def _secret(name: str) -> bool:
    return any(word in name for word in ("password", "token", "secret", "key"))


_URL_PASSWORD = re.compile(r"(://[^:@/]*):[^@/]*@")


def _shown(name: str, value: object) -> object:
    """A setting's value as it may be printed: secrets masked, a URL's password shown as ``***``."""
    if value is None:
        return None
    if isinstance(value, Path):
        return str(value)
    if _secret(name) and not isinstance(value, bool) and name not in ("redis_password_file", "tls_key"):
        if isinstance(value, dict):
            return {k: "***" for k in value}
        return "***" if value else value
    if isinstance(value, str):
        return re.sub(r"password=[^&]*", "password=***", _URL_PASSWORD.sub(r"\1:***@", value))
    return value


def describe_settings(settings: Settings) -> list[dict[str, object]]:
    """Every setting: its variable, default, current value (secrets masked) and description."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append({"variable": ENV_PREFIX + name.upper(), "default": _shown(name, default),
                     "value": _shown(name, getattr(settings, name)), "set": (ENV_PREFIX + name.upper()) in os.environ,
                     "description": field.description or ""})
    return rows
