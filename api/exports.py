"""A job's result images for people: PNG previews rendered on the server, and DICOM (pydicom) in a zip.

Result files are MRD image files (see :mod:`reconq.core.results`); the MRD header stored with them gives
the patient, study, equipment and protocol for DICOM, written as UTF-8 (``ISO_IR 192``).

The DICOM files are MR Image Storage instances (PS3.3 A.4) that Debian's ``dciodvfy`` (dicom3tools) passes
without errors, as a PACS wants them: every Type 1 attribute has a value, every Type 2 attribute is there,
empty where the header does not say (never a made-up value). The UIDs ReconQ makes are derived from the job,
so exporting a job twice gives the same files, under the ``dicom_uid_root`` setting's root.

References:
    DICOM PS3.3, A.4 MR Image IOD; C.7 the patient, study, series, equipment, frame of reference and image
    modules; C.8.3.1 the MR Image module.
    Inati SJ et al. ISMRM Raw data format. Magn Reson Med 2017;77:411-421 (the header's classes).
"""

from __future__ import annotations

import contextlib
import io
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ismrmrd
import ismrmrd.xsd
import numpy as np
import pydicom
from PIL import Image as PILImage
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, RE_VALID_UID, UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds
from xsdata.models.datatype import XmlDate, XmlTime

from reconq.core.mrdfile import parse_header
from reconq.core.results import read_images, read_result_xml
from reconq.recon.images import bits_stored

log = logging.getLogger(__name__)

#: DICOM's defined term for UTF-8 (PS3.3 C.12.1.1.2): patient and protocol names need no other encoding.
UTF8 = "ISO_IR 192"

#: Bits stored of images whose result file has no MRD header (the whole uint16 range).
UINT16_BITS = 16

#: How many slices the job page previews at most (evenly spread over the images).
PREVIEW_COUNT = 4


def preview_indexes(n_images: int, count: int = PREVIEW_COUNT) -> list[int]:
    """Indexes of up to ``count`` images spread evenly over ``n_images``."""
    if n_images <= count:
        return list(range(n_images))
    return sorted({round(i * (n_images - 1) / (count - 1)) for i in range(count)})


def count_images(path: Path) -> int:
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False, mode="r") as dset:
        return sum(dset.number_of_images(g) for g in dset.list() if g.startswith("image_"))


def _window(image: ismrmrd.Image, pixels: np.ndarray) -> tuple[float, float]:
    """(low, high) display range: the image's WindowCenter/WindowWidth, else its min and max."""
    try:
        centre, width = float(image.meta["WindowCenter"]), float(image.meta["WindowWidth"])
        if width > 0:
            return centre - width / 2, centre + width / 2
    except (KeyError, TypeError, ValueError):
        pass
    low, high = float(pixels.min()), float(pixels.max())
    return low, high if high > low else low + 1


