"""``extproc router train`` / ``extproc router eval``: fit and judge the learned router on labelled prompts.

Both use the gateway's own encoder (all-MiniLM-L6-v2 in NumPy) and token counter, and the text
the gateway routes on (:func:`extproc_plugins.routing.task_text.task_text` of the user message: what
it asks, not the material attached), so a model judged here behaves the same in the gateway. ``--holdout F`` sets aside a stable, hash-chosen fraction of
the file (:func:`extproc_plugins.routing.router_model.in_holdout`): ``train --holdout 0.25`` never sees it and
``eval --holdout 0.25`` judges on it alone.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from extproc_plugins.routing import router_model as rm


def chat_tokens(prompt: str) -> int:
    """Tokens of a one-message chat holding ``prompt`` (what the gateway counts for it)."""
    from extproc.formats.openai import ChatMessage
    from extproc.formats.tokens import count_chat

    return count_chat([ChatMessage("user", prompt)])


def encode(texts: list[str]) -> np.ndarray:
    from extproc.embeddings.encoder import get_encoder

    return get_encoder().encode(texts)


@dataclass
class TrainResult:
    model: rm.RouterModel
    oof_report: rm.EvalReport  # the calibrated routing on out-of-fold scores (an estimate for new traffic)
    n_train: int
    n_held_out: int


def train(data: str | Path, *, prices: Mapping[str, object], holdout: float = 0.0, strong_share: float = 0.4,
          medium_share: float | None = None, l2: float = 1e-2, folds: int = 5, seed: int = 0,
          labels: Sequence[str] = rm.DEFAULT_LABELS, completion_tokens: int = 256,
          length_feature: bool = False) -> TrainResult:
    """Train on ``data`` minus its held-out part; return the model and its out-of-fold estimate."""
    items = rm.load_labelled(data, labels)
    train_items, held = rm.split_holdout(items, holdout)
    if len(train_items) < folds * len(labels):
        raise rm.RouterDataError(f"{data}: {len(train_items)} training prompts are too few for {folds} folds")
    meta = {"data": Path(data).name, "data_sha256": rm.file_sha256(data), "holdout": holdout,
            "embedding_model": rm.EMBEDDING_MODEL,
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    model, P_oof = rm.train_router([i.prompt for i in train_items], [i.tier for i in train_items],
                                   embed=encode, count_tokens=chat_tokens, labels=labels,
                                   strong_share=strong_share, medium_share=medium_share, l2=l2, folds=folds,
                                   seed=seed, length_feature=length_feature, meta=meta)
    y = [model.labels.index(i.tier) for i in train_items]
    routed = model.route_indices(P_oof)
    report = rm.evaluate(model.labels, y, routed, prices=_label_prices(prices, model.labels),
                         prompt_tokens=[chat_tokens(i.prompt) for i in train_items],
                         completion_tokens=completion_tokens)
    return TrainResult(model, report, len(train_items), len(held))


def evaluate(data: str | Path, model: rm.RouterModel, *, prices: Mapping[str, object], holdout: float = 0.0,
             completion_tokens: int = 256, tier_map: Mapping[str, str] | None = None) -> rm.EvalReport:
    """Route every prompt of ``data`` (only its held-out part when ``holdout`` > 0) and report."""
    items = rm.load_labelled(data, model.labels)
    if holdout > 0:
        items = rm.split_holdout(items, holdout)[1]
        if not items:
            raise rm.RouterDataError(f"{data}: the held-out part ({holdout:.0%}) is empty")
    texts = [i.prompt for i in items]
    counts = [chat_tokens(t) for t in texts]
    from extproc_plugins.routing.task_text import task_text

    X = model.featurize(encode([task_text(t) for t in texts]), counts)
    routed = model.route_indices(model.probabilities(X))
    y = [model.labels.index(i.tier) for i in items]
    return rm.evaluate(model.labels, y, routed, prices=_label_prices(prices, model.labels, tier_map),
                       prompt_tokens=counts, completion_tokens=completion_tokens)


def _label_prices(prices: Mapping[str, object], labels: Sequence[str],
                  tier_map: Mapping[str, str] | None = None) -> dict[str, object]:
    tier_map = tier_map or {}
    out = {}
    for label in labels:
        tier = tier_map.get(label, label)
        if tier not in prices:
            raise rm.RouterDataError(f"label {label!r}: no tier {tier!r} in the configuration to price it "
                                     f"(tiers: {', '.join(prices)})")
        out[label] = prices[tier]
    return out
