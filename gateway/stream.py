"""One MRD session's stream: messages in, by the protocol's reader table; TEXT and CLOSE out.

Acquisition and retrieval scans each take a :class:`MessageStream` (and the gateway's
:class:`~reconq.gateway.context.SessionContext`); neither knows the other.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Collection

from reconq.core.mrdfile import MrdFileError, parse_header
from reconq.gateway import protocol as p
from reconq.gateway.opening import Opening

log = logging.getLogger(__name__)

Handler = Callable[[], None]


class SessionError(Exception):
    """A session cannot go on; the message is sent to the scanner as an ERR TEXT."""


def text(level: str, message: str) -> bytes:
    """A TEXT message with the level prefix the scanner's log viewer expects (DBG/INF/WRN/ERR)."""
    return p.write_text(f"{level} {message}")


def unexpected(msg: int) -> str:
    """Why message ``msg`` is refused where it came."""
    if msg == p.MessageId.HEADER:
        return "a second HEADER in one session"
    if msg in (p.MessageId.CONFIG_FILE, p.MessageId.CONFIG_TEXT):
        return "a config message after the HEADER"
    return f"unexpected {p.describe(msg)}"


class MessageStream:
    """The messages of one connection, read in order; replies are sent on the same socket."""

    def __init__(self, sock: socket.socket, peer: str, limits: p.Limits) -> None:
        self.sock, self.peer, self.limits = sock, peer, limits
        self.src = p.SocketSource(sock)

    @property
    def bytes_read(self) -> int:
        return self.src.bytes_read

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(messages))

    def read(self, msg: int) -> object:
        """The body of message ``msg`` (its id read), by the protocol's reader table."""
        return p.read_body(self.src, self.limits, msg)

    def next_message(self) -> int:
        """The id of the next message, answering (and skipping) Gadgetron QUERY messages on the way."""
        while (msg := p.read_message_id(self.src)) == p.MessageId.QUERY:
            query = p.read_query(self.src, self.limits)
            log.info("session from %s: Gadgetron QUERY %.100r not supported", self.peer, query)
            self.send(text("WRN", f"Gadgetron QUERY messages are not supported by this MRD gateway "
                                  f"(query {query[:100]!r} not answered); the session goes on"))
        return msg

    def read_opening(self) -> Opening | None:
        """The config (if any) and the header; None for a header-less session (CLOSE after the config)."""
        config_file = config_text = None
        msg = self.next_message()
        if msg == p.MessageId.CONFIG_FILE:
            config_file = p.read_config_file(self.src)
            msg = self.next_message()
        elif msg == p.MessageId.CONFIG_TEXT:
            config_text = str(self.read(msg))
            msg = self.next_message()
        if msg == p.MessageId.CLOSE:
            return None
        if msg != p.MessageId.HEADER:
            raise p.ProtocolError(f"expected the HEADER, got {p.describe(msg)}; nothing was stored")
        xml = str(self.read(msg))
        try:  # parse_header ignores the declared encoding (ismrmrd's ToXML declares ASCII for any header)
            header = parse_header(xml, "HEADER")
        except MrdFileError as e:
            raise p.ProtocolError(f"HEADER is not a valid MRD XML header: {e.__cause__ or e}") from e
        return Opening(config_file, config_text, xml, header)

    def read_until_close(self, handlers: dict[int, Handler], drop: Collection[int] = ()) -> None:
        """Until the client's CLOSE: each message in ``handlers`` goes to its handler (which reads its
        body); each in ``drop`` is read by the protocol's table and dropped; any other is refused."""
        while (msg := self.next_message()) != p.MessageId.CLOSE:
            handler = handlers.get(msg)
            if handler is not None:
                handler()
            elif msg in drop:
                self.read(msg)
            else:
                raise p.ProtocolError(unexpected(msg))

    def close(self) -> None:
        self.src.close()
