"""The learned router: its model (NumPy softmax regression, calibration, artefact), data, plugin and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from extproc_plugins.routing import router_model as rm
from extproc.commands.cli import main
from extproc.framework.config import PluginEntry, load_config
from extproc.framework.testing import GatewayHarness

from .routing_helpers import RequestFacts, config_with


def blobs(n_per=60, d=385, seed=1):
    """Three separable Gaussian blobs in feature space."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (3, d))
    X = np.concatenate([centers[k] + 0.8 * rng.normal(0, 1, (n_per, d)) for k in range(3)])
    y = np.repeat(np.arange(3), n_per)
    return X, y


# ---------------------------------------------------------------------------- model maths


def test_softmax_regression_fits_separable_data_deterministically():
    X, y = blobs()
    W1, b1 = rm.fit_softmax(X, y, 3)
    W2, b2 = rm.fit_softmax(X, y, 3)
    assert np.array_equal(W1, W2) and np.array_equal(b1, b2)
    model = rm.RouterModel(["small", "medium", "large"], W1, b1, {"medium": 0.5, "large": 0.5})
    P = model.probabilities(X)
    assert np.allclose(P.sum(axis=1), 1.0)
    assert (P.argmax(axis=1) == y).mean() > 0.97


def test_threshold_for_share_sends_that_share():
    scores = np.linspace(0, 1, 101)
    for share in (0.1, 0.25, 0.4, 0.9):
        t = rm.threshold_for_share(scores, share)
        assert abs((scores >= t).mean() - share) <= 0.011
    with pytest.raises(ValueError):
        rm.threshold_for_share(scores, 1.0)


def test_calibration_hits_the_strong_share_on_its_scores():
    X, y = blobs()
    P = rm.out_of_fold_probabilities(X, y, 3, folds=3)
    labels = ["small", "medium", "large"]
    for share in (0.2, 0.4, 0.6):
        th = rm.calibrate(P, labels, share)
        model = rm.RouterModel(labels, np.zeros((3, X.shape[1])), np.zeros(3), th)
        routed = model.route_indices(P)
        assert abs((routed == 2).mean() - share) < 0.02
        assert th["medium"] == 0.5
    th = rm.calibrate(P, labels, 0.3, medium_share=0.3)
    routed = rm.RouterModel(labels, np.zeros((3, 1)), np.zeros(3), th).route_indices(P)
    assert abs((routed >= 1).mean() - 0.6) < 0.02


def test_route_picks_the_strongest_label_reaching_its_threshold():
    model = rm.RouterModel(["s", "m", "l"], np.zeros((3, 1)), np.zeros(3), {"m": 0.5, "l": 0.3})
    P = np.array([[0.9, 0.05, 0.05],   # S(m)=0.1, S(l)=0.05 -> s
                  [0.3, 0.4, 0.3],     # S(l)=0.3 -> l
                  [0.4, 0.4, 0.2],     # S(m)=0.6 -> m
                  [0.0, 0.0, 1.0]])
    assert model.route_indices(P).tolist() == [0, 2, 1, 2]


def test_cost_ratio_and_report():
    from extproc.framework.config import Price

    prices = {"small": Price(prompt_per_1k=0.1, completion_per_1k=0.1),
              "medium": Price(prompt_per_1k=0.5, completion_per_1k=0.5),
              "large": Price(prompt_per_1k=1.0, completion_per_1k=1.0)}
    rep = rm.evaluate(["small", "medium", "large"], [0, 1, 2, 2], [0, 1, 2, 1], prices=prices,
                      prompt_tokens=[0, 0, 0, 0], completion_tokens=1000)
    assert rep.cost_ratio == pytest.approx((0.1 + 0.5 + 1.0 + 0.5) / 4.0)
    assert rep.accuracy == 0.75 and rep.strong_recall() == 0.5 and rep.cheaper_share() == 0.75
    text = rep.format()
    assert "accuracy: 0.750" in text and "cost relative to all-large: 0.525" in text
    assert "large-labelled prompts routed to large: 50.0%" in text