def png_of(image: ismrmrd.Image) -> bytes:
    """An 8-bit greyscale PNG of the image's first channel and partition, windowed as the scanner would."""
    pixels = np.abs(np.asarray(image.data)[0, 0]).astype(np.float32)
    low, high = _window(image, pixels)
    grey = np.clip((pixels - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(grey).save(out, format="PNG")
    return out.getvalue()


def preview_png(path: Path, index: int) -> bytes:
    """PNG of image ``index`` (in :func:`reconq.core.results.read_images` order) of a result file."""
    images = read_images(path)
    if not 0 <= index < len(images):
        raise IndexError(f"image {index} out of range (the result has {len(images)})")
    return png_of(images[index])


def _header(path: Path) -> ismrmrd.xsd.ismrmrdHeader | None:
    xml = read_result_xml(path)
    return None if xml is None else parse_header(xml, str(path))


# -- DICOM ----------------------------------------------------------------------------------------------------

#: ``sequenceParameters.sequence_type`` (lower case, e.g. ``Flash``, ``TurboSpinEcho``, ``Gradient echo``):
#: the words that give each Scanning Sequence term (PS3.3 C.8.3.1, in the order DICOM lists them) and
#: Sequence Variant term. Short names count only as whole words (``se``, not the ``se`` of ``sense``).
SCANNING_WORDS: dict[str, tuple[str, ...]] = {
    "SE": ("spin echo", "spinecho", "spin-echo", "turbospin", "tse", "fse", "haste"),
    "IR": ("inversion", "mprage", "flair", "stir"),
    "GR": ("gradient", "gre", "flash", "fisp", "ssfp", "spgr", "fiesta", "vibe"),
    "EP": ("epi", "echo planar", "echoplanar", "echo-planar"),
}
SCANNING_NAMES = {"se": "SE", "ir": "IR", "gr": "GR", "fl": "GR", "ep": "EP"}
VARIANT_WORDS: dict[str, tuple[str, ...]] = {
    "SP": ("flash", "spgr", "spoil"),
    "SS": ("ssfp", "fisp", "fiesta"),
    "MP": ("mprage", "prepared"),
}

#: The MR Image module's Type 1 terms when the header names no sequence: research mode, no variant.
RESEARCH_MODE, NO_VARIANT = "RM", "NONE"


@dataclass(frozen=True)
class _Export:
    """What the DICOM files of one result share: the scan's header, the job, the UID root, the bits stored."""

    header: ismrmrd.xsd.ismrmrdHeader | None
    job_id: str
    description: str
    uid_root: str
    bits: int

    def uid(self, *entropy: str) -> UID:
        """A UID under the root (pydicom's when empty), the same for the same ``entropy``; at most 64 chars."""
        return generate_uid(prefix=f"{self.uid_root}." if self.uid_root else PYDICOM_ROOT_UID,
                            entropy_srcs=list(entropy))

    def scanners_uid(self, value: str | None, *entropy: str) -> UID:
        """The header's UID ``value`` where it is a valid one, else one made from ``entropy``."""
        if value and len(value) <= 64 and RE_VALID_UID.match(value):
            return UID(value)
        if value:  # not the value: a study UID identifies the exam
            log.warning("job %s: a UID in the MRD header is not a valid DICOM UID: another is made", self.job_id)
        return self.uid(*entropy)


def _text(value: object, max_chars: int) -> str:
    """``value`` as DICOM text of at most ``max_chars`` characters (the VR's limit); "" for None."""
    return "" if value is None else str(value)[:max_chars]


def _da(date: XmlDate | None) -> str:
    """An MRD (xs:date) date as DICOM DA ``YYYYMMDD``; "" for None."""
    return "" if date is None else f"{date.year:04d}{date.month:02d}{date.day:02d}"


def _tm(time: XmlTime | None) -> str:
    """An MRD (xs:time) time as DICOM TM ``HHMMSS.FFFFFF`` (the fraction only where there is one); ""."""
    if time is None:
        return ""
    hhmmss = f"{time.hour:02d}{time.minute:02d}{time.second:02d}"
    fraction_us = (time.fractional_second or 0) // 1000  # xsdata keeps nanoseconds
    return f"{hhmmss}.{fraction_us:06d}" if fraction_us else hhmmss


def _ds(value: float | None) -> str | None:
    """A number as DICOM DS (at most 16 characters); None (an empty value) for None."""
    return None if value is None else format_number_as_ds(float(value))


def _nth(values: Sequence[float], n: int) -> float | None:
    """``values[n]`` (e.g. the TE of contrast ``n``); the one value when there is only one; else None."""
    if n < len(values):
        return values[n]
    return values[0] if len(values) == 1 else None


def _pixel_values(image: ismrmrd.Image, bits: int) -> tuple[np.ndarray, int]:
    """The first channel and partition as uint16 in ``0 .. 2**bits - 1``: rounded (magnitudes of complex
    data), clipped where outside (never wrapped); and how many pixels were clipped."""
    data = np.asarray(image.data)[0, 0]
    values = np.rint(np.abs(data) if np.iscomplexobj(data) else data.astype(np.float64))
    top = 2**bits - 1
    values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
    clipped = int(np.count_nonzero((values < 0) | (values > top)))
    return np.clip(values, 0, top).astype(np.uint16), clipped


def _sequence_terms(sequence_type: str | None) -> tuple[list[str], list[str]]:
    """Scanning Sequence and Sequence Variant (PS3.3 C.8.3.1, both Type 1) of the header's sequence type:
    research mode and no variant where it names none (or none that is known)."""
    name = (sequence_type or "").lower()
    words = set("".join(c if c.isalnum() else " " for c in name).split())
    scanning = [term for term, parts in SCANNING_WORDS.items()
                if any(part in name for part in parts) or any(SCANNING_NAMES.get(w) == term for w in words)]
    variant = [term for term, parts in VARIANT_WORDS.items() if any(part in name for part in parts)]
    return scanning or [RESEARCH_MODE], variant or [NO_VARIANT]


def _file_dataset(sop_instance_uid: UID) -> FileDataset:
    """An empty MR Image Storage instance, Explicit VR Little Endian, its text in UTF-8 (SOP Common)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = UTF8  # pydicom encodes every text element with it: names go in as the header has them
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_instance_uid
    return ds


def _patient(ds: FileDataset, export: _Export) -> None:
    """Patient module (C.7.1.1); weight (kg) and height (m) when the header has them."""
    subject = getattr(export.header, "subjectInformation", None)
    ds.PatientName = _text(getattr(subject, "patientName", None), 64)
    ds.PatientID = _identifier(getattr(subject, "patientID", None), "patient ID", export.job_id, 64)
    ds.PatientBirthDate = _da(getattr(subject, "patientBirthdate", None))
    sex = getattr(subject, "patientGender", None)
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    if weight_kg := getattr(subject, "patientWeight_kg", None):
        ds.PatientWeight = _ds(weight_kg)
    if height_m := getattr(subject, "patientHeight_m", None):
        ds.PatientSize = _ds(height_m)


def _identifier(value: object, what: str, job_id: str, max_chars: int = 16) -> str:
    """An identifier (SH: 16 characters at most, LO: 64): one longer is left empty, never cut (a cut patient
    ID or accession number could be another patient's or order's), with a warning that does not show it."""
    text = "" if value is None else str(value)
    if len(text) > max_chars:
        log.warning("job %s: the MRD header's %s is longer than DICOM's %d characters: left empty", job_id, what,
                    max_chars)
        return ""
    return text


def _study(ds: FileDataset, export: _Export) -> None:
    """General Study module (C.7.2.1): the scanner's study UID, or one made from the job where it has none."""
    study = getattr(export.header, "studyInformation", None)
    ds.StudyInstanceUID = export.scanners_uid(getattr(study, "studyInstanceUID", None), export.job_id)
    ds.StudyDate = _da(getattr(study, "studyDate", None))
    ds.StudyTime = _tm(getattr(study, "studyTime", None))
    ds.ReferringPhysicianName = _text(getattr(study, "referringPhysicianName", None), 64)
    ds.StudyID = _identifier(getattr(study, "studyID", None), "study ID", export.job_id)
    ds.AccessionNumber = _identifier(getattr(study, "accessionNumber", None), "accession number", export.job_id)
    if description := getattr(study, "studyDescription", None):
        ds.StudyDescription = _text(description, 64)


def _series(ds: FileDataset, image: ismrmrd.Image, export: _Export) -> None:
    """General Series module (C.7.3.1): one series per ``image_series_index``; the body part only where the
    header's is a valid code string."""
    measurement = getattr(export.header, "measurementInformation", None)
    ds.Modality = "MR"
    ds.SeriesInstanceUID = export.uid(export.job_id, str(image.image_series_index))
    ds.SeriesNumber = int(image.image_series_index)
    ds.Laterality = ""  # Type 2C: a paired body part's side, which the header does not give
    ds.SeriesDate = _da(getattr(measurement, "seriesDate", None))
    ds.SeriesTime = _tm(getattr(measurement, "seriesTime", None))
    ds.SeriesDescription = export.description[:64]
    if protocol := getattr(measurement, "protocolName", None):
        ds.ProtocolName = _text(protocol, 64)
    position = getattr(measurement, "patientPosition", None)
    ds.PatientPosition = getattr(position, "value", "")  # HFS, FFP, ...: the same terms in MRD and DICOM
    body_part = (getattr(getattr(export.header, "studyInformation", None), "bodyPartExamined", None) or "").upper()
    if body_part and len(body_part) <= 16 and all(c.isascii() and (c.isalnum() or c in " _") for c in body_part):
        ds.BodyPartExamined = body_part


def _frame_of_reference(ds: FileDataset, export: _Export) -> None:
    """Frame of Reference module (C.7.4.1): the scanner's frame, so that the images overlay its own; made
    from the study (one frame for all its jobs) only where the header has none."""
    measurement = getattr(export.header, "measurementInformation", None)
    ds.FrameOfReferenceUID = export.scanners_uid(getattr(measurement, "frameOfReferenceUID", None),
                                                 ds.StudyInstanceUID, "frame")
    ds.PositionReferenceIndicator = ""  # Type 2: the anatomical landmark, which the header does not give


def _equipment(ds: FileDataset, export: _Export) -> None:
    """General Equipment module (C.7.5.1): the scanner that acquired the raw data."""
    system = getattr(export.header, "acquisitionSystemInformation", None)
    ds.Manufacturer = _text(getattr(system, "systemVendor", None), 64)
    for keyword, attribute, max_chars in (("ManufacturerModelName", "systemModel", 64),
                                          ("InstitutionName", "institutionName", 64),
                                          ("StationName", "stationName", 16),
                                          ("DeviceSerialNumber", "deviceSerialNumber", 64)):
        if getattr(system, attribute, None):
            setattr(ds, keyword, _text(getattr(system, attribute), max_chars))


def _general_image(ds: FileDataset, image: ismrmrd.Image, export: _Export) -> None:
    """General Image module (C.7.6.1): the content date and time are the series' (the images were made from
    its raw data); a repetition is an acquisition. Image Type value 3 is one of the MR Image module's terms
    (C.8.3.1.1.1): a magnitude image is none of its maps or subtractions, so ``OTHER``."""
    measurement = getattr(export.header, "measurementInformation", None)
    ds.InstanceNumber = int(image.image_index)
    ds.ContentDate = _da(getattr(measurement, "seriesDate", None))
    ds.ContentTime = _tm(getattr(measurement, "seriesTime", None))
    ds.AcquisitionNumber = int(image.repetition) + 1
    ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]


def _image_plane(ds: FileDataset, image: ismrmrd.Image, rows: int, columns: int) -> None:
    """Image Plane module (C.7.6.2): MRD gives the position of the centre pixel, ``(rows // 2, columns // 2)``
    (the centred FFT's, :mod:`reconq.recon.geometry`), and the FOV; DICOM the centre of the first (top left)
    pixel and the spacing of rows, then columns. The slice location is along the DICOM normal (row x column
    direction)."""
    fov = [float(v) for v in image.field_of_view]
    read_dir, phase_dir = np.asarray(image.read_dir, float), np.asarray(image.phase_dir, float)
    dy, dx = fov[1] / rows, fov[0] / columns
    centre = np.asarray(image.position, float)
    corner = centre - read_dir * (columns // 2) * dx - phase_dir * (rows // 2) * dy
    ds.ImagePositionPatient = [f"{v:.6f}" for v in corner]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*read_dir, *phase_dir)]
    ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
    ds.SliceThickness = f"{fov[2]:.6f}"
    ds.SliceLocation = f"{float(centre @ np.cross(read_dir, phase_dir)):.6f}"


