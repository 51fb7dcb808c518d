"""The reference tiers' BLAS thread setting: which source wins, bad values, and applying it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_MODELS = Path(__file__).resolve().parents[2] / "triton_models"
if str(_MODELS) not in sys.path:
    sys.path.insert(0, str(_MODELS))

from reference_llm.blas_threads import blas_thread_limit, limit_blas_threads  # noqa: E402


def test_config_value_applies_when_the_environment_is_silent():
    assert blas_thread_limit("1", "llm-large", {}) == 1
    assert blas_thread_limit("4", "large", {}) == 4
    assert blas_thread_limit(None, "large", {}) is None  # no parameter: the library's choice


@pytest.mark.parametrize("value", ["auto", "AUTO", "0"])
def test_auto_keeps_the_library_choice(value):
    assert blas_thread_limit(value, "large", {}) is None
    assert blas_thread_limit("1", "large", {"EXTPROC_LLM_BLAS_THREADS": value}) is None


def test_precedence_tier_variable_then_all_tiers_then_blas_env_then_config():
    env = {"EXTPROC_LLM_BLAS_THREADS_LARGE": "3", "EXTPROC_LLM_BLAS_THREADS": "2", "OPENBLAS_NUM_THREADS": "5"}
    assert blas_thread_limit("1", "llm-large", env) == 3
    assert blas_thread_limit("1", "llm-small", env) == 2          # no SMALL variable
    env.pop("EXTPROC_LLM_BLAS_THREADS")
    assert blas_thread_limit("1", "llm-small", env) is None       # OPENBLAS_NUM_THREADS chose
    assert blas_thread_limit("1", "llm-small", {"OMP_NUM_THREADS": "2"}) is None


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_bad_values_name_the_setting(value):
    with pytest.raises(ValueError, match="blas_threads must be a positive number of threads or 'auto'"):
        blas_thread_limit(value, "large", {})
    with pytest.raises(ValueError, match="EXTPROC_LLM_BLAS_THREADS_SMALL must be"):
        blas_thread_limit("1", "small", {"EXTPROC_LLM_BLAS_THREADS_SMALL": value})


def test_limit_is_applied_to_numpys_blas_and_read_back():
    import numpy  # noqa: F401  (loads the BLAS library)
    from threadpoolctl import threadpool_info, threadpool_limits

    before = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert before, "NumPy's BLAS not found by threadpoolctl"
    try:
        assert limit_blas_threads(1) == 1
        assert limit_blas_threads(None) == 1  # None changes nothing, only reads
    finally:
        threadpool_limits(limits=max(before.values()), user_api="blas")


# --- the Triton adapter: a bad value fails the load, a missing threadpoolctl warns -------------
@pytest.fixture
def adapter(monkeypatch):
    """reference_llm.triton_backend imported against a minimal stand-in for Triton's pb_utils
    (and dropped again afterwards); yields (module, model, pb_utils, warnings logged)."""
    import importlib
    import types

    warnings: list[str] = []
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TritonModelException = type("TritonModelException", (Exception,), {})
    pb.Logger = types.SimpleNamespace(log_warn=warnings.append, log_info=lambda m: None,
                                      log_verbose=lambda m: None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    sys.modules.pop("reference_llm.triton_backend", None)
    module = importlib.import_module("reference_llm.triton_backend")
    model = module.TritonPythonModel.__new__(module.TritonPythonModel)
    model.model_name = "llm-large"
    for key in ("EXTPROC_LLM_BLAS_THREADS", "EXTPROC_LLM_BLAS_THREADS_LARGE", "OPENBLAS_NUM_THREADS",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    yield module, model, pb, warnings
    sys.modules.pop("reference_llm.triton_backend", None)


def _config(value: str) -> dict:
    return {"parameters": {"blas_threads": {"string_value": value}}}


def test_adapter_applies_the_setting(adapter, monkeypatch):
    module, model, _, warnings = adapter
    applied = []
    monkeypatch.setattr(module, "limit_blas_threads", lambda n: applied.append(n) or n)
    assert model._limit_blas_threads(_config("1"), "large") == 1 and applied == [1]
    assert not warnings


def test_adapter_bad_value_fails_the_load(adapter):
    _, model, pb, _ = adapter
    with pytest.raises(pb.TritonModelException, match="llm-large: blas_threads must be"):
        model._limit_blas_threads(_config("many"), "large")


def test_adapter_without_threadpoolctl_warns_and_serves(adapter, monkeypatch):
    module, model, _, warnings = adapter

    def missing(n):
        raise ImportError("No module named 'threadpoolctl'")

    monkeypatch.setattr(module, "limit_blas_threads", missing)
    assert model._limit_blas_threads(_config("1"), "large") is None
    assert len(warnings) == 1 and "blas_threads=1 not applied" in warnings[0] and "threadpoolctl" in warnings[0]
