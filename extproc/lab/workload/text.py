"""Synthetic English text of a requested token length, and paraphrases of it.

Text is assembled from a :class:`~extproc.lab.workload.domains.Domain`'s sentence templates with
``random.Random`` draws only (deterministic for the caller's generator). Lengths are counted with
:func:`approx_tokens`, a characters-per-token rule calibrated on this text against tiktoken's
cl100k_base (within ~10 % on blocks of 50 tokens or more; ``tests/unit/test_lab_workload.py`` checks it).
"""

from __future__ import annotations

import math
import random
import re

from extproc.lab.workload.domains import SLOTS, Domain

#: Characters per cl100k token on the domains' text (measured: 4.3 to 4.7; transcripts are denser).
CHARS_PER_TOKEN = 4.4


def approx_tokens(text: str) -> int:
    """Cheap estimate of the cl100k token count of ``text``."""
    return int(len(text) / CHARS_PER_TOKEN + 0.5) if text else 0


#: Slots drawn once per text block and then kept (who and what it is about); the others are drawn
#: at each use, so a template used twice in a transcript reads differently.
STICKY = frozenset({"first", "last", "age", "doctor", "visit", "condition", "symptom", "product", "order", "plan",
                    "vendor", "inv", "po", "dept", "topic"})


class Facts(dict):
    """The slot values of one text block: a sticky slot (:data:`STICKY`) is drawn on first use and
    then kept, so a transcript is about one patient and a message about one order."""

    __slots__ = ("rng",)

    def __init__(self, rng: random.Random):
        super().__init__()
        self.rng = rng

    def __missing__(self, key: str) -> str:
        values = SLOTS[key]
        value = values[int(self.rng.random() * len(values))]
        if key in STICKY:
            self[key] = value
        return value


def fill(template: str, facts: Facts) -> str:
    """``template`` with its ``{slot}`` placeholders replaced."""
    return template.format_map(facts)


def _coprimes(n: int) -> tuple[int, ...]:
    return tuple(k for k in range(1, max(n, 2)) if math.gcd(k, n) == 1) or (1,)


_STEPS: dict[int, tuple[int, ...]] = {}


def _sentences(rng: random.Random, facts: Facts, banks, prefixes, tokens: int, used: int) -> list[str]:
    """Sentences from ``banks`` in rotation, none repeated before its bank is used up (each bank is
    walked from a random start with a random step coprime to its size)."""
    out: list[str] = []
    walks = []
    for bank in banks:
        n = len(bank)
        steps = _STEPS.get(n) or _STEPS.setdefault(n, _coprimes(n))
        walks.append([int(rng.random() * n), steps[int(rng.random() * len(steps))]])
    nb, npre, i = len(banks), len(prefixes), 0
    while used < tokens:
        b = i % nb
        bank, walk = banks[b], walks[b]
        template = bank[walk[0]]
        walk[0] = (walk[0] + walk[1]) % len(bank)
        line = prefixes[i % npre] + (template.format_map(facts) if "{" in template else template)
        out.append(line)
        used += int(len(line) / CHARS_PER_TOKEN + 0.5) + 1
        i += 1
    return out


def content(domain: Domain, rng: random.Random, tokens: int, facts: Facts | None = None) -> str:
    """A content block (transcript, customer message, business document) of about ``tokens`` tokens."""
    facts = facts if facts is not None else Facts(rng)
    header = fill(rng.choice(domain.header), facts)
    header = header[:1].upper() + header[1:]
    closing = fill(rng.choice(domain.closing), facts)
    parts = [header] if header else []
    if domain.lead:
        parts.append(fill(rng.choice(domain.lead), facts))
    used = sum(approx_tokens(p) + 1 for p in parts) + approx_tokens(closing)
    parts += _sentences(rng, facts, domain.lines, domain.prefixes, tokens, used)
    if closing:
        parts.append(closing)
    return domain.separator.join(parts)


def document(domain: Domain, rng: random.Random, tokens: int) -> tuple[str, str]:
    """A reference document of about ``tokens`` tokens: ``(title, text)``."""
    facts = Facts(rng)
    title = fill(rng.choice(domain.doc_title), facts)
    body = _sentences(rng, facts, (domain.doc_lines,), ("",), tokens, approx_tokens(title))
    return title, " ".join(body)


def answer(domain: Domain, rng: random.Random, tokens: int, facts: Facts | None = None) -> str:
    """The assistant's answer of about ``tokens`` tokens (history of a multi-turn session)."""
    facts = facts if facts is not None else Facts(rng)
    return " ".join(_sentences(rng, facts, (domain.answer_lines,), ("",), max(tokens, 1), 0))


def clip(text: str, tokens: int) -> str:
    """``text`` cut to about ``tokens`` tokens, at a line or sentence end when there is one."""
    limit = int(tokens * CHARS_PER_TOKEN)
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind("\n"), cut.rfind(". "))
    return cut[: end + 1].rstrip() if end > limit // 2 else cut.rstrip()


_PREFIXES = ("Hi, ", "Hello, ", "Quick question: ", "Please help: ", "Hey, ", "One more thing: ")
_ASKS = ("Please ", "Could you ", "Can you ", "I need you to ", "Would you ", "Kindly ")
_SUFFIXES = (" Thanks.", " Thank you!", " Thanks in advance.", " Much appreciated.", " Cheers.")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


class Paraphraser:
    """Rewords text with a domain's synonym pairs (both ways), an optional polite opener or closer,
    and, for a text of several sentences, another sentence order. Numbers, names and negations are
    left alone, so a semantic cache's guard accepts the paraphrase while an exact cache misses."""

    def __init__(self, synonyms: tuple[tuple[str, str], ...]):
        pairs: dict[str, str] = {}
        for a, b in synonyms:
            pairs.setdefault(a, b)
            pairs.setdefault(b, a)
        self.pairs = pairs
        words = sorted(pairs, key=len, reverse=True)
        self.pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in words) + r")(?![\w-])")

    def reword(self, text: str, rng: random.Random, *, reorder: bool = True, polite: bool = True) -> str:
        """A reworded ``text``, always different from it."""
        out = self.pattern.sub(lambda m: self.pairs[m.group(1)] if rng.random() < 0.7 else m.group(1), text)
        if reorder and rng.random() < 0.5:
            sentences = _SENTENCE_END.split(out)
            if 3 <= len(sentences) <= 8:  # the opening sentence (a greeting, the task) stays first
                i = rng.randrange(1, len(sentences) - 1)
                sentences[i], sentences[i + 1] = sentences[i + 1], sentences[i]
                out = " ".join(sentences)
        keep = out[:2] in ("I ", "I'")
        if polite and rng.random() < 0.5 and not keep and out[:1].isupper():  # "Please summarize ..."
            out = rng.choice(_ASKS) + out[:1].lower() + out[1:]
        elif polite and rng.random() < 0.5:
            out = rng.choice(_PREFIXES) + (out if keep else out[:1].lower() + out[1:])
        if polite and rng.random() < 0.4 and "Thank" not in out[-24:]:
            out += rng.choice(_SUFFIXES)
        if out == text:
            out = "Hello, " + (text[:1].lower() + text[1:] if not text.startswith("I ") else text)
        return out
