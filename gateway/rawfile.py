"""Writes a raw MRD file (ismrmrd's HDF5 layout) while a scan streams in, in batches.

``/dataset/xml`` holds the header, ``/dataset/data`` the readouts (compound ``head``/``traj``/``data``
exactly as ``ismrmrd.Dataset`` reads them), ``/dataset/waveforms`` the waveforms, and
``/dataset/image_<series>`` any images the client sent. Readouts are buffered as the bytes that came
off the wire and written as one HDF5 write per batch (``write_batch_bytes``), not one append per
readout, which is what limits the field's common Python server to tens of MB/s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.hdf5
import numpy as np

from reconq.storage import fsync_path

log = logging.getLogger(__name__)

_ACQ_HEAD = ismrmrd.hdf5.acquisition_header_dtype
_WAV_HEAD = ismrmrd.hdf5.waveform_header_dtype
_CHUNK_ROWS = 1024


class _Batch:
    """Readouts (or waveforms) received but not yet written: header bytes and payload bytes."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.payloads: list[bytes] = []
        self.nbytes = 0

    def add(self, head: bytes, payload: bytes) -> None:
        self.heads.append(head)
        self.payloads.append(payload)
        self.nbytes += len(head) + len(payload)

    def clear(self) -> None:
        self.heads.clear()
        self.payloads.clear()
        self.nbytes = 0


class RawFileWriter:
    """One raw MRD file being written; :meth:`finish` makes it durable, :meth:`abort` keeps what came."""

    def __init__(self, path: Path, batch_bytes: int = 8 << 20) -> None:
        self.path = Path(path)
        self.batch_bytes = batch_bytes
        self._file = h5py.File(self.path, "w", libver="v110")
        self._group = self._file.create_group("dataset")
        self._acqs = _Batch()
        self._wavs = _Batch()
        self.acquisitions = 0
        self.waveforms = 0
        self.images = 0

    def write_header(self, xml: str) -> None:
        dset = self._group.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        dset[0] = xml.encode("utf-8")

    def write_config(self, config_file: str | None, config_text: str | None) -> None:
        """The session's CONFIG_FILE name and CONFIG_TEXT, where the MRD format keeps them."""
        for name, value in (("config_file", config_file), ("config", config_text)):
            if value is not None:
                self._group.create_dataset(name, data=np.bytes_(value.encode()))

    def add_acquisition(self, head: bytes, payload: bytes) -> None:
        self._acqs.add(head, payload)
        if self._acqs.nbytes >= self.batch_bytes:
            self._flush_acquisitions()

    def add_waveform(self, head: bytes, payload: bytes) -> None:
        self._wavs.add(head, payload)
        if self._wavs.nbytes >= self.batch_bytes:
            self._flush_waveforms()

    def add_image(self, image: ismrmrd.Image) -> None:
        """Images from the client are rare; stored as ismrmrd does, under ``image_<series>``."""
        path = f"image_{image.image_series_index}"
        group = self._group.require_group(path)
        head = np.frombuffer(image.getHead(), dtype=ismrmrd.hdf5.image_header_dtype)
        data = image.data.view(ismrmrd.hdf5.get_hdf5type(image.data_type))
        if "header" not in group:
            group.create_dataset("header", (0,), maxshape=(None,), dtype=ismrmrd.hdf5.image_header_dtype)
            group.create_dataset("attributes", (0,), maxshape=(None,), dtype=h5py.special_dtype(vlen=str))
            group.create_dataset("data", (0, *data.shape), maxshape=(None, *data.shape), dtype=data.dtype)
        n = group["header"].shape[0]
        for name, value in (("header", head[0]), ("attributes", image.attribute_string), ("data", data)):
            group[name].resize(n + 1, axis=0)
            group[name][n] = value
        self.images += 1

    def flush(self) -> None:
        self._flush_acquisitions()
        self._flush_waveforms()
        self._file.flush()

    def finish(self) -> None:
        """Write what is buffered, close, and fsync the file and its folder."""
        self.flush()
        self._file.close()
        fsync_path(self.path)
        fsync_path(self.path.parent)

    def abort(self) -> None:
        """Keep what was received (for inspection), close; no error escapes."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - the file is being abandoned; keep going
            log.exception("could not flush %s while aborting", self.path)
        finally:
            self._file.close()

    def _dataset(self, name: str, dtype: np.dtype) -> h5py.Dataset:
        if name not in self._group:
            return self._group.create_dataset(name, (0,), maxshape=(None,), dtype=dtype, chunks=(_CHUNK_ROWS,))
        return self._group[name]

    def _flush_acquisitions(self) -> None:
        batch = self._acqs
        if not batch.heads:
            return
        n = len(batch.heads)
        rows = np.empty(n, dtype=ismrmrd.hdf5.acquisition_dtype)
        heads = np.frombuffer(b"".join(batch.heads), dtype=_ACQ_HEAD)
        rows["head"] = heads
        traj_floats = heads["number_of_samples"].astype(np.int64) * heads["trajectory_dimensions"]
        traj_col, data_col = rows["traj"], rows["data"]
        for i, payload in enumerate(batch.payloads):
            floats = np.frombuffer(payload, dtype=np.float32)
            t = int(traj_floats[i])
            traj_col[i] = floats[:t]
            data_col[i] = floats[t:]
        self._append("data", ismrmrd.hdf5.acquisition_dtype, rows)
        self.acquisitions += n
        batch.clear()

    def _flush_waveforms(self) -> None:
        batch = self._wavs
        if not batch.heads:
            return
        n = len(batch.heads)
        rows = np.empty(n, dtype=ismrmrd.hdf5.waveform_dtype)
        rows["head"] = np.frombuffer(b"".join(batch.heads), dtype=_WAV_HEAD)
        data_col = rows["data"]
        for i, payload in enumerate(batch.payloads):
            data_col[i] = np.frombuffer(payload, dtype=np.uint32)
        self._append("waveforms", ismrmrd.hdf5.waveform_dtype, rows)
        self.waveforms += n
        batch.clear()

    def _append(self, name: str, dtype: np.dtype, rows: np.ndarray) -> None:
        dset = self._dataset(name, dtype)
        start = dset.shape[0]
        dset.resize(start + len(rows), axis=0)
        dset[start:] = rows