def _mr_image(ds: FileDataset, image: ismrmrd.Image, export: _Export) -> None:
    """MR Image module (C.8.3.1): the sequence named by the header's ``sequence_type``, its timings (ms) and
    flip angle (deg), the echo time of the image's contrast (the inversion time only for an inversion
    recovery); 2D or 3D from the encoded matrix's z; the field (T) and frequency (MHz) of the system."""
    header = export.header
    sequence = getattr(header, "sequenceParameters", None)
    ds.ScanningSequence, ds.SequenceVariant = _sequence_terms(getattr(sequence, "sequence_type", None))
    ds.ScanOptions = ""  # Type 2: the header does not say which (gating, fat saturation, ...)
    encoding = header.encoding[0] if header is not None and header.encoding else None
    nz = int(encoding.encodedSpace.matrixSize.z or 1) if encoding is not None else None
    ds.MRAcquisitionType = "" if nz is None else "3D" if nz > 1 else "2D"
    ds.RepetitionTime = _ds(_nth(getattr(sequence, "TR", None) or [], 0))
    ds.EchoTime = _ds(_nth(getattr(sequence, "TE", None) or [], int(image.contrast)))
    ds.EchoNumbers = int(image.contrast) + 1
    ds.EchoTrainLength = None  # Type 2: not in the header
    if "IR" in ds.ScanningSequence:  # Type 2C, and only then: a TI of another sequence is no inversion's
        ds.InversionTime = _ds(_nth(getattr(sequence, "TI", None) or [], 0))
    flip = _nth(getattr(sequence, "flipAngle_deg", None) or [], 0)
    if flip is not None:
        ds.FlipAngle = _ds(flip)
    measurement = getattr(header, "measurementInformation", None)
    if name := getattr(measurement, "sequenceName", None):
        ds.SequenceName = _text(name, 16)
    if field_t := getattr(getattr(header, "acquisitionSystemInformation", None), "systemFieldStrength_T", None):
        ds.MagneticFieldStrength = _ds(field_t)
    frequency = getattr(getattr(header, "experimentalConditions", None), "H1resonanceFrequency_Hz", None)
    if frequency:
        ds.ImagingFrequency = _ds(frequency / 1e6)


