"""The composition root: every service a ReconQ process needs, built from the settings once.

The gateway, the HTTP API and the command line each get their job store, scan store, task sender,
placement, staff actions and allow-list of pipelines from :func:`build_services`, so the wiring is
written here and nowhere else. Plugins are loaded here too, so that every process knows the same
pipelines (the gateway's allow-list, the API's retro-recon, placement's estimates). Each process imports
only the service it runs: the gateway does not load FastAPI, the API not the MRD server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from celery import Celery

from reconq.core.celeryapp import make_celery
from reconq.core.jobs import JobStore
from reconq.core.redisconn import connect
from reconq.core.sender import TaskSender
from reconq.core.settings import Settings
from reconq.core.storage import ScanStore
from reconq.recon.plugins import load_plugins
from reconq.recon.registry import pipeline_names
from reconq.scheduler.actions import Actions
from reconq.scheduler.placement import Placement

if TYPE_CHECKING:
    from fastapi import FastAPI

    from reconq.gateway.server import Gateway


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


def build_services(settings: Settings, client: redis.Redis | None = None, celery: Celery | None = None) -> Services:
    """The services on ``client`` (default: a connection from the settings) and ``celery`` (default: an app
    from the settings), after loading the site's plugins."""
    load_plugins(settings.plugin_dir, settings.parameter_map)
    client = client if client is not None else connect(settings)
    jobs, scans = JobStore(client), ScanStore(settings.data_dir)
    sender = TaskSender(celery if celery is not None else make_celery(settings))
    placement = Placement(settings, jobs, scans, sender)
    pipelines = frozenset(pipeline_names())
    return Services(settings, client, jobs, scans, sender, placement,
                    Actions(jobs, sender, scans, pipelines, placement), pipelines)


def make_gateway(settings: Settings) -> Gateway:
    """The MRD gateway on the configured Redis; its allow-list is every registered pipeline and plugin."""
    from reconq.gateway.server import Gateway

    s = build_services(settings)
    return Gateway(settings, s.jobs, s.scans, s.sender, s.placement, s.pipelines)


def make_api(settings: Settings, client: redis.Redis | None = None, celery: Celery | None = None) -> FastAPI:
    """The HTTP API on ``client`` (default: a connection from the settings)."""
    from reconq.api.app import create_api

    s = build_services(settings, client, celery)
    return create_api(settings, s.jobs, s.scans, s.actions)
