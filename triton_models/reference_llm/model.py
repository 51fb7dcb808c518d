"""A small decoder-only transformer in NumPy with fixed, seeded random weights.

Real arithmetic per token (pre-norm blocks: multi-head causal self-attention + ReLU MLP), a
slot-based KV cache for in-flight batching, no sleeping anywhere.  The weights are random, so the
model produces gibberish: it exists to make Triton do LLM-shaped work (prefill, per-token decode
cost growing with model size, batched decode steps) on a CPU.

Vocabulary: input ids are any cl100k id (embedded through a hashed table of ``embed_rows`` rows);
output logits cover the reduced vocabulary of :func:`tokenizer.output_vocab`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tokenizer import EOS_ID, output_vocab

MAX_PROMPT_TOKENS = 1024   #: longer prompts keep their last MAX_PROMPT_TOKENS tokens
MAX_NEW_TOKENS = 512       #: cap on max_tokens
MAX_CONTEXT = 1 + MAX_PROMPT_TOKENS + MAX_NEW_TOKENS  # BOS + prompt + completion


@dataclass(frozen=True)
class TierConfig:
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    ff_mult: int = 4
    vocab_out: int = 8192
    embed_rows: int = 16384
    seed: int = 0
    logit_scale: float = 4.0
    eos_bias: float = -6.0  # keeps the default EOS rare so greedy runs are usually full length

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def macs_per_token(self) -> int:
        """Multiply-accumulates per decoded token, excluding attention over the context."""
        d, f = self.d_model, self.d_model * self.ff_mult
        return self.n_layers * (4 * d * d + 2 * d * f) + d * self.vocab_out


TIERS: dict[str, TierConfig] = {
    "small": TierConfig("small", d_model=64, n_layers=2, n_heads=2, seed=11),
    "medium": TierConfig("medium", d_model=256, n_layers=4, n_heads=4, seed=22),
    "large": TierConfig("large", d_model=512, n_layers=8, n_heads=8, seed=33),
}


def tier_config(name: str) -> TierConfig:
    key = name.lower().removeprefix("llm-")
    try:
        return TIERS[key]
    except KeyError:
        raise ValueError(f"unknown tier {name!r}; known: {sorted(TIERS)}") from None


def _lin(x: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """``x @ W`` for ``wt = W.T`` stored contiguously ([out, in], like torch.nn.Linear).

    OpenBLAS is much faster at ``W.T @ x.T`` than at ``x @ W`` when x has few rows (a decode
    batch of 4-16 sequences): 1.6-4x on the sizes used here.  The result is a transposed view.
    """
    return (wt @ x.T).T


def _rmsnorm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    ms = np.einsum("ij,ij->i", x, x)[:, None] / np.float32(x.shape[-1])
    return x * (g / np.sqrt(ms + np.float32(1e-6)))


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0.0), out=x)  # x is a fresh temporary: safe in place


def _softmax_lastdim(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)
    return x


class ReferenceTransformer:
    """Weights + forward passes.  ``slots`` KV-cache slots of ``max_context`` positions each.

    The cache is allocated with ``np.zeros`` (lazily backed by the OS), so untouched slots and
    positions cost no memory.  Active sequences must occupy slots ``0..B-1`` (the engine keeps
    them compact) so that the batched decode step works on plain views, never copies.
    """

    #: output rows of the unembedding per matrix product (see :meth:`_logits`)
    unembed_block_rows = 2048

    def __init__(self, cfg: TierConfig, slots: int, max_context: int = MAX_CONTEXT) -> None:
        self.cfg = cfg
        self.slots = slots
        self.max_context = max_context
        d, h, dh, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_model * cfg.ff_mult
        rng = np.random.default_rng(cfg.seed)

        def w(*shape: int, fan_in: int) -> np.ndarray:
            return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)

        def _t(m: np.ndarray) -> np.ndarray:  # matrices are stored transposed, see _lin
            return np.ascontiguousarray(m.T)

        self.vocab = output_vocab(cfg.vocab_out)                  # output index -> cl100k id
        self.index_of = {int(t): i for i, t in enumerate(self.vocab)}
        self.embed = w(cfg.embed_rows, d, fan_in=1) * np.float32(0.5)
        self.layers = []
        for _ in range(cfg.n_layers):
            self.layers.append(
                dict(
                    g1=np.ones(d, np.float32),
                    wqkv=_t(w(d, 3 * d, fan_in=d)),
                    wo=_t(w(d, d, fan_in=d)),
                    g2=np.ones(d, np.float32),
                    w1=_t(w(d, f, fan_in=d)),
                    w2=_t(w(f, d, fan_in=f)),
                )
            )
        self.g_final = np.ones(d, np.float32)
        self.unembed = _t(w(d, cfg.vocab_out, fan_in=d) * np.float32(cfg.logit_scale))
        self.logit_bias = np.zeros(cfg.vocab_out, np.float32)
        if EOS_ID in self.index_of:
            self.logit_bias[self.index_of[EOS_ID]] = cfg.eos_bias
        # sinusoidal positions
        pos = np.arange(max_context, dtype=np.float64)[:, None]
        freq = np.exp(-np.log(10000.0) * np.arange(0, d, 2, dtype=np.float64) / d)[None, :]
        pe = np.zeros((max_context, d), np.float64)
        pe[:, 0::2] = np.sin(pos * freq)
        pe[:, 1::2] = np.cos(pos * freq)
        self.pos_embed = (pe * 0.5).astype(np.float32)
        # KV cache: per layer [slots, heads, max_context, head_dim]
        self.k_cache = [np.zeros((slots, h, max_context, dh), np.float32) for _ in range(cfg.n_layers)]
        self.v_cache = [np.zeros((slots, h, max_context, dh), np.float32) for _ in range(cfg.n_layers)]
        self._scale = np.float32(1.0 / np.sqrt(dh))

    # -- helpers ----------------------------------------------------------------------------
    def _embed_ids(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        rows = (ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(self.cfg.embed_rows)
        return self.embed[rows.astype(np.int64)] + self.pos_embed[positions]

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """``[n, vocab_out]`` logits of the rows of ``x``.

        The unembedding is applied in blocks of ``unembed_block_rows`` output rows: one sgemm
        over all 8 192 rows runs well below the speed of the same products in blocks whose
        weights fit the cache (about 1.3x slower at 16 rows per step); a block is the same
        arithmetic, written into its slice of the result.
        """
        xt = _rmsnorm(x, self.g_final).T
        n_out = self.unembed.shape[0]
        out = np.empty((n_out, xt.shape[1]), np.float32)
        step = self.unembed_block_rows
        for lo in range(0, n_out, step):
            np.matmul(self.unembed[lo:lo + step], xt, out=out[lo:lo + step])
        out = out.T
        out += self.logit_bias
        return out

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` into slot ``dst``."""
        for k, v in zip(self.k_cache, self.v_cache):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # -- forward passes ---------------------------------------------------------------------
    def prefill(self, slot: int, ids: np.ndarray) -> np.ndarray:
        """Run one prompt (``ids``, 1-D, includes BOS) into ``slot``; return last-position logits."""
        return self.prefill_many([slot], [ids])[0]

    def prefill_many(self, slots: list[int], prompts: list[np.ndarray]) -> np.ndarray:
        """Prefill several prompts in ONE forward pass (batched prefill).

        Returns the logits of each prompt's last position, ``[len(prompts), vocab_out]``.
        See :meth:`forward`.
        """
        if not prompts:
            raise ValueError("no prompts")
        return self.forward(np.zeros(0, np.int64), np.zeros(0, np.int64), slots, prompts)

    def decode(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One batched decode step for the sequences in slots ``0..B-1``.

        ``ids[b]`` is sequence b's newest token, to be written at cache position ``positions[b]``.
        Returns logits ``[B, vocab_out]``.
        """
        return self.forward(ids, positions)

    def forward(self, ids: np.ndarray, positions: np.ndarray,
                slots: list[int] = (), prompts: list[np.ndarray] = ()) -> np.ndarray:
        """ONE forward pass for a decode step and for joining prompts together.

        * Decode rows: the ``B = len(ids)`` sequences in cache slots ``0..B-1``; ``ids[b]`` is
          sequence b's newest token, written at cache position ``positions[b]``; it attends to
          its own cache up to there.
        * Prompt rows (in-flight *fused* batching, as TensorRT-LLM does with context and
          generation requests): each prompt of ``prompts`` (1-D ids, BOS included) goes to cache
          slot ``slots[i]`` from position 0, attending causally within itself (block-diagonal
          mask).

        All rows go through every weight matrix together, so a step in which requests join
        reads the weights once instead of once for the prompts and again for the decode step.
        Returns logits ``[B + len(prompts), vocab_out]``: the decode rows, then each prompt's
        last position.
        """
        cfg = self.cfg
        h, dh = cfg.n_heads, cfg.head_dim
        b = len(ids)
        xs = []
        if b:
            xs.append(self._embed_ids(ids, positions))
            tmax = int(positions.max()) + 1
            rows = np.arange(b)
            # additive mask: position t is visible to sequence i iff t <= positions[i]
            dmask = np.where(np.arange(tmax)[None, :] <= positions[:, None], 0.0, -np.inf).astype(np.float32)
            dmask = dmask[:, None, None, :]                               # [b, 1, 1, tmax]
        n = 0
        if len(prompts):
            lens = np.asarray([len(p) for p in prompts], dtype=np.int64)
            if lens.min() < 1 or lens.max() > self.max_context:
                raise ValueError(f"prompt lengths {lens.tolist()} outside 1..{self.max_context}")
            n = int(lens.sum())
            pids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            ppos = np.arange(n) - np.repeat(starts, lens)
            seg = np.repeat(np.arange(len(lens)), lens)
            visible = (seg[:, None] == seg[None, :]) & (ppos[:, None] >= ppos[None, :])
            pmask = np.where(visible, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
            xs.append(self._embed_ids(pids, ppos))
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        for li, p in enumerate(self.layers):
            a = np.ascontiguousarray(_lin(_rmsnorm(x, p["g1"]), p["wqkv"]))  # [b + n, 3d]
            kc, vc = self.k_cache[li], self.v_cache[li]
            outs = []
            if b:
                q, k, v = a[:b].reshape(b, 3, h, dh).transpose(1, 0, 2, 3)  # each [b, h, dh]
                kc[rows, :, positions] = k
                vc[rows, :, positions] = v
                keys = kc[:b, :, :tmax]                                   # [b, h, tmax, dh] (view)
                vals = vc[:b, :, :tmax]
                s = (q[:, :, None, :] @ keys.transpose(0, 1, 3, 2)) * self._scale + dmask  # [b,h,1,tmax]
                outs.append((_softmax_lastdim(s) @ vals).reshape(b, -1))  # [b, d]
            if n:
                q, k, v = a[b:].reshape(n, 3, h, dh).transpose(1, 2, 0, 3)  # each [h, n, dh]
                for slot, st, ln in zip(slots, starts, lens):
                    kc[slot, :, :ln] = k[:, st:st + ln]
                    vc[slot, :, :ln] = v[:, st:st + ln]
                s = (q @ k.transpose(0, 2, 1)) * self._scale + pmask      # [h, n, n]
                o = _softmax_lastdim(s) @ v                               # [h, n, dh]
                outs.append(o.transpose(1, 0, 2).reshape(n, -1))          # [n, d]
            o = outs[0] if len(outs) == 1 else np.concatenate(outs)
            x = x + _lin(o, p["wo"])
            x = x + _lin(_relu(_lin(_rmsnorm(x, p["g2"]), p["w1"])), p["w2"])
        if n:
            x = x[np.concatenate([np.arange(b), b + starts + lens - 1])]
        return self._logits(x)
