"""Read-only access to raw MRD (ISMRMRD) HDF5 files.

Layout (as written by ``ismrmrd.Dataset``): ``/dataset/xml`` (one variable-length string, the
header), ``/dataset/data`` (compound: ``head`` an acquisition header, ``traj`` vlen float32 of
``(ns, tdim)``, ``data`` vlen float32 of interleaved re/im, channel-major ``(nch, ns)``) and an
optional ``/dataset/waveforms``.

References:
    Inati SJ et al. ISMRM Raw data format: a proposed standard for MRI raw datasets.
    Magn Reson Med 2017;77:411-421.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np

from reconq.recon.errors import ReconError

logger = logging.getLogger(__name__)

HEAD_DTYPE = ismrmrd.hdf5.acquisition_header_dtype


class RawScan:
    """Read-only view of a raw MRD HDF5 file (/dataset/xml, /dataset/data, optional /dataset/waveforms).

    Attributes:
        path: the file.
        xml: the header XML text.
        header: the parsed header.
        heads: ``(n,)`` acquisition headers (``ismrmrd.hdf5.acquisition_header_dtype``), read once.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Path, file: h5py.File, xml: str, header: ismrmrd.xsd.ismrmrdHeader):
        self.path = path
        self._file = file
        self.xml = xml
        self.header = header
        self._data = file["dataset"].get("data")
        self.heads = _read_heads(self._data)

    @classmethod
    def open(cls, path: str | os.PathLike) -> RawScan:
        """Open ``path`` read-only and parse its header; raises ReconError if it is not raw MRD."""
        path = Path(path)
        try:
            file = h5py.File(path, "r")
        except OSError as e:
            raise ReconError(f"cannot open raw file {path}: {e}") from e
        try:
            xml = _read_xml(file, path)
            header = _parse_header(xml, path)
            scan = cls(path, file, xml, header)
        except BaseException:
            file.close()
            raise
        logger.debug("opened %s: %d acquisitions", path, len(scan))
        return scan

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def __enter__(self) -> RawScan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.heads)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Read acquisitions ``start:stop`` in one HDF5 read.

        Returns:
            heads: ``(m,)`` acquisition headers;
            data: ``m`` arrays ``(nch, ns)`` complex64;
            traj: ``m`` arrays ``(ns, tdim)`` float32.
        """
        start, stop = max(start, 0), min(stop, len(self))
        if stop <= start:
            return self.heads[0:0], [], []
        rows = self._data[start:stop]
        heads = self.heads[start:stop]
        data = [_unpack_data(r, h) for r, h in zip(rows["data"], heads, strict=True)]
        traj = [_unpack_traj(r, h) for r, h in zip(rows["traj"], heads, strict=True)]
        return heads, data, traj

    def iter_chunks(self, chunk: int = 2048) -> Iterator[tuple[int, np.ndarray, list[np.ndarray]]]:
        """Yield ``(start, heads, data)`` for consecutive chunks of ``chunk`` acquisitions."""
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        for start in range(0, len(self), chunk):
            heads, data, _ = self.read(start, start + chunk)
            yield start, heads, data


def _read_xml(file: h5py.File, path: Path) -> str:
    if "dataset" not in file or "xml" not in file["dataset"]:
        raise ReconError(f"{path} has no /dataset/xml header")
    xml = file["dataset"]["xml"][0]
    return xml.decode("utf-8") if isinstance(xml, bytes) else str(xml)


def _parse_header(xml: str, path: Path) -> ismrmrd.xsd.ismrmrdHeader:
    try:
        return ismrmrd.xsd.CreateFromDocument(xml)
    except Exception as e:  # xsdata raises several parser exception types
        raise ReconError(f"{path}: invalid MRD header: {e}") from e


def _read_heads(data: h5py.Dataset | None) -> np.ndarray:
    if data is None:
        return np.zeros(0, dtype=HEAD_DTYPE)
    heads = data.fields("head")[:]
    return heads if heads.dtype == HEAD_DTYPE else heads.astype(HEAD_DTYPE)


def _unpack_data(flat: np.ndarray, head: np.void) -> np.ndarray:
    shape = (int(head["active_channels"]), int(head["number_of_samples"]))
    return np.ascontiguousarray(flat, dtype=np.float32).view(np.complex64).reshape(shape)


def _unpack_traj(flat: np.ndarray, head: np.void) -> np.ndarray:
    shape = (int(head["number_of_samples"]), int(head["trajectory_dimensions"]))
    return np.asarray(flat, dtype=np.float32).reshape(shape)
