"""In-flight batching generation engine for :class:`ReferenceTransformer`.

Requests are submitted from any thread (Triton's ``execute()``); one loop (a background thread in
Triton, or ``step()`` called directly in tests) does, per step:

1. admit waiting requests into free KV-cache slots (up to ``prefill_token_budget`` prompt
   tokens per step);
2. run ONE forward pass for every active sequence's next token *and* the joining prompts
   (in-flight fused batching: prompts ride along with the decode step instead of a pass of
   their own), sample each row's token (a joining request's first token is sent at once) and
   retire sequences that finished (compacting the cache slots).

So new requests join between steps and finished ones leave, and the cost of a step is shared by
all active sequences.  ``max_active_sequences=1`` turns batching off (requests run one by one).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .model import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, ReferenceTransformer, TierConfig, tier_config
from .tokenizer import EOS_ID, StopMatcher, StreamDetokenizer, encode

DEFAULT_MAX_TOKENS = 16


@dataclass
class GenRequest:
    prompt: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop_words: list[str] = field(default_factory=list)
    end_id: int = EOS_ID

    def validate(self) -> "GenRequest":
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.max_tokens = min(int(self.max_tokens), MAX_NEW_TOKENS)
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        return self


@dataclass
class Event:
    """One generated token's worth of output for a request."""

    text: str                 #: newly decoded text (may be "" while bytes/stop-word prefixes wait)
    completion_tokens: int    #: cumulative generated tokens (end id not counted)
    prompt_tokens: int
    finish_reason: str = ""   #: "" until the last event, then "stop" or "length"

    @property
    def final(self) -> bool:
        return bool(self.finish_reason)


EventCallback = Callable[[Event], None]


class _Sequence:
    __slots__ = ("req", "callback", "is_cancelled", "ids", "prompt_tokens", "n_generated",
                 "last_token", "position", "detok", "stop", "rng", "finished", "submitted", "first_token_at")

    def __init__(self, req: GenRequest, callback: EventCallback, is_cancelled) -> None:
        self.req = req
        self.callback = callback
        self.is_cancelled = is_cancelled
        prompt_ids = encode(req.prompt)
        self.prompt_tokens = len(prompt_ids)
        self.ids = np.asarray([EOS_ID] + prompt_ids[-MAX_PROMPT_TOKENS:], dtype=np.int64)  # BOS + prompt
        self.n_generated = 0
        self.last_token = -1
        self.position = len(self.ids)  # cache position the next fed token goes to
        self.detok = StreamDetokenizer()
        self.stop = StopMatcher(req.stop_words)
        self.rng = np.random.default_rng(req.seed) if req.temperature > 0 else None
        self.finished = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None


def sample(logits: np.ndarray, req: GenRequest, rng: Optional[np.random.Generator]) -> int:
    """Index into the output vocabulary: argmax when temperature is 0, else top-k/top-p sampling."""
    if req.temperature <= 0 or rng is None:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / req.temperature
    if req.top_k and req.top_k < z.size:
        kth = np.partition(z, -req.top_k)[-req.top_k]
        z = np.where(z >= kth, z, -np.inf)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if req.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(csum, req.top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))