def _image_pixel(ds: FileDataset, image: ismrmrd.Image, pixels: np.ndarray, bits: int) -> None:
    """Image Pixel and VOI LUT modules (C.7.6.3, C.11.2): unsigned 16-bit words of which ``bits`` are
    stored; no rescale (the values are the scanner's display units, not a physical quantity)."""
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    with contextlib.suppress(KeyError):
        ds.WindowCenter, ds.WindowWidth = str(image.meta["WindowCenter"]), str(image.meta["WindowWidth"])
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def _dicom_of(image: ismrmrd.Image, pixels: np.ndarray, export: _Export) -> FileDataset:
    """One MR Image Storage instance of ``image``, module by module (PS3.3 A.4.3)."""
    ds = _file_dataset(export.uid(export.job_id, str(image.image_series_index), str(image.image_index),
                                  str(image.slice)))
    _patient(ds, export)
    _study(ds, export)
    _series(ds, image, export)
    _frame_of_reference(ds, export)
    _equipment(ds, export)
    _general_image(ds, image, export)
    _image_plane(ds, image, *pixels.shape)
    _mr_image(ds, image, export)
    _image_pixel(ds, image, pixels, export.bits)
    return ds


def dicom_zip(path: Path, job_id: str, description: str, *, uid_root: str = "") -> bytes:
    """A zip of one DICOM MR image file per result image, ``series_<n>/image_<k>.dcm``.

    Pixels are stored in the header's ``BitsStored`` (16 without a header), as the images were scaled
    (:func:`reconq.recon.images.to_mrd_images`); a value outside that range is clipped, and logged.

    Args:
        path: the result file (MRD images and the scan's header).
        job_id: the job, from which every UID made here is derived.
        description: the Series Description.
        uid_root: the root of the UIDs made here (the ``dicom_uid_root`` setting); empty: pydicom's.
    """
    images: Sequence[ismrmrd.Image] = read_images(path)
    header = _header(path)
    export = _Export(header, job_id, description, uid_root,
                     bits_stored(header) if header is not None else UINT16_BITS)
    clipped = 0
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, image in enumerate(images):
            pixels, n_clipped = _pixel_values(image, export.bits)
            clipped += n_clipped
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, _dicom_of(image, pixels, export), enforce_file_format=True)
            zf.writestr(f"series_{image.image_series_index}/image_{k:04d}.dcm", buf.getvalue())
    if clipped:
        log.warning("job %s: %d pixels outside 0..%d (BitsStored %d) clipped in the DICOM export", job_id,
                    clipped, 2**export.bits - 1, export.bits)
    return out.getvalue()
