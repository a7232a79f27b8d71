"""Trajectories of Pulseq scans, computed from the ``.seq`` file the scanner ran.

A scan acquired with a Pulseq sequence (Layton et al. 2017) reaches the server as MRD readouts
without trajectories: the k-space path is defined by the sequence file the Pulseq interpreter played
out. This module finds that file and computes each readout's k-space coordinates from it.

The mechanism, end to end:

1. **Identity.** Every ``.seq`` file written by Pulseq (MATLAB) or pypulseq (Ravi et al. 2019) ends with
   a ``[SIGNATURE]`` section holding ``Type md5`` and ``Hash <32 hex digits>``: the MD5 of the file's
   bytes written *before* that section, i.e. everything up to, and **not** including, the newline
   that precedes ``[SIGNATURE]`` (both writers append ``"\\n[SIGNATURE]\\n..."`` after hashing the
   file as written). :func:`seq_signature` returns the recorded hash and recomputes it that way; a
   file whose two values differ was changed after it was signed. A file written with Windows line
   ends by pypulseq (text mode: the hash is over ``\\n`` line ends) is also recognised: when the raw
   bytes do not give the recorded hash, the hash of the bytes with ``\\r\\n`` read as ``\\n`` is
   tried. A file without a ``[SIGNATURE]`` section hashes in full and has no recorded signature.
2. **Which sequence a scan ran.** The scanner side puts the signature of the sequence it ran in the
   MRD header, as the user parameter string ``seq_signature`` (a Siemens ``tSequenceVariant`` holding
   a 32-hex MD5 is accepted too), optionally with the file's name as ``seq_file``
   (:func:`signature_from_header`).
3. **The library.** :class:`SequenceLibrary` is a folder of ``.seq`` files. A file is matched only by
   its *verified* signature (recorded equals recomputed); files that do not verify are listed as such
   and never matched, so an edited copy can never supply a trajectory under the original's name.
   :meth:`SequenceLibrary.add` copies only files that verify.
4. **Trajectory.** :func:`load_trajectory` reads the file with ``pypulseq.Sequence.read``, integrates
   the gradients with ``calculate_kspace()`` (k reset at each excitation, mirrored at refocusing
   pulses) and splits the k-space samples at the ADC sample times (``k_traj_adc``) into one
   ``(ns, 3)`` array per ADC event, in block order, using each ADC block's ``num_samples``. The
   sequence's counters (labels) at each ADC event come from ``evaluate_labels(evolution='adc')``
   and are named as MRD ``idx`` fields the way Pulseq's own tools map them. Results are cached in
   process per signature (a small LRU).
5. **Matching a scan.** :func:`scan_trajectories` pairs the scan's readouts with the ADC events, in
   order, skipping noise-measurement readouts (the interpreter's noise scans are not ADC events of
   the sequence). The counts and each readout's number of samples must agree exactly; any mismatch
   is a :class:`~reconq.recon.errors.ReconError` that names the signature and what differs.

Axes and units: the three columns are the sequence's gradient axes x, y, z as written in the
``.seq`` file, which the interpreter plays out as the logical read, phase and slice directions of
the prescribed slice/slab (``read_dir``, ``phase_dir``, ``slice_dir`` of the readouts).
:class:`SeqTrajectory` holds k in 1/m (pypulseq's ``calculate_kspace`` units);
:func:`scan_trajectories` returns cycles per FOV (k [1/m] times FOV [m], the NUFFT's unit: a
Nyquist-sampled readout of N samples spans -N/2 .. N/2).

pypulseq is imported lazily, only by the functions that read or build sequences: processes that do
not compute trajectories (the gateway) start without it.

References:
    Layton KJ, Kroboth S, Jia F, Littin S, Yu H, Leupold J, Nielsen JF, Stöcker T, Zaitsev M.
    Pulseq: a rapid and hardware-independent pulse sequence prototyping framework.
    Magn Reson Med 2017;77(4):1544-1552. doi:10.1002/mrm.26235

    Ravi KS, Geethanath S, Vaughan JT. PyPulseq: a Python package for MRI pulse sequence design.
    J Open Source Softw 2019;4(42):1725. doi:10.21105/joss.01725
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from reconq.recon.errors import ReconError

if TYPE_CHECKING:  # pragma: no cover
    import ismrmrd.xsd
    import pypulseq

log = logging.getLogger(__name__)

#: Pulseq counter labels and the MRD ``idx`` fields they fill (as Pulseq's own MRD tools map them).
LABEL_TO_IDX: dict[str, str] = {
    "LIN": "kspace_encode_step_1",
    "PAR": "kspace_encode_step_2",
    "SLC": "slice",
    "ECO": "contrast",
    "REP": "repetition",
    "SET": "set",
    "SEG": "segment",
    "AVG": "average",
    "PHS": "phase",
}

_MD5 = re.compile(r"[0-9a-fA-F]{32}")
_SIGNATURE_LINE = re.compile(rb"(?m)^\[SIGNATURE\][ \t]*\r?$")
_HASH_LINE = re.compile(rb"(?m)^[ \t]*Hash[ \t]+([0-9A-Za-z]+)[ \t]*\r?$")
_SECTION = re.compile(rb"(?m)^\[([A-Z]+)\][ \t]*\r?$")
_CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------- signature


class SeqSignature(NamedTuple):
    """A ``.seq`` file's signatures.

    Attributes:
        recorded: The MD5 in the file's ``[SIGNATURE]`` section (lower case), or None when there is none.
        computed: The MD5 of the file's content the way Pulseq computes it (lower case).
    """

    recorded: str | None
    computed: str

    @property
    def verified(self) -> bool:
        """Whether the file carries a signature and its content still gives it."""
        return self.recorded is not None and self.recorded == self.computed


def _signature_of_bytes(data: bytes) -> SeqSignature:
    m = _SIGNATURE_LINE.search(data)
    if m is None:
        return SeqSignature(None, hashlib.md5(data).hexdigest())
    body = data[: m.start()]
    # The newline before [SIGNATURE] belongs to the signature section, not to the signed content.
    if body.endswith(b"\n"):
        body = body[:-1]
        if body.endswith(b"\r"):
            body = body[:-1]
    h = _HASH_LINE.search(data, m.end())
    recorded = h.group(1).decode("ascii").lower() if h else None
    computed = hashlib.md5(body).hexdigest()
    if recorded is not None and computed != recorded and b"\r\n" in body:
        # pypulseq hashes the text it wrote as read back in text mode: "\n" line ends on every OS.
        normalised = hashlib.md5(body.replace(b"\r\n", b"\n")).hexdigest()
        if normalised == recorded:
            computed = normalised
    return SeqSignature(recorded, computed)


_sig_cache: dict[tuple[str, int, int], SeqSignature] = {}
_sig_lock = threading.Lock()


def seq_signature(path: str | os.PathLike[str]) -> SeqSignature:
    """The recorded and the recomputed MD5 signature of a ``.seq`` file.

    The recomputed hash covers the file's bytes up to the ``[SIGNATURE]`` line, without the newline
    that precedes it (Pulseq's and pypulseq's ``write``); for a file with no ``[SIGNATURE]`` section
    it covers the whole file. Results are cached by path, size and modification time.

    Args:
        path: The ``.seq`` file.

    Returns:
        ``SeqSignature(recorded, computed)``; ``recorded`` is None when the file has no signature.

    Raises:
        ReconError: The file cannot be read.
    """
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        with _sig_lock:
            hit = _sig_cache.get(key)
        if hit is not None:
            return hit
        sig = _signature_of_bytes(p.read_bytes())
    except OSError as e:
        raise ReconError(f"cannot read sequence file {p}: {e.strerror or e}") from e
    with _sig_lock:
        if len(_sig_cache) > 1024:
            _sig_cache.clear()
        _sig_cache[key] = sig
    return sig


def _adc_counts(data: bytes) -> tuple[int, int] | None:
    """(ADC events, samples in all) from a ``.seq`` file's text, without pypulseq; None if unparsable."""
    sections: dict[str, bytes] = {}
    marks = list(_SECTION.finditer(data))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(data)
        sections[m.group(1).decode("ascii")] = data[m.end():end]
    if "BLOCKS" not in sections:
        return None
    try:
        adc_samples: dict[int, int] = {}
        for line in sections.get("ADC", b"").splitlines():
            tok = line.split()
            if tok and not tok[0].startswith(b"#"):
                adc_samples[int(tok[0])] = int(float(tok[1]))
        events = samples = 0
        for line in sections["BLOCKS"].splitlines():
            tok = line.split()
            if not tok or tok[0].startswith(b"#"):
                continue
            adc = int(tok[6])  # id dur|delay rf gx gy gz adc [ext], in every format version
            if adc:
                events += 1
                samples += adc_samples[adc]
    except (IndexError, ValueError, KeyError):
        return None
    return events, samples


