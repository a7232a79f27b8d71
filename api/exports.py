"""A job's result images for people: PNG previews rendered on the server, and DICOM (pydicom) in a zip.

Result files are MRD image files (see :mod:`reconq.core.results`); the MRD header stored with them gives
the patient, study and protocol for DICOM, written as UTF-8 (``ISO_IR 192``).
"""

from __future__ import annotations

import contextlib
import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

import ismrmrd
import ismrmrd.xsd
import numpy as np
import pydicom
from PIL import Image as PILImage
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from reconq.core.mrdfile import parse_header
from reconq.core.results import read_images, read_result_xml

#: DICOM's defined term for UTF-8 (PS3.3 C.12.1.1.2): patient and protocol names need no other encoding.
UTF8 = "ISO_IR 192"

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


def _dicom_of(image: ismrmrd.Image, header: ismrmrd.xsd.ismrmrdHeader | None, job_id: str,
              description: str) -> FileDataset:
    pixels = np.asarray(image.data)[0, 0]
    ny, nx = pixels.shape
    fov = [float(v) for v in image.field_of_view]
    read_dir, phase_dir = np.asarray(image.read_dir, float), np.asarray(image.phase_dir, float)
    dy, dx = fov[1] / ny, fov[0] / nx
    # MRD positions the image centre; DICOM the centre of the first (top left) pixel.
    corner = np.asarray(image.position, float) - read_dir * (fov[0] - dx) / 2 - phase_dir * (fov[1] - dy) / 2

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[job_id, str(image.image_series_index),
                                                                 str(image.image_index), str(image.slice)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = UTF8  # before any text: names go in as the header has them
    ds.Modality = "MR"
    subject = header.subjectInformation if header is not None else None
    study = header.studyInformation if header is not None else None
    measurement = header.measurementInformation if header is not None else None
    ds.PatientID = (subject.patientID if subject is not None else None) or ""
    ds.PatientName = (subject.patientName if subject is not None else None) or ""
    if measurement is not None and measurement.protocolName:
        ds.ProtocolName = measurement.protocolName[:64]
    ds.StudyInstanceUID = (study.studyInstanceUID if study is not None else None) or generate_uid(
        entropy_srcs=[job_id])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[job_id, str(image.image_series_index)])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[ds.StudyInstanceUID, "frame"])
    ds.SeriesNumber, ds.InstanceNumber = int(image.image_series_index), int(image.image_index)
    ds.SeriesDescription = description[:64]
    ds.ImageType = ["DERIVED", "PRIMARY", "M"]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in corner]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*read_dir, *phase_dir)]
    ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
    ds.SliceThickness = f"{fov[2]:.6f}"
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    with contextlib.suppress(KeyError):
        ds.WindowCenter, ds.WindowWidth = str(image.meta["WindowCenter"]), str(image.meta["WindowWidth"])
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    return ds


def dicom_zip(path: Path, job_id: str, description: str) -> bytes:
    """A zip of one DICOM MR image file per result image, ``series_<n>/image_<k>.dcm``."""
    images: Sequence[ismrmrd.Image] = read_images(path)
    header = _header(path)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, image in enumerate(images):
            buf = io.BytesIO()
            pydicom.dcmwrite(buf, _dicom_of(image, header, job_id, description), enforce_file_format=True)
            zf.writestr(f"series_{image.image_series_index}/image_{k:04d}.dcm", buf.getvalue())
    return out.getvalue()
