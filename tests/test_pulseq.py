"""Pulseq scans: .seq signatures verified, the sequence folder, trajectories matched to a scan's readouts."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import ismrmrd
import ismrmrd.hdf5
import ismrmrd.xsd
import numpy as np
import pytest

from reconq.cli import main
from reconq.recon import pulseq
from reconq.recon.errors import ReconError
from reconq.recon.pulseq import (
    SequenceLibrary,
    load_trajectory,
    scan_trajectories,
    seq_signature,
    signature_from_header,
)
from reconq.recon.simulate import synthetic_scan

NSPOKES, NS, FOV = 8, 64, 0.256
NOISE = np.uint64(1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))


@pytest.fixture(scope="module")
def seqs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Signed .seq files written by pypulseq: a 2D radial, a two-echo radial, a stack of stars."""
    folder = tmp_path_factory.mktemp("written")
    out = {}
    for key, kw in {"radial": {}, "echoes": {"echoes": 2}, "stars": {"partitions": 4}}.items():
        seq = pulseq.example_radial_sequence(NSPOKES, NS, FOV, **kw)
        path = folder / f"{key}.seq"
        written = seq.write(str(path))
        out[key] = path
        out[key + "_written"] = written
    return out


def heads_for(counts: list[int], noise_at: tuple[int, ...] = ()) -> np.ndarray:
    """Acquisition headers: one per ADC count, with noise readouts inserted at the given positions."""
    rows = list(counts)
    for i in sorted(noise_at):
        rows.insert(i, -1)
    heads = np.zeros(len(rows), dtype=ismrmrd.hdf5.acquisition_header_dtype)
    for i, n in enumerate(rows):
        heads[i]["number_of_samples"] = 128 if n < 0 else n
        heads[i]["flags"] = NOISE if n < 0 else np.uint64(0)
    return heads


# ------------------------------------------------------------------------------------------- signatures


def test_a_pypulseq_file_verifies_and_the_recomputed_signature_is_the_recorded_one(seqs):
    sig = seq_signature(seqs["radial"])
    assert sig.recorded == seqs["radial_written"]
    assert sig.computed == sig.recorded and sig.verified
    data = seqs["radial"].read_bytes()  # the bytes covered: up to the newline before [SIGNATURE], not it
    body = data[: data.index(b"\n[SIGNATURE]")]
    assert hashlib.md5(body).hexdigest() == sig.recorded
    assert hashlib.md5(body + b"\n").hexdigest() != sig.recorded


def test_windows_line_ends_still_verify(seqs, tmp_path):
    crlf = tmp_path / "crlf.seq"
    crlf.write_bytes(seqs["radial"].read_bytes().replace(b"\n", b"\r\n"))
    sig = seq_signature(crlf)
    assert sig.verified and sig.computed == seqs["radial_written"]


def test_an_edited_byte_fails_verification_and_is_never_matched(seqs, tmp_path):
    data = bytearray(seqs["radial"].read_bytes())
    at = data.index(b"[BLOCKS]") - 3
    data[at : at + 1] = b"7" if data[at : at + 1] != b"7" else b"8"
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "radial.seq").write_bytes(bytes(data))
    sig = seq_signature(lib / "radial.seq")
    assert sig.recorded == seqs["radial_written"] and not sig.verified
    entry = SequenceLibrary(lib).entries()[0]
    assert not entry.verified and "changed after signing" in entry.reason
    with pytest.raises(ReconError, match=seqs["radial_written"]) as e:
        SequenceLibrary(lib).find(seqs["radial_written"], "radial.seq")
    assert "changed after signing" in str(e.value)
    with pytest.raises(ReconError, match="changed after it was signed"):
        load_trajectory(lib / "radial.seq")


def test_unsigned_files_are_listed_and_never_matched(seqs, tmp_path):
    data = seqs["radial"].read_bytes()
    (tmp_path / "plain.seq").write_bytes(data[: data.index(b"\n[SIGNATURE]")])
    entry = SequenceLibrary(tmp_path).entries()[0]
    assert entry.recorded is None and not entry.verified and "not signed" in entry.reason
    with pytest.raises(ReconError):
        SequenceLibrary(tmp_path).find(entry.computed)


# ------------------------------------------------------------------------------------------------ library


def test_find_by_signature_by_a_wrong_one_and_with_a_name_holding_another(seqs, tmp_path):
    lib = SequenceLibrary(tmp_path / "lib")
    radial = lib.add(seqs["radial"])
    echoes = lib.add(seqs["echoes"])
    assert lib.find(seqs["radial_written"]) == radial
    assert lib.find(seqs["echoes_written"].upper() + " ") == echoes
    assert lib.find(seqs["echoes_written"], "radial.seq") == echoes  # the signature decides
    wrong = "0" * 32
    with pytest.raises(ReconError) as e:
        lib.find(wrong)
    assert wrong in str(e.value) and str(lib.folder) in str(e.value)
    with pytest.raises(ReconError) as e:
        lib.find(wrong, "radial")
    assert f"radial.seq there has signature {seqs['radial_written']}" in str(e.value)
    with pytest.raises(ReconError, match="no file named other.seq"):
        lib.find(wrong, "other.seq")
    with pytest.raises(ReconError, match="does not exist"):
        SequenceLibrary(tmp_path / "none").find(wrong)


