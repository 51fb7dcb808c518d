"""One real Triton (from nvidia-pytriton) serving the three reference LLM tiers, per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "triton_models"):  # extproc, and reference_llm for its helpers
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests.conftest import require  # noqa: E402

TIERS = ["llm-small", "llm-medium", "llm-large"]


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    try:
        from extproc.commands.tritonserver import TritonProcess, find_tritonserver, free_port

        find_tritonserver()
    except (ImportError, RuntimeError) as exc:
        require(False, f"tritonserver unavailable: {exc}")
    work = tmp_path_factory.mktemp("triton")
    proc = TritonProcess(
        REPO / "triton_models",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        work_dir=work,
        models=TIERS,
    )
    proc.start()
    try:
        proc.wait_ready(timeout=90)
        yield proc
    finally:
        proc.stop()
