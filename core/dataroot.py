"""One data root, checked: every process refuses to run on a data dir that is not the gateway's.

The gateway, the API and every worker read and write the same scans, so on several machines they must
all see one shared data root (mounted at ``RECONQ_DATA_DIR`` on each node; the mount point may differ,
paths in Redis are relative to the root). A node where the share is not mounted sees an empty folder,
and without a check its worker would fail every job at once with "cannot open raw file". So the root
gets an identity:

- ``<data_dir>/reconq-root.json`` holds a random id and its creation time (nothing of any patient),
  written once, atomically, and never changed;
- Redis holds the same id under :data:`~reconq.core.constants.DATA_ROOT_KEY`.

Every process calls :func:`check_data_root` at start, before it touches a scan, and refuses to run
(:class:`DataRootError`, whose message says what each side has, which path, and what to do) when the
two do not agree. The cases:

=============================  ======================  ===========================================
Redis                          this data dir           what happens
=============================  ======================  ===========================================
no id                          no id file              a *creator* (``create=True``: the gateway,
                                                       ``reconq up``) writes a new file and records
                                                       its id; anyone else waits for one (below)
no id (Redis lost its data)    an id file              a creator records the file's id again;
                                                       anyone else waits for one
id X                           id X                    go ahead
id X                           no id file, or id Y     refuse (:class:`DataRootMismatch`)
=============================  ======================  ===========================================

Only the gateway and ``reconq up`` create or re-record the id: they own the data root (they hold its
lock, :mod:`reconq.core.datalock`, which also keeps two of them from creating at once on one root). A
worker or an API never does: were a worker on a node without the share the first to start, it would
otherwise stamp its empty local folder as the root, and the gateway, on the real root, would then be the
one refused. A worker or API that finds no id in Redis waits (``wait_s``) for the gateway to record one,
so that services started together (compose) come up in any order, then refuses. One that waited also
waits, within ``wait_s``, for the new id file to show on its node (an NFS client may cache "no such
file" for up to a minute); one that did not wait refuses a missing file at once.

Two first starts race safely: the file is created exclusively (a hard link of a fully written file,
atomic on local file systems and NFS), so of two creators one file wins and both read it; the id goes to
Redis with ``SET NX``, so of two recorders one wins and the other compares against it.

Redis unreachable is its own error (:class:`DataRootUnchecked`): the API starts anyway, unchecked, with a
warning (it answers 503 until Redis is back); a worker waits for Redis (``redis_wait_s``), then refuses;
the gateway starts unchecked too (it stores scans and queues them once Redis is back) and checks at every
reconcile from then on: it re-records an id Redis lost, and stops (exit 2) after three checks in a row
that find another root's id (:meth:`reconq.gateway.server.Gateway.reconcile_once`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import time
from pathlib import Path

import redis

from reconq.core.constants import DATA_ROOT_KEY
from reconq.core.settings import Settings
from reconq.core.storage import fsync_path, write_atomic

log = logging.getLogger(__name__)

#: The id file at the top of the data root.
ROOT_FILE = "reconq-root.json"
#: How long a worker or the API waits at start for a gateway to record the root's id (services started
#: together come up in any order).
FIRST_START_WAIT_S = 60.0

_WHAT_TO_DO = ("Mount the shared data root at RECONQ_DATA_DIR on every node (the mount point may differ per "
               "node), then start this {role} again.")


class DataRootError(RuntimeError):
    """This process may not run on its data dir; the message says why and what to do."""


class DataRootMismatch(DataRootError):
    """The data dir is not the data root Redis records (it has no id file, or another id)."""


class DataRootNotHere(DataRootMismatch):
    """Redis records an id, and the data dir has no id file (the share not mounted: an empty folder)."""


class DataRootUnrecorded(DataRootError):
    """Redis records no data root id, and this process may not record one (it is not the gateway)."""


class DataRootUnchecked(DataRootError):
    """Redis cannot be reached, so the data root cannot be checked."""


def root_file(data_dir: Path) -> Path:
    return Path(data_dir) / ROOT_FILE


def read_root_id(data_dir: Path) -> str | None:
    """The id in the data dir's id file; None where there is no such file (or no such folder).

    Raises :class:`DataRootError` for a file that cannot be read or is not an id file: guessing would
    either refuse a good root or accept a wrong one.
    """
    path = root_file(data_dir)
    for _ in range(20):  # an exclusive create without hard links fills the file just after it appears
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:  # a stale NFS handle, no permission
            raise DataRootError(f"cannot read the data root id file {path}: {e}") from e
        if text:
            break
        time.sleep(0.1)
    try:
        ident = json.loads(text)["id"]
        if not isinstance(ident, str) or not ident:
            raise ValueError(ident)
    except (ValueError, KeyError, TypeError) as e:
        raise DataRootError(f"{path} is not a ReconQ data root id file ({e!r}). If this folder is the shared "
                            f'data root, write into it {{"id": "<the id Redis holds at {DATA_ROOT_KEY}>"}}') from e
    return ident


def _create_root_file(data_dir: Path) -> str:
    """Write a new id file unless one exists; returns the id the file holds then (ours, or that of a creator
    who came first)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = root_file(data_dir)
    ident = secrets.token_hex(16)
    body = json.dumps({"id": ident, "created_at": time.time(),
                       "about": "ReconQ data root id: every node's RECONQ_DATA_DIR must hold this file"}).encode()
    tmp = data_dir / f".{ROOT_FILE}.{ident}"
    try:
        write_atomic(tmp, body)  # complete and durable under a private name first
        os.chmod(tmp, 0o644)  # no patient data: services running as other users read it
        try:
            os.link(tmp, path)  # create-if-absent in one step: of two creators, one file wins
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
            _create_exclusive(path, body)  # a file system without hard links (some FUSE or SMB mounts)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(data_dir)
    ours = read_root_id(data_dir)
    assert ours is not None
    if ours == ident:
        log.warning("data root %s: new id %s written to %s", data_dir.absolute(), ident, path)
    return ours