def test_add_is_idempotent_and_refuses_bad_files(seqs, tmp_path):
    lib = SequenceLibrary(tmp_path / "lib")
    first = lib.add(seqs["radial"])
    assert lib.add(seqs["radial"]) == first and first.read_bytes() == seqs["radial"].read_bytes()
    entries = lib.entries()
    assert [(e.name, e.verified, e.adc_events, e.adc_samples) for e in entries] == [
        ("radial.seq", True, NSPOKES, NSPOKES * NS)]
    other = tmp_path / "other" / "radial.seq"  # same name, other content
    other.parent.mkdir()
    other.write_bytes(seqs["echoes"].read_bytes())
    with pytest.raises(ReconError, match="already holds a different radial.seq"):
        lib.add(other)
    edited = tmp_path / "edited.seq"
    edited.write_bytes(seqs["radial"].read_bytes().replace(b"[BLOCKS]", b"[BLOCKS]\n", 1))
    with pytest.raises(ReconError, match="changed after it was signed"):
        lib.add(edited)
    with pytest.raises(ReconError, match="no such file"):
        lib.add(tmp_path / "missing.seq")
    notseq = tmp_path / "radial.txt"
    notseq.write_bytes(seqs["radial"].read_bytes())
    with pytest.raises(ReconError, match="not a Pulseq .seq file"):
        lib.add(notseq)
    assert [e.name for e in lib.entries()] == ["radial.seq"]


def test_signature_from_header():
    def header(**strings: str) -> ismrmrd.xsd.ismrmrdHeader:
        h = synthetic_scan(matrix=(8, 8), ncoil=1).header
        h.userParameters = ismrmrd.xsd.userParametersType(
            userParameterString=[ismrmrd.xsd.userParameterStringType(name=k, value=v) for k, v in strings.items()])
        return ismrmrd.xsd.CreateFromDocument(ismrmrd.xsd.ToXML(h))  # as the gateway reads it

    md5 = "0123456789ABCDEF0123456789abcdef"
    assert signature_from_header(header(seq_signature=md5, seq_file="radial.seq")) == (md5.lower(), "radial.seq")
    assert signature_from_header(header(tSequenceVariant=f"md5 {md5}")) == (md5.lower(), None)
    assert signature_from_header(header(tSequenceVariant="none")) == (None, None)
    assert signature_from_header(synthetic_scan(matrix=(8, 8), ncoil=1).header) == (None, None)


# --------------------------------------------------------------------------------------------- trajectory


def test_radial_trajectory_one_spoke_per_adc_at_its_angle_and_nyquist_extent(seqs):
    traj = load_trajectory(seqs["radial"])
    assert traj.signature == seqs["radial_written"] and traj.file == "radial.seq"
    assert len(traj.adc) == NSPOKES and all(a.shape == (NS, 3) and a.dtype == np.float64 for a in traj.adc)
    assert traj.fov_m == pytest.approx((FOV, FOV, 5e-3))
    assert list(traj.labels) == ["kspace_encode_step_1"]
    np.testing.assert_array_equal(traj.labels["kspace_encode_step_1"], np.arange(NSPOKES))
    cycles = scan_trajectories(traj, heads_for([NS] * NSPOKES), None)  # the .seq FOV suffices
    for s, k in enumerate(cycles):
        assert k.dtype == np.float32 and k.shape == (NS, 3)
        phi = s * math.pi / NSPOKES
        direction = np.array([math.cos(phi), math.sin(phi)])
        along = k[:, :2] @ direction
        across = k[:, :2] @ np.array([-direction[1], direction[0]])
        np.testing.assert_allclose(along, np.arange(NS) - NS / 2, atol=1e-3)  # sample i at (i - ns/2) / FOV
        np.testing.assert_allclose(across, 0, atol=1e-3)
        np.testing.assert_allclose(k[:, 2], 0, atol=1e-2)
        assert np.abs(k[:, :2]).max() <= NS / 2 + 1e-3
        assert np.linalg.norm(k[:, :2], axis=1).max() == pytest.approx(NS / 2, abs=1e-3)
    assert load_trajectory(seqs["radial"]) is traj  # cached per signature