class Engine:
    #: prompts joining in the same step share its forward pass, up to this many prompt tokens
    #: (at least one prompt joins whatever its length; the rest wait for the next step)
    prefill_token_budget = 512
    #: check each sequence for cancellation every this many generated tokens
    cancel_check_every = 8

    def __init__(self, tier: str | TierConfig, max_active_sequences: int = 32) -> None:
        self.cfg = tier if isinstance(tier, TierConfig) else tier_config(tier)
        self.max_active = max(1, int(max_active_sequences))
        self.model = ReferenceTransformer(self.cfg, slots=self.max_active)
        self._pending: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []  # _active[i] lives in cache slot i
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._step_lock = threading.Lock()
        # statistics (read by the Triton adapter for metrics, and by tests)
        self.stats = collections.Counter()
        self.timings: collections.Counter = collections.Counter()  # seconds: prefill/decode/emit
        self.max_batch_seen = 0
        self.on_idle: Optional[Callable[[], None]] = None
        #: called after each step while requests remain (keep it cheap: it runs on the engine thread)
        self.on_busy_step: Optional[Callable[[], None]] = None
        #: called as on_error(exc, callback) for each request dropped because of an engine error
        self.on_error: Optional[Callable[[BaseException, EventCallback], None]] = None

    # -- submission -------------------------------------------------------------------------
    def submit(self, req: GenRequest, callback: EventCallback,
               is_cancelled: Optional[Callable[[], bool]] = None) -> None:
        """Queue a request; ``callback`` gets one :class:`Event` per generated token (from the
        engine loop's thread).  Raises ``ValueError`` for invalid parameters."""
        seq = _Sequence(req.validate(), callback, is_cancelled)
        with self._cv:
            self._pending.append(seq)
            self._cv.notify()

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._active)

    def queue_depths(self) -> tuple[int, int]:
        """``(waiting, active)``: requests queued for a slot, and sequences being generated."""
        return len(self._pending), len(self._active)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit waiting requests, then one forward pass for all.  Returns False if idle."""
        with self._step_lock:
            joining = self._admit()
            if not self._active and not joining:
                return bool(self._pending)
            self._forward_step(joining)
            return True

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def generate(self, req: GenRequest) -> tuple[str, list[Event]]:
        """Synchronous helper (tests): run one request alone to completion."""
        events: list[Event] = []
        self.submit(req, events.append)
        self.run_until_idle()
        return "".join(e.text for e in events), events

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"reference-llm-{self.cfg.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.busy:  # requests still queued or running get an error, not silence
            self._fail_all(RuntimeError("model is shutting down"))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._pending and not self._active:
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except BaseException as exc:  # keep serving; report through the adapter
                self._fail_all(exc)
            hook = self.on_idle if not self.busy else self.on_busy_step
            if hook is not None:
                try:
                    hook()
                except Exception:
                    pass

    def _fail_all(self, exc: BaseException) -> None:
        seqs = list(self._active)
        with self._cv:
            seqs += list(self._pending)
            self._pending.clear()
        self._active.clear()
        if self.on_error is not None:
            for s in seqs:
                try:
                    self.on_error(exc, s.callback)
                except Exception:
                    pass

    # -- internals --------------------------------------------------------------------------
    def _cancelled(self, seq: _Sequence) -> bool:
        if seq.is_cancelled is None:
            return False
        try:
            return bool(seq.is_cancelled())
        except Exception:
            return False

    def _admit(self) -> list[_Sequence]:
        """Take waiting requests for the free slots, within the step's prompt-token budget."""
        joining: list[_Sequence] = []
        budget = 0
        with self._cv:
            while self._pending and len(self._active) + len(joining) < self.max_active:
                seq = self._pending[0]
                if joining and budget + len(seq.ids) > self.prefill_token_budget:
                    break
                self._pending.popleft()
                if self._cancelled(seq):
                    self.stats["cancelled"] += 1
                    continue
                joining.append(seq)
                budget += len(seq.ids)
        return joining

    def _forward_step(self, joining: list[_Sequence]) -> None:
        """One forward pass: the active sequences' next tokens and the joining prompts."""
        active = self._active
        b = len(active)
        ids = np.fromiter((s.last_token for s in active), dtype=np.int64, count=b)
        pos = np.fromiter((s.position for s in active), dtype=np.int64, count=b)
        t0 = time.perf_counter()
        logits = self.model.forward(ids, pos, list(range(b, b + len(joining))), [s.ids for s in joining])
        t1 = time.perf_counter()
        if b:
            self.timings["decode"] += t1 - t0
            self.stats["decode_steps"] += 1
            self.stats["decode_tokens"] += b
            if b > self.max_batch_seen:
                self.max_batch_seen = b
        else:
            self.timings["prefill"] += t1 - t0
            self.stats["prefill_passes"] += 1
        if joining:
            self.stats["prefills"] += len(joining)
            self.stats["prefill_tokens"] += sum(len(s.ids) for s in joining)
            if b:
                self.stats["fused_prefills"] += len(joining)
        # one vectorised argmax (and vocabulary lookup) for all rows; sequences that sample
        # (temperature > 0) draw from their own row in _accept instead
        greedy = self.model.vocab[np.argmax(logits, axis=1)].tolist()
        check = self.cancel_check_every
        done = []
        for i, seq in enumerate(active):
            seq.position += 1
            # is_cancelled may be costly (Triton: an IPC round trip): not every token
            if seq.n_generated % check == 0 and self._cancelled(seq):
                seq.finished = True
                self.stats["cancelled"] += 1
                done.append(i)
                continue
            self._accept(seq, logits[i], greedy[i])
            if seq.finished:
                done.append(i)
        for j, seq in enumerate(joining):  # their first token
            active.append(seq)
            self._accept(seq, logits[b + j], greedy[b + j])
            if seq.finished:
                done.append(b + j)
        self.timings["emit"] += time.perf_counter() - t1
        if done:
            self._retire(done)

    def _accept(self, seq: _Sequence, logits: np.ndarray, greedy_token: int | None = None) -> None:
        """Sample the next token from ``logits`` and emit its event.

        ``greedy_token``: the cl100k id of the argmax of ``logits`` when the caller has it already.
        """
        if seq.rng is None and greedy_token is not None:
            token = greedy_token
        else:
            token = int(self.model.vocab[sample(logits, seq.req, seq.rng)])
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        finish = ""
        if token == seq.req.end_id:
            finish = "stop"
            text = seq.stop.push(seq.detok.flush())[0] + seq.stop.flush()
        else:
            seq.n_generated += 1
            seq.last_token = token
            text, stopped = seq.stop.push(seq.detok.feed(token))
            if stopped:
                finish = "stop"
            elif seq.n_generated >= seq.req.max_tokens or seq.position >= self.model.max_context:
                tail, stopped = seq.stop.push(seq.detok.flush())
                text += tail
                if stopped:
                    finish = "stop"
                else:
                    text += seq.stop.flush()
                    finish = "length"
        if finish:
            seq.finished = True
            self.stats["finished_" + finish] += 1
        self.stats["generated_tokens"] += 1
        try:
            seq.callback(Event(text, seq.n_generated, seq.prompt_tokens, finish))
        except Exception:
            # a broken consumer (e.g. client went away) must not take the engine down
            seq.finished = True
            self.stats["callback_errors"] += 1

    def _retire(self, done: list[int]) -> None:
        """Drop finished sequences; survivors beyond the new end move into the freed slots."""
        active = self._active
        n_keep = len(active) - len(done)
        holes = [i for i in done if i < n_keep]
        movers = [j for j in range(n_keep, len(active)) if not active[j].finished]
        for i, j in zip(holes, movers):
            self.model.move_slot(j, i, active[j].position)
            active[i] = active[j]
        del active[n_keep:]
