"""The learned router's model: multinomial logistic regression on sentence embeddings, in NumPy.

    extproc router train LABELLED.jsonl --out router.json --strong-share 0.4
    extproc router eval  LABELLED.jsonl --model router.json

**Labelled data** is JSON Lines, one ``{"prompt": "...", "tier": "small"}`` per line (``tier`` is
one of the router's labels, cheapest first: ``small``, ``medium``, ``large`` by default). The
project ships its own set in ``extproc_plugins/routing/data/route_labelled.jsonl``.

**Model.** Features are the all-MiniLM-L6-v2 embedding of what the prompt asks (its task text,
:func:`extproc_plugins.routing.task_text.task_text`: a long message's instruction, not its attached
material), scaled to unit variance per component; a softmax regression with an L2 penalty is fitted
by full-batch gradient descent (deterministic; a few hundred prompts train in well under a second
once embedded). The prompt's length is **not** a feature by default: how much text is attached says
little about how hard the task is, and on a labelled set of short prompts a length weight learns
"longer is harder" and then sends every long document to the strong tier. The limit length does
impose (a tier's context window) is ``route_rules``' job. ``length_feature=True`` (``extproc router
train --length-feature``) adds the log token count back; models trained so (format 1 with 385
columns, as earlier versions wrote) still load and use it.

**Routing, RouteLLM-style.** The model gives P(tier) for each label. For every label above the
cheapest, the *cumulative* score S(label) = P(label or any stronger one) says how likely the prompt
needs at least that tier. A prompt goes to the strongest label whose score reaches that label's
threshold, else to the cheapest. The thresholds are not 0.5: they are **calibrated** so that a
chosen share of traffic reaches the strong tier (``--strong-share``; RouteLLM calls it the
percentage of calls to the strong model), and optionally a chosen share reaches medium or
stronger (``--medium-share``, else 0.5). Calibration uses out-of-fold scores (k-fold
cross-validation on the training set), which behave like scores on unseen prompts; scores of the
final model on its own training prompts are over-confident and would put the thresholds too high.

**Artefact.** A small JSON file (weights rounded to 6 significant digits, ~15 KB), with the labels,
thresholds, calibration targets and the SHA-256 of the data it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

FORMAT = "extproc-learned-router/1"
DEFAULT_LABELS = ("small", "medium", "large")
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
_EMB_SCALE = float(np.sqrt(EMBEDDING_DIM))  # unit-norm embedding -> components of ~unit variance
_LEN_CENTER, _LEN_SCALE = 3.5, 1.5  # log1p(tokens): ~3.5 for a 30-token prompt


class RouterDataError(ValueError):
    """The labelled file is unusable; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class LabelledPrompt:
    prompt: str
    tier: str


def default_data_path() -> Path:
    """The labelled prompts shipped with the package."""
    return Path(str(resources.files("extproc_plugins.routing").joinpath("data", "route_labelled.jsonl")))


def default_model_path() -> Path:
    """The trained router shipped with the package."""
    return Path(str(resources.files("extproc_plugins.routing").joinpath("data", "learned_router.json")))