def test_two_echoes_label_eco_and_run_back(seqs):
    traj = load_trajectory(seqs["echoes"])
    assert len(traj.adc) == 2 * NSPOKES
    np.testing.assert_array_equal(traj.labels["contrast"], np.tile([0, 1], NSPOKES))
    np.testing.assert_array_equal(traj.labels["kspace_encode_step_1"], np.repeat(np.arange(NSPOKES), 2))
    k = scan_trajectories(traj, heads_for([NS] * 2 * NSPOKES), (256.0, 256.0, 5.0))
    np.testing.assert_allclose(k[0][:, 0], np.arange(NS) - NS / 2, atol=1e-3)
    np.testing.assert_allclose(k[1][:, 0], NS / 2 - 1 - np.arange(NS), atol=1e-3)  # bipolar second echo


def test_stack_of_stars_partitions(seqs):
    traj = load_trajectory(seqs["stars"])
    assert len(traj.adc) == 4 * NSPOKES
    np.testing.assert_array_equal(traj.labels["kspace_encode_step_2"], np.repeat(np.arange(4), NSPOKES))
    k = scan_trajectories(traj, heads_for([NS] * 4 * NSPOKES), None)
    kz = [float(np.median(a[:, 2])) for a in k[::NSPOKES]]
    np.testing.assert_allclose(kz, [-2, -1, 0, 1], atol=1e-2)


def test_header_fov_fills_axes_the_file_does_not_give(seqs):
    traj = load_trajectory(seqs["radial"])
    half = pulseq.SeqTrajectory(adc=traj.adc, fov_m=None, labels=traj.labels, signature=traj.signature)
    k = scan_trajectories(half, heads_for([NS] * NSPOKES), (128.0, 128.0, 5.0))
    np.testing.assert_allclose(k[0][:, 0], (np.arange(NS) - NS / 2) / 2, atol=1e-3)
    with pytest.raises(ReconError, match="no FOV"):
        scan_trajectories(half, heads_for([NS] * NSPOKES), None)


def test_noise_acquisitions_are_skipped(seqs):
    traj = load_trajectory(seqs["radial"])
    heads = heads_for([NS] * NSPOKES, noise_at=(0, 1))
    k = scan_trajectories(traj, heads, None)
    assert len(k) == NSPOKES + 2 and k[0] is None and k[1] is None
    assert all(a is not None and a.shape == (NS, 3) for a in k[2:])
    np.testing.assert_allclose(k[2], scan_trajectories(traj, heads_for([NS] * NSPOKES), None)[0])


def test_count_and_sample_mismatches_name_the_signature_and_the_difference(seqs):
    traj = load_trajectory(seqs["radial"])
    sig = seqs["radial_written"]
    with pytest.raises(ReconError) as e:
        scan_trajectories(traj, heads_for([NS] * (NSPOKES - 1), noise_at=(0,)), None)
    msg = str(e.value)
    assert sig in msg and "radial.seq" in msg
    assert f"has {NSPOKES} ADC events, the scan {NSPOKES - 1} acquisitions" in msg and "1 noise" in msg
    counts = [NS] * NSPOKES
    counts[5] = 2 * NS
    with pytest.raises(ReconError) as e:
        scan_trajectories(traj, heads_for(counts, noise_at=(0,)), None)
    assert sig in str(e.value) and f"ADC event 5 has {NS} samples, acquisition 6 has {2 * NS}" in str(e.value)


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_sequences_add_and_list(seqs, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "sequences"
    monkeypatch.setenv("RECONQ_SEQUENCE_DIR", str(folder))
    assert main(["sequences", "add", str(seqs["radial"]), str(seqs["echoes"])]) == 0
    out = capsys.readouterr().out
    assert str(folder) in out and f"radial.seq  {seqs['radial_written']}  verified" in out
    assert main(["sequences", "add", str(seqs["radial"])]) == 0  # idempotent
    capsys.readouterr()
    (folder / "broken.seq").write_bytes(seqs["stars"].read_bytes().replace(b"[BLOCKS]", b"[BLOCKS]\n", 1))

    assert main(["sequences", "list"]) == 0
    out = capsys.readouterr().out
    assert str(folder) in out
    assert f"echoes.seq  {seqs['echoes_written']}  verified" in out
    assert "broken.seq" in out and "NOT verified" in out
    assert main(["sequences", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["folder"] == str(folder)
    assert {e["name"]: e["verified"] for e in listed["sequences"]} == {
        "broken.seq": False, "echoes.seq": True, "radial.seq": True}

    for bad, words in ((tmp_path / "missing.seq", "no such file"), (folder / "broken.seq", "changed after")):
        assert main(["sequences", "add", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("reconq: ") and words in err and "Traceback" not in err and err.count("\n") == 1


def test_sequence_folder_defaults_under_the_data_dir(tmp_path, monkeypatch):
    from reconq.core.settings import load_settings

    monkeypatch.setenv("RECONQ_DATA_DIR", str(tmp_path))
    assert load_settings().sequence_folder == tmp_path / "sequences"
    monkeypatch.setenv("RECONQ_SEQUENCE_DIR", str(tmp_path / "x"))
    assert load_settings().sequence_folder == tmp_path / "x"
