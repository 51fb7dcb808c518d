"""The `extproc` command's small sub-commands: check-config, plugins."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True, text=True, timeout=120)


def test_check_config_on_the_embedded_default():
    result = run("check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration OK: 3 tier(s) (small, medium, large)")
    assert "model_tiers" in result.stdout


def test_check_config_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: {small: {model: m}}\ndefault_tier: small\nserver: {prot: 1}\n")
    result = run("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: server.prot: unknown key" in result.stderr


def test_plugins_lists_built_ins_with_the_hooks_they_implement():
    result = run("plugins")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["model_tiers"]["loaded"] is True
    assert rows["model_tiers"]["target"] == "extproc_plugins.model_tiers:ModelTiers"
    assert "extproc_choose_tier" in rows["model_tiers"]["hooks"]
    assert rows["budgets"]["loaded"] is False  # installed, opt-in