def load_labelled(path: str | Path, labels: Sequence[str] = DEFAULT_LABELS) -> list[LabelledPrompt]:
    """Read a JSONL file of ``{"prompt", "tier"}``; blank lines and ``#`` lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RouterDataError(f"{path}: cannot read: {exc.strerror}") from None
    out: list[LabelledPrompt] = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RouterDataError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise RouterDataError(f'{path}:{number}: expected {{"prompt": "<text>", "tier": "<label>"}}')
        if row.get("tier") not in labels:
            raise RouterDataError(f"{path}:{number}: tier {row.get('tier')!r} is not one of {', '.join(labels)}")
        out.append(LabelledPrompt(row["prompt"], row["tier"]))
    if not out:
        raise RouterDataError(f"{path}: no labelled prompts")
    return out


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def in_holdout(prompt: str, fraction: float) -> bool:
    """Whether a prompt belongs to the held-out part: a stable hash of the text, not its position.

    Adding prompts to the file never moves an existing prompt between the parts.
    """
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def split_holdout(items: Sequence[LabelledPrompt], fraction: float) -> tuple[list[LabelledPrompt], list[LabelledPrompt]]:
    """``(train, held_out)`` by :func:`in_holdout`."""
    train, held = [], []
    for item in items:
        (held if in_holdout(item.prompt, fraction) else train).append(item)
    return train, held


# ---------------------------------------------------------------------------- features & model


def features(embeddings: np.ndarray, token_counts: Sequence[int] | None = None) -> np.ndarray:
    """The model's input: the scaled embedding [n, 384], and with ``token_counts`` the log token
    count as one more column [n, 385]."""
    emb = np.asarray(embeddings, dtype=np.float64) * _EMB_SCALE
    if token_counts is None:
        return emb
    length = (np.log1p(np.asarray(token_counts, dtype=np.float64)) - _LEN_CENTER) / _LEN_SCALE
    return np.concatenate([emb, length[:, None]], axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_softmax(X: np.ndarray, y: np.ndarray, n_classes: int, *, l2: float = 1e-2,
                iterations: int = 3000, tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with an L2 penalty on the weights (not the bias).

    Full-batch gradient descent with Nesterov momentum and a step of 1/L (L bounds the loss's
    curvature), so it is deterministic and needs no tuning. Returns ``(W [k, d], b [k])``.
    """
    n, d = X.shape
    Y = np.zeros((n, n_classes))
    Y[np.arange(n), y] = 1.0
    # The softmax cross-entropy's Hessian is bounded by 1/2 * X^T X / n (per class) + l2.
    top = np.linalg.eigvalsh(X.T @ X / n)[-1] if d <= 2048 else float((X * X).sum(axis=1).mean())
    step = 1.0 / (0.5 * top + 0.5 + l2)  # +0.5: the (unpenalised) bias column of ones
    W = np.zeros((n_classes, d))
    b = np.zeros(n_classes)
    Wv, bv = W.copy(), b.copy()
    prev_loss = math.inf
    for it in range(1, iterations + 1):
        P = _softmax(X @ Wv.T + bv)
        G = P - Y
        gW = G.T @ X / n + l2 * Wv
        gb = G.mean(axis=0)
        W_next, b_next = Wv - step * gW, bv - step * gb
        mom = (it - 1) / (it + 2)
        Wv, bv = W_next + mom * (W_next - W), b_next + mom * (b_next - b)
        W, b = W_next, b_next
        if it % 50 == 0:
            P = _softmax(X @ W.T + b)
            loss = -np.log(P[np.arange(n), y] + 1e-12).mean() + 0.5 * l2 * float((W * W).sum())
            if prev_loss - loss < tol:
                break
            prev_loss = loss
    return W, b


def cumulative_scores(P: np.ndarray) -> np.ndarray:
    """S[:, k] = P(label k or any stronger one); S[:, 0] is 1."""
    return np.cumsum(P[:, ::-1], axis=1)[:, ::-1]


