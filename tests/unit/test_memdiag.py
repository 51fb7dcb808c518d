"""Memory diagnostics of a worker (extproc/observability/memdiag.py), used by the soak benchmark."""

from __future__ import annotations

import json
import tracemalloc
from types import SimpleNamespace

from extproc.observability import memdiag
from extproc.framework.testing import GatewayHarness


class Held:
    pass


async def test_samples_say_what_the_worker_holds_and_what_grew(tmp_path):
    async with GatewayHarness() as gw:
        worker = SimpleNamespace(gateway=gw.gateway, processor=SimpleNamespace(active_streams=0))
        diag = memdiag.MemDiag(worker, str(tmp_path), trace_frames=1, baseline_after=0, count_objects=True)
        tracemalloc.start(1)
        try:
            first = diag.sample()  # the baseline
            kept = [(Held(), bytearray(1000)) for _ in range(100)]
            second = diag.sample()
        finally:
            tracemalloc.stop()
    assert first["rss_kib"] > 0 and first["py_blocks"] > 0 and "top_growth" not in first
    assert first["holdings"]["gateway.store"]["entries"] == 0 and "metric_children" in first["holdings"]
    assert any("test_memdiag.py" in g["where"] and g["kib"] >= 90 for g in second["top_growth"])
    assert second["objects_growth"]["Held"] == 100  # counted by type (gc-tracked objects)
    json.dumps(second)  # what goes to the file
    del kept


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv(memdiag.DIR_ENV, raising=False)
    assert memdiag.start_from_env(None) is None
    assert memdiag.rss_kib(2**22 + 12345) is None  # no such process