def test_artefact_round_trip_and_validation(tmp_path):
    X, y = blobs(n_per=10)
    W, b = rm.fit_softmax(X, y, 3, iterations=100)
    model = rm.RouterModel(["small", "medium", "large"], W, b, {"medium": 0.5, "large": 0.25}, {"n": 30})
    path = tmp_path / "m.json"
    model.save(path)
    back = rm.RouterModel.load(path)
    assert back.labels == model.labels and back.thresholds == model.thresholds and back.meta == {"n": 30}
    assert np.allclose(back.weights, model.weights, rtol=1e-5)
    doc = json.loads(path.read_text())
    for broken, match in [({**doc, "format": "other"}, "not a learned-router model"),
                          ({**doc, "weights": [[1.0]]}, "do not fit"),
                          ({**doc, "thresholds": {"medium": 0.5}}, "no threshold for large"),
                          ({k: v for k, v in doc.items() if k != "bias"}, "malformed")]:
        path.write_text(json.dumps(broken))
        with pytest.raises(rm.RouterDataError, match=match):
            rm.RouterModel.load(path)
    path.write_text("{not json")
    with pytest.raises(rm.RouterDataError, match="not JSON"):
        rm.RouterModel.load(path)


# ---------------------------------------------------------------------------- data


def test_labelled_file_errors_name_the_line(tmp_path):
    f = tmp_path / "l.jsonl"
    f.write_text('# comment\n{"prompt": "ok", "tier": "small"}\n\n{"prompt": "x", "tier": "huge"}\n')
    with pytest.raises(rm.RouterDataError, match=r"l.jsonl:4: tier 'huge'"):
        rm.load_labelled(f)
    f.write_text('{"prompt": "", "tier": "small"}\n')
    with pytest.raises(rm.RouterDataError, match=r":1: expected"):
        rm.load_labelled(f)
    f.write_text('not json\n')
    with pytest.raises(rm.RouterDataError, match=r":1: not JSON"):
        rm.load_labelled(f)
    f.write_text('# nothing\n')
    with pytest.raises(rm.RouterDataError, match="no labelled prompts"):
        rm.load_labelled(f)
    with pytest.raises(rm.RouterDataError, match="cannot read"):
        rm.load_labelled(tmp_path / "missing.jsonl")


def test_shipped_labelled_set_is_large_and_balanced_enough():
    items = rm.load_labelled(rm.default_data_path())
    per = {t: sum(1 for i in items if i.tier == t) for t in rm.DEFAULT_LABELS}
    assert len(items) >= 300 and min(per.values()) >= 100, per
    assert len({i.prompt for i in items}) == len(items)  # no duplicates


def test_holdout_split_is_stable_and_about_the_fraction():
    items = rm.load_labelled(rm.default_data_path())
    train, held = rm.split_holdout(items, 0.25)
    assert len(train) + len(held) == len(items) and 0.18 < len(held) / len(items) < 0.32
    # membership depends on the prompt only: adding prompts does not move existing ones
    more = items + [rm.LabelledPrompt(f"new prompt {i}", "small") for i in range(50)]
    assert {i.prompt for i in rm.split_holdout(more, 0.25)[1]} >= {i.prompt for i in held}
    assert rm.split_holdout(items, 0.0)[1] == []


def test_shipped_model_was_trained_on_the_shipped_data():
    model = rm.RouterModel.load(rm.default_model_path())
    assert model.labels == list(rm.DEFAULT_LABELS)
    assert model.meta["data_sha256"] == rm.file_sha256(rm.default_data_path()), \
        "retrain: extproc router train extproc_plugins/routing/data/route_labelled.jsonl --out extproc_plugins/routing/data/learned_router.json"
    assert rm.default_model_path().stat().st_size < 40_000


# ---------------------------------------------------------------------------- the plugin


def harness(settings=None, *extra):
    return GatewayHarness(RequestFacts, config=config_with(*extra, ("learned_router", settings or {})))


def tier(result) -> str:
    return result.upstream_headers["x-extproc-tier"]


async def test_shipped_model_routes_each_kind_of_prompt():
    async with harness() as gw:
        small = await gw.chat("What is the capital of Norway?")
        medium = await gw.chat("Write a friendly email to our customers announcing new opening hours.")
        large = await gw.chat("Implement a lock-free queue in C++ and prove that it is linearizable.")
        pinned = await gw.chat("Implement a lock-free queue in C++.", model="small")
    assert (tier(small), tier(medium), tier(large), tier(pinned)) == ("small", "medium", "large", "small")
    assert large.headers["x-extproc-tier-reason"] == "learned_router"
    assert large.ctx.route_trace[0].startswith("learned_router: large: p small ")
    assert pinned.ctx.embedding_calls == 0