# ----------------------------------------------------------------------------------------------- library


@dataclass(frozen=True)
class SeqEntry:
    """One ``.seq`` file of a :class:`SequenceLibrary`.

    Attributes:
        name: The file's name in the folder.
        path: Its path.
        recorded: The signature recorded in the file (None: unsigned).
        computed: The signature its content gives.
        verified: Whether ``recorded == computed``; only verified files are ever matched.
        reason: Why the file does not verify ("" when it does).
        adc_events: ADC events of the sequence (None when the file could not be parsed).
        adc_samples: ADC samples of all events together (None likewise).
    """

    name: str
    path: Path
    recorded: str | None
    computed: str
    verified: bool
    reason: str = ""
    adc_events: int | None = None
    adc_samples: int | None = None

    @property
    def signature(self) -> str | None:
        """The verified signature, or None."""
        return self.computed if self.verified else None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (path as a string)."""
        return {"name": self.name, "path": str(self.path), "signature": self.recorded, "computed": self.computed,
                "verified": self.verified, "reason": self.reason, "adc_events": self.adc_events,
                "adc_samples": self.adc_samples}


def _entry(path: Path, counts: bool = True) -> SeqEntry:
    try:
        data = path.read_bytes()
    except OSError as e:
        return SeqEntry(path.name, path, None, "", False, f"cannot be read: {e.strerror or e}")
    sig = _signature_of_bytes(data)
    if sig.recorded is None:
        reason = "not signed (no [SIGNATURE] Hash)"
    elif not sig.verified:
        reason = f"content gives signature {sig.computed}, not the recorded {sig.recorded} (changed after signing)"
    else:
        reason = ""
    n = _adc_counts(data) if counts else None
    return SeqEntry(path.name, path, sig.recorded, sig.computed, sig.verified, reason,
                    n[0] if n else None, n[1] if n else None)


def _normalise_signature(signature: str) -> str:
    return signature.strip().lower()


def _seq_name(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base if base.lower().endswith(".seq") else base + ".seq"


class SequenceLibrary:
    """A folder of Pulseq ``.seq`` files, matched to scans by verified signature.

    Args:
        folder: The folder (need not exist until :meth:`add`).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"SequenceLibrary({str(self.folder)!r})"

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.suffix.lower() == ".seq" and p.is_file())

    def entries(self, counts: bool = True) -> list[SeqEntry]:
        """Every ``.seq`` file of the folder, by name, with its signatures and whether it verifies.

        Args:
            counts: Also count each file's ADC events and samples (a text parse, no pypulseq).
        """
        return [_entry(p, counts) for p in self._files()]

    def find(self, signature: str, name: str | None = None) -> Path:
        """The file whose verified signature is ``signature``.

        Args:
            signature: The MD5 the scan names (case and surrounding spaces ignored).
            name: The file name the scan names, if any: preferred among files with that signature
                and quoted in the error when it holds another one.

        Raises:
            ReconError: No verified file has that signature (the message names the signature and
                the folder, and what the file called ``name`` holds instead).
        """
        sig = _normalise_signature(signature)
        wanted = _seq_name(name) if name else None
        matches: list[Path] = []
        named: tuple[Path, SeqSignature] | None = None
        for p in self._files():
            try:
                s = seq_signature(p)
            except ReconError:
                continue
            if wanted is not None and p.name == wanted:
                named = (p, s)
            if s.verified and s.computed == sig:
                matches.append(p)
        if matches:
            for p in matches:
                if p.name == wanted:
                    return p
            if wanted is not None:
                log.info("sequence %s found as %s, not as the %s the scan names", sig, matches[0].name, wanted)
            return matches[0]
        msg = f"no verified Pulseq sequence with signature {sig} in {self.folder}"
        if wanted is not None:
            if named is None:
                msg += f" (and no file named {wanted} there)"
            else:
                s = named[1]
                if s.recorded is None:
                    msg += f"; {wanted} there is not signed (its content gives {s.computed})"
                elif not s.verified:
                    msg += (f"; {wanted} there records signature {s.recorded} but its content gives "
                            f"{s.computed} (changed after signing)")
                else:
                    msg += f"; {wanted} there has signature {s.computed}"
        if not self.folder.is_dir():
            msg += " (the folder does not exist)"
        raise ReconError(msg)

    def add(self, path: str | os.PathLike[str]) -> Path:
        """Copy a verified ``.seq`` file into the folder (created if needed).

        Adding the same file again returns the same path.

        Args:
            path: The ``.seq`` file.

        Returns:
            The path of the copy in the folder.

        Raises:
            ReconError: The file is missing or not a ``.seq`` file, is not signed, its recorded and
                computed signatures differ, or the folder holds a different file of that name.
        """
        src = Path(path)
        if src.suffix.lower() != ".seq":
            raise ReconError(f"{src} is not a Pulseq .seq file (name must end in .seq)")
        if not src.is_file():
            raise ReconError(f"{src}: no such file")
        try:
            data = src.read_bytes()
        except OSError as e:
            raise ReconError(f"cannot read {src}: {e.strerror or e}") from e
        if not _SECTION.search(data) or b"[BLOCKS]" not in data:
            raise ReconError(f"{src} is not a Pulseq .seq file (no [BLOCKS] section)")
        sig = _signature_of_bytes(data)
        if sig.recorded is None:
            raise ReconError(f"{src} is not signed: it has no [SIGNATURE] Hash (write it with Pulseq or pypulseq)")
        if not sig.verified:
            raise ReconError(f"{src} records signature {sig.recorded} but its content gives {sig.computed}: "
                             "it was changed after it was signed")
        dest = self.folder / src.name
        if dest.exists():
            try:
                same = dest.read_bytes() == data
            except OSError as e:
                raise ReconError(f"cannot read {dest}: {e.strerror or e}") from e
            if same:
                return dest
            other = seq_signature(dest)
            raise ReconError(f"{self.folder} already holds a different {src.name} (signature "
                             f"{other.recorded or 'none'}); rename the new file (signature {sig.computed})")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".seq.tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest


