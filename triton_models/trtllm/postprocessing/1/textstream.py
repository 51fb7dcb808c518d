"""Token stream -> text, token counts and finish reason, with the CPU tiers' semantics.

Shared by ``postprocessing`` (ensemble path) and ``tensorrt_llm_bls`` (which puts this directory
on ``sys.path``).  Pure Python: the tokenizer is anything with
``decode(ids, skip_special_tokens=...) -> str`` (a ``transformers`` tokenizer in production).

Semantics (same as ``triton_models/reference_llm``):

* ``completion_tokens`` counts generated tokens, cumulative, the end token excluded;
* stop words match on text; the stop word and everything after it are dropped, text that may be
  the start of a stop word is held back until it cannot be;
* streamed text never splits a UTF-8 character or a multi-token glyph (incremental
  detokenisation with a prefix window, as vLLM/TGI do);
* ``finish_reason`` is "" until the end, then "stop" (end token or stop word) or "length"
  (``max_tokens`` reached).
"""

from __future__ import annotations

from typing import Iterable, Sequence


class StopMatcher:
    """Text-level stop words over a stream of text deltas."""

    def __init__(self, stop_words: Iterable[str] = ()) -> None:
        self.stop_words = [w for w in stop_words if w]
        self._pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """``(text safe to emit now, stop word found)``."""
        if not self.stop_words:
            return delta, False
        text = self._pending + delta
        cut = -1
        for w in self.stop_words:
            i = text.find(w)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self._pending = ""
            return text[:cut], True
        hold = 0
        for w in self.stop_words:
            for k in range(min(len(w) - 1, len(text)), hold, -1):
                if text.endswith(w[:k]):
                    hold = k
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class IncrementalDetokenizer:
    """Decode a growing id list into text deltas without splitting characters."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def feed(self, new_ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""


class GenerationState:
    """One sequence: feed token chunks, get ``(text delta, completion_tokens, finish_reason)``."""

    def __init__(
        self,
        tokenizer,
        *,
        max_tokens: int,
        end_id: int | None,
        stop_words: Iterable[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = StopMatcher(stop_words)
        self.max_tokens = int(max_tokens)
        self.end_id = None if end_id is None else int(end_id)
        self.completion_tokens = 0
        self.finish_reason = ""

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    def feed(self, token_ids: Iterable[int], *, final: bool = False) -> tuple[str, int, str]:
        """Add generated tokens; ``final`` marks the engine's last response for this sequence."""
        if self.finished:
            return "", self.completion_tokens, self.finish_reason
        text = ""
        saw_end = False
        for tok in token_ids:
            tok = int(tok)
            if self.end_id is not None and tok == self.end_id:
                saw_end = True
                break
            self.completion_tokens += 1
            piece, stopped = self.stop.push(self.detok.feed([tok]))
            text += piece
            if stopped:
                self.finish_reason = "stop"
                return text, self.completion_tokens, self.finish_reason
            if self.completion_tokens >= self.max_tokens:
                break
        if saw_end or final or self.completion_tokens >= self.max_tokens:
            tail, stopped = self.stop.push(self.detok.flush())
            text += tail
            if stopped:
                self.finish_reason = "stop"
            else:
                text += self.stop.flush()
                if saw_end or self.completion_tokens < self.max_tokens:
                    self.finish_reason = "stop"
                else:
                    self.finish_reason = "length"
        return text, self.completion_tokens, self.finish_reason
