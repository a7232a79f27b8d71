"""Low-level reads of a raw MRD (ISMRMRD HDF5) file: the XML header, every readout's acquisition header
without its samples, and the samples of chosen readouts.

``/dataset/data`` is a compound of ``head`` (``acquisition_header_dtype``), ``traj`` and ``data``
(variable-length float32; ``data`` interleaves re/im, channel-major). Asking HDF5 for the ``head``
member alone still converts the variable-length members, which reads every sample: a 5 GB scan would
be read once to find its headers and again for its data. So the headers are read from the dataset's
storage directly: the fixed-size part of each row (the header and two 16-byte heap references) sits
in the chunks (or the contiguous block), and only those bytes are read. Filtered (compressed)
datasets fall back to HDF5's own read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import h5py
import ismrmrd.hdf5
import numpy as np

from .errors import TwixError

HEAD_DTYPE = ismrmrd.hdf5.acquisition_header_dtype
_CHUNK_BYTES = 64 << 20  # samples read per HDF5 call, at most
_GAP_ROWS = 8  # unneeded readouts read through rather than starting a new read
_MERGE_BYTES = 4096  # stored chunks closer than this (a page) are read with one system call


class MrdFile:
    """An open raw MRD file: ``xml`` (the header text), ``heads`` (every readout's header, in file
    order) and :meth:`readouts`. Close it, or use ``with``."""

    def __init__(self, path: str | os.PathLike[str], dataset: str = "dataset") -> None:
        self.path = os.fspath(path)
        self._file = h5py.File(self.path, "r")
        try:
            group = self._file[dataset]
            xml = group["xml"][0]
            self.xml: str = xml.decode() if isinstance(xml, bytes) else str(xml)
            self._data = group["data"]
            self.heads: np.ndarray = read_heads(self._data, self.path)
        except (KeyError, OSError, ValueError) as e:
            self.close()
            raise TwixError(
                f"{self.path} is not a raw MRD file with /{dataset}/xml and /{dataset}/data: {e}") from e

    def readouts(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """The samples, (active_channels, number_of_samples) complex64, of ``rows`` (ascending), read
        in a few large HDF5 reads of at most ``_CHUNK_BYTES``."""
        heads = self.heads
        for start, stop in _runs(rows, heads):
            block = self._data[start:stop]["data"]
            for r in rows[np.searchsorted(rows, start): np.searchsorted(rows, stop)]:
                shape = (heads["active_channels"][r], heads["number_of_samples"][r])
                yield block[r - start].view(np.complex64).reshape(shape)

    def close(self) -> None:
        self._file.close()


def read_heads(ds: h5py.Dataset, path: str) -> np.ndarray:
    """Every row's ``head`` of the acquisition dataset ``ds`` (in the file ``path``), without reading
    the samples where the storage allows."""
    raw = _raw_row_dtype(ds)
    layout = ds.id.get_create_plist().get_layout()
    if raw is None or len(ds) == 0:
        return ds.fields("head")[...] if len(ds) else np.zeros(0, HEAD_DTYPE)
    if layout == h5py.h5d.CONTIGUOUS:
        offset = ds.id.get_offset()
        if offset is None:
            return np.zeros(len(ds), raw["head"])
        with open(path, "rb") as f:
            buf = os.pread(f.fileno(), len(ds) * raw.itemsize, offset)
        if len(buf) < len(ds) * raw.itemsize:  # not on disk yet (a file still being written)
            return ds.fields("head")[...]
        return np.frombuffer(buf, raw)["head"].copy()
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    if layout != h5py.h5d.CHUNKED or filtered or not hasattr(ds.id, "chunk_iter"):
        return ds.fields("head")[...]
    return _read_chunked_heads(ds, path, raw)


def _raw_row_dtype(ds: h5py.Dataset) -> np.dtype | None:
    """The stored layout of one row with only ``head`` named, or ``None`` if it is not the usual one."""
    tid = ds.id.get_type()
    if not isinstance(tid, h5py.h5t.TypeCompoundID):
        return None
    for i in range(tid.get_nmembers()):
        if tid.get_member_name(i) == b"head":
            head = tid.get_member_type(i)
            if not isinstance(head, h5py.h5t.TypeCompoundID) or head.dtype.hasobject:
                return None
            return np.dtype({"names": ["head"], "formats": [head.dtype],
                             "offsets": [tid.get_member_offset(i)], "itemsize": tid.get_size()})
    return None


def _read_chunked_heads(ds: h5py.Dataset, path: str, raw: np.dtype) -> np.ndarray:
    chunk_rows = ds.chunks[0]
    stored: list = []
    ds.id.chunk_iter(stored.append)
    stored.sort(key=lambda s: s.byte_offset)
    heads = np.zeros(len(ds), raw["head"])
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
                return ds.fields("head")[...]
            for s in stored[i:j]:
                start = s.chunk_offset[0]
                n = min(chunk_rows, len(ds) - start)
                at = s.byte_offset - stored[i].byte_offset
                heads[start: start + n] = np.frombuffer(buf, raw, count=n, offset=at)["head"]
            i = j
    return heads


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
