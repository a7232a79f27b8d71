"""Settings: RECONQ_ variables, defaults, and mistyped names refused."""

from __future__ import annotations

import pytest

from reconq.core.settings import SettingsError, load_settings


def test_environment_sets_values(monkeypatch, tmp_path):
    monkeypatch.setenv("RECONQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RECONQ_MRD_PORT", "9100")
    monkeypatch.setenv("RECONQ_RETRIEVE_CONFIGS", '["retrieve", "fetch"]')
    s = load_settings()
    assert s.data_dir == tmp_path and s.mrd_port == 9100 and s.retrieve_configs == ["retrieve", "fetch"]
    assert load_settings(mrd_port=9200).mrd_port == 9200  # explicit values win


def test_defaults_match_the_protocol():
    s = load_settings()
    assert s.mrd_port == 9002 and s.default_pipeline == "cartesian" and "retrieve" in s.retrieve_configs


def test_unknown_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("RECONQ_MRD_PROT", "9100")
    with pytest.raises(SettingsError, match="RECONQ_MRD_PROT"):
        load_settings()


def test_bad_value_is_an_error(monkeypatch):
    monkeypatch.setenv("RECONQ_MRD_PORT", "ninety")
    with pytest.raises(ValueError, match="mrd_port"):
        load_settings()