def threshold_for_share(scores: np.ndarray, share: float) -> float:
    """The threshold that sends ``share`` of these scores at or above it.

    Half-way between the last score in and the first score out, so that ties and small score
    shifts on new traffic do not flip the boundary case.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    k = max(1, min(len(s), int(round(share * len(s)))))
    if k >= len(s):
        return float(s[-1])
    return float((s[k - 1] + s[k]) / 2.0)


@dataclass
class RouterModel:
    """A trained router; see the module docstring."""

    labels: list[str]
    weights: np.ndarray  # [k, d]
    bias: np.ndarray  # [k]
    thresholds: dict[str, float]  # label (all but the cheapest) -> cumulative-score threshold
    meta: dict = field(default_factory=dict)

    @property
    def uses_tokens(self) -> bool:
        """Whether the prompt's token count is one of the model's features (the last column)."""
        return self.weights.shape[1] == EMBEDDING_DIM + 1

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        return _softmax(np.atleast_2d(X) @ self.weights.T + self.bias)

    def route_indices(self, P: np.ndarray) -> np.ndarray:
        """The label index each row of probabilities routes to."""
        S = cumulative_scores(np.atleast_2d(P))
        out = np.zeros(S.shape[0], dtype=np.int64)
        for k in range(len(self.labels) - 1, 0, -1):
            hit = (out == 0) & (S[:, k] >= self.thresholds[self.labels[k]])
            out[hit] = k
        return out

    def featurize(self, embeddings: np.ndarray, token_counts: Sequence[int] | None) -> np.ndarray:
        """:func:`features` as this model reads them (the token counts only if it uses them)."""
        if self.uses_tokens and token_counts is None:
            raise ValueError("this model reads the prompt's token count: give token_counts")
        return features(embeddings, token_counts if self.uses_tokens else None)

    def decide(self, embedding: np.ndarray, tokens: int | None = None) -> tuple[str, np.ndarray]:
        """``(label, probabilities)`` for one prompt (``tokens`` only matters if :attr:`uses_tokens`)."""
        P = self.probabilities(self.featurize(np.atleast_2d(embedding), None if tokens is None else [tokens]))
        return self.labels[int(self.route_indices(P)[0])], P[0]

    # -- persistence --------------------------------------------------------------------------
    def to_json(self) -> str:
        def r(x: float) -> float:
            return float(f"{x:.6g}")

        doc = {
            "format": FORMAT,
            "labels": self.labels,
            "embedding_model": EMBEDDING_MODEL,
            "features": ({"embedding_scale": _EMB_SCALE, "log_tokens_center": _LEN_CENTER,
                          "log_tokens_scale": _LEN_SCALE} if self.uses_tokens
                         else {"embedding_scale": _EMB_SCALE, "log_tokens": False}),
            "thresholds": {k: r(v) for k, v in self.thresholds.items()},
            "meta": self.meta,
            "bias": [r(v) for v in self.bias],
            "weights": [[r(v) for v in row] for row in self.weights],
        }
        return json.dumps(doc, indent=1, separators=(",", ": ")) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<router model>") -> "RouterModel":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise RouterDataError(f"{source}: not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RouterDataError(f"{source}: not a learned-router model (format {FORMAT!r} expected)")
        try:
            labels = [str(x) for x in doc["labels"]]
            W = np.asarray(doc["weights"], dtype=np.float64)
            b = np.asarray(doc["bias"], dtype=np.float64)
            thresholds = {str(k): float(v) for k, v in doc["thresholds"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise RouterDataError(f"{source}: malformed model: {exc!r}") from None
        if (len(labels) < 2 or W.ndim != 2 or W.shape[0] != len(labels)
                or W.shape[1] not in (EMBEDDING_DIM, EMBEDDING_DIM + 1) or b.shape != (len(labels),)):
            raise RouterDataError(f"{source}: weights of shape {W.shape} do not fit {len(labels)} labels")
        missing = [lab for lab in labels[1:] if lab not in thresholds]
        if missing:
            raise RouterDataError(f"{source}: no threshold for {', '.join(missing)}")
        return cls(labels, W, b, thresholds, doc.get("meta") or {})

    @classmethod
    def load(cls, path: str | Path) -> "RouterModel":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RouterDataError(f"{path}: cannot read: {exc.strerror}") from None
        return cls.from_json(text, str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")


# ---------------------------------------------------------------------------- training


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, n_classes: int, *, folds: int = 5,
                              l2: float = 1e-2, seed: int = 0) -> np.ndarray:
    """Each prompt's probabilities from a model that did not see it (k-fold)."""
    P = np.zeros((X.shape[0], n_classes))
    for held in _folds(X.shape[0], folds, seed):
        mask = np.ones(X.shape[0], dtype=bool)
        mask[held] = False
        W, b = fit_softmax(X[mask], y[mask], n_classes, l2=l2)
        P[held] = _softmax(X[held] @ W.T + b)
    return P


def calibrate(P: np.ndarray, labels: Sequence[str], strong_share: float,
              medium_share: float | None = None) -> dict[str, float]:
    """Thresholds so that ``strong_share`` of these prompts go to the strongest label and (when
    given) ``strong_share + medium_share`` to the second strongest or above (else 0.5 there);
    labels between (with four or more) get 0.5."""
    S = cumulative_scores(P)
    k = len(labels)
    thresholds = {lab: 0.5 for lab in labels[1:]}
    thresholds[labels[-1]] = threshold_for_share(S[:, k - 1], strong_share)
    if k >= 3 and medium_share is not None:
        thresholds[labels[-2]] = threshold_for_share(S[:, k - 2], min(0.999, strong_share + medium_share))
    return thresholds