# ------------------------------------------------------------------------------------------------ header


def signature_from_header(header: ismrmrd.xsd.ismrmrdHeader) -> tuple[str | None, str | None]:
    """The sequence signature and file name an MRD header names.

    Looks at ``userParameters.userParameterString``: ``seq_signature`` (else a ``tSequenceVariant``
    whose value holds a 32-hex MD5) and ``seq_file`` (else a ``tFree`` ending in ``.seq``, where the
    Siemens interpreter keeps the file name). Names are compared case-insensitively.

    Args:
        header: The parsed MRD header.

    Returns:
        ``(signature, seq_file)``: the signature lower-cased (None when the header names none), and
        the file name (None when not given).
    """
    params = getattr(header, "userParameters", None)
    strings = list(getattr(params, "userParameterString", None) or []) if params is not None else []
    values: dict[str, str] = {}
    for p in strings:
        name = str(getattr(p, "name", "") or "").strip().lower()
        value = getattr(p, "value", None)
        if name and value is not None and name not in values:
            values[name] = str(value).strip()
    signature: str | None = None
    if values.get("seq_signature"):
        raw = values["seq_signature"]
        m = _MD5.fullmatch(raw)
        signature = m.group(0).lower() if m else raw.lower()
    elif "tsequencevariant" in values:
        m = _MD5.search(values["tsequencevariant"])
        signature = m.group(0).lower() if m else None
    seq_file = values.get("seq_file") or None
    if seq_file is None and values.get("tfree", "").lower().endswith(".seq"):
        seq_file = values["tfree"]
    return signature, seq_file