def _create_exclusive(path: Path, body: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_once(data_dir: Path, client: redis.Redis, create: bool, role: str) -> str:
    where = data_dir.absolute()
    todo = _WHAT_TO_DO.format(role=role)
    try:
        # Redis first, then the file: whoever recorded the id wrote the file before, so an id seen in Redis
        # has its file in place by the time the file is read (the other order refuses a racing start).
        recorded = client.get(DATA_ROOT_KEY)
        here = read_root_id(data_dir)
        if recorded is None:
            if not create:
                if here is None:
                    raise DataRootUnrecorded(
                        f"Redis records no data root id yet and the data dir {where} has none: no gateway has "
                        f"started on this Redis and data root. Start the gateway (`reconq gateway` or `reconq up`) "
                        f"first, which records the data root's id, then this {role}")
                raise DataRootUnrecorded(
                    f"Redis records no data root id (it lost its data, or no gateway has started on it yet); the "
                    f"data dir {where} has id {here}. The gateway records it again when it starts: start the "
                    f"gateway (`reconq gateway` or `reconq up`), then this {role}")
            if here is None:
                try:
                    here = _create_root_file(data_dir)
                except OSError as e:  # read-only, no permission, no space
                    raise DataRootError(f"cannot create the data root id file {root_file(where)}: {e}. The "
                                        f"gateway needs to write to RECONQ_DATA_DIR") from e
            if client.set(DATA_ROOT_KEY, here, nx=True):
                log.warning("data root %s: id %s recorded in Redis (Redis had none: a first start, or Redis lost "
                            "its data)", where, here)
                return here
            recorded = client.get(DATA_ROOT_KEY)  # another process recorded one first: compare with it
    except redis.RedisError as e:
        raise DataRootUnchecked(f"cannot check the data root {where}: Redis (RECONQ_REDIS_URL) is unreachable "
                                f"({e})") from e
    if here is None:
        raise DataRootNotHere(
            f"the data dir {where} is not the shared data root: it has no {ROOT_FILE}, but Redis records data root "
            f"id {recorded}, so this node does not see the gateway's data root (an empty folder here usually "
            f"means the share is not mounted). {todo}")
    if here != recorded:
        raise DataRootMismatch(
            f"the data dir {where} is data root id {here} ({ROOT_FILE}), but Redis records data root id "
            f"{recorded}: this node's RECONQ_DATA_DIR is another data root than the gateway's (a local folder, "
            f"or another share). {todo}")
    return here


def check_data_root(settings: Settings, client: redis.Redis, create: bool, role: str = "process",
                    wait_s: float = 0.0, redis_wait_s: float = 0.0, poll_s: float = 0.5) -> str:
    """The id of the data root at ``settings.data_dir``, checked against the one Redis records.

    ``create``: this process owns the data root (the gateway, ``reconq up``) and may create its id or
    record it again (see the module's table). Otherwise, while Redis records no id, look again every
    ``poll_s`` for ``wait_s`` seconds; while Redis cannot be reached, for ``redis_wait_s`` seconds. Raises
    :class:`DataRootError` (a subclass saying which case) when the data root is not the recorded one, or
    still cannot be checked; ``role`` names this process in the message.
    """
    data_dir = Path(settings.data_dir)
    start = time.monotonic()
    said = waited = False
    while True:
        try:
            ident = _check_once(data_dir, client, create, role)
        except DataRootNotHere:
            # Waited for the gateway's first start, which has now recorded its id: a shared file system may
            # show the new file here a little later (an NFS client caches "no such file" for up to a minute).
            if not waited or time.monotonic() - start >= wait_s:
                raise
            time.sleep(poll_s)
            continue
        except (DataRootUnrecorded, DataRootUnchecked) as e:
            waited = waited or isinstance(e, DataRootUnrecorded)
            limit = wait_s if isinstance(e, DataRootUnrecorded) else redis_wait_s
            if time.monotonic() - start >= limit:
                raise type(e)(f"{e} (waited {limit:g} s)" if limit else str(e)) from e.__cause__
            if not said:
                log.warning("%s; waiting up to %g s", e, limit)
                said = True
            time.sleep(poll_s)
            continue
        log.info("data root %s: id %s, as Redis records", data_dir.absolute(), ident)
        return ident
