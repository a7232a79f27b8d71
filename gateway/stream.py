"""One MRD session's stream: messages in, by the protocol's reader table; TEXT and CLOSE out.

Acquisition and retrieval scans each take a :class:`MessageStream` (and the gateway's
:class:`~reconq.gateway.context.SessionContext`); neither knows the other.

The opening (config and HEADER) must come within a deadline of connecting (``mrd_opening_timeout_s``),
so silent clients cannot hold the session slots. A HEADER with a DTD (``<!DOCTYPE``) is refused before
it is parsed (no entities, internal or external, ever reach the parser), and what the header parser
warns about is logged without the values it names (a patient's birth date): :func:`parse_header_quietly`.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable, Collection

import ismrmrd.xsd

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


_DOCTYPE = re.compile(r"<!\s*doctype", re.IGNORECASE)
#: xsdata's ConverterWarning: "Failed to convert value for `type.field`\n  `VALUE` is not a valid `Type`"
#: ``warnings.catch_warnings`` swaps process-wide state: header parses take turns under this lock.


def parse_header_quietly(xml: str, source: str, who: str = "") -> ismrmrd.xsd.ismrmrdHeader:
    """:func:`reconq.core.mrdfile.parse_header` (which logs the parser's warnings without their values),
    naming the sender in its log line."""
    return parse_header(xml, f"{source} from {who}" if who else source)


class MessageStream:
    """The messages of one connection, read in order; replies are sent on the same socket.

    ``opening_timeout_s``: how long after this stream is made its opening (config and HEADER) may take."""

    def __init__(self, sock: socket.socket, peer: str, limits: p.Limits,
                 opening_timeout_s: float | None = None) -> None:
        self.sock, self.peer, self.limits = sock, peer, limits
        self.src = p.SocketSource(sock)
        self.opened_at = time.monotonic()
        self.opening_timeout_s = opening_timeout_s

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
        """The config (if any) and the header; None for a header-less session (CLOSE after the config).

        Within ``opening_timeout_s`` of connecting, or :class:`~reconq.gateway.protocol.DeadlineExceeded`."""
        if self.opening_timeout_s is not None:
            self.src.set_deadline(self.opened_at + self.opening_timeout_s,
                                  f"no config and HEADER within {self.opening_timeout_s:g} s of connecting "
                                  "(RECONQ_MRD_OPENING_TIMEOUT_S); session ended, nothing stored")
        try:
            return self._read_opening()
        finally:
            self.src.clear_deadline()

    def _read_opening(self) -> Opening | None:
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
        if _DOCTYPE.search(xml):  # before any parser sees it: no entity (XXE, billion laughs) is ever expanded
            raise p.ProtocolError("HEADER declares a DTD (<!DOCTYPE ...>): DTDs and entities are not accepted in "
                                  "MRD headers; nothing was stored")
        try:  # parse_header ignores the declared encoding (ismrmrd's ToXML declares ASCII for any header)
            header = parse_header_quietly(xml, "HEADER", self.peer)
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
