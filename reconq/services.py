"""The composition root: every service a ReconQ process needs, built from the settings once.

The gateway, the HTTP API and the command line each get their job store, scan store, task sender,
placement, staff actions and allow-list of pipelines from :func:`build_services`, so the wiring is
written here and nowhere else. Plugins are loaded here too, so that every process knows the same
pipelines (the gateway's allow-list, the API's retro-recon, placement's estimates); with
``load_plugins_at_submit`` off the gateway and the API read only the plugins' names (:func:`plugin_names`), so
plugin code runs in workers alone, and workers estimate plugin jobs. Each process imports
only the service it runs: the gateway does not load FastAPI, the API not the MRD server. The gateway and
the API check first that their data dir is the recorded data root (:mod:`reconq.core.dataroot`).
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from celery import Celery

from reconq.core.celeryapp import make_celery
from reconq.core.dataroot import FIRST_START_WAIT_S, DataRootUnchecked, check_data_root
from reconq.core.jobs import JobStore
from reconq.core.redisconn import connect
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings
from reconq.core.storage import ScanStore
from reconq.recon.pipelines import BUILTIN_PIPELINES
from reconq.recon.plugins import ENTRY_POINT_GROUP, PluginError, load_plugins
from reconq.recon.registry import pipeline_names
from reconq.scheduler.actions import Actions
from reconq.scheduler.placement import Placement

if TYPE_CHECKING:
    from fastapi import FastAPI

    from reconq.gateway.server import Gateway

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """One process's services, sharing one Redis connection pool and one Celery producer."""

    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    scans: ScanStore
    sender: TaskSender
    placement: Placement
    actions: Actions
    pipelines: frozenset[str]


def plugin_names(settings: Settings) -> frozenset[str]:
    """The plugins' pipeline names, found without running any plugin code: an entry point's name is package
    metadata, and a plugin file's name is its module-level ``PIPELINE_NAME = "..."`` (a string literal, read
    with :mod:`ast`) or its file name, as :func:`~reconq.recon.plugins.load_plugins` would name it."""
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    folder = settings.plugin_dir
    if folder is not None:
        if not folder.is_dir():
            raise PluginError(f"plugin folder {folder} does not exist")
        names.update(_declared_name(path) for path in sorted(folder.glob("*.py")) if not path.name.startswith("_"))
    shadowing = sorted(names & {p.name for p in BUILTIN_PIPELINES})
    if shadowing:
        raise PluginError(f"plugin(s) {', '.join(shadowing)} would replace a built-in pipeline of that name")
    return frozenset(names)


def _declared_name(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=path.name)
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        raise PluginError(f"plugin file {path.name} cannot be read: {type(e).__name__}: {e}") from e
    for node in tree.body:
        value: ast.expr | None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "PIPELINE_NAME" for t in targets):
            if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                raise PluginError(f"plugin file {path.name}: PIPELINE_NAME must be a string literal where plugins "
                                  "are read by name only (load_plugins_at_submit=false)")
            return value.value
    return path.stem


def build_services(settings: Settings, client: redis.Redis | None = None, celery: Celery | None = None,
                   *, run_plugins: bool = True) -> Services:
    """The services on ``client`` (default: a connection from the settings) and ``celery`` (default: an app
    from the settings), after loading the site's plugins; with ``run_plugins`` false their names only (no plugin
    code runs in this process, and placement leaves plugin jobs' estimates to the workers)."""
    if run_plugins:
        load_plugins(settings.plugin_dir, settings.parameter_map)
    client = client if client is not None else connect(settings)
    jobs, scans = JobStore(client), ScanStore(settings.data_dir)
    sender = TaskSender(celery if celery is not None else make_celery(settings))
    placement = Placement(settings, jobs, scans, sender)
    pipelines = frozenset(pipeline_names()) | (frozenset() if run_plugins else plugin_names(settings))
    return Services(settings, client, jobs, scans, sender, placement,
                    Actions(jobs, sender, scans, pipelines, placement), pipelines)


def make_gateway(settings: Settings) -> Gateway:
    """The MRD gateway on the configured Redis; its allow-list is every registered pipeline and plugin.

    The gateway owns the data root: it creates the root's id, or records it again in a Redis that lost it,
    and refuses (:class:`~reconq.core.dataroot.DataRootError`) a data dir that is not the recorded root. With
    Redis unreachable it starts unchecked and checks once Redis answers (:meth:`Gateway.reconcile_once`)."""
    from reconq.gateway.server import Gateway

    client = connect(settings)
    try:
        check_data_root(settings, client, create=True, role="gateway")  # before anything reads or marks a scan
    except DataRootUnchecked as e:  # it serves without Redis (scans stored, queued later): checked when it is back
        log.warning("%s; serving anyway: the data root is checked as soon as Redis answers", e)
    s = build_services(settings, client, run_plugins=settings.load_plugins_at_submit)
    return Gateway(settings, s.jobs, s.scans, s.sender, s.placement, s.pipelines)


def make_api(settings: Settings, client: redis.Redis | None = None, celery: Celery | None = None) -> FastAPI:
    """The HTTP API on ``client`` (default: a connection from the settings).

    It serves result files from the data root, so it refuses a data dir that is not the recorded root, and
    waits for a gateway to record one (services started together). With Redis out of reach it starts
    unchecked, answering 503 until Redis is back."""
    from reconq.api.app import create_api

    client = client if client is not None else connect(settings)
    try:
        check_data_root(settings, client, create=False, role="API", wait_s=FIRST_START_WAIT_S)
    except DataRootUnchecked as e:
        log.warning("%s; the API starts without the check", e)
    s = build_services(settings, client, celery, run_plugins=settings.load_plugins_at_submit)
    return create_api(settings, s.jobs, s.scans, s.actions)
