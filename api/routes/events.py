"""``GET /api/events``: job changes as server-sent events, relayed from Redis pub/sub."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from reconq.api.deps import RedisUrlDep, SettingsDep, ViewerDep
from reconq.api.problems import VIEW_ERRORS
from reconq.api.schemas import TEXT
from reconq.core.constants import EVENTS_CHANNEL
from reconq.core.redisconn import connect_async
from reconq.core.settings import Settings

log = logging.getLogger(__name__)

#: Seconds between keep-alive comments on the event stream (proxies drop silent connections).
SSE_KEEPALIVE_S = 15.0

router = APIRouter(prefix="/api", tags=["status"])

#: What an event may tell a viewer who is not signed in (public read): ids and states, nothing of the patient.
PUBLIC_EVENT_KEYS = ("id", "state", "progress", "stage", "action")


def public_event(data: str) -> str | None:
    """An event as anonymous viewers get it: only :data:`PUBLIC_EVENT_KEYS` (None: not a JSON object, dropped)."""
    try:
        event = json.loads(data)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    return json.dumps({k: event[k] for k in PUBLIC_EVENT_KEYS if k in event})


async def _event_stream(request: Request, redis_url: str, staff: bool, settings: Settings) -> AsyncIterator[str]:
    # made as every other client (password file, TLS verified against RECONQ_REDIS_CA_FILE), where the settings
    # name the Redis; an API built on a given client (tests) has only its URL
    client = (connect_async(settings, socket_timeout=None) if settings.redis_url
              else aioredis.Redis.from_url(redis_url, decode_responses=True))
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(EVENTS_CHANNEL)
        yield "retry: 2000\nevent: hello\ndata: {}\n\n"
        quiet_since = time.monotonic()
        while not await request.is_disconnected():
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                data = msg["data"] if staff else public_event(msg["data"])
                if data is not None:
                    yield f"data: {data}\n\n"
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
    except (redis.RedisError, OSError) as e:
        log.warning("event stream ends: Redis: %s", e)
    finally:
        await pubsub.aclose()
        await client.aclose()


@router.get("/events", response_class=StreamingResponse, summary="Job changes as server-sent events",
            responses={**VIEW_ERRORS, 200: {"content": {"text/event-stream": TEXT},
                                            "description": "`data:` JSON {id, state?, progress?, stage?, "
                                                           "action?} per change"}})
async def events(request: Request, redis_url: RedisUrlDep, who: ViewerDep, settings: SettingsDep) -> StreamingResponse:
    return StreamingResponse(_event_stream(request, redis_url, who.staff, settings), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