# -------------------------------------------------------------------------------------------- trajectory


@dataclass(frozen=True)
class SeqTrajectory:
    """The k-space path of a sequence at its ADC events.

    Attributes:
        adc: One ``(ns, 3)`` float64 array per ADC event, in block order: k in 1/m along the
            sequence's gradient axes x, y, z (read-only arrays, shared through the cache).
        fov_m: The ``[DEFINITIONS]`` FOV in metres (values above 1 are read as mm); an axis the file
            does not give is NaN. None when the file defines no FOV.
        labels: Per ADC event, each counter label the sequence uses, under its MRD ``idx`` field name
            (``LIN`` as ``kspace_encode_step_1``, ...; see :data:`LABEL_TO_IDX`), int64 arrays.
        signature: The file's signature.
        file: The file's name, for messages.
    """

    adc: list[np.ndarray]
    fov_m: tuple[float, float, float] | None
    labels: dict[str, np.ndarray]
    signature: str
    file: str | None = field(default=None, compare=False)

    @property
    def num_samples(self) -> list[int]:
        """Samples of each ADC event."""
        return [int(a.shape[0]) for a in self.adc]


_traj_cache: OrderedDict[str, SeqTrajectory] = OrderedDict()
_traj_lock = threading.Lock()


def _fov_from_definitions(definitions: dict[str, Any]) -> tuple[float, float, float] | None:
    raw = definitions.get("FOV")
    if raw is None:
        return None
    try:
        values = [float(v) for v in np.atleast_1d(np.asarray(raw, dtype=float))]
    except (TypeError, ValueError):
        return None
    if not values or not all(math.isfinite(v) for v in values):
        return None
    if max(values) > 1.0:  # older files give mm; current interpreters expect metres
        values = [v / 1000.0 for v in values]
    values = (values + [math.nan] * 3)[:3]
    return (values[0], values[1], values[2])