def train_router(prompts: Sequence[str], tiers: Sequence[str], *,
                 embed: Callable[[list[str]], np.ndarray], count_tokens: Callable[[str], int],
                 labels: Sequence[str] = DEFAULT_LABELS, strong_share: float = 0.4,
                 medium_share: float | None = None, l2: float = 1e-2, folds: int = 5, seed: int = 0,
                 length_feature: bool = False, meta: Mapping | None = None) -> tuple[RouterModel, np.ndarray]:
    """Fit, calibrate and return ``(model, out_of_fold_probabilities)``.

    :param embed: texts -> unit embeddings [n, 384] (the same encoder the gateway uses).
    :param count_tokens: text -> token count (the same counter the gateway uses).
    :param length_feature: add the log token count as a feature (off by default: see the module docstring).
    """
    from extproc_plugins.routing.task_text import task_text

    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    texts = [task_text(p) for p in prompts]
    y = np.asarray([index[t] for t in tiers], dtype=np.int64)
    missing = [lab for lab in labels if not (y == index[lab]).any()]
    if missing:
        raise RouterDataError(f"no training prompt for tier(s) {', '.join(missing)}")
    started = time.perf_counter()
    X = features(embed(texts), [count_tokens(p) for p in prompts] if length_feature else None)
    embedded = time.perf_counter()
    P_oof = out_of_fold_probabilities(X, y, len(labels), folds=folds, l2=l2, seed=seed)
    thresholds = calibrate(P_oof, labels, strong_share, medium_share)
    W, b = fit_softmax(X, y, len(labels), l2=l2)
    info = {"n": len(prompts), "per_tier": {lab: int((y == i).sum()) for i, lab in enumerate(labels)},
            "strong_share": strong_share, "medium_share": medium_share, "l2": l2, "folds": folds,
            "length_feature": length_feature,
            "seed": seed, "embed_seconds": round(embedded - started, 3),
            "fit_seconds": round(time.perf_counter() - embedded, 3)}
    info.update(meta or {})
    return RouterModel(labels, W, b, thresholds, info), P_oof


# ---------------------------------------------------------------------------- evaluation


@dataclass
class EvalReport:
    labels: list[str]
    confusion: np.ndarray  # [true, routed]
    cost_ratio: float  # cost of the routed traffic / cost of all of it on the strongest label

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(1, self.n))

    def recall(self, label: str) -> float:
        i = self.labels.index(label)
        row = self.confusion[i].sum()
        return float(self.confusion[i, i] / row) if row else float("nan")

    def strong_recall(self) -> float:
        """Share of prompts labelled with the strongest tier that were routed to it."""
        return self.recall(self.labels[-1])

    def routed_share(self, label: str) -> float:
        return float(self.confusion[:, self.labels.index(label)].sum() / max(1, self.n))

    def cheaper_share(self) -> float:
        """Share of all traffic routed below the strongest tier."""
        return 1.0 - self.routed_share(self.labels[-1])

    def format(self) -> str:
        labels = self.labels
        width = max(8, *(len(lab) + 2 for lab in labels))
        lines = [f"prompts: {self.n}",
                 f"accuracy: {self.accuracy:.3f}",
                 "confusion matrix (rows: labelled tier, columns: routed tier):",
                 " " * width + "".join(f"{lab:>{width}}" for lab in labels)]
        for i, lab in enumerate(labels):
            lines.append(f"{lab:<{width}}" + "".join(f"{int(v):>{width}}" for v in self.confusion[i]))
        lines.append("routed share: " + ", ".join(f"{lab} {self.routed_share(lab):.1%}" for lab in labels))
        lines.append(f"{labels[-1]}-labelled prompts routed to {labels[-1]}: {self.strong_recall():.1%}")
        lines.append(f"traffic to cheaper tiers than {labels[-1]}: {self.cheaper_share():.1%}")
        lines.append(f"cost relative to all-{labels[-1]}: {self.cost_ratio:.3f}")
        return "\n".join(lines)


def request_cost(price, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k) / 1000.0


def evaluate(labels: Sequence[str], true_idx: Sequence[int], routed_idx: Sequence[int], *,
             prices: Mapping[str, object], prompt_tokens: Sequence[int], completion_tokens: int = 256) -> EvalReport:
    """Accuracy, confusion matrix and cost ratio of a routing.

    :param prices: label -> :class:`~extproc.framework.config.Price` (the configured tiers' prices).
    :param completion_tokens: the completion length assumed for every request (answers are not
        in the labelled data); the ratio depends on it only through the prompt/completion mix.
    """
    labels = list(labels)
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    for t, r in zip(true_idx, routed_idx):
        confusion[int(t), int(r)] += 1
    strongest = prices[labels[-1]]
    routed_cost = sum(request_cost(prices[labels[int(r)]], p, completion_tokens)
                      for r, p in zip(routed_idx, prompt_tokens))
    all_strong = sum(request_cost(strongest, p, completion_tokens) for p in prompt_tokens)
    return EvalReport(labels, confusion, routed_cost / all_strong if all_strong else float("nan"))