# A long conversation attached to a simple request (hand-written here, not from the growth lab).
_TURN = ("On Monday the warehouse team reported that pallet 14 had been loaded onto the wrong truck, and the "
         "driver only noticed at the second stop. The store in Leeds called three times asking where their "
         "delivery was, and the shift lead promised a replacement by Wednesday. ")
LOG = "\n".join(f"{'Alex' if i % 2 else 'Sam'}: {_TURN}" for i in range(8))  # ~470 tokens


@pytest.mark.parametrize("want,instruction", [
    ("small", "Extract the pallet number from the conversation below."),
    ("medium", "Summarize the conversation below in three bullet points."),
    ("large", "Using the conversation below, determine the root cause of the misdelivery, propose process "
              "changes and weigh their costs and risks in detail."),
])
async def test_the_task_decides_the_tier_not_the_length_of_the_attached_text(want, instruction):
    async with harness() as gw:
        r = await gw.chat(f"{instruction}\n\nConversation:\n{LOG}")
    assert r.ctx.prompt_tokens_estimate is None or r.ctx.prompt_tokens_estimate > 400
    assert tier(r) == want, r.ctx.route_trace


async def test_a_prompt_too_long_for_a_tier_goes_to_the_cheapest_tier_whose_window_holds_it():
    long = "Extract the pallet number from the conversation below.\n\n" + "\n".join([LOG] * 5)  # ~2,400 tokens
    async with harness(None, "route_rules") as gw:
        r = await gw.chat(long)
    assert r.ctx.prompt_tokens_estimate > 2048 - 64
    assert tier(r) == "medium" and "small (context" in r.ctx.route_trace[0], r.ctx.route_trace


def test_the_shipped_model_does_not_read_the_prompt_length_and_older_models_still_do(tmp_path):
    shipped = rm.RouterModel.load(rm.default_model_path())
    assert not shipped.uses_tokens and shipped.weights.shape[1] == rm.EMBEDDING_DIM
    X, y = blobs(n_per=10)  # 385 columns: embedding + log tokens, as earlier versions trained
    W, b = rm.fit_softmax(X, y, 3, iterations=50)
    old = rm.RouterModel(["small", "medium", "large"], W, b, {"medium": 0.5, "large": 0.5})
    old.save(tmp_path / "old.json")
    back = rm.RouterModel.load(tmp_path / "old.json")
    assert back.uses_tokens
    emb = np.ones(rm.EMBEDDING_DIM) / np.sqrt(rm.EMBEDDING_DIM)
    assert not np.allclose(back.decide(emb, 10)[1], back.decide(emb, 5000)[1])
    with pytest.raises(ValueError, match="token count"):
        back.decide(emb)
    assert np.array_equal(shipped.decide(emb, 10)[1], shipped.decide(emb, 5000)[1])


async def test_the_memo_key_holds_the_token_count_only_for_a_model_that_reads_it():
    async with harness() as gw:
        a = await gw.chat("What is the capital of Lesotho? (memo key test)")
        b = await gw.chat("What is the capital of Lesotho? (memo key test)", max_tokens=8)
    assert a.ctx.embedding_calls == 1 and b.ctx.embedding_calls == 0
    assert b.ctx.route_trace[0].startswith("route_memo: learned_router small")
    plugin = next(p.obj for p in gw.gateway.hooks.plugins if p.name == "learned_router")
    assert all(len(k) == 4 and k[-1] is None for k in plugin.memo._data)


async def test_threshold_override_and_nearest_allowed():
    async with harness({"thresholds": {"large": 0.999999, "medium": 0.999999}}) as gw:
        r = await gw.chat("Implement a lock-free queue in C++ and prove that it is linearizable.")
    assert tier(r) in ("small", "medium")  # nothing reaches an impossible threshold
    deny = ("route_rules", {"rules": [{"name": "no_large", "deny": ["large"]}]})
    async with harness(None, deny) as gw:
        r = await gw.chat("Implement a lock-free queue in C++ and prove that it is linearizable.")
    assert tier(r) == "medium" and "(nearest allowed to large)" in r.ctx.route_trace[-1]


