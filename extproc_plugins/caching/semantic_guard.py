"""A cheap check beyond cosine similarity: the details that flip an answer must match.

Sentence embeddings place "What is the capital of France?" and "... of Germany?" close together,
"Convert kilograms to pounds" and "Convert pounds to kilograms" closer still (0.998 with
all-MiniLM-L6-v2), and a negation barely moves them. Any threshold that keeps paraphrases
(0.83-0.97) lets those through. So before a semantic hit is served, :func:`compatible` compares
the two texts on what such near misses change (each check can be turned off):

``numbers``      the multiset of numbers, digits or words ("three" == "3", "first" == "1st")
``negation``     whether the text is negated (not, no, never, without, n't, cannot...)
``entities``     every capitalised name or acronym of one text (not the first word of a sentence)
                 must occur in the other as a word, case-insensitively (France / france's), or
                 as the initials of capitalised words (UK / United Kingdom), or an acronym as the
                 initials of consecutive words of any case (UTI / urinary tract infection)
``contrast``     one text must not use a word whose opposite the other uses instead (largest /
                 smallest, before / after, encrypt / decrypt, zoom in / zoom out...)
``direction``    the words around "to"/"from"/"into" must not be swapped ("kilograms to pounds"
                 vs "pounds to kilograms")

Pure Python, about 20 us per pair; no model, no I/O. What each check buys is measured by
``benchmarks/bench_semantic_precision.py`` on the labelled pairs in ``benchmarks/data/``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["GuardChecks", "Features", "features", "compatible"]

_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*|\d+(?:[.,]\d+)*(?:st|nd|rd|th)?")
_CAPITAL_RUN = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)+\b")
_SENTENCE_END = re.compile(r"[.!?:;]\s+|\n")

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30,
    "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
    "thousand": 1000, "million": 10**6, "billion": 10**9, "dozen": 12, "half": 0.5, "twice": 2,
}
_ORDINAL_WORDS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "twentieth": 20, "hundredth": 100,
}
_NEGATIONS = frozenset({"not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "without",
                        "cannot", "nowhere", "non"})

# Opposite pairs: each word maps to (pair id, side). Inflections listed explicitly.
_OPPOSITES = [
    ("advantage advantages pro pros benefit benefits upside upsides", "disadvantage disadvantages con cons drawback drawbacks downside downsides"),
    ("largest biggest greatest", "smallest tiniest"),
    ("large big bigger larger", "small little smaller tiny"),
    ("highest tallest", "lowest shortest"),
    ("high higher tall taller", "low lower short shorter"),
    ("most", "least fewest"),
    ("more", "less fewer"),
    ("best", "worst"),
    ("better", "worse"),
    ("hottest warmest", "coldest coolest"),
    ("hot warm", "cold cool"),
    ("fastest quickest", "slowest"),
    ("fast quick", "slow"),
    ("oldest", "newest youngest latest"),
    ("old", "new young"),
    ("earliest", "latest"),
    ("early", "late"),
    ("richest wealthiest", "poorest"),
    ("rich wealthy", "poor"),
    ("cheapest", "priciest"),
    ("cheap cheaper inexpensive", "expensive pricier costly"),
    ("increase increases increasing raise raising rise rises grow", "decrease decreases decreasing lower lowering fall falls drop shrink reduce"),
    ("gain gaining", "lose losing"),
    ("before prior", "after following"),
    ("start starting begin", "stop stopping end finish"),
    ("open opening", "close closing"),
    ("enable enabling activate turn_on switch_on", "disable disabling deactivate turn_off switch_off"),
    ("encrypt encrypting encryption", "decrypt decrypting decryption"),
    ("compress compressing compression zip", "decompress decompressing decompression unzip extract"),
    ("upload uploading", "download downloading"),
    ("import imports importing", "export exports exporting"),
    ("buy buying purchase", "sell selling"),
    ("add adding insert", "remove removing delete deleting"),
    ("lock locking", "unlock unlocking"),
    ("install installing", "uninstall uninstalling"),
    ("win won winning winner", "lose lost losing loser"),
    ("zoom_in", "zoom_out"),
    ("log_in login sign_in signin", "log_out logout sign_out signout"),
    ("scale_up", "scale_down"),
    ("north northern", "south southern"),
    ("east eastern", "west western"),
    ("maximum max", "minimum min"),
    ("positive", "negative"),
    ("true", "false"),
    ("inflation", "deflation"),
    ("like likes love loves", "dislike dislikes hate hates"),
    ("safe safer safest", "dangerous unsafe"),
    ("strong stronger strongest", "weak weaker weakest"),
    ("heavy heavier heaviest", "light lighter lightest"),
    ("wet", "dry"),
    ("left", "right"),
    ("up", "down"),
    ("past", "future"),
    ("accept", "reject"),
    ("allow allowed", "block blocked forbid forbidden"),
    ("success succeed succeeded", "failure fail failed"),
    ("rent renting", "own owning"),
    ("import_from", "export_to"),
]
# word -> every (pair, side) it belongs to ("lose" opposes both "gain" and "win").
_CONTRAST: dict[str, frozenset[tuple[int, int]]] = {}
for _i, (_a, _b) in enumerate(_OPPOSITES):
    for _side, _words in enumerate((_a, _b)):
        for _w in _words.split():
            _CONTRAST[_w] = _CONTRAST.get(_w, frozenset()) | {(_i, _side)}
_PHRASAL = re.compile(r"\b(zoom|log|sign|scale|turn|switch)\s+(in|out|up|down|on|off)\b", re.I)

# Common words that start sentences capitalised without being names.
_COMMON = frozenset("""
a an the what whats what's which who whom whose why when where how is are was were be been am do does
did can could would should will shall may might must i i'm im i've you your we our they their he she
it its it's this that these those there here tell give show list explain describe define write compose
make create find get help please hi hello hey thanks thank ok okay so and or but if then also just
summarize summarise translate convert calculate compute compare name suggest recommend let lets let's
in on at for from to of with by about as into over under after before during since my me any some
is isn't aren't don't doesn't can't won't should've could've would've yes no not quick question
""".split())

_DIRECTION_WORDS = frozenset({"to", "from", "into"})
# Function words: never the content words around a direction marker.
_STOP = frozenset("""
a an the what whats what's which who whom whose why when where how is are was were be been am do does
did can could would should will shall may might must i i'm im you your we our they their he she it its
it's this that these those there here please and or but if then also just so in on at for of with by
about as over under during since my me any some vs versus than between per each every all other
another such own same too very s t way ways thing things something anything someone one
""".split())
# Capitalised common nouns that are not names for this purpose.
_NOT_NAMES = frozenset({"earth", "world", "internet", "web"})


@dataclass(frozen=True, slots=True)
class GuardChecks:
    """Which checks :func:`compatible` applies."""

    numbers: bool = True
    negation: bool = True
    entities: bool = True
    contrast: bool = True
    direction: bool = True


@dataclass(frozen=True, slots=True)
class Features:
    """What the guard compares, extracted once per text."""

    numbers: tuple
    negated: bool
    entities: frozenset
    words: frozenset
    contrast: frozenset
    pairs: frozenset  # (left, right) content words around to/from/into
    initials: frozenset = frozenset()  # initials of 2-5 consecutive words ("uti": urinary tract infection)


def _number(token: str) -> float | None:
    t = token.lower()
    if t[0].isdigit():
        t = re.sub(r"(st|nd|rd|th)$", "", t).replace(",", "")
        try:
            return float(t)
        except ValueError:
            return None
    if t in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[t])
    if t in _ORDINAL_WORDS:
        return float(_ORDINAL_WORDS[t])
    return None


def _base(word: str) -> str:
    w = word.lower().replace("\u2019", "'")
    if w.endswith("'s"):
        w = w[:-2]
    return w.strip("'-")


@lru_cache(maxsize=4096)
def features(text: str) -> Features:
    """The guard's view of ``text`` (cached: the same stored text is compared many times)."""
    numbers: list[float] = []
    negated = False
    entities: set[tuple[str, ...]] = set()  # (word,) or (words..., initials) for a multi-word name
    words: set[str] = set()
    contrast: set[tuple[int, int]] = set()
    content: list[str] = []  # content words and direction markers, in order
    starts = {0} | {m.end() for m in _SENTENCE_END.finditer(text)}
    phrasal = {m.start(): f"{m.group(1).lower()}_{m.group(2).lower()}" for m in _PHRASAL.finditer(text)}
    for m in _WORD.finditer(text):
        raw = m.group(0)
        low = raw.lower().replace("\u2019", "'")
        n = _number(raw)
        if n is not None:
            numbers.append(n)
            continue
        if low in _NEGATIONS or low.endswith("n't"):
            negated = True
        base = _base(raw)
        if not base:
            continue
        words.add(base)
        key = phrasal.get(m.start(), base)
        if key in _CONTRAST:
            contrast.update(_CONTRAST[key])
        if raw[0].isupper() and base not in _COMMON and base not in _NOT_NAMES:
            # A capitalised word is a name unless it merely starts a sentence; a sentence-initial
            # one counts too unless it is a contrast word. Over-detection is cheap: the check
            # only asks that the word occur in the other text.
            # A word that merely opens a sentence ("Draft ...", "Typically, ...") is not a name
            # unless its spelling says so (PostgreSQL, ICD-10, GP: a second capital or a digit).
            at_start = m.start() in starts or not text[: m.start()].strip()
            marked = any(c.isupper() or c.isdigit() for c in raw[1:])
            if not at_start or (marked and base not in _CONTRAST):
                entities.add((base,))
        if low in _DIRECTION_WORDS:
            content.append("->" if low in ("to", "into") else "<-")
        elif base not in _STOP:
            content.append(base)
    for run in _CAPITAL_RUN.finditer(text):  # "United Kingdom" is one name, also known as "uk"
        names = tuple(_base(w) for w in run.group(0).split() if (_base(w),) in entities)
        if len(names) > 1:
            initials = "".join(w[0] for w in run.group(0).split()).lower()
            entities.difference_update((n,) for n in names)
            entities.add(names + (initials,))
            words.add(initials)
    parts = [p for m in _WORD.finditer(text) for p in _base(m.group(0)).split("-") if p and p[0].isalpha()]
    initials = {"".join(w[0] for w in parts[i:i + n]) for n in range(2, 6) for i in range(len(parts) - n + 1)}
    pairs = set()
    for i, w in enumerate(content):
        if w in ("->", "<-"):
            left = next((c for c in reversed(content[:i]) if c not in ("->", "<-")), None)
            right = next((c for c in content[i + 1:] if c not in ("->", "<-")), None)
            if left and right:
                pairs.add((left, right) if w == "->" else (right, left))
    return Features(tuple(sorted(numbers)), negated, frozenset(entities), frozenset(words),
                    frozenset(contrast), frozenset(pairs), frozenset(initials))


