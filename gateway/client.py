"""An MRD client, as a scanner would be: stream a scan (or a retrieval scan) and collect the replies."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ismrmrd
import ismrmrd.xsd

from reconq.gateway import protocol as p


@dataclass
class Reply:
    """What the server sent back: TEXT messages, images, and whether it closed with CLOSE."""

    texts: list[str] = field(default_factory=list)
    images: list[ismrmrd.Image] = field(default_factory=list)
    closed: bool = False

    def job_id(self) -> str | None:
        """The job id from an ``INF job <id> queued`` TEXT, if any."""
        for t in self.texts:
            words = t.split()
            if len(words) >= 3 and words[0] == "INF" and words[1] == "job":
                return words[2]
        return None

    def errors(self) -> list[str]:
        return [t for t in self.texts if t.startswith(("ERR", "WRN"))]


#: Called with each TEXT the server sends, as it comes (a progress bar shows it; see ``reconq send``)
TextHook = Callable[[str], None]
#: Called with each image as it arrives, and with how many have come
ImageHook = Callable[[ismrmrd.Image, int], None]


def read_reply(sock: socket.socket, limits: p.Limits | None = None, on_text: TextHook | None = None,
               on_image: ImageHook | None = None) -> Reply:
    """Read server messages until its CLOSE (or EOF)."""
    limits = limits or p.Limits()
    src = p.SocketSource(sock)
    reply = Reply()
    try:
        while True:
            msg = p.read_message_id(src)
            if msg == p.MessageId.CLOSE:
                reply.closed = True
                return reply
            if msg == p.MessageId.TEXT:
                reply.texts.append(p.read_length_prefixed(src, limits.max_text_bytes, "TEXT"))
                if on_text is not None:
                    on_text(reply.texts[-1])
            elif msg == p.MessageId.IMAGE:
                reply.images.append(p.read_image(src, limits))
                if on_image is not None:
                    on_image(reply.images[-1], len(reply.images))
            else:
                raise p.ProtocolError(f"unexpected message id {msg} from the server")
    except p.StreamClosed:
        return reply
    finally:
        src.close()


def header_xml(header: ismrmrd.xsd.ismrmrdHeader) -> str:
    """``header`` as XML declared UTF-8, the encoding it goes on the wire in (``toXML()`` declares ASCII
    whatever the header holds, which an XML parser refuses for a patient ``Müller``)."""
    return str(ismrmrd.xsd.ToXML(header, encoding="utf-8"))


def opening(config: str | None, header: ismrmrd.xsd.ismrmrdHeader | str, params: dict[str, Any] | None = None,
            config_text: bool = False) -> bytes:
    """CONFIG (file or text, or none), HEADER, and the optional JSON parameter TEXT."""
    xml = header if isinstance(header, str) else header_xml(header)
    parts = []
    if config is not None:
        parts.append(p.write_length_prefixed(p.MessageId.CONFIG_TEXT, config) if config_text
                     else p.write_config_file(config))
    parts.append(p.write_length_prefixed(p.MessageId.HEADER, xml))
    if params:
        parts.append(p.write_text(json.dumps(params)))
    return b"".join(parts)


def stream_session(host: str, port: int, head: bytes, messages: Iterable[bytes], timeout: float = 600.0,
                   on_sent: Callable[[int], None] | None = None, on_text: TextHook | None = None,
                   on_image: ImageHook | None = None) -> Reply:
    """Send ``head``, then each message, then CLOSE; return what the server replied. ``on_sent`` is called
    with the size of each message sent after the head; ``on_text``/``on_image`` as :func:`read_reply`."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head)
        for message in messages:
            sock.sendall(message)
            if on_sent is not None:
                on_sent(len(message))
        sock.sendall(p.write_close())
        return read_reply(sock, on_text=on_text, on_image=on_image)


def send_scan(host: str, port: int, header: ismrmrd.xsd.ismrmrdHeader | str,
              acquisitions: Iterable[ismrmrd.Acquisition], config: str | None = None,
              params: dict[str, Any] | None = None, config_text: bool = False) -> Reply:
    return stream_session(host, port, opening(config, header, params, config_text),
                          (p.write_acquisition(a) for a in acquisitions))


def send_file(host: str, port: int, path: Path, config: str | None = None,
              params: dict[str, Any] | None = None, on_sent: Callable[[int], None] | None = None,
              on_text: TextHook | None = None) -> Reply:
    """Stream an MRD file's header, readouts and waveforms, as a scanner would (``on_sent``: see
    :func:`stream_session`)."""
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False, mode="r") as dset:
        xml = dset.read_xml_header()
        xml = xml.decode("utf-8") if isinstance(xml, bytes) else xml
        n_acq = dset.number_of_acquisitions() if "data" in dset.list() else 0
        n_wav = dset.number_of_waveforms() if "waveforms" in dset.list() else 0
        messages = [p.write_waveform(dset.read_waveform(i)) for i in range(n_wav)]

        def all_messages() -> Iterable[bytes]:
            yield from messages
            for i in range(n_acq):
                yield p.write_acquisition(dset.read_acquisition(i))

        return stream_session(host, port, opening(config, xml, params), all_messages(), on_sent=on_sent,
                              on_text=on_text)


def retrieve(host: str, port: int, header: ismrmrd.xsd.ismrmrdHeader | str, config: str = "retrieve",
             params: dict[str, Any] | None = None, timeout: float = 3600.0, on_text: TextHook | None = None,
             on_image: ImageHook | None = None) -> Reply:
    """Run a retrieval scan: the header identifies patient, study and protocol; no data."""
    return stream_session(host, port, opening(config, header, params), (), timeout=timeout, on_text=on_text,
                          on_image=on_image)


def retrieval_header(patient_id: str, study_uid: str, protocol: str) -> str:
    """A minimal MRD header naming a patient, study and protocol (for `reconq retrieve`); its recon space is
    all zeros, which asks for the images as they were reconstructed (not fitted to another matrix)."""
    x = ismrmrd.xsd
    space = x.encodingSpaceType(matrixSize=x.matrixSizeType(x=0, y=0, z=0),
                                fieldOfView_mm=x.fieldOfViewMm(x=0.0, y=0.0, z=0.0))
    hdr = x.ismrmrdHeader(
        subjectInformation=x.subjectInformationType(patientID=patient_id),
        studyInformation=x.studyInformationType(studyInstanceUID=study_uid),
        measurementInformation=x.measurementInformationType(
            protocolName=protocol, patientPosition=x.patientPositionType("HFS")),
        experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=123_000_000),
        encoding=[x.encodingType(encodedSpace=space, reconSpace=space, encodingLimits=x.encodingLimitsType(),
                                 trajectory=x.trajectoryType("cartesian"))],
    )
    return header_xml(hdr)
