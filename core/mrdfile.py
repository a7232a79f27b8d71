"""Reads of a raw MRD (ISMRMRD HDF5) file: the XML header alone (:func:`read_header`), every readout's
acquisition header without its samples, and the samples (or trajectory) of chosen readouts, read
straight into the caller's array (:class:`MrdFile`). The one raw-file reader of ReconQ: the recon's
``RawScan``, the twix-like view of ``parametermaps`` and the scheduler's estimates all read through it.

Layout (as ``ismrmrd.Dataset`` writes it): ``/dataset/xml`` (one variable-length string, the header),
``/dataset/data`` (absent while a scan has no readouts) and an optional ``/dataset/waveforms``.
``/dataset/data`` is a compound of ``head`` (``acquisition_header_dtype``), ``traj`` and ``data``
(variable-length float32; ``data`` interleaves re/im, channel-major; ``traj`` is samples × dimensions).

:func:`read_header` opens the file and reads ``/dataset/xml`` only: a scheduler that wants the matrix
and the channels of a scan need not touch its readouts.

Asking HDF5 for the ``head`` member alone still converts the variable-length members, which reads
every sample: a 5 GB scan would be read once to find its headers and again for its data. So the rows
are read from the dataset's storage directly: the fixed-size part of each row (the header and two
16-byte heap references) sits in the chunks (or the contiguous block), and only those bytes are read.

A heap reference on disk is the sequence length (uint32), the address of a global heap collection
(uint64) and the object's index in it (uint32). A collection (``GCOL``, version, collection size) holds
objects (index uint16, reference count uint16, 4 reserved bytes, size uint64, the data padded to 8
bytes). The samples of a readout are one object's data, so they are read with one ``preadv`` into the
destination array; finding the object reads 16-byte object headers (or, for a small collection, the
whole collection, at most ``_SMALL_COLLECTION`` bytes), and a few located collections are remembered.
Nothing is read into a buffer larger than one readout.

Filtered (compressed) datasets, files with other address sizes and rows whose references do not
resolve (a file still being written) fall back to HDF5's own read, in blocks of at most
``_CHUNK_BYTES`` of samples.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import h5py
import ismrmrd.hdf5
import ismrmrd.xsd
import numpy as np

log = logging.getLogger(__name__)

HEAD_DTYPE = ismrmrd.hdf5.acquisition_header_dtype
#: A variable-length reference as stored: length, global heap collection address, object index.
REF_DTYPE = np.dtype([("length", "<u4"), ("collection", "<u8"), ("index", "<u4")])
_CHUNK_BYTES = 4 << 20  # samples read per HDF5 call, at most (the fallback read)
_GAP_ROWS = 8  # unneeded readouts read through rather than starting a new read (the fallback read)
_MERGE_BYTES = 4096  # stored chunks closer than this (a page) are read with one system call
_SMALL_COLLECTION = 64 << 10  # heap collections up to this size are read whole to find their objects
_COLLECTIONS_KEPT = 64  # located heap collections remembered
_MEMBERS = {"data": (np.complex64, 2), "traj": (np.float32, 1)}  # dtype, float32 per element
#: A leading XML declaration (``<?xml version="1.0" encoding="..."?>``), with a byte-order mark before it.
_DECLARATION = re.compile(r"\A\ufeff?\s*<\?xml\b[^>]*\?>")

#: ``dest(i, shape)``: the array the ``i``-th readout, of ``shape``, is to be read into, or ``None``.
Dest = Callable[[int, tuple[int, int]], "np.ndarray | None"]


class MrdFileError(ValueError):
    """A file that is not a raw MRD file, or whose header cannot be parsed (the message names the file)."""


def read_xml(path: str | os.PathLike[str], dataset: str = "dataset") -> str:
    """The header XML of the raw MRD file ``path``: ``/dataset/xml`` alone is read.

    Raises OSError where the file cannot be opened and :class:`MrdFileError` where it has no header."""
    with h5py.File(os.fspath(path), "r") as file:
        return _xml(file, os.fspath(path), dataset)


def read_header(path: str | os.PathLike[str], dataset: str = "dataset") -> ismrmrd.xsd.ismrmrdHeader:
    """The parsed MRD header of the raw MRD file ``path``, read from ``/dataset/xml`` alone (no readout
    is touched: a few milliseconds whatever the file's size). Raises as :func:`read_xml`, and
    :class:`MrdFileError` where the XML cannot be parsed."""
    return parse_header(read_xml(path, dataset), os.fspath(path))


def parse_header(xml: str, source: str) -> ismrmrd.xsd.ismrmrdHeader:
    """``xml`` parsed as an MRD header; :class:`MrdFileError` naming ``source`` where it cannot be.

    ``xml`` is text, already decoded, so the encoding its XML declaration names no longer applies and the
    declaration is dropped: ``ismrmrd.xsd.ToXML`` declares ``encoding="ascii"`` by default whatever the
    header holds, and the parser would refuse such a header's first non-ASCII character (a patient
    ``Müller``)."""
    caught: list[warnings.WarningMessage] = []
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return ismrmrd.xsd.CreateFromDocument(_DECLARATION.sub("", xml, count=1))
    except Exception as e:  # the XML parser's errors have no common base worth naming
        raise MrdFileError(f"{source}: the MRD header XML cannot be parsed: {e}") from e
    finally:  # the lock released and the process's warnings filters back
        for w in caught:
            if _from_parser(w):
                _log_quietly(w, source)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


# xsdata's ConverterWarning quotes the value it could not convert (a patient's birth date), which must not
# reach any log: the parser's warnings are logged by category and field only. catch_warnings changes
# process-wide state, hence the lock.
_WARNED_FIELD = re.compile(r"\A\s*Failed to convert value for `([A-Za-z0-9_.]{1,200})`")
_WARNED_TYPE = re.compile(r"is not a valid `([A-Za-z0-9_.]{1,100})`\s*\Z")
_WARNINGS_LOCK = threading.Lock()


def _from_parser(w: warnings.WarningMessage) -> bool:
    return "xsdata" in w.filename or w.category.__module__.startswith("xsdata")


def _log_quietly(w: warnings.WarningMessage, what: str) -> None:
    message = str(w.message)
    field, kind = _WARNED_FIELD.search(message), _WARNED_TYPE.search(message)
    log.warning("%s: the header parser warns (%s)%s%s; the value is not logged", what, w.category.__name__,
                f" about {field.group(1)}" if field else "", f": not a valid {kind.group(1)}" if kind else "")


def _xml(file: h5py.File, path: str, dataset: str) -> str:
    try:
        xml = file[dataset]["xml"][0]
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise MrdFileError(f"{path} is not a raw MRD file: it has no /{dataset}/xml header ({e})") from e
    if not isinstance(xml, bytes):
        return str(xml)
    try:
        return xml.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MrdFileError(f"{path}: the /{dataset}/xml header is not UTF-8 (byte {xml[e.start]:#04x} at offset "
                           f"{e.start})") from e


class MrdFile:
    """An open raw MRD file: ``xml`` (the header text), :attr:`header` (parsed when first asked for),
    ``heads`` (every readout's header, in file order: ``(n,)`` of ``HEAD_DTYPE``, read once without the
    samples), :meth:`readouts` and :meth:`read`. A file without ``/dataset/data`` has no readouts.
    Close it, or use ``with``.

    Raises OSError where the file cannot be opened, :class:`MrdFileError` where it is not raw MRD."""

    def __init__(self, path: str | os.PathLike[str], dataset: str = "dataset") -> None:
        self.path = os.fspath(path)
        self._file = h5py.File(self.path, "r")
        self._fd = -1
        self._header: ismrmrd.xsd.ismrmrdHeader | None = None
        try:
            self.xml: str = _xml(self._file, self.path, dataset)
            self._data: h5py.Dataset | None = self._file[dataset].get("data")
            if self._data is None:
                self.heads, self._refs = np.zeros(0, HEAD_DTYPE), None
            else:
                self.heads, self._refs = read_rows(self._data, self.path)
            if self._refs is not None:
                self._fd = os.open(self.path, os.O_RDONLY)
        except MrdFileError:
            self.close()
            raise
        except (KeyError, OSError, ValueError, TypeError) as e:
            self.close()
            raise MrdFileError(f"{self.path} is not a raw MRD file with /{dataset}/xml and /{dataset}/data: "
                               f"{e}") from e
        self._heap = _Heap(self._fd)

    @property
    def header(self) -> ismrmrd.xsd.ismrmrdHeader:
        """The parsed header (parsed once); :class:`MrdFileError` where the XML cannot be parsed."""
        if self._header is None:
            self._header = parse_header(self.xml, self.path)
        return self._header

    @property
    def closed(self) -> bool:
        return not self._file  # an h5py File is falsy once closed

    def __len__(self) -> int:
        return len(self.heads)

    def __enter__(self) -> MrdFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shape(self, row: int, member: str = "data") -> tuple[int, int]:
        """The array shape of ``member`` of readout ``row``: ``data`` (active_channels,
        number_of_samples), ``traj`` (number_of_samples, trajectory_dimensions)."""
        h = self.heads[row]
        if member == "data":
            return int(h["active_channels"]), int(h["number_of_samples"])
        return int(h["number_of_samples"]), int(h["trajectory_dimensions"])

    def readouts(self, rows: np.ndarray, member: str = "data") -> Iterator[np.ndarray]:
        """The samples, (active_channels, number_of_samples) complex64, of ``rows`` (ascending); with
        ``member="traj"`` the trajectories, (number_of_samples, trajectory_dimensions) float32."""
        for got in self.read(rows, member):
            assert got is not None
            yield got

    def read(self, rows: np.ndarray, member: str = "data", dest: Dest | None = None
             ) -> Iterator[np.ndarray | None]:
        """``member`` of each of ``rows`` (ascending): ``None`` where it was read into ``dest(i, shape)``
        (a C-contiguous array of that shape and of the member's dtype), else a new array."""
        if member not in _MEMBERS:
            raise MrdFileError(f"{member!r} is not one of {sorted(_MEMBERS)}")
        dtype = _MEMBERS[member][0]
        if self._refs is None:
            yield from self._read_hdf5(rows, member, dest)
            return
        refs = self._refs[member]
        for i, r in enumerate(map(int, rows)):
            shape = self.shape(r, member)
            target = dest(i, shape) if dest is not None else None
            out = target if target is not None else np.empty(shape, dtype)
            if not self._heap.read_into(refs[r], out):
                out[...] = next(self._read_hdf5(np.array([r]), member, None))
            yield None if target is not None else out

    def _read_hdf5(self, rows: np.ndarray, member: str, dest: Dest | None) -> Iterator[np.ndarray | None]:
        """HDF5's own read of ``member`` of ``rows``, in blocks of at most ``_CHUNK_BYTES``."""
        dtype = _MEMBERS[member][0]
        i = 0
        for start, stop in _runs(rows, self.heads):
            assert self._data is not None  # a file without /dataset/data has no rows to read
            block = self._data[start:stop][member]
            for r in rows[np.searchsorted(rows, start): np.searchsorted(rows, stop)]:
                shape = self.shape(int(r), member)
                got = block[r - start].view(dtype).reshape(shape)
                target = dest(i, shape) if dest is not None else None
                if target is not None:
                    target[...] = got
                yield None if target is not None else got.copy()
                i += 1
            del block

    def close(self) -> None:
        """Release the file (closing twice is harmless)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._file.close()


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Read into ``buf`` (contiguous uint8) from ``offset`` of ``fd``; the byte count read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf.data], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.readv(fd, [buf.data])


class _Heap:
    """Reads global heap objects of one file by their references, remembering where the objects of
    the last ``_COLLECTIONS_KEPT`` collections lie."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._found: dict[int, dict[int, tuple[int, int]]] = {}  # collection → index → (offset, size)
        self._walk: dict[int, tuple[int, int]] = {}  # collection → (next object header, end)

    def read_into(self, ref: np.void, out: np.ndarray) -> bool:
        """Read the object of ``ref`` into ``out`` (C-contiguous); False where it cannot be."""
        nbytes = out.nbytes
        if int(ref["length"]) * 4 != nbytes:
            return nbytes == 0 and int(ref["length"]) == 0
        if nbytes == 0:
            return True
        where = self._locate(int(ref["collection"]), int(ref["index"]))
        if where is None or where[1] < nbytes:
            return False
        view = out.reshape(-1).view(np.uint8)
        done = 0
        while done < nbytes:  # a regular file reads whole, except at its end
            n = _pread_into(self._fd, view[done:], where[0] + done)
            if n <= 0:
                return False
            done += n
        return True

    def _locate(self, collection: int, index: int) -> tuple[int, int] | None:
        found = self._found.get(collection)
        if found is None:
            head = os.pread(self._fd, 16, collection)
            if len(head) < 16 or head[:4] != b"GCOL" or head[4] != 1:
                return None
            size = struct.unpack_from("<Q", head, 8)[0]
            if len(self._found) >= _COLLECTIONS_KEPT:
                oldest = next(iter(self._found))
                del self._found[oldest]
                self._walk.pop(oldest, None)
            found = self._found[collection] = {}
            if size <= _SMALL_COLLECTION:
                self._parse(collection, os.pread(self._fd, size, collection), found)
                return found.get(index)
            self._walk[collection] = (collection + 16, collection + size)
        if index in found or collection not in self._walk:
            return found.get(index)
        pos, end = self._walk[collection]
        while pos + 16 <= end:  # one 16-byte object header at a time: the objects are large
            obj = os.pread(self._fd, 16, pos)
            if len(obj) < 16:
                break
            k, size = struct.unpack_from("<H", obj)[0], struct.unpack_from("<Q", obj, 8)[0]
            if k == 0:  # free space: the last object
                break
            found[k] = (pos + 16, size)
            pos += 16 + (size + 7) // 8 * 8
            if k == index:
                self._walk[collection] = (pos, end)
                return found[k]
        del self._walk[collection]
        return found.get(index)

    @staticmethod
    def _parse(collection: int, buf: bytes, found: dict[int, tuple[int, int]]) -> None:
        pos = 16
        while pos + 16 <= len(buf):
            k, size = struct.unpack_from("<H", buf, pos)[0], struct.unpack_from("<Q", buf, pos + 8)[0]
            if k == 0:
                break
            found[k] = (collection + pos + 16, size)
            pos += 16 + (size + 7) // 8 * 8


def read_heads(ds: h5py.Dataset, path: str) -> np.ndarray:
    """Every row's ``head`` of the acquisition dataset ``ds`` (in the file ``path``), without reading
    the samples where the storage allows."""
    return read_rows(ds, path)[0]


def read_rows(ds: h5py.Dataset, path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Every row's ``head``, and its ``traj`` and ``data`` references (``REF_DTYPE``) where they can be
    read from storage (else ``None``), of the acquisition dataset ``ds`` in the file ``path``."""
    raw = _raw_row_dtype(ds)
    layout = ds.id.get_create_plist().get_layout()
    if raw is None or len(ds) == 0:
        return (ds.fields("head")[...] if len(ds) else np.zeros(0, HEAD_DTYPE)), None
    has_refs = "data" in (raw.names or ()) and _heap_refs_readable(ds)
    if layout == h5py.h5d.CONTIGUOUS:
        offset = ds.id.get_offset()
        if offset is None:
            return np.zeros(len(ds), raw["head"]), None
        with open(path, "rb") as f:
            buf = os.pread(f.fileno(), len(ds) * raw.itemsize, offset)
        if len(buf) < len(ds) * raw.itemsize:  # not on disk yet (a file still being written)
            return ds.fields("head")[...], None
        return _split(np.frombuffer(buf, raw), has_refs)
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    if layout != h5py.h5d.CHUNKED or filtered or not hasattr(ds.id, "chunk_iter"):
        return ds.fields("head")[...], None
    return _read_chunked_rows(ds, path, raw, has_refs)


def _split(rows: np.ndarray, has_refs: bool) -> tuple[np.ndarray, np.ndarray | None]:
    heads = rows["head"].copy()
    if not has_refs:
        return heads, None
    refs = np.empty(len(rows), [("traj", REF_DTYPE), ("data", REF_DTYPE)])
    refs["traj"], refs["data"] = rows["traj"], rows["data"]
    return heads, refs


def _heap_refs_readable(ds: h5py.Dataset) -> bool:
    """Whether the references can be followed by hand: 8-byte addresses and lengths (the default)."""
    try:
        return tuple(ds.file.id.get_create_plist().get_sizes()) == (8, 8)
    except Exception:  # an HDF5 build without the call: leave it to HDF5
        return False


def _raw_row_dtype(ds: h5py.Dataset) -> np.dtype | None:
    """The stored layout of one row with ``head`` (and ``traj``, ``data`` as ``REF_DTYPE``, where they
    are variable-length little-endian float32) named, or ``None`` if it is not the usual one."""
    tid = ds.id.get_type()
    if not isinstance(tid, h5py.h5t.TypeCompoundID):
        return None
    members: dict[str, tuple[np.dtype, int]] = {}
    for i in range(tid.get_nmembers()):
        name, mtype = tid.get_member_name(i).decode(), tid.get_member_type(i)
        if name == "head":
            if not isinstance(mtype, h5py.h5t.TypeCompoundID) or mtype.dtype.hasobject:
                return None
            members["head"] = (mtype.dtype, tid.get_member_offset(i))
        elif (name in ("traj", "data") and isinstance(mtype, h5py.h5t.TypeVlenID) and mtype.get_size() == 16
              and mtype.get_super().dtype == np.dtype("<f4")):
            members[name] = (REF_DTYPE, tid.get_member_offset(i))
    if "head" not in members:
        return None
    if not {"traj", "data"} <= members.keys():
        members = {"head": members["head"]}
    return np.dtype({"names": list(members), "formats": [m[0] for m in members.values()],
                     "offsets": [m[1] for m in members.values()], "itemsize": tid.get_size()})


def _read_chunked_rows(ds: h5py.Dataset, path: str, raw: np.dtype, has_refs: bool
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    chunk_rows = ds.chunks[0]
    stored: list = []
    ds.id.chunk_iter(stored.append)
    stored.sort(key=lambda s: s.byte_offset)
    fields: dict[str, Any] = dict(raw.fields or {})
    packed = np.zeros(len(ds), [(n, fields[n][0]) for n in fields])
    with open(path, "rb") as f:
        i = 0
        while i < len(stored):  # one read per run of neighbouring chunks
            j = i + 1
            end = stored[i].byte_offset + stored[i].size
            while j < len(stored) and stored[j].byte_offset - end < _MERGE_BYTES and (
                    stored[j].byte_offset + stored[j].size - stored[i].byte_offset) < _CHUNK_BYTES:
                end = stored[j].byte_offset + stored[j].size
                j += 1
            buf = os.pread(f.fileno(), end - stored[i].byte_offset, stored[i].byte_offset)
            if len(buf) < end - stored[i].byte_offset:  # not on disk yet (a file still being written)
                return ds.fields("head")[...], None
            for s in stored[i:j]:
                start = s.chunk_offset[0]
                n = min(chunk_rows, len(ds) - start)
                at = s.byte_offset - stored[i].byte_offset
                packed[start: start + n] = np.frombuffer(buf, raw, count=n, offset=at)
            i = j
    return _split(packed, has_refs)


def _runs(rows: np.ndarray, heads: np.ndarray) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` row ranges covering ``rows`` (ascending): gaps of a few rows are read
    through, and no range holds much more than ``_CHUNK_BYTES`` of samples."""
    if not len(rows):
        return
    nbytes = heads["number_of_samples"].astype(np.int64) * heads["active_channels"] * 8
    start = prev = int(rows[0])
    size = 0
    for r in map(int, rows):
        if r - prev > _GAP_ROWS or size >= _CHUNK_BYTES:
            yield start, prev + 1
            start, size = r, 0
        size += int(nbytes[r])
        prev = r
    yield start, prev + 1
