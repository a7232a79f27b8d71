"""Redis Lua scripts kept as ``.lua`` files in a package's ``lua/`` folder, registered once per client.

Every key a script touches is passed to it as a key (``KEYS``), as the EVAL documentation requires (a
script that must build some key itself says which and why in its header); each file's header comment
documents its keys and its arguments, in order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources

import redis
from redis.commands.core import Script


@functools.cache
def script_source(package: str, name: str) -> str:
    """The text of ``<package>/lua/<name>.lua`` (package data, also in an installed wheel)."""
    return (resources.files(package) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def load_script(client: redis.Redis, package: str, name: str) -> Script:
    """The script ``name`` of ``package`` registered on ``client`` (sent by SHA, loaded again if Redis
    has forgotten it, as after a restart)."""
    return client.register_script(script_source(package, name))


def load_joined(client: redis.Redis, package: str, names: Sequence[str]) -> Script:
    """The script made of the files ``names`` of ``package``, joined in that order, registered on ``client``:
    Redis scripts cannot ``require``, so shared functions are prepended this way (each file's header says
    which it needs)."""
    return client.register_script("\n".join(script_source(package, name) for name in names))
