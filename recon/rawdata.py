"""The raw scan a pipeline reconstructs: a read-only view of a raw MRD (ISMRMRD) HDF5 file.

Built on the one raw-file reader, :class:`reconq.core.mrdfile.MrdFile`: the header, every readout's
acquisition header (read once, without the samples), and consecutive readouts in chunks, each readout
with its samples and, where it has one (``trajectory_dimensions > 0``), its trajectory, for
non-Cartesian pipelines.

References:
    Inati SJ et al. ISMRM Raw data format: a proposed standard for MRI raw datasets.
    Magn Reson Med 2017;77:411-421.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import ismrmrd.xsd
import numpy as np

from reconq.core.mrdfile import MrdFile, MrdFileError
from reconq.recon.errors import ReconError

logger = logging.getLogger(__name__)


class Readouts(NamedTuple):
    """Consecutive readouts ``start : start + len(heads)`` of a scan.

    Attributes:
        start: the index of the first readout in the file.
        heads: ``(m,)`` acquisition headers (``ismrmrd.hdf5.acquisition_header_dtype``).
        data: ``m`` arrays ``(nch, ns)`` complex64: channels x samples.
        traj: ``m`` entries: ``(ns, tdim)`` float32 (k-space coordinates per sample, in the units the
            sequence wrote them) for a readout with ``trajectory_dimensions`` tdim > 0, else ``None``.
    """

    start: int
    heads: np.ndarray
    data: list[np.ndarray]
    traj: list[np.ndarray | None]


class RawScan:
    """Read-only view of a raw MRD HDF5 file (/dataset/xml, /dataset/data, optional /dataset/waveforms).

    Attributes:
        path: the file.
        xml: the header XML text.
        header: the parsed header.
        heads: ``(n,)`` acquisition headers (``ismrmrd.hdf5.acquisition_header_dtype``), read once.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Path, file: MrdFile, header: ismrmrd.xsd.ismrmrdHeader) -> None:
        self.path = path
        self._file = file
        self.xml = file.xml
        self.header = header
        self.heads = file.heads

    @classmethod
    def open(cls, path: str | os.PathLike) -> RawScan:
        """Open ``path`` read-only and parse its header; raises ReconError if it is not raw MRD."""
        path = Path(path)
        try:
            file = MrdFile(path)
        except (OSError, MrdFileError) as e:
            raise ReconError(f"cannot open raw file {path}: {e}") from e
        try:
            scan = cls(path, file, file.header)
        except MrdFileError as e:
            file.close()
            raise ReconError(f"{path}: invalid MRD header: {e}") from e
        logger.debug("opened %s: %d acquisitions", path, len(scan))
        return scan

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> RawScan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.heads)

    def read(self, start: int, stop: int) -> Readouts:
        """Readouts ``start:stop`` (clipped to the scan), with their samples and trajectories."""
        start, stop = max(start, 0), min(stop, len(self))
        rows = np.arange(start, max(stop, start))
        heads = self.heads[rows]
        data = list(self._file.readouts(rows))
        traj: list[np.ndarray | None] = [None] * len(rows)
        has_traj = np.flatnonzero(heads["trajectory_dimensions"] > 0)
        for i, t in zip(has_traj, self._file.readouts(rows[has_traj], "traj"), strict=True):
            traj[i] = t
        return Readouts(start, heads, data, traj)

    def iter_chunks(self, chunk: int = 2048) -> Iterator[Readouts]:
        """Consecutive chunks of at most ``chunk`` readouts, covering the scan once, in file order."""
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        for start in range(0, len(self), chunk):
            yield self.read(start, start + chunk)
