"""The import-linter contracts in pyproject.toml hold, and they catch a lower layer importing a higher one."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint() -> subprocess.CompletedProcess:
    require(LINT.exists(), f"import-linter is not installed ({LINT})")
    return subprocess.run([str(LINT), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_layer_contracts_hold():
    result = lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout


@pytest.mark.parametrize(("where", "imports", "contract"), [
    ("extproc/formats", "import extproc.framework.gateway", "Layers: a lower layer never imports a higher one"),
    ("extproc_plugins/caching", "import extproc_plugins.budgets.ledger", "Policy families are independent"),
    ("extproc_plugins/routing", "import extproc.wire.processor", "Policies never touch the stream machine"),
])
def test_a_violation_breaks_the_build(where, imports, contract):
    """A probe module that imports upwards (or across families) makes lint-imports fail, naming the contract."""
    probe = ROOT / where / f"_layer_probe_{uuid.uuid4().hex[:8]}.py"
    probe.write_text(f"{imports}  # deliberate violation, removed by the test\n")
    try:
        result = lint()
    finally:
        probe.unlink()
    assert result.returncode != 0
    broken = result.stdout[result.stdout.index("Broken contracts"):]
    assert contract in broken and probe.stem in broken