def load_trajectory(path: str | os.PathLike[str]) -> SeqTrajectory:
    """The k-space trajectory of every ADC event of a ``.seq`` file, and its labels.

    Cached in process per signature (the last few sequences).

    Args:
        path: The ``.seq`` file.

    Returns:
        The :class:`SeqTrajectory`.

    Raises:
        ReconError: The file cannot be read, records a signature its content does not give, or
            pypulseq cannot read it or compute its k-space.
    """
    p = Path(path)
    sig = seq_signature(p)
    if sig.recorded is not None and not sig.verified:
        raise ReconError(f"sequence file {p.name} records signature {sig.recorded} but its content gives "
                         f"{sig.computed}: it was changed after it was signed")
    key = sig.computed
    with _traj_lock:
        hit = _traj_cache.get(key)
        if hit is not None:
            _traj_cache.move_to_end(key)
            return hit
    traj = _compute_trajectory(p, key)
    with _traj_lock:
        _traj_cache[key] = traj
        _traj_cache.move_to_end(key)
        while len(_traj_cache) > _CACHE_SIZE:
            _traj_cache.popitem(last=False)
    return traj


def _compute_trajectory(path: Path, signature: str) -> SeqTrajectory:
    try:
        import pypulseq as pp
    except ImportError as e:  # pragma: no cover - a dependency
        raise ReconError("pypulseq is not installed: Pulseq trajectories cannot be computed") from e
    seq = pp.Sequence()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # detect_rf_use=None: pypulseq infers RF use (excitation/refocusing) for pre-1.5 files only
            seq.read(str(path), detect_rf_use=None)  # type: ignore[arg-type]
            k_adc, _k, _t_exc, _t_ref, _t_adc = seq.calculate_kspace()
            labels_raw = seq.evaluate_labels(evolution="adc")
        for w in caught:
            log.debug("pypulseq on %s: %s", path.name, w.message)
    except ReconError:
        raise
    except Exception as e:  # pypulseq raises many kinds on malformed files
        raise ReconError(f"sequence file {path.name} (signature {signature}) cannot be read by pypulseq: "
                         f"{type(e).__name__}: {e}") from e
    counts = []
    for events in seq.block_events.values():
        adc_id = int(events[5])
        if adc_id:
            counts.append(int(seq.adc_library.data[adc_id][0]))
    k_adc = np.asarray(k_adc, dtype=np.float64)
    if k_adc.ndim != 2 or k_adc.shape[1] != sum(counts):
        raise ReconError(f"sequence file {path.name} (signature {signature}): k-space has "
                         f"{k_adc.shape[-1] if k_adc.ndim else 0} ADC samples, its ADC events {sum(counts)}")
    if k_adc.shape[0] < 3:
        k_adc = np.vstack([k_adc, np.zeros((3 - k_adc.shape[0], k_adc.shape[1]))])
    k = np.ascontiguousarray(k_adc[:3].T)
    adc: list[np.ndarray] = []
    start = 0
    for n in counts:
        a = k[start:start + n]
        a.setflags(write=False)
        adc.append(a)
        start += n
    labels: dict[str, np.ndarray] = {}
    for label, idx_name in LABEL_TO_IDX.items():
        if label in labels_raw:
            values = np.atleast_1d(np.asarray(labels_raw[label]))
            if values.shape != (len(counts),):
                raise ReconError(f"sequence {signature} ({path.name}): label {label} has {values.size} values "
                                 f"for {len(counts)} ADC events")
            arr = np.asarray(values, dtype=np.int64)
            arr.setflags(write=False)
            labels[idx_name] = arr
    return SeqTrajectory(adc=adc, fov_m=_fov_from_definitions(seq.definitions), labels=labels,
                         signature=signature, file=path.name)