async def test_tier_map_lets_the_model_serve_differently_named_tiers():
    config = load_config(None)
    tiers = {"cheap": config.tiers["small"], "mid": config.tiers["medium"], "big": config.tiers["large"]}
    cfg = config.model_copy(update={"tiers": tiers, "default_tier": "cheap", "plugins": [
        PluginEntry(name="learned_router", settings={"tier_map": {"small": "cheap", "medium": "mid", "large": "big"}}),
        PluginEntry(name="model_tiers")]})
    async with GatewayHarness(config=cfg) as gw:
        r = await gw.chat("Implement a lock-free queue in C++ and prove that it is linearizable.")
    assert tier(r) == "big"


@pytest.mark.parametrize("settings,match", [
    ({"model_path": "/nonexistent/router.json"}, "cannot read"),
    ({"tier_map": {"tiny": "small"}}, "label.*'tiny'"),
    ({"tier_map": {"large": "huge"}}, "'huge' are not configured"),
    ({"thresholds": {"huge": 0.5}}, "label.*'huge'"),
])
async def test_bad_settings_stop_start_up(settings, match):
    with pytest.raises(Exception, match=match):
        async with harness(settings):
            pass


# ---------------------------------------------------------------------------- the CLI


def write_small_set(path):
    rows = []
    for p in ["What is the capital of Chile?", "Convert 5 km to miles.", "Extract the email from: a@b.co",
              "Is 17 prime?", "Translate 'cat' into French.", "Sort: b, a, c"]:
        rows.append({"prompt": p, "tier": "small"})
    for p in ["Write an email to the team about the party.", "Summarize this article about trains.",
              "Explain inflation to a teenager.", "Draft a thank-you note to a client.",
              "Write a product description for a lamp.", "Give tips for a job interview."]:
        rows.append({"prompt": p, "tier": "medium"})
    for p in ["Prove that sqrt(3) is irrational.", "Implement a B-tree in Rust with deletion.",
              "Design a multi-region database failover plan.", "Derive the gradient of softmax cross-entropy.",
              "Debug this deadlock between two mutexes in Go.", "Analyze our churn data and build a forecast model."]:
        rows.append({"prompt": p, "tier": "large"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_router_train_then_eval(tmp_path, capsys):
    data, out = tmp_path / "l.jsonl", tmp_path / "router.json"
    write_small_set(data)
    assert main(["router", "train", str(data), "--out", str(out), "--folds", "2", "--strong-share", "0.34"]) == 0
    printed = capsys.readouterr().out
    assert "trained on 18 prompts (small 6, medium 6, large 6)" in printed
    assert "thresholds: medium 0.500, large " in printed and f"wrote {out}" in printed
    model = rm.RouterModel.load(out)
    assert model.meta["data_sha256"] == rm.file_sha256(data) and model.meta["strong_share"] == 0.34
    assert main(["router", "eval", str(data), "--model", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prompts: 18" in printed and "confusion matrix" in printed and "cost relative to all-large" in printed


def test_router_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "tier": "enormous"}\n')
    assert main(["router", "train", str(bad), "--out", str(tmp_path / "m.json")]) == 2
    assert "tier 'enormous'" in capsys.readouterr().err
    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "x", "tier": "small"}\n')
    assert main(["router", "train", str(few)]) == 2
    assert "too few" in capsys.readouterr().err
    assert main(["router", "eval", str(few), "--model", str(tmp_path / "none.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["router", "eval", str(few), "--holdout", "0.01"]) == 2
    assert "held-out part" in capsys.readouterr().err


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
async def test_a_failing_router_follows_its_failure_policy(monkeypatch, on_error):
    from extproc.embeddings import prompt as prompts

    async def broken(ctx, embedder=None):
        raise RuntimeError("encoder down")

    cfg = config_with().model_copy(update={"plugins": [
        PluginEntry(name="learned_router", on_error=on_error), PluginEntry(name="model_tiers")]})
    async with GatewayHarness(config=cfg) as gw:
        monkeypatch.setattr(prompts, "prompt_embedding", broken)
        r = await gw.chat("Implement a lock-free queue in C++.")
    if on_error == "fail_closed":
        assert r.status == 500 and r.json()["error"]["code"] == "plugin_error"
    else:
        assert r.status == 200 and tier(r) == "small" and r.headers["x-extproc-degraded"] == "learned_router"
