"""Configuration and plugin loading: errors name the bad key."""

from __future__ import annotations

import pytest
import yaml

from extproc.framework.config import ConfigError, default_config_text, load_config, parse_config
from extproc.framework.gateway import Gateway
from extproc.framework.plugin_manager import DEFAULT_PLUGINS, installed_plugins


def base() -> dict:
    return yaml.safe_load(default_config_text())


def test_embedded_default_is_valid_and_loads_the_default_plugins():
    config = load_config(None)
    assert config.default_tier == "small"
    routing = ["route_rules", "semantic_routes", "learned_router", "budget_downgrade", "load_spill"]
    assert Gateway(config).plugin_names == [*routing, "model_tiers", "idempotency", "exact_cache", "coalescing",
                                            "request_log", "usage_records", "metrics"]


def test_omitted_plugins_list_means_default_plugins():
    data = base()
    del data["plugins"]
    assert Gateway(parse_config(data)).plugin_names == list(DEFAULT_PLUGINS)


def test_builtin_plugins_are_entry_points_like_third_party_ones():
    eps = installed_plugins()
    for name in DEFAULT_PLUGINS:
        assert eps[name].value.startswith("extproc_plugins.")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["server"].update(prot=1), "server.prot: unknown key"),
    (lambda d: d["tiers"]["small"].update(kind="grpc"), "tiers.small.kind"),
    (lambda d: d["tiers"]["small"].update(chat_template="nope"), "unknown chat template 'nope'"),
    (lambda d: d.update(default_tier="huge"), "default_tier: 'huge' is not one of the tiers"),
    (lambda d: d["tiers"]["medium"].update(aliases=["llm-small"]), "tiers.medium.aliases"),
    (lambda d: d["server"].update(port="many"), "server.port"),
    (lambda d: d.update(auto_model="small"), "auto_model"),
])
def test_bad_config_names_the_key(mutate, message):
    data = base()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        parse_config(data, "gw.yaml")
    assert message in str(err.value)
    assert "gw.yaml" in str(err.value)


def test_unknown_plugin_is_named_with_the_installed_ones():
    data = base()
    data["plugins"].append({"name": "no_such_plugin"})
    with pytest.raises(ConfigError, match=r"plugins\[\d+\]\.name: unknown plugin 'no_such_plugin' \(installed: .*model_tiers"):
        Gateway(parse_config(data))


def test_plugin_listed_twice_is_an_error():
    data = base()
    data["plugins"].append({"name": "model_tiers"})
    with pytest.raises(ConfigError, match=r"plugins\[\d+\]\.name: plugin 'model_tiers' is listed twice"):
        Gateway(parse_config(data))


def test_settings_for_a_plugin_without_settings_are_refused():
    data = base()
    i = [p["name"] for p in data["plugins"]].index("model_tiers")
    data["plugins"][i]["settings"] = {"x": 1}
    with pytest.raises(ConfigError, match=rf"plugins\[{i}\]\.settings: plugin 'model_tiers' takes no settings"):
        Gateway(parse_config(data))


def test_env_var_limits_which_plugins_load(monkeypatch):
    monkeypatch.setenv("EXTPROC_PLUGINS", "model_tiers")
    assert Gateway(load_config(None)).plugin_names == ["model_tiers"]


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_settings_read_at_load_not_import(monkeypatch, tmp_path):
    cfg = tmp_path / "c.yaml"
    data = base()
    data["server"]["port"] = 6000
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("EXTPROC_CONFIG", str(cfg))
    assert load_config(None).server.port == 6000