def _noise_mask(heads: np.ndarray) -> np.ndarray:
    import ismrmrd

    bit = np.uint64(1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))
    return (np.asarray(heads["flags"]).astype(np.uint64) & bit) != 0


def scan_trajectories(traj: SeqTrajectory, heads: np.ndarray,
                      fov_mm: tuple[float, float, float] | np.ndarray | None) -> list[np.ndarray | None]:
    """Each of a scan's readouts' trajectory, in cycles per FOV.

    The readouts that are not noise measurements are paired, in order, with the sequence's ADC
    events; their number and each one's ``number_of_samples`` must equal the sequence's.

    Args:
        traj: The sequence's trajectory (:func:`load_trajectory`).
        heads: The scan's acquisition headers, a structured array of
            ``ismrmrd.hdf5.acquisition_header_dtype`` (``flags`` and ``number_of_samples`` are used).
        fov_mm: The header's encoded FOV (x, y, z) in mm: used for each axis the ``.seq`` file's
            ``[DEFINITIONS]`` FOV does not give (it wins where it does). May be None when the file
            defines the whole FOV.

    Returns:
        A list aligned with ``heads`` (one item per acquisition, in order): None for a noise
        acquisition, else an ``(ns, 3)`` float32 array, k times FOV (cycles per FOV) along the
        sequence's gradient axes x, y, z (the logical read, phase and slice directions).

    Raises:
        ReconError: The counts of readouts and ADC events differ, a readout's number of samples
            differs from its ADC event's, or no FOV is known for an axis.
    """
    where = f"sequence {traj.signature}" + (f" (file {traj.file})" if traj.file else "")
    heads = np.atleast_1d(heads)
    noise = _noise_mask(heads)
    imaging = np.flatnonzero(~noise)
    n_noise = int(noise.sum())
    if imaging.size != len(traj.adc):
        raise ReconError(f"{where} has {len(traj.adc)} ADC events, the scan {imaging.size} acquisitions"
                         + (f" (not counting {n_noise} noise acquisitions)" if n_noise else ""))
    samples = np.asarray(heads["number_of_samples"])[imaging].astype(np.int64)
    expected = np.asarray(traj.num_samples, dtype=np.int64)
    bad = np.flatnonzero(samples != expected)
    if bad.size:
        i = int(bad[0])
        more = f" ({bad.size} ADC events differ)" if bad.size > 1 else ""
        raise ReconError(f"{where}: ADC event {i} has {expected[i]} samples, acquisition {int(imaging[i])} has "
                         f"{samples[i]}{more}")
    fov = _fov_for(traj, fov_mm, where)
    out: list[np.ndarray | None] = [None] * len(heads)
    for i, acq in enumerate(imaging):
        out[int(acq)] = (traj.adc[i] * fov).astype(np.float32)
    return out