def _word_in(name: str, words: frozenset) -> bool:
    """``name`` among ``words``, or the same name with at most 3 letters more at the end (Postgres /
    PostgreSQL, Monday / Mondays; not Java / JavaScript)."""
    if name in words:
        return True
    for w in words:
        short, long = sorted((name, w), key=len)
        if len(short) >= 4 and long.startswith(short) and len(long) - len(short) <= 3:
            return True
    return False


def _named_in(entities: frozenset, words: frozenset, initials: frozenset = frozenset()) -> bool:
    """Whether every name occurs in ``words``: each of its words, or a multi-word name's initials;
    an acronym of 2-5 letters may be spelled out in the other text ("UTI" / "urinary tract
    infection", "YoY" / "year-over-year"): the initials of consecutive words there."""
    for name in entities:
        if len(name) == 1:
            if not _word_in(name[0], words) and not (2 <= len(name[0]) <= 5 and name[0] in initials):
                return False
        elif not (all(w in words for w in name[:-1]) or name[-1] in words):
            return False
    return True


def _opposed(a: frozenset, b: frozenset) -> bool:
    """Whether one text uses a word and the other its opposite (and not the word itself)."""
    for pair, side in a:
        if (pair, 1 - side) in b and (pair, side) not in b:
            return True
    return False


def compatible(a: str, b: str, checks: GuardChecks = GuardChecks()) -> tuple[bool, str]:
    """Whether ``b`` may be answered with ``a``'s answer, and if not, which check said no."""
    fa, fb = features(a), features(b)
    if checks.numbers and Counter(fa.numbers) != Counter(fb.numbers):
        return False, "numbers"
    if checks.negation and fa.negated != fb.negated:
        return False, "negation"
    if checks.entities and not (_named_in(fa.entities, fb.words, fb.initials)
                                and _named_in(fb.entities, fa.words, fa.initials)):
        return False, "entities"
    if checks.contrast and _opposed(fa.contrast, fb.contrast):
        return False, "contrast"
    if checks.direction and any((r, l) in fb.pairs and (r, l) not in fa.pairs for l, r in fa.pairs):
        return False, "direction"
    return True, ""
