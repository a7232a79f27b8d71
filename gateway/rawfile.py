"""Writes a raw MRD file (ismrmrd's HDF5 layout) while a scan streams in, on a writer thread of its own.

``/dataset/xml`` holds the header, ``/dataset/data`` the readouts (compound ``head``/``traj``/``data``
exactly as ``ismrmrd.Dataset`` reads them), ``/dataset/waveforms`` the waveforms, and
``/dataset/image_<series>`` any images the client sent.

How it keeps up with the wire:

- the session receives each readout's samples straight into a batch buffer (:meth:`RawFileWriter.
  add_acquisition_into`), no Python object per readout. Buffers are anonymous memory maps of
  ``batch_bytes``: only the pages a session fills become resident, so a 1 MB scan costs about 1 MB
  whatever the batch size, and the memory goes back to the system when the scan ends;
- a full batch (``batch_bytes``) goes to the writer thread, which turns it into one HDF5 write of
  views on that buffer, while the session fills the next one (h5py releases the GIL while HDF5
  writes). A few batches at most are in flight, so memory stays flat in scan size and a slow disk
  slows the client down through TCP, never the gateway's memory;
- a writer with nothing to do for ``_PULL_S`` takes the batch being filled as it is (between two
  readouts), so what a slow scanner sent is on disk within a fraction of a second and the client's
  CLOSE finds little left to write: the ack then costs a close and an fsync, also when many scans end
  at once (HDF5 serialises every call of the process, so the writes of many scans left to the end
  would queue up behind each other);
- batches are followed by an HDF5 flush (no fsync; small ones every ``_FLUSH_BYTES`` or ``_FLUSH_S``,
  and when the stream pauses): the samples (which HDF5 keeps in its metadata cache as heap
  collections) reach the page cache at once, and a gateway killed mid-scan leaves the file as it was
  at the last flush. A new dataset is flushed on its own before its first rows, so that a kill never
  leaves a group naming a dataset that the file does not hold;
- write-behind: after each batch the writer thread starts the kernel's write-back of what it just
  wrote, waits for the one before (Linux ``sync_file_range``) and drops that from the page cache, so
  dirty pages never pile up, the page cache neither throttles the writer nor fills up with the scan,
  and the final fsync after the client's CLOSE only has a few megabytes to write: the ack stays short
  whatever the scan's size;
- every ``sync_bytes`` it flushes HDF5's metadata and ``fdatasync``\\ s the file, so a gateway killed
  mid-scan leaves a file that h5py and ismrmrd read as it was at the last sync (elsewhere than Linux
  this is the only sync). The file is created under a temporary name, its superblock and groups
  flushed and synced, and only then renamed to ``raw.h5``: a file of that name always opens. The header
  is synced as soon as it is written;
- the disk never fills under HDF5 (which does not survive ``ENOSPC``: it crashes the process): before
  every write the writer checks the free space of the file's file system, and where the write (with a
  margin for HDF5's metadata) would leave less than ``disk_floor_bytes``, it writes nothing more and
  the session ends with :class:`WriteError` (``disk_full``) saying so. What was written is kept: the
  file is flushed, closed and synced, and :meth:`RawFileWriter.abort` counts the rows it holds by
  reading them back (:func:`reconq.core.rawcheck.readable_counts`).

The field's common Python MRD server appends to HDF5 once per readout, which limits it to tens of MB/s.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.hdf5
import numpy as np

from reconq.core.rawcheck import readable_counts
from reconq.core.storage import fsync_path

log = logging.getLogger(__name__)

_ACQ_HEAD = ismrmrd.hdf5.acquisition_header_dtype
_WAV_HEAD = ismrmrd.hdf5.waveform_header_dtype
_ACQ_SIZE = _ACQ_HEAD.itemsize
_WAV_SIZE = _WAV_HEAD.itemsize
_CHUNK_ROWS = 1024
_BATCHES_IN_FLIGHT = 2  # one being filled while one is written
_PULL_S = 0.05  # an idle writer takes the batch being filled after this long
_FLUSH_BYTES, _FLUSH_S = 1 << 20, 0.5  # batches are flushed to the file once this much, or this long, is unflushed
DISK_FLOOR_BYTES = 256 << 20  # the default of the setting ``disk_floor_bytes``
_METADATA_MARGIN = 1 << 20  # kept free beyond each write for HDF5's own metadata (chunk index, heaps, headers)
_WAKE = object()  # a session tells a writer that sleeps that data came


class WriteBehind:
    """Keeps a file's dirty pages to about one batch: start write-back of each new range, wait for the one before.

    A range on disk is then dropped from the page cache: a scan streams through the cache instead of
    filling it, so the kernel reuses the same pages rather than finding fresh ones for every write,
    which costs more CPU than all the copies (the gateway's write rate doubled on a 2-core VM); the
    price is that a worker reading the scan soon after reads it from disk.

    Uses Linux's ``sync_file_range`` (through libc; it releases the GIL); elsewhere it does nothing.
    It makes data reach the disk early; durability still comes from fsync.
    """

    _WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
    _call: Callable[[int, int, int, int], int] | None = None

    if sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            _call = _libc.sync_file_range
            _call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _call.restype = ctypes.c_int
        except (OSError, AttributeError):
            _call = None

    def __init__(self, fd: int | None) -> None:
        self.fd = fd if self._call is not None else None
        self.started = 0  # file offset up to which write-back was started
        self.ranges: deque[tuple[int, int]] = deque()

    def wrote_up_to(self, end: int) -> None:
        if self.fd is None or end <= self.started:
            return
        self._sync(self.started, end - self.started, self._WRITE)
        self.ranges.append((self.started, end - self.started))
        self.started = end
        while len(self.ranges) > 1:
            start, length = self.ranges.popleft()
            self._sync(start, length, self._WAIT_BEFORE | self._WRITE | self._WAIT_AFTER)
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)

    def _sync(self, start: int, length: int, flags: int) -> None:
        assert self._call is not None and self.fd is not None
        if self._call(self.fd, start, length, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sync_file_range: {os.strerror(err)}")


class WriteError(Exception):
    """The raw file could not be written; :attr:`disk_full` when the disk ran out of space."""

    def __init__(self, message: str, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def write_error(error: BaseException) -> WriteError:
    """``error`` (from h5py or the OS) as the :class:`WriteError` the scanner is told about."""
    if isinstance(error, WriteError):
        return error
    full = isinstance(error, OSError) and (error.errno == errno.ENOSPC or "No space left" in str(error))
    if full:
        return WriteError(f"disk full: no space left on the device of the raw file ({error})", disk_full=True)
    return WriteError(f"could not write the raw file: {error}")


class _Batch:
    """Readouts and waveforms received but not yet written: their headers and one payload buffer."""

    def __init__(self, capacity: int) -> None:
        # an anonymous map: its pages cost memory only once written, and go back to the system with it
        self.buf = mmap.mmap(-1, max(capacity, 1))
        self.view = memoryview(self.buf)
        self.used = 0
        self.acq_heads = bytearray()
        self.acq_spans: list[tuple[int, int]] = []
        self.wav_heads = bytearray()
        self.wav_spans: list[tuple[int, int]] = []

    @property
    def empty(self) -> bool:
        return not self.acq_spans and not self.wav_spans

    def fits(self, size: int) -> bool:
        return self.used + size <= len(self.buf)

    def reserve(self, size: int) -> tuple[int, memoryview]:
        start = self.used
        self.used += size
        return start, self.view[start:self.used]

    def clear(self) -> None:
        self.used = 0
        self.acq_heads.clear()
        self.acq_spans.clear()
        self.wav_heads.clear()
        self.wav_spans.clear()


class RawFileWriter:
    """One raw MRD file being written; :meth:`finish` makes it durable, :meth:`abort` keeps what came.

    Every method is called from the session's thread; HDF5 is touched only by the writer thread (and by
    the constructor, before it starts). A failed write surfaces as :class:`WriteError` from the next call.
    The batch being filled is the session's, under ``_lock``; an idle writer takes it only when it gets
    that lock at once (the session holds it while a readout comes in).
    """

    def __init__(self, path: Path, batch_bytes: int = 4 << 20, sync_bytes: int = 64 << 20,
                 disk_floor_bytes: int = DISK_FLOOR_BYTES) -> None:
        self.path = Path(path)
        self.batch_bytes = batch_bytes
        self.sync_bytes = sync_bytes
        self.disk_floor_bytes = disk_floor_bytes
        # The oldest superblock: it has no "open for writing" flag, so a file cut off by a crash opens as it
        # was at the last sync (a newer superblock would need h5clear first). Made under a temporary name,
        # synced, then renamed: whenever raw.h5 exists, it opens.
        part = self.path.with_name(f".{self.path.name}.part")
        self._file = h5py.File(part, "w", libver=("earliest", "v110"))
        try:
            self._group = self._file.create_group("dataset")
            self._fd = self._file.id.get_vfd_handle() if self._file.driver == "sec2" else None
            self._unflushed, self._flushed_at = 0, time.monotonic()
            self._sync()
            os.replace(part, self.path)
            fsync_path(self.path.parent)  # the file's name is durable now, off the path of the ack
        except BaseException:
            with contextlib.suppress(Exception):
                self._file.close()
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        self._behind = WriteBehind(self._fd)
        self._free: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        self._made = 0
        self._todo: queue.Queue[_Batch | Callable[[], None] | object | None] = queue.Queue(
            maxsize=_BATCHES_IN_FLIGHT)
        self._error: WriteError | None = None
        self._unsynced = 0
        self._lock = threading.Lock()
        self._asleep = False  # the writer waits for a wake-up: the batch was empty when it last looked
        self._batch: _Batch | None = self._take_batch()
        self.acquisitions = 0  # received (and kept when the file is finished or aborted)
        self.waveforms = 0
        self.images = 0
        # in the file: counted by the writer thread as it writes, and after an abort by reading the file back
        self.written_acquisitions = 0
        self.written_waveforms = 0
        self._thread = threading.Thread(target=self._run, name=f"raw-{self.path.parent.name}", daemon=True)
        self._thread.start()

    # -- the session's side ------------------------------------------------------------------------------------

    def write_header(self, xml: str) -> None:
        self._call(self._write_header, xml)

    def write_config(self, config_file: str | None, config_text: str | None) -> None:
        """The session's CONFIG_FILE name and CONFIG_TEXT, where the MRD format keeps them."""
        self._call(self._write_config, config_file, config_text)

    def add_acquisition_into(self, head: bytes, size: int, fill: Callable[[memoryview], None]) -> None:
        """A readout: ``fill`` writes its ``size`` bytes of trajectory+data into the view it gets."""
        with self._lock:
            batch = self._receive(size, fill)
            batch.acq_heads += head
            batch.acq_spans.append((batch.used - size, size))
            self.acquisitions += 1
            self._wake()

    def add_waveform_into(self, head: bytes, size: int, fill: Callable[[memoryview], None]) -> None:
        """A waveform: ``fill`` writes its ``size`` bytes of samples into the view it gets."""
        with self._lock:
            batch = self._receive(size, fill)
            batch.wav_heads += head
            batch.wav_spans.append((batch.used - size, size))
            self.waveforms += 1
            self._wake()

    def add_image(self, image: ismrmrd.Image) -> None:
        """Images from the client are rare; stored as ismrmrd does, under ``image_<series>``."""
        self._call(self._write_image, image)
        self.images += 1

    def finish(self) -> None:
        """Write what is buffered, close, and fsync the file (its name was made durable when it was created).

        Raises :class:`WriteError`.
        """
        with self._lock:
            self._send_batch()
        self._stop()
        if self._error is not None:
            raise self._error
        try:
            fsync_path(self.path)
        except OSError as e:
            raise write_error(e) from e

    def abort(self) -> None:
        """Keep what was received (for inspection): write it where the disk allows, close, fsync, and count
        the readouts and waveforms the file holds by reading them back; no error escapes."""
        with self._lock, contextlib.suppress(WriteError):
            self._send_batch()
        self._stop()
        with contextlib.suppress(OSError):
            fsync_path(self.path)
        self.written_acquisitions, self.written_waveforms = readable_counts(self.path)

    # -- handing work to the writer thread ---------------------------------------------------------------------

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        self._check()
        self._todo.put(lambda: fn(*args))

    def _wake(self) -> None:
        """Data came (the lock held): a writer that found nothing to take is woken to take it in a while."""
        if self._asleep:
            self._asleep = False
            with contextlib.suppress(queue.Full):  # full: the writer has work anyway
                self._todo.put_nowait(_WAKE)

    def _receive(self, size: int, fill: Callable[[memoryview], None]) -> _Batch:
        """Room for ``size`` bytes in the current batch, filled by ``fill``; a message cut off is not kept."""
        batch = self._room(size)
        start, view = batch.reserve(size)
        try:
            fill(view)
        except BaseException:
            batch.used = start
            raise
        finally:
            view.release()
        return batch

    def _room(self, size: int) -> _Batch:
        self._check()
        assert self._batch is not None, "the file is finished"
        if not self._batch.fits(size):
            self._send_batch()
            assert self._batch is not None
            if size > len(self._batch.buf):  # one readout larger than a batch: a buffer of its own
                if len(self._batch.buf) == self.batch_bytes:
                    self._free.put(self._batch)
                self._batch = _Batch(size)
        return self._batch

    def _take_batch(self) -> _Batch:
        batch = self._spare_batch()
        # all in flight: wait for the writer (back-pressure on the client)
        return batch if batch is not None else self._free.get()

    def _spare_batch(self) -> _Batch | None:
        """A free buffer, or a new one while fewer than ``_BATCHES_IN_FLIGHT`` exist; None where both are busy."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._made < _BATCHES_IN_FLIGHT:
                self._made += 1
                return _Batch(self.batch_bytes)
        return None

    def _send_batch(self) -> None:
        """Hand the batch being filled to the writer (the lock held) and take another."""
        batch = self._batch
        if batch is None or batch.empty:
            return
        self._check()
        self._todo.put(batch)
        self._batch = self._take_batch()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()
        with self._lock:  # the buffers' memory goes back to the system now, not when the writer is dropped
            self._batch = None
            while not self._free.empty():
                self._free.get_nowait()

    # -- the writer thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                work = self._todo.get() if self._asleep else self._todo.get(timeout=_PULL_S)
            except queue.Empty:
                work = self._pull()
                if work is None:
                    if self._asleep:
                        self._flush_idle()
                    continue
            if work is None:
                break
            if work is _WAKE:
                continue
            if self._error is None:
                try:
                    self._write_batch(work) if isinstance(work, _Batch) else work()  # type: ignore[operator]
                except WriteError as e:  # the disk is nearly full: nothing more is written
                    log.warning("%s: %s", self.path, e)
                    self._error = e
                except Exception as e:  # noqa: BLE001 - reported to the session by the next call
                    log.exception("writing %s failed", self.path)
                    self._error = write_error(e)
            if isinstance(work, _Batch) and len(work.buf) == self.batch_bytes:
                work.clear()  # give the buffer back to the session (a one-off large buffer is dropped)
                self._free.put(work)
        try:
            self._file.close()
        except Exception as e:  # noqa: BLE001
            log.exception("closing %s failed", self.path)
            self._error = self._error or write_error(e)

    def _pull(self) -> _Batch | None:
        """The batch being filled, taken by an idle writer where the session is between two messages and a
        spare buffer is there for it; None otherwise (an empty batch: the writer sleeps until woken)."""
        if not self._lock.acquire(blocking=False):
            return None  # a readout is coming in; try again after the next wait
        try:
            batch = self._batch
            if batch is None or batch.empty:
                self._asleep = True
                return None
            spare = self._spare_batch()
            if spare is None:
                return None
            self._batch = spare
            return batch
        finally:
            self._lock.release()

    def _check_space(self, nbytes: int) -> None:
        """Raise :class:`WriteError` (``disk_full``) where writing ``nbytes`` (plus HDF5's margin) would leave
        less than ``disk_floor_bytes`` free on the raw file's file system."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError as e:
            raise write_error(e) from e
        free = st.f_bavail * st.f_frsize
        if free - nbytes - _METADATA_MARGIN < self.disk_floor_bytes:
            raise WriteError(
                f"disk nearly full: {free / 2**20:.0f} MiB free in the data folder's file system, and the gateway "
                f"keeps {self.disk_floor_bytes / 2**20:.0f} MiB free (RECONQ_DISK_FLOOR_BYTES); the scan was "
                "stopped before the disk filled up, and the data received so far is kept",
                disk_full=True,
            )

    def _write_header(self, xml: str) -> None:
        data = xml.encode("utf-8")
        self._check_space(2 * len(data))
        dset = self._group.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        dset[0] = data
        self._sync()  # the header is on disk before any readout

    def _write_config(self, config_file: str | None, config_text: str | None) -> None:
        values = [(name, value) for name, value in (("config_file", config_file), ("config", config_text))
                  if value is not None]
        if not values:
            return
        self._check_space(2 * sum(len(v.encode()) for _, v in values))
        for name, value in values:
            self._group.create_dataset(name, data=np.bytes_(value.encode()))
        self._flush()

    def _write_image(self, image: ismrmrd.Image) -> None:
        self._check_space(2 * (image.data.nbytes + len(image.attribute_string.encode())) + (64 << 10))
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
        self._flush()

    def _write_batch(self, batch: _Batch) -> None:
        # the samples twice over at most (small readouts fill whole heap collections), and their headers
        self._check_space(2 * batch.used + len(batch.acq_heads) + len(batch.wav_heads))
        if batch.acq_spans:
            self._append("data", ismrmrd.hdf5.acquisition_dtype, self._acquisition_rows(batch))
            self.written_acquisitions += len(batch.acq_spans)
        if batch.wav_spans:
            rows = np.empty(len(batch.wav_spans), dtype=ismrmrd.hdf5.waveform_dtype)
            rows["head"] = np.frombuffer(batch.wav_heads, dtype=_WAV_HEAD)
            data_col = rows["data"]
            for i, (start, size) in enumerate(batch.wav_spans):
                data_col[i] = np.frombuffer(batch.buf, np.uint32, size // 4, start)
            self._append("waveforms", ismrmrd.hdf5.waveform_dtype, rows)
            self.written_waveforms += len(batch.wav_spans)
        self._unsynced += batch.used
        self._unflushed += batch.used
        if self._unsynced >= self.sync_bytes:
            self._sync()
        elif self._unflushed >= _FLUSH_BYTES or time.monotonic() - self._flushed_at >= _FLUSH_S:
            self._flush()  # into the page cache: what a kill leaves, and what write-behind sends on
        self._behind.wrote_up_to(self._file.id.get_filesize())

    @staticmethod
    def _acquisition_rows(batch: _Batch) -> np.ndarray:
        """Rows of ``/dataset/data`` whose ``traj``/``data`` are views on the batch buffer (no copy)."""
        n = len(batch.acq_spans)
        rows = np.empty(n, dtype=ismrmrd.hdf5.acquisition_dtype)
        heads = np.frombuffer(batch.acq_heads, dtype=_ACQ_HEAD)
        rows["head"] = heads
        traj_floats = (heads["number_of_samples"].astype(np.int64) * heads["trajectory_dimensions"]).tolist()
        traj_col, data_col = rows["traj"], rows["data"]
        buf = batch.buf
        for i, (start, size) in enumerate(batch.acq_spans):
            t = traj_floats[i]
            traj_col[i] = np.frombuffer(buf, np.float32, t, start)
            data_col[i] = np.frombuffer(buf, np.float32, size // 4 - t, start + 4 * t)
        return rows

    def _append(self, name: str, dtype: np.dtype, rows: np.ndarray) -> None:
        if name not in self._group:
            self._group.create_dataset(name, (0,), maxshape=(None,), dtype=dtype, chunks=(_CHUNK_ROWS,))
            # the new dataset in the file on its own, before rows: a kill while a batch is flushed then never
            # leaves the group naming a dataset that the file does not hold yet
            self._flush()
        dset = self._group[name]
        start = dset.shape[0]
        dset.resize(start + len(rows), axis=0)
        try:
            dset[start:] = rows
        except BaseException:
            dset.resize(start, axis=0)  # no rows that hold nothing
            raise

    def _flush_idle(self) -> None:
        """Nothing came for a while: flush what is not yet in the file (a pause, or the end before CLOSE)."""
        if self._unflushed and self._error is None:
            try:
                self._flush()
            except Exception as e:  # noqa: BLE001 - reported to the session by the next call
                log.exception("flushing %s failed", self.path)
                self._error = write_error(e)

    def _flush(self) -> None:
        """HDF5's cache (the samples' heap collections, the chunk index, the shape) into the file, not synced.

        Small batches (what an idle writer took) are flushed every ``_FLUSH_BYTES`` or ``_FLUSH_S``, or
        when nothing more comes: a flush writes the chunk being filled whole (1024 rows' headers, 380 kB)."""
        self._file.flush()
        self._unflushed, self._flushed_at = 0, time.monotonic()

    def _sync(self) -> None:
        """Flush HDF5's metadata and make everything written so far durable (on the writer thread)."""
        self._flush()
        if self._fd is not None:
            os.fdatasync(self._fd)
        self._unsynced = 0
