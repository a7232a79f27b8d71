"""What an MRD session opens with: the config (a pipeline name, or JSON), the header, its identifiers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import ismrmrd.xsd


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
