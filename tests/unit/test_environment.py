"""extproc.environment: every variable the gateway reads, read when asked; nothing else reads the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from extproc import environment

ROOT = Path(__file__).resolve().parents[2]
#: Builds a child process's environment from a copy of this one (Triton's): allowed to copy os.environ.
CHILD_ENV_BUILDERS = {"extproc/commands/tritonserver.py"}


def test_nothing_else_reads_the_environment():
    reads = re.compile(r"os\.environ\b|os\.getenv\b|\bgetenv\(|from os import .*environ")
    offenders = []
    for path in [*ROOT.glob("extproc/**/*.py"), *ROOT.glob("extproc_plugins/**/*.py")]:
        rel = path.relative_to(ROOT).as_posix()
        if rel == "extproc/environment.py" or "/tests/" in rel:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if reads.search(code) and not (rel in CHILD_ENV_BUILDERS and "dict(os.environ)" in code):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "read the environment through extproc.environment:\n" + "\n".join(offenders)


def test_named_variable(monkeypatch):
    monkeypatch.delenv("GW_TEST_KEY", raising=False)
    assert environment.named("GW_TEST_KEY") == ""
    assert environment.named("GW_TEST_KEY", "fallback") == "fallback"
    assert environment.named(None) == ""
    monkeypatch.setenv("GW_TEST_KEY", "secret")
    assert environment.named("GW_TEST_KEY") == "secret"


def test_config_path_and_plugin_filter(monkeypatch):
    monkeypatch.delenv(environment.CONFIG, raising=False)
    monkeypatch.delenv(environment.PLUGINS, raising=False)
    assert environment.config_path() is None
    assert environment.plugin_filter() == set()
    monkeypatch.setenv(environment.CONFIG, "/etc/gw.yaml")
    monkeypatch.setenv(environment.PLUGINS, " metrics, ,model_tiers ")
    assert environment.config_path() == "/etc/gw.yaml"
    assert environment.plugin_filter() == {"metrics", "model_tiers"}


def test_worker_index_round_trip(monkeypatch):
    monkeypatch.delenv(environment.WORKER_INDEX, raising=False)
    assert environment.worker_index() == "0"
    environment.set_worker_index(3)
    assert environment.worker_index() == "3"


def test_simple_overrides(monkeypatch):
    for name, read in ((environment.MINILM_DIR, environment.minilm_dir), (environment.ENVOY_BIN, environment.envoy_bin),
                       (environment.PROMETHEUS_MULTIPROC_DIR, environment.prometheus_multiproc_dir)):
        monkeypatch.delenv(name, raising=False)
        assert read() is None
        monkeypatch.setenv(name, "")
        assert read() is None  # empty is unset
        monkeypatch.setenv(name, "/x")
        assert read() == "/x"
    monkeypatch.delenv(environment.ADMIN_ADDRESS, raising=False)
    assert environment.admin_address("127.0.0.1:50052") == "127.0.0.1:50052"
    monkeypatch.setenv(environment.ADMIN_ADDRESS, "127.0.0.1:1")
    assert environment.admin_address("127.0.0.1:50052") == "127.0.0.1:1"


def test_memdiag_settings(monkeypatch):
    for name in (environment.MEMDIAG_DIR, environment.MEMDIAG_SECONDS, environment.MEMDIAG_TRACEMALLOC,
                 environment.MEMDIAG_BASELINE_SECONDS, environment.MEMDIAG_OBJECTS):
        monkeypatch.delenv(name, raising=False)
    assert environment.memdiag_settings() is None
    monkeypatch.setenv(environment.MEMDIAG_DIR, "/tmp/diag")
    assert environment.memdiag_settings() == environment.MemDiagSettings("/tmp/diag", 5.0, 0, 30.0, False)
    monkeypatch.setenv(environment.MEMDIAG_SECONDS, "2")
    monkeypatch.setenv(environment.MEMDIAG_TRACEMALLOC, "8")
    monkeypatch.setenv(environment.MEMDIAG_OBJECTS, "1")
    s = environment.memdiag_settings()
    assert (s.interval, s.trace_frames, s.count_objects) == (2.0, 8, True)
    monkeypatch.setenv(environment.MEMDIAG_SECONDS, "soon")
    with pytest.raises(ValueError):
        environment.memdiag_settings()
