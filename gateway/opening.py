"""What an MRD session opens with: the config (a pipeline name, or JSON), the header, its identifiers;
what the client's parameters may be (:func:`refused_parameters`) and how much data its header lets a scan
bring (:func:`session_byte_cap`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ismrmrd.xsd

from reconq.gateway.protocol import ACQ_HEADER_SIZE
from reconq.recon.errors import ReconError
from reconq.recon.registry import get_pipeline
from reconq.scheduler.estimate import EstimateError, check_params

#: Receiver channels assumed where a header does not say how many it has.
UNKNOWN_CHANNELS = 128
#: Trajectory bytes per sample at most (three float32 dimensions).
TRAJECTORY_BYTES = 3 * 4
#: Encoding counters that multiply the readouts of an encoding (k-space lines come from step_1 and step_2).
_MULTIPLIERS = ("average", "slice", "contrast", "phase", "repetition", "set")


class OpeningError(Exception):
    """The config or a parameter TEXT cannot be used; the message says why (sent as an ERR TEXT)."""


@dataclass
class Opening:
    """What came before the data: the config and the header."""

    config_file: str | None
    config_text: str | None
    xml: str
    header: ismrmrd.xsd.ismrmrdHeader


def identity(header: ismrmrd.xsd.ismrmrdHeader) -> dict[str, str]:
    """Patient, study, protocol and measurement identifiers of a header ('' where absent)."""
    subject, study, meas = header.subjectInformation, header.studyInformation, header.measurementInformation
    return {
        "patient_id": str(getattr(subject, "patientID", None) or ""),
        "study_uid": str(getattr(study, "studyInstanceUID", None) or getattr(study, "studyID", None) or ""),
        "protocol": str(getattr(meas, "protocolName", None) or ""),
        "measurement_id": str(getattr(meas, "measurementID", None) or ""),
    }


def json_object(body: str, what: str) -> dict[str, Any]:
    """``body`` parsed as a JSON object; OpeningError saying what is wrong otherwise."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise OpeningError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise OpeningError(f"{what} must be a JSON object")
    return data


def config_name(opening: Opening) -> tuple[str | None, dict[str, Any]]:
    """The config name and any parameters carried in CONFIG_TEXT (a name, or JSON ``{"pipeline": ...}``)."""
    if opening.config_file is not None:
        name = opening.config_file.strip()  # path separators and '..' are refused as it is read
        if not name:
            raise OpeningError("CONFIG_FILE names no config")
        return name.removesuffix(".xml"), {}
    if opening.config_text is None:
        return None, {}
    body = opening.config_text.strip()
    if body.startswith("{"):
        data = json_object(body, "CONFIG_TEXT")
        name = data.pop("pipeline", None) or data.pop("config", None)
        if not isinstance(name, str) or not name:
            raise OpeningError("CONFIG_TEXT JSON names no pipeline: give {\"pipeline\": NAME, ...}")
        parameters = data.pop("parameters", {})
        if not isinstance(parameters, dict):
            raise OpeningError("CONFIG_TEXT JSON \"parameters\" must be an object")
        return name, {**parameters, **data}
    if body and body.replace("_", "").replace("-", "").isalnum():
        return body, {}
    raise OpeningError("CONFIG_TEXT must be a pipeline name or JSON {\"pipeline\": NAME, \"parameters\": {...}}")


def parameters_from_text(body: str) -> dict[str, Any]:
    """Job parameters from a JSON TEXT: a flat object, or python-ismrmrd-server's ``configAdditional``
    form ``{"parameters": {...}, ...}`` (whose ``parameters`` are taken)."""
    data = json_object(body, "parameter TEXT")
    inner = data.get("parameters")
    return dict(inner) if isinstance(inner, dict) else data


def refused_parameters(pipeline: str, params: Mapping[str, Any]) -> str | None:
    """Why a scan's job cannot have ``params`` (a scheduling hint, ``gpu_memory_gb`` or
    ``expected_seconds``, that is not a number in its range, or a parameter ``pipeline`` declares out of
    its range: :func:`reconq.scheduler.estimate.check_params`); None where they may be used."""
    try:
        declared = get_pipeline(pipeline)
    except ReconError:  # not registered in this process: its hints are still checked
        declared = None
    try:
        check_params(params, declared)
    except EstimateError as e:
        return str(e)
    return None


def _whole(value: Any) -> int | None:
    try:
        number = int(value) if value is not None and not isinstance(value, bool) else 0
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _count(limits: Any, name: str) -> int:
    """Values of the encoding counter ``name`` (``maximum + 1``), 1 where the header does not say."""
    top = getattr(getattr(limits, name, None), "maximum", None)
    return (_whole(top) or 0) + 1


def declared_bytes(header: ismrmrd.xsd.ismrmrdHeader) -> int:
    """Bytes of readouts (headers, samples of every receiver channel, trajectories) the header's encodings
    describe: per encoding, the larger of its k-space lines (``kspace_encoding_step_1`` x ``_2``) and its
    encoded matrix's (y x z), times its averages, slices, contrasts, phases, repetitions and sets, each of
    the encoded matrix's x samples. A value the header lacks, or that is not a whole number, counts 1
    (channels: :data:`UNKNOWN_CHANNELS`)."""
    system = getattr(header, "acquisitionSystemInformation", None)
    channels = _whole(getattr(system, "receiverChannels", None)) or UNKNOWN_CHANNELS
    total = 0
    for enc in getattr(header, "encoding", None) or []:
        matrix = getattr(getattr(enc, "encodedSpace", None), "matrixSize", None)
        x, y, z = (_whole(getattr(matrix, axis, None)) or 1 for axis in "xyz")
        limits = getattr(enc, "encodingLimits", None)
        readouts = max(_count(limits, "kspace_encoding_step_1"), y) * max(_count(limits, "kspace_encoding_step_2"), z)
        for name in _MULTIPLIERS:
            readouts *= _count(limits, name)
        total += readouts * (ACQ_HEADER_SIZE + x * (channels * 8 + TRAJECTORY_BYTES))
    return total


def session_byte_cap(header: ismrmrd.xsd.ismrmrdHeader, factor: float, floor: int) -> int | None:
    """The most bytes a scan with ``header`` may bring: ``factor`` times :func:`declared_bytes` (noise,
    calibration and navigator readouts, readouts longer than the matrix), plus ``floor``; None (no cap)
    where ``factor`` is 0."""
    if factor <= 0:
        return None
    return int(factor * declared_bytes(header)) + floor
