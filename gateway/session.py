"""One MRD session on the wire: the opening (config, header), then an acquisition or a retrieval scan.

The config name decides: a name in ``retrieve_configs`` is a retrieval scan
(:mod:`reconq.gateway.retrieval`), anything else an acquisition scan (:mod:`reconq.gateway.acquisition`).
Both are peers: each takes the session's :class:`~reconq.gateway.stream.MessageStream` and the gateway's
:class:`~reconq.gateway.context.SessionContext`.

Errors go back to the scanner as an ``ERR`` TEXT that says what was wrong, then CLOSE (also when the
client closed its side mid-stream and may still read): bad messages, lengths past the limits, a
silent client (``idle_timeout_s``), an opening (config and HEADER) not done within
``mrd_opening_timeout_s`` of connecting, a HEADER with a DTD, more data than the header declares, a
full disk. What was received of a scan is kept, its
``scan.json`` says ``incomplete`` with the error, and nothing is queued. A session refused before its
HEADER was read (no header, an unparseable one, data first) stores nothing: no scan began.

Gadgetron's QUERY message (id 6) is not part of MRD and the gateway answers no queries: it reads the
query, sends a ``WRN`` TEXT saying so, and the session goes on (a query-only session, QUERY then
CLOSE, gets that TEXT and CLOSE).
"""

from __future__ import annotations

import contextlib
import logging
import socket

from reconq.gateway import protocol as p
from reconq.gateway.acquisition import Acquisition, reason
from reconq.gateway.context import SessionContext
from reconq.gateway.opening import OpeningError, config_name
from reconq.gateway.rawfile import WriteError
from reconq.gateway.retrieval import Retrieval
from reconq.gateway.stream import MessageStream, SessionError, text

log = logging.getLogger(__name__)


class Session:
    """Serves one connection; :meth:`run` never raises."""

    def __init__(self, ctx: SessionContext, sock: socket.socket, peer: str) -> None:
        self.ctx = ctx
        self.stream = MessageStream(sock, peer, ctx.limits, ctx.settings.mrd_opening_timeout_s)
        self.peer = peer
        self.failed = False  # ended with an ERR TEXT
        self.retrieval = False

    @property
    def bytes_read(self) -> int:
        return self.stream.bytes_read

    def run(self) -> None:
        try:
            opening = self.stream.read_opening()
            if opening is None:  # header-less session (Gadgetron's dependency queries)
                self.stream.send(p.write_close())
                return
            name, params = config_name(opening)
            if name is not None and name in self.ctx.settings.retrieve_configs:
                self.retrieval = True
                Retrieval(self.stream, self.ctx, opening, params).run()
            else:
                Acquisition(self.stream, self.ctx, opening, name, params).run()
        except p.StreamClosed as e:
            if self.stream.bytes_read == 0:  # a port probe (health check), not a session
                log.debug("connection from %s closed before any message", self.peer)
            else:  # the client may have closed only its sending side and still read
                self.fail(f"stream cut off before the client's CLOSE: {e}")
        except (SessionError, OpeningError, p.ProtocolError, WriteError) as e:
            self.fail(str(e))
        except TimeoutError as e:
            self.fail(reason(e, self.ctx.settings.idle_timeout_s))
        except OSError as e:
            log.warning("session from %s: connection error: %s", self.peer, e)
        except Exception:
            log.exception("session from %s: internal error", self.peer)
            self.fail("internal error in the gateway; the data received so far is kept")
        finally:
            self.stream.close()

    def fail(self, message: str) -> None:
        self.failed = True
        log.warning("session from %s refused: %s", self.peer, message)
        with contextlib.suppress(OSError):
            self.stream.send(text("ERR", message), p.write_close())