def _fov_for(traj: SeqTrajectory, fov_mm: Any, where: str) -> np.ndarray:
    header = None
    if fov_mm is not None:
        h = np.asarray(fov_mm, dtype=np.float64).ravel()
        if h.size == 3:
            header = h / 1000.0
    fov = np.empty(3)
    for ax in range(3):
        seq_v = traj.fov_m[ax] if traj.fov_m is not None else math.nan
        if math.isfinite(seq_v) and seq_v > 0:
            fov[ax] = seq_v
        elif header is not None and math.isfinite(header[ax]) and header[ax] > 0:
            fov[ax] = header[ax]
        else:
            raise ReconError(f"{where}: no FOV for axis {'xyz'[ax]} (neither the .seq [DEFINITIONS] FOV "
                             "nor the header's encoded FOV gives one)")
    return fov


def clear_cache() -> None:
    """Forget cached trajectories and signatures (tests; after replacing files in place)."""
    with _traj_lock:
        _traj_cache.clear()
    with _sig_lock:
        _sig_cache.clear()


# ------------------------------------------------------------------------------------------------ example


def example_radial_sequence(nspokes: int = 32, ns: int = 64, fov_m: float = 0.256, *,
                            slice_thickness_m: float = 5e-3, dwell_s: float = 10e-6, flip_deg: float = 10.0,
                            echoes: int = 1, partitions: int = 1, golden_angle: bool = False,
                            rf_spoiling: bool = True) -> pypulseq.Sequence:
    """A small radial GRE written with pypulseq, for tests and the demo.

    2D: a slice-selective sinc excitation, then per spoke a readout trapezoid rotated about z by the
    spoke's angle (``k * pi / nspokes``, full spokes over 180 degrees; or golden angle, 111.246
    degrees apart), an ADC of ``ns`` samples over its flat top and a z spoiler. The readout is
    Nyquist sampled: ``dk = 1/fov_m``, so sample ``i`` lies at ``(i - ns/2) dk`` along the spoke
    (``|k|max = ns/2`` cycles per FOV, at the first sample). Each spoke's ADC sets label ``LIN`` to
    the spoke's number.

    ``echoes=2`` adds a second, bipolar readout in the same TR (k from ``ns/2 - 1`` down to
    ``-ns/2``); the ADCs set ``ECO`` 0 and 1. ``partitions > 1`` makes it a stack of stars: the
    slab (``slice_thickness_m``) is phase encoded in ``partitions`` steps of ``1/slice_thickness_m``,
    ``kz = (p - partitions/2) dkz``, label ``PAR``; spokes run inside partitions.

    The ``[DEFINITIONS]`` FOV is ``(fov_m, fov_m, slice_thickness_m)``. The system limits are
    below pypulseq's defaults, and the sequence passes ``check_timing``.

    Args:
        nspokes: Spokes (per partition).
        ns: ADC samples per readout (even).
        fov_m: In-plane FOV in metres.
        slice_thickness_m: Slice (2D) or slab (stack of stars) thickness in metres.
        dwell_s: ADC dwell time; ``ns * dwell_s`` must be a multiple of 10 us.
        flip_deg: Flip angle in degrees.
        echoes: 1 or 2 readouts per TR.
        partitions: 1 (2D) or the partitions of a stack of stars.
        golden_angle: Golden-angle spoke order instead of uniform over 180 degrees.
        rf_spoiling: Quadratic RF phase cycling (117 degrees).

    Returns:
        The ``pypulseq.Sequence``; write it with ``seq.write(path)`` (signed).
    """
    import pypulseq as pp

    if echoes not in (1, 2):
        raise ValueError("echoes must be 1 or 2")
    if ns < 2 or ns % 2:
        raise ValueError("ns must be even")
    system = pp.Opts(max_grad=32, grad_unit="mT/m", max_slew=130, slew_unit="T/m/s",
                     rf_ringdown_time=20e-6, rf_dead_time=100e-6, adc_dead_time=10e-6)
    seq = pp.Sequence(system)
    rf, gz, gz_reph = pp.make_sinc_pulse(flip_angle=math.radians(flip_deg), duration=1e-3, delay=system.rf_dead_time,
                                         slice_thickness=slice_thickness_m, apodization=0.5,
                                         time_bw_product=4, system=system, return_gz=True, use="excitation")
    dk = 1.0 / fov_m
    gx = pp.make_trapezoid(channel="x", flat_area=ns * dk, flat_time=ns * dwell_s, system=system)
    adc = pp.make_adc(num_samples=ns, duration=gx.flat_time, delay=gx.rise_time, system=system)
    gx_pre = pp.make_trapezoid(channel="x", area=-gx.area / 2 - dk / 2, duration=1e-3, system=system)
    gx_back = pp.scale_grad(gx, -1.0)
    dkz = 1.0 / slice_thickness_m
    pre_duration = 1e-3
    spoil = pp.make_trapezoid(channel="z", area=4.0 / slice_thickness_m, system=system)
    golden = math.pi / ((1.0 + math.sqrt(5.0)) / 2.0)  # 111.246 degrees
    rf_inc = 0.0
    rf_phase = 0.0
    for p in range(partitions):
        kz = (p - partitions / 2) * dkz if partitions > 1 else 0.0
        gz_pre = pp.make_trapezoid(channel="z", area=gz_reph.area + kz, duration=pre_duration, system=system)
        gz_spoil = pp.make_trapezoid(channel="z", area=spoil.area - kz, duration=pp.calc_duration(spoil) + 5e-4,
                                     system=system) if partitions > 1 else spoil
        for s in range(nspokes):
            phi = (s * golden) % (2 * math.pi) if golden_angle else s * math.pi / nspokes
            if rf_spoiling:
                rf.phase_offset = math.radians(rf_phase)
                adc.phase_offset = math.radians(rf_phase)
                rf_inc = (rf_inc + 117.0) % 360.0
                rf_phase = (rf_phase + rf_inc) % 360.0
            seq.add_block(rf, gz)
            seq.add_block(*pp.rotate(gx_pre, gz_pre, angle=phi, axis="z", system=system))
            labels = [pp.make_label(type="SET", label="LIN", value=s)]
            if partitions > 1:
                labels.append(pp.make_label(type="SET", label="PAR", value=p))
            if echoes == 2:
                labels.append(pp.make_label(type="SET", label="ECO", value=0))
            seq.add_block(*pp.rotate(gx, adc, angle=phi, axis="z", system=system), *labels)
            if echoes == 2:
                seq.add_block(*pp.rotate(gx_back, adc, angle=phi, axis="z", system=system),
                              pp.make_label(type="SET", label="ECO", value=1))
            seq.add_block(gz_spoil)
    ok, errors = seq.check_timing()
    if not ok:  # pragma: no cover - a design error
        raise ReconError("example radial sequence fails its timing check: " + "; ".join(map(str, errors[:3])))
    seq.set_definition("FOV", [fov_m, fov_m, slice_thickness_m])
    seq.set_definition("Name", "reconq_radial" if partitions == 1 else "reconq_stack_of_stars")
    return seq
