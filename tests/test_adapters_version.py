"""The vLLM version gate (vllm_cos.adapters.check_vllm_version): 0.32.0 runs, 0.33.0 (hook
surface checked, engine untested) and unknown releases are refused with one line saying what
is untested, unless VLLM_COS_ALLOW_UNTESTED_VLLM=1."""

from __future__ import annotations

import logging

import pytest

from vllm_cos.adapters import ALLOW_UNTESTED_ENV, UnsupportedVllmVersion, check_vllm_version


def test_the_pinned_release_runs_with_or_without_a_local_suffix():
    assert check_vllm_version("0.32.0", environ={}) == "0.32.0"
    assert check_vllm_version("0.32.0+cpu", environ={}) == "0.32.0+cpu"


@pytest.mark.parametrize("version, says", [("0.33.0", "engine tests have not run"),
                                           ("0.34.1", "neither tested nor hook-checked")])
def test_other_releases_are_refused_naming_what_is_untested_and_the_way_out(version, says):
    with pytest.raises(UnsupportedVllmVersion) as info:
        check_vllm_version(version, environ={ALLOW_UNTESTED_ENV: "0"})
    message = str(info.value)
    assert "\n" not in message and says in message and version in message
    assert "vllm==0.32.0" in message and f"{ALLOW_UNTESTED_ENV}=1" in message


def test_the_opt_in_runs_an_untested_release_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="vllm.cos"):
        assert check_vllm_version("0.33.0", environ={ALLOW_UNTESTED_ENV: "1"}) == "0.33.0"
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "engine tests have not run" in caplog.records[0].getMessage()


def test_no_vllm_at_all_names_the_install_command(monkeypatch):
    import vllm_cos.adapters as adapters

    monkeypatch.setattr(adapters, "installed_vllm_version", lambda: None)
    with pytest.raises(UnsupportedVllmVersion, match="no vLLM installation found"):
        adapters.check_vllm_version()
