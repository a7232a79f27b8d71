"""The MRD (ISMRMRD) streaming protocol: message ids, wire formats, and one read/write pair per family.

Every message starts with a little-endian ``uint16`` id. Byte layouts are quoted from the MRD
streaming-protocol specification above each reader. Readers take a :class:`MessageSource` (a socket
or bytes in memory) and a :class:`Limits`; lengths are checked against the limits *before* any
buffer is allocated, and a socket's buffers then grow only as the bytes arrive
(:meth:`SocketSource.read_exactly`). Acquisitions and waveforms are returned as raw bytes so that the gateway can
store them without building Python objects per readout.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

import ismrmrd
import ismrmrd.hdf5

ID = struct.Struct("<H")
LENGTH = struct.Struct("<I")
ATTRIBUTE_LENGTH = struct.Struct("<Q")
CONFIG_FILE_SIZE = 1024

ACQ_HEADER_SIZE = ismrmrd.hdf5.acquisition_header_dtype.itemsize  # 340
IMAGE_HEADER_SIZE = ismrmrd.hdf5.image_header_dtype.itemsize  # 198
WAVEFORM_HEADER_SIZE = ismrmrd.hdf5.waveform_header_dtype.itemsize  # 40

# The three AcquisitionHeader fields that size the rest of the message (offsets from ismrmrd's layout).
_ACQ_SIZES = struct.Struct("<HHH")  # number_of_samples, available_channels, active_channels
_ACQ_SIZES_AT = ismrmrd.hdf5.acquisition_header_dtype.fields["number_of_samples"][1]
_ACQ_TRAJ_DIMS = struct.Struct("<H")
_ACQ_TRAJ_DIMS_AT = ismrmrd.hdf5.acquisition_header_dtype.fields["trajectory_dimensions"][1]
_WAV_SIZES = struct.Struct("<HH")  # number_of_samples, channels
_WAV_SIZES_AT = ismrmrd.hdf5.waveform_header_dtype.fields["number_of_samples"][1]
_IMG_MATRIX = struct.Struct("<3H")
_IMG_MATRIX_AT = ismrmrd.hdf5.image_header_dtype.fields["matrix_size"][1]
_IMG_CHANNELS = struct.Struct("<H")
_IMG_CHANNELS_AT = ismrmrd.hdf5.image_header_dtype.fields["channels"][1]
_IMG_DATA_TYPE = struct.Struct("<H")
_IMG_DATA_TYPE_AT = ismrmrd.hdf5.image_header_dtype.fields["data_type"][1]
_IMG_ITEM_SIZE = {1: 2, 2: 2, 3: 4, 4: 4, 5: 4, 6: 8, 7: 8, 8: 16}
_QUERY = struct.Struct("<QQQ")  # reserved, correlation id, query length


class MessageId(IntEnum):
    CONFIG_FILE = 1
    CONFIG_TEXT = 2
    HEADER = 3
    CLOSE = 4
    TEXT = 5
    QUERY = 6  # Gadgetron's; not part of MRD
    ACQUISITION = 1008
    IMAGE = 1022
    WAVEFORM = 1026


class ProtocolError(Exception):
    """The peer sent something that is not valid MRD; the message says what."""


class StreamClosed(ProtocolError):
    """The peer closed the connection (EOF) where a message or part of one was due."""


class DeadlineExceeded(ProtocolError):
    """A deadline set on a :class:`SocketSource` (the session's opening) passed before the bytes came."""


@dataclass(frozen=True)
class Limits:
    """Largest lengths accepted, checked before allocating."""

    max_header_bytes: int = 1 << 20
    max_text_bytes: int = 1 << 20
    max_acquisition_bytes: int = 64 << 20
    max_image_bytes: int = 1 << 30


class MessageSource(Protocol):
    """Where messages come from: a socket (:class:`SocketSource`) or bytes in memory (:class:`BytesSource`).

    Both methods raise :class:`StreamClosed` when the stream ends first.
    """

    def read_exactly(self, n: int) -> bytes: ...

    def read_into(self, view: memoryview) -> None: ...


def read_message_id(src: MessageSource) -> int:
    """Read the 2-byte id of the next message; raises :class:`StreamClosed` at EOF."""
    return int(ID.unpack(src.read_exactly(ID.size))[0])


# ID 1 CONFIG_FILE | 2 bytes id | 1024 bytes: null-terminated UTF-8 file name
def read_config_file(src: MessageSource) -> str:
    """The config file name; a name with a path separator or ``..`` is refused (it names no file of ours)."""
    raw = src.read_exactly(CONFIG_FILE_SIZE)
    name = utf8(raw.split(b"\0", 1)[0], "CONFIG_FILE").strip()
    if "/" in name or "\\" in name or ".." in name:
        raise ProtocolError(f"config file name {name!r} is not a plain name (no path separators, no '..')")
    return name


def write_config_file(name: str) -> bytes:
    encoded = name.encode("utf-8")
    if len(encoded) >= CONFIG_FILE_SIZE:
        raise ValueError(f"config file name longer than {CONFIG_FILE_SIZE - 1} bytes")
    return ID.pack(MessageId.CONFIG_FILE) + encoded.ljust(CONFIG_FILE_SIZE, b"\0")


def utf8(raw: bytes, what: str) -> str:
    """``raw`` decoded as UTF-8; bytes that are not UTF-8 are refused, never replaced: a header's patient
    name must reach the raw file as the scanner sent it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{what} is not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start}") from e


# ID 2 CONFIG_TEXT, 3 HEADER, 5 TEXT | 2 bytes id | uint32 length | length bytes UTF-8
#   (the length counts bytes, not characters: "Müller" is 7)
def read_length_prefixed(src: MessageSource, limit: int, what: str) -> str:
    (length,) = LENGTH.unpack(src.read_exactly(LENGTH.size))
    if length > limit:
        raise ProtocolError(f"{what} of {length} bytes exceeds the limit of {limit} bytes")
    return utf8(src.read_exactly(length).rstrip(b"\0"), what)


def write_length_prefixed(msg_id: MessageId, text: str) -> bytes:
    encoded = text.encode("utf-8")  # the length prefix is that of the encoded bytes
    return ID.pack(msg_id) + LENGTH.pack(len(encoded)) + encoded


def write_text(text: str) -> bytes:
    return write_length_prefixed(MessageId.TEXT, text)


# ID 4 CLOSE | 2 bytes id, nothing else
def write_close() -> bytes:
    return ID.pack(MessageId.CLOSE)


# ID 1008 ACQUISITION | 2 bytes id | 340 bytes AcquisitionHeader
#   | number_of_samples * trajectory_dimensions * 4 bytes float trajectory
#   | active_channels * number_of_samples * 8 bytes complex float data
def acquisition_payload_size(head: bytes) -> int:
    """Bytes of trajectory plus data that follow an acquisition header."""
    samples, _available, channels = _ACQ_SIZES.unpack_from(head, _ACQ_SIZES_AT)
    (traj_dims,) = _ACQ_TRAJ_DIMS.unpack_from(head, _ACQ_TRAJ_DIMS_AT)
    return samples * traj_dims * 4 + channels * samples * 8


def read_acquisition_head(src: MessageSource, limits: Limits) -> tuple[bytes, int]:
    """Return (header bytes, size of the trajectory+data that follow), the size checked against the limit."""
    head = src.read_exactly(ACQ_HEADER_SIZE)
    size = acquisition_payload_size(head)
    if size > limits.max_acquisition_bytes:
        samples, _available, channels = _ACQ_SIZES.unpack_from(head, _ACQ_SIZES_AT)
        raise ProtocolError(
            f"acquisition of {samples} samples x {channels} channels ({size} bytes with its trajectory) exceeds "
            f"the limit of {limits.max_acquisition_bytes} bytes"
        )
    return head, size


_ACQ_MEASUREMENT_UID = struct.Struct("<I")
_ACQ_MEASUREMENT_UID_AT = ismrmrd.hdf5.acquisition_header_dtype.fields["measurement_uid"][1]


def acquisition_measurement_uid(head: bytes) -> int:
    """The ``measurement_uid`` of a readout, from its header bytes."""
    return int(_ACQ_MEASUREMENT_UID.unpack_from(head, _ACQ_MEASUREMENT_UID_AT)[0])


def read_acquisition(src: MessageSource, limits: Limits) -> tuple[bytes, bytes]:
    """Return (header bytes, trajectory+data bytes) of one readout."""
    head, size = read_acquisition_head(src, limits)
    return head, src.read_exactly(size)


# ID 1026 WAVEFORM | 2 bytes id | 40 bytes WaveformHeader | channels * number_of_samples * 4 bytes uint32
def read_waveform_head(src: MessageSource, limits: Limits) -> tuple[bytes, int]:
    """Return (header bytes, size of the samples that follow), the size checked against the limit."""
    head = src.read_exactly(WAVEFORM_HEADER_SIZE)
    samples, channels = _WAV_SIZES.unpack_from(head, _WAV_SIZES_AT)
    size = samples * channels * 4
    if size > limits.max_acquisition_bytes:
        raise ProtocolError(f"waveform of {samples} samples x {channels} channels ({size} bytes) exceeds the "
                            f"limit of {limits.max_acquisition_bytes} bytes")
    return head, size


def read_waveform(src: MessageSource, limits: Limits) -> tuple[bytes, bytes]:
    head, size = read_waveform_head(src, limits)
    return head, src.read_exactly(size)


# ID 6 QUERY (Gadgetron's, not MRD) | 2 bytes id | uint64 reserved | uint64 correlation id
#   | uint64 length | length bytes UTF-8 query
def read_query(src: MessageSource, limits: Limits) -> str:
    """The query text of a Gadgetron QUERY (the gateway answers none; see :mod:`reconq.gateway.session`)."""
    _reserved, _correlation, length = _QUERY.unpack(src.read_exactly(_QUERY.size))
    if length > limits.max_text_bytes:
        raise ProtocolError(f"QUERY of {length} bytes exceeds the limit of {limits.max_text_bytes} bytes")
    return src.read_exactly(length).decode("utf-8", errors="replace")


def write_query(query: str, correlation_id: int = 0) -> bytes:
    encoded = query.encode("utf-8")
    return ID.pack(MessageId.QUERY) + _QUERY.pack(0, correlation_id, len(encoded)) + encoded


# ID 1022 IMAGE | 2 bytes id | 198 bytes ImageHeader | uint64 attribute length | attribute XML
#   | matrix_size[0] * matrix_size[1] * matrix_size[2] * channels * sizeof(data_type) bytes
def read_image(src: MessageSource, limits: Limits) -> ismrmrd.Image:
    head = src.read_exactly(IMAGE_HEADER_SIZE)
    (data_type,) = _IMG_DATA_TYPE.unpack_from(head, _IMG_DATA_TYPE_AT)
    if data_type not in _IMG_ITEM_SIZE:
        raise ProtocolError(f"image with unknown data_type {data_type}")
    (nx, ny, nz), (channels,) = _IMG_MATRIX.unpack_from(head, _IMG_MATRIX_AT), _IMG_CHANNELS.unpack_from(
        head, _IMG_CHANNELS_AT
    )
    size = nx * ny * nz * channels * _IMG_ITEM_SIZE[data_type]
    (attr_len,) = ATTRIBUTE_LENGTH.unpack(src.read_exactly(ATTRIBUTE_LENGTH.size))
    if size > limits.max_image_bytes or attr_len > limits.max_text_bytes:
        raise ProtocolError(f"image of {size} bytes with {attr_len} bytes of attributes exceeds the limits")
    attributes = src.read_exactly(attr_len)
    data = src.read_exactly(size)
    parts = iter((ATTRIBUTE_LENGTH.pack(attr_len), attributes, data))
    try:
        return ismrmrd.Image.deserialize_from_with_header(head, lambda _n: next(parts))
    except (ValueError, TypeError, StopIteration) as e:
        raise ProtocolError(f"IMAGE message is not a valid MRD image: {e}") from e


def write_image(image: ismrmrd.Image) -> bytes:
    chunks: list[bytes] = [ID.pack(MessageId.IMAGE)]
    image.serialize_into(lambda b: chunks.append(bytes(b)))
    return b"".join(chunks)


def write_acquisition(acq: ismrmrd.Acquisition) -> bytes:
    chunks: list[bytes] = [ID.pack(MessageId.ACQUISITION)]
    acq.serialize_into(lambda b: chunks.append(bytes(b)))
    return b"".join(chunks)


def write_waveform(wav: ismrmrd.Waveform) -> bytes:
    chunks: list[bytes] = [ID.pack(MessageId.WAVEFORM)]
    wav.serialize_into(lambda b: chunks.append(bytes(b)))
    return b"".join(chunks)


# --- the message-reader table ---------------------------------------------------------------------

#: Reads the body of one message (its id already read) and returns it parsed: a str for the
#: config, header and text messages, ``(header bytes, payload bytes)`` for readouts and waveforms,
#: an :class:`ismrmrd.Image` for images.
Reader = Callable[[MessageSource, Limits], Any]


def _read_config_text(src: MessageSource, limits: Limits) -> str:
    return read_length_prefixed(src, limits.max_header_bytes, "CONFIG_TEXT")


def _read_header(src: MessageSource, limits: Limits) -> str:
    return read_length_prefixed(src, limits.max_header_bytes, "HEADER")


def _read_text(src: MessageSource, limits: Limits) -> str:
    return read_length_prefixed(src, limits.max_text_bytes, "TEXT")


#: How the body of every known message is read, by id: the one table that acquisition scans, retrieval
#: scans and the fuzz tests use. (An acquisition scan reads readout and waveform payloads straight into
#: the raw-file writer instead, through :func:`read_acquisition_head` / :func:`read_waveform_head`.)
READERS: dict[MessageId, Reader] = {
    MessageId.CONFIG_FILE: lambda src, _limits: read_config_file(src),
    MessageId.CONFIG_TEXT: _read_config_text,
    MessageId.HEADER: _read_header,
    MessageId.TEXT: _read_text,
    MessageId.QUERY: read_query,
    MessageId.ACQUISITION: read_acquisition,
    MessageId.WAVEFORM: read_waveform,
    MessageId.IMAGE: read_image,
}


def describe(msg: int) -> str:
    """A message id as the scanner's log should show it."""
    try:
        return f"{MessageId(msg).name} (message id {msg})"
    except ValueError:
        return f"unknown message id {msg}"


def read_body(src: MessageSource, limits: Limits, msg: int) -> Any:
    """The body of message ``msg`` read by :data:`READERS`; :class:`ProtocolError` for an unknown id (its
    length is unknown, so the stream cannot be read past it)."""
    reader = READERS.get(msg)  # type: ignore[call-overload]
    if reader is None:
        raise ProtocolError(f"unexpected {describe(msg)}")
    return reader(src, limits)


#: A message body larger than this is received in growing pieces (each at most what came so far), so the
#: memory it takes follows the bytes that arrive, never the length a client declares.
FIRST_PIECE = 1 << 20


class SocketSource:
    """Reads exact byte counts from a socket through a small buffer of its own.

    :meth:`read_into` copies what is buffered and then receives the rest straight into the caller's
    buffer, so a readout's samples are copied once, from the kernel into the raw-file writer's batch.
    :meth:`read_exactly` allocates as the bytes arrive (:data:`FIRST_PIECE`, then pieces as large as what
    came), so a client that declares a large message and stalls costs what it sent, not what it declared.
    A socket time-out surfaces as :class:`TimeoutError`; a deadline (:meth:`set_deadline`) that passes
    as :class:`DeadlineExceeded`.
    """

    def __init__(self, sock: socket.socket, bufsize: int = 64 << 10) -> None:
        self._sock = sock
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self.bytes_read = 0
        self._deadline: float | None = None
        self._deadline_message = ""
        self._idle: float | None = None

    def set_deadline(self, at: float, message: str) -> None:
        """Receive nothing after ``at`` (``time.monotonic()``): :class:`DeadlineExceeded` with ``message``."""
        self._deadline, self._deadline_message, self._idle = at, message, self._sock.gettimeout()

    def clear_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline = None
            self._sock.settimeout(self._idle)

    def _recv(self, view: memoryview | bytearray, nbytes: int) -> int:
        if self._deadline is None:
            return self._sock.recv_into(view, nbytes)
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(self._deadline_message)
        self._sock.settimeout(left if self._idle is None else min(left, self._idle))
        try:
            return self._sock.recv_into(view, nbytes)
        except TimeoutError:
            if time.monotonic() >= self._deadline:
                raise DeadlineExceeded(self._deadline_message) from None
            raise

    def read_exactly(self, n: int) -> bytes:
        if n <= self._end - self._start:
            data = bytes(self._view[self._start:self._start + n])
            self._start += n
            self.bytes_read += n
            return data
        if n <= FIRST_PIECE:
            out = bytearray(n)
            self.read_into(memoryview(out))
            return bytes(out)
        pieces: list[bytearray] = []
        got = 0
        while got < n:
            piece = bytearray(min(n - got, max(FIRST_PIECE, got)))
            self._fill(memoryview(piece), got, n)
            pieces.append(piece)
            got += len(piece)
        return b"".join(pieces)

    def read_into(self, view: memoryview) -> None:
        self._fill(view, 0, len(view))

    def _fill(self, view: memoryview, before: int, total: int) -> None:
        """Fill ``view``, the part of a read of ``total`` bytes after its first ``before``."""
        n = len(view)
        take = min(n, self._end - self._start)
        view[:take] = self._view[self._start:self._start + take]
        self._start += take
        got = take
        while got < n:
            if n - got >= len(self._buf):  # large: straight into the caller's buffer
                received = self._recv(view[got:], n - got)
                if not received:
                    self._closed(got, before, total)
                got += received
                continue
            self._start, self._end = 0, self._recv(self._buf, len(self._buf))
            if not self._end:
                self._closed(got, before, total)
            take = min(n - got, self._end)
            view[got:got + take] = self._view[:take]
            self._start, got = take, got + take
        self.bytes_read += n

    def _closed(self, got: int, before: int, total: int) -> None:
        self.bytes_read += got
        raise StreamClosed(f"connection closed after {before + got} of {total} expected bytes")

    def close(self) -> None:
        self._view.release()


class BytesSource:
    """Messages from bytes in memory (tests, files); ends with :class:`StreamClosed` like a socket."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.bytes_read = 0

    def read_exactly(self, n: int) -> bytes:
        start = self.bytes_read
        got = min(n, len(self._data) - start)  # nothing allocated beyond the bytes there are
        self.bytes_read += got
        if got < n:
            raise StreamClosed(f"stream ended after {got} of {n} expected bytes")
        return bytes(self._data[start:start + n])

    def read_into(self, view: memoryview) -> None:
        n, start = len(view), self.bytes_read
        got = min(n, len(self._data) - start)
        view[:got] = self._data[start:start + got]
        self.bytes_read += got
        if got < n:
            raise StreamClosed(f"stream ended after {got} of {n} expected bytes")
