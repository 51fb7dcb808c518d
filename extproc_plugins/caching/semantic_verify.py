"""Verification of a semantic-cache candidate: align the two prompts and judge what differs.

Run only when the vector index returned a candidate at or above the threshold (and the lexicon guard,
:mod:`extproc_plugins.caching.semantic_guard`, passed it). Whole-sentence cosine cannot tell
"ascending" from "descending" or "ethanol" from "methanol": the sentences share every other word.
So the two texts are tokenised (lower case, contractions split, hyphenated words split, number
words as digits, a light stem, "have to" as "must", a short word right after a number kept as a
case-sensitive unit: "unit:MBps" is not "unit:Mbps"), aligned with :class:`difflib.SequenceMatcher`,
and the *differing spans* are judged:

``classes``   a differing span holds a word of a closed class whose members are not interchangeable
              (numbers, times and dates, units, scope and exceptive words, negation) and the other
              side's differing spans do not hold it (or a same-meaning member): reject. In a pair
              that rephrases its question (the edit check's framing differs) only numbers, symbols,
              units after a number and negation reject on one side alone; a time or scope word
              rejects there only against another word of its class ("tomorrow" / "yesterday"), so
              "warning signs" / "early signs" or "every day" / "daily" still hit. For ordering,
              format, audience, polarity and direction words only a swap within the class rejects
              (an inserted "simple" or "best" is mostly filler). A small lexicon, one signal among
              the others.
``affix``     a word of one side is a word of the other with a negating prefix (install /
              uninstall, safe / unsafe, follow / unfollow): reject.
``order``     the same content words in another order around a word both share ("Alice reports to
              Bob" / "Bob reports to Alice", "from English to French" / "from French to English"):
              some pair x, y has a shared pivot z with x < z < y in one text and y < z < x in the
              other; or the content words are a permutation of each other that is not one block
              moved: reject. Moving a whole phrase ("In Python, how do I sort a list?") is not a swap.
``degree``    a substitution with a degree word on both sides that differ ("faster" / "slower",
              "safest" / "least safe"): reject. MiniLM embeds such antonyms as close as synonyms
              (faster / slower 0.88, quickest / fastest 0.72), so no span cosine can tell them apart.
``edit``      the shape of the edit (:mod:`extproc_plugins.caching.semantic_edit`): in a
              near-identical pair every content word left over must be explained (moved, one stem,
              or framing); one added or dropped rejects, one replaced must embed on its own at
              ``edit_min_cosine`` or more (0.75: a stricter bar than the loose span check); content
              words exchanged between two places reject; the modality (obligation, permission,
              advice...) must be the same.
``predicates`` the checks of :mod:`extproc_plugins.caching.semantic_predicates` (task, length and
              register, roles, negation per clause, quantifiers, agent, words spelled alike).
``spans``     a small substitution (at most 3 words each side, the rest of the sentence aligned)
              must be a near-synonym: the two spans are embedded on their own with the same MiniLM
              and their cosine must reach ``span_min_cosine``. Synonyms ("largest" / "biggest",
              "delete" / "remove") embed close on their own; co-hyponyms and antonyms that sit in
              the same sentence slot ("ethanol" / "methanol", "formal" / "casual") do not as much.
              The embedding is the caller's (the worker's embedder, off the event loop, cached).

:func:`structure` is the pure part (no model): it returns either a rejection or the span pairs
still to be embedded; :func:`spans_agree` judges those with their vectors. Deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache

import numpy as np

from extproc_plugins.caching.semantic_edit import FRAME, edit, related
from extproc_plugins.caching.semantic_predicates import predicates

__all__ = ["Structure", "structure", "spans_agree", "tokens", "SPAN_MIN_COSINE"]

SPAN_MIN_COSINE = 0.20
EDIT_MIN_COSINE = 0.75
EDIT_MAX_LEFT = 5
MAX_SPAN_WORDS = 3
_ALWAYS = frozenset({"number", "symbol", "negation"})

_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*|\d+(?:[.,:]\d+)*(?:st|nd|rd|th|am|pm|%)?|[$€£%]", re.I)
_LETTER = re.compile(r"([^.!?\s]\s*[\s(\"']|[,;:]\s+)(?!I\b)([A-Z])\b(?!['\u2019]|\.\w)")
# Names spelled with symbols, as one word each: "C++" is not "C", "C#" is not "C", ".NET", "Node.js".
_SYMBOL_NAMES = [
    (re.compile(r"(?<![\w+])([A-Za-z])\+\+(?!\w)"), r" \1plusplus "),
    (re.compile(r"(?<![\w#])([A-Za-z])#(?!\w)"), r" \1sharp "),
    (re.compile(r"(?<![\w.])\.(net)\b", re.I), r" dot\1 "),
    (re.compile(r"\b([A-Za-z]+)\.js\b", re.I), r"\1js"),
]
_CONTRACTIONS = [
    (re.compile(r"\bwon't\b", re.I), "will not"), (re.compile(r"\bcan't\b", re.I), "can not"),
    (re.compile(r"\bcannot\b", re.I), "can not"), (re.compile(r"n't\b", re.I), " not"),
    (re.compile(r"'s\b", re.I), " is"), (re.compile(r"'re\b", re.I), " are"), (re.compile(r"'ve\b", re.I), " have"),
    (re.compile(r"'m\b", re.I), " am"), (re.compile(r"'ll\b", re.I), " will"), (re.compile(r"'d\b", re.I), " would"),
]
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                 "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1000000", "dozen": "12"})
_NUMBERS.update({w: f"{i + 1}th" for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split())})
_ORDINAL = re.compile(r"^(\d+)(st|nd|rd|th)$")

# Words that never carry the difference between two prompts that mean the same thing.
_STOP = frozenset("""
a an the is are was were be been being am do does did doing done have has had i you we they he she it
me my your our their its this that these those there here of in on at for to from by with about as into
and or but so if then than please can could would will shall what which who whom whose why when where
how way ways thing things tell give show explain describe let lets s t just also really actually
some any kind sort type
""".split()) - {"from", "to", "into", "than"}
# The framing of a symmetric comparison: "the difference between A and B" asks what "B vs A" asks.
_COMPARISON = frozenset({"between", "vs", "versus", "difference", "differ", "different", "compare", "compared",
                         "comparison", "distinguish"})
_PIVOT_FUNCTION = frozenset({"to", "from", "into", "than", "over", "by", "vs", "versus"})

# Closed classes: a word of one of them differing between the texts changes the answer.
_CLASSES: dict[str, str] = {}
# Each class: its words; "=" joins words that mean the same within the class (all=every).
_CLASS_WORDS = {
    "time": """am pm morning afternoon evening night tonight noon midnight today tomorrow yesterday weekend
               weekday monday tuesday wednesday thursday friday saturday sunday january february march april
               june july august september october november december winter summer spring autumn
               breakfast lunch dinner sunrise sunset dawn dusk next previous ago century decade
               medieval ancient modern before after early late earlier later daily weekly monthly yearly
               annual hourly past future""",
    "unit": """km=kilometer=kilometre meter=metre cm=centimeter=centimetre mm=millimeter inch foot=feet yard
               mile gram kilogram=kg lb ounce=oz ton=tonne liter=litre ml=milliliter gallon quart pint cup
               tablespoon teaspoon celsius fahrenheit kelvin second minute hour day week month year byte
               kilobyte=kb megabyte=mb gigabyte=gb terabyte=tb acre hectare dollar euro yen pound
               percent=% mph kph watt volt calorie joule""",
    "scope": """all=every=each=whole=entire only some=few=several none both either neither part partial
                always sometimes usually rarely often majority minority except=excluding=besides unless
                exclusively""",
    "negation": """not=no=never=without=nothing=nobody=none=nor non impossible""",
}
# Classes whose words matter only when swapped for another word of the same class (an inserted
# "best" or "simple" is mostly filler; "ascending" -> "descending" or "formal" -> "casual" is not).
_SWAP_CLASS_WORDS = {
    "order": """ascending descending increasing decreasing first last final next previous top bottom
                beginning end=finish start=begin newest oldest latest earliest forward backward reverse""",
    "format": """json yaml xml csv markdown html latex pdf bullet paragraph sentence essay poem haiku sonnet
                 limerick tweet numbered prose table chart graph diagram flowchart spreadsheet email=e-mail
                 letter memo report outline slide presentation script story article blog post text message
                 list""",
    "audience": """child=kid children=kids baby=infant toddler preschooler teen=teenager adult senior=elderly
                   beginner intermediate advanced expert=specialist professional novice grandmother student
                   layperson=layman lawyer formal informal casual polite rude funny serious technical
                   playful""",
    "polarity": """pros=advantage=benefit=upside cons=disadvantage=drawback=downside risk=danger good bad""",
    "direction": """from to=into=onto toward=towards away""",
    "length": """short=brief=concise=succinct detailed=thorough=comprehensive=extensive=exhaustive""",
}
_SWAP_CLASSES: dict[str, str] = {}
_CANON: dict[str, str] = {}
for _table, _target in ((_CLASS_WORDS, _CLASSES), (_SWAP_CLASS_WORDS, _SWAP_CLASSES)):
    for _cls, _words in _table.items():
        for _group in _words.split():
            _members = _group.split("=")
            for _w in _members:
                _target.setdefault(_w, _cls)
                _CANON.setdefault(_w, _members[0])
_DEGREE = frozenset({"more", "less", "most", "least", "fewer", "better", "worse", "best", "worst"})
# Degree words of the same meaning ("quickest" / "fastest" is no swap).
_SAME_DEGREE = {"quickest": "fastest", "quicker": "faster", "speediest": "fastest", "biggest": "largest",
                "bigger": "larger", "tiniest": "smallest", "simplest": "easiest", "simpler": "easier"}
_CANON.update(_SAME_DEGREE)  # and they explain each other in the edit check
_NOT_DEGREE = frozenset({"interest", "request", "suggest", "forest", "honest", "invest", "harvest",
                         "digest", "contest", "protest", "manifest", "modest", "earnest", "conquest"})
_ADJ_ER = frozenset("""fast slow quick high low big small larg great long short old new young cheap rich
poor hot cold warm cool strong weak heavy light hard soft easy safe deep wide near far clos dark bright
smart loud quiet thick thin tall tight loos sharp fresh clean busy happy healthy early pretty noisy risky
tasty lucky simple rare nice fine wise late pure dense steep rough smooth clear tough calm""".split())
_NEG_PREFIX = ("un", "dis", "de", "in", "im", "non", "il", "ir")
# Prefixes that make opposite pairs from one stem (inhale / exhale, upload / download, increase / decrease).
_PAIR_PREFIX = frozenset({"in", "ex", "im", "up", "down", "en", "de", "inc", "dec", "pre", "post", "over",
                          "under", "sub", "super", "pro", "anti", "hyper", "hypo", "micro", "macro", "inter",
                          "intra", "intro", "extro", "im", "ex"})


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


_UNIT_AFTER_NUMBER = 4  # letters: a short word right after a number is its unit (5 mg, 100 Mbps, 4 ft)
# Lower-case words after a number that are units by their abbreviation; another lower-case word
# there is a word ("5 name ideas", "3 bed flat"); a word with a capital is always a unit (5 MB).
_UNIT_ABBREVIATIONS = frozenset("""mg mcg ug ml l kg g km m cm mm ft in oz lb lbs kb mb gb tb kbps mbps gbps
hz khz mhz ghz kw kwh w v mph kph psi rpm fps dpi ppm bpm iu mmol px pt ms ns tbsp tsp qt gal pct""".split())
_UNIT_WORDS = {"min": "minute", "mins": "minute", "hr": "hour", "hrs": "hour", "h": "hour", "sec": "second",
               "secs": "second", "yr": "year", "yrs": "year", "wk": "week", "wks": "week", "mo": "month"}
_OBLIGATION = re.compile(r"\b(?:have|has|had|got) to\b")


@lru_cache(maxsize=4096)
def tokens(text: str) -> tuple[str, ...]:
    """Normalised tokens: lower case, contractions split, hyphenated words split, number words as
    digits, a light stem; "have to" as "must"; a short word right after a number is a unit and
    keeps its case ("unit:MBps" is not "unit:Mbps") when it has a capital or is a known
    abbreviation (mg, ml, gb...), "min"/"hrs"/"yrs" as the unit's word, else it is a word ("5 name
    ideas"); names with symbols as words ("cplusplus", "csharp", "dotnet", "nodejs")."""
    for pattern, repl in _SYMBOL_NAMES:
        text = pattern.sub(repl, text)
    # a lone capital letter other than "I", not opening a sentence, is a symbol (A to Z, vitamin C)
    t = _LETTER.sub(lambda m: m.group(1) + "letter-" + m.group(2).lower(), text).replace("\u2019", "'")
    for pattern, repl in _CONTRACTIONS:
        t = pattern.sub(repl, t)
    t = _OBLIGATION.sub("must", t)
    out: list[str] = []
    for m in _TOKEN.finditer(t):
        raw = m.group(0)
        parts = [raw] if raw.startswith("letter-") else raw.split("-")
        for part in parts:
            if not part:
                continue
            w = _NUMBERS.get(part.lower(), part.lower())
            o = _ORDINAL.match(w)
            if o:
                w = o.group(1) + "th"
            if out and out[-1][0].isdigit() and w in ("am", "pm"):  # "6 am" is "6am"
                out[-1] += w
                continue
            if out and out[-1][0].isdigit() and part.isalpha() and len(part) <= _UNIT_AFTER_NUMBER \
                    and w not in _STOP and (w not in _CLASSES or not part.islower()):
                if part.islower() and w in _UNIT_WORDS:  # "45 min" is "45 minutes"
                    out.append(_UNIT_WORDS[w])
                    continue
                if not part.islower() or w in _UNIT_ABBREVIATIONS:
                    out.append("unit:" + part)
                    continue
            out.append(_stem(w) if w[0].isalpha() and w not in _STOP else w)
    return tuple(out)


def _cls(word: str) -> str | None:
    if word.startswith("unit:"):
        return "unit"
    if word[0].isdigit() or word in ("$", "€", "£"):
        return "number"
    if word.startswith("letter-"):
        return "symbol"
    return _CLASSES.get(word)


@dataclass(frozen=True, slots=True)
class Structure:
    """The pure verdict: ``ok`` False with a ``reason``, or True with span pairs still to embed."""

    ok: bool
    reason: str = ""
    spans: tuple[tuple[str, str], ...] = ()
    edit_spans: tuple[tuple[str, str], ...] = ()  # a near-identical pair's replaced words


def _affixed(x: str, y: str) -> bool:
    """A negating prefix (install / uninstall), or one stem with two prefixes (inhale / exhale,
    import / export, encrypt / decrypt, upload / download)."""
    if x == y or not (x.isalpha() and y.isalpha()):
        return False
    for p in _NEG_PREFIX:
        if (x == p + y or y == p + x) and min(len(x), len(y)) >= 3:
            return True
    n = 0
    while n < min(len(x), len(y)) and x[-1 - n] == y[-1 - n]:
        n += 1
    return n >= 3 and x[: len(x) - n] in _PAIR_PREFIX and y[: len(y) - n] in _PAIR_PREFIX


def _comparative(word: str) -> bool:
    """A comparative adjective: slower, larger, easier (easy), bigger (big)."""
    if len(word) <= 4 or not word.endswith("er"):
        return False
    base = word[:-2]
    return base in _ADJ_ER or word[:-1] in _ADJ_ER or base[:-1] + "y" in _ADJ_ER \
        or (len(base) > 2 and base[-1] == base[-2] and base[:-1] in _ADJ_ER)


def _degree(word: str) -> bool:
    """A superlative or comparative adjective, or a degree word (fastest, slower, least, more)."""
    return word in _DEGREE or (len(word) > 5 and word.endswith("est") and word not in _NOT_DEGREE) \
        or _comparative(word)


def _swapped(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """A pair of shared words in the opposite order around a shared pivot word."""
    def positions(seq):
        pos: dict[str, int] = {}
        dup = set()
        for i, w in enumerate(seq):
            if w in _STOP and w not in _PIVOT_FUNCTION:
                continue
            if w in pos:
                dup.add(w)
            pos[w] = i
        for w in dup:
            del pos[w]
        return pos
    pa, pb = positions(a), positions(b)
    shared = [w for w in pa if w in pb]
    content = [w for w in shared if w not in _PIVOT_FUNCTION]
    for i, x in enumerate(content):
        for y in content[i + 1:]:
            ax, ay, bx, by = pa[x], pa[y], pb[x], pb[y]
            if (ax < ay) == (bx < by):
                continue
            lo_a, hi_a = sorted((ax, ay))
            lo_b, hi_b = sorted((bx, by))
            for z in shared:
                if z in (x, y):
                    continue
                if lo_a < pa[z] < hi_a and lo_b < pb[z] < hi_b:
                    return True
    return False


_JOINED = re.compile(r"[A-Za-z0-9]+(?:\s?[/:×-]\s?[A-Za-z0-9]+)+")
_JOINER = re.compile(r"\s?[/:×-]\s?")


def _reordered_joined(a: str, b: str) -> bool:
    """A sequence joined by a symbol ("DD/MM/YYYY", "HH:MM", "W×H") in one text with the same parts
    in another order in the other ("MM/DD/YYYY"): the order is the meaning."""
    def seqs(text):
        return {tuple(p.lower() for p in _JOINER.split(m.group(0))) for m in _JOINED.finditer(text)}
    sa, sb = seqs(a), seqs(b)
    return any(x != y and sorted(x) == sorted(y) for x in sa - sb for y in sb - sa)


def _permuted(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """The same content words (and relation words) in another order that is not one phrase moved
    elsewhere ("caffeine affects sleep or sleep affects caffeine" reordered)."""
    ca = [w for w in a if w not in _STOP or w in _PIVOT_FUNCTION]
    cb = [w for w in b if w not in _STOP or w in _PIVOT_FUNCTION]
    if ca == cb or sorted(ca) != sorted(cb):
        return False
    ops = [op for op in SequenceMatcher(None, ca, cb, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(ops) == 2 and {ops[0][0], ops[1][0]} == {"insert", "delete"}:
        return False  # one block moved: "In Python, how do I sort a list?"
    return True


def _comparing(seq: tuple[str, ...]) -> bool:
    """A symmetric comparison of two things ("difference between A and B", "A vs B"), with no
    degree word or "than" that would give it a direction ("is A faster than B")."""
    return any(w in _COMPARISON for w in seq) and not any(w == "than" or _degree(w) for w in seq)


def _contract_acronyms(ta: tuple[str, ...], tb: tuple[str, ...]) -> tuple[str, ...]:
    """``tb`` with each run of 2-5 words whose initials spell a word of ``ta`` absent from ``tb``
    replaced by that word ("urinary tract infection" -> "uti" when the other text says "UTI")."""
    acronyms = {w for w in ta if w.isalpha() and 2 <= len(w) <= 5 and w not in tb}
    if not acronyms:
        return tb
    out, i = [], 0
    while i < len(tb):
        for n in range(5, 1, -1):
            run = tb[i:i + n]
            if len(run) == n and all(w.isalpha() for w in run) and "".join(w[0] for w in run) in acronyms:
                out.append("".join(w[0] for w in run))
                i += n
                break
        else:
            out.append(tb[i])
            i += 1
    return tuple(out)


def structure(a: str, b: str) -> Structure:
    """Align ``a`` and ``b`` and judge the differing spans without a model."""
    ta, tb = tokens(a), tokens(b)
    ta, tb = _contract_acronyms(tb, ta), _contract_acronyms(ta, tb)
    if ta == tb:
        return Structure(True)
    matcher = SequenceMatcher(None, ta, tb, autojunk=False)
    spans: list[tuple[str, str]] = []
    only_a: list[str] = []
    only_b: list[str] = []
    ops = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    for tag, i1, i2, j1, j2 in ops:
        only_a += ta[i1:i2]
        only_b += tb[j1:j2]
    set_a, set_b = set(only_a), set(only_b)
    canon_a = {_CANON.get(w, w) for w in only_a}
    canon_b = {_CANON.get(w, w) for w in only_b}
    marked = frozenset(w for w in ta + tb if _cls(w) or w in _SWAP_CLASSES)
    judged = edit(ta, tb, ops, _STOP - marked, max_left=EDIT_MAX_LEFT, canon=_CANON)
    # closed classes: a class word on one side's differing spans, not on the other's (in a
    # rephrased question only the classes whose words are never reworded: numbers, symbols, units
    # written after a number, negation)
    strict = judged.near_identical
    for side, other, other_words in ((only_a, canon_b, only_b), (only_b, canon_a, only_a)):
        for w in side:
            c = _cls(w)
            if c is None or _CANON.get(w, w) in other:
                continue
            if not strict and c not in _ALWAYS and not w.startswith("unit:") \
                    and not any(_cls(o) == c for o in other_words):
                continue  # a rephrased question may add "early" or "daily"; not "tomorrow" for "yesterday"
            return Structure(False, f"class:{c}")
    # swap classes: a word of the class replaced by another word of the same class
    for tag, i1, i2, j1, j2 in ops:
        if tag != "replace":
            continue
        ca = {_SWAP_CLASSES[w]: _CANON.get(w, w) for w in ta[i1:i2] if w in _SWAP_CLASSES}
        cb = {_SWAP_CLASSES[w]: _CANON.get(w, w) for w in tb[j1:j2] if w in _SWAP_CLASSES}
        for c in ca.keys() & cb.keys():
            if ca[c] != cb[c]:
                return Structure(False, f"swap:{c}")
    for x in set_a - set_b:
        for y in set_b - set_a:
            if _affixed(x, y):
                return Structure(False, "affix")
    for tag, i1, i2, j1, j2 in ops:  # "faster" -> "slower", "safest" -> "least safe"
        if tag == "replace":
            da = {_SAME_DEGREE.get(w, w) for w in ta[i1:i2] if _degree(w)}
            db = {_SAME_DEGREE.get(w, w) for w in tb[j1:j2] if _degree(w)}
            if da and db and da != db:
                return Structure(False, "degree")
    symmetric = _comparing(ta) and _comparing(tb)
    if (not symmetric and (_swapped(ta, tb) or _permuted(ta, tb))) or _reordered_joined(a, b):
        return Structure(False, "order")
    why = predicates(ta, tb, ops, _STOP, related)
    if why:
        return Structure(False, why)
    if judged.reason:
        return Structure(False, judged.reason)
    # small substitutions must be near-synonyms (judged by the caller's embeddings)
    content_a = [w for w in only_a if w not in _STOP]
    content_b = [w for w in only_b if w not in _STOP]
    if content_a and content_b:
        for tag, i1, i2, j1, j2 in ops:
            sa = [w for w in ta[i1:i2] if w not in _STOP and w not in FRAME and w not in _COMPARISON]
            sb = [w for w in tb[j1:j2] if w not in _STOP and w not in FRAME and w not in _COMPARISON]
            if sa and sb and len(sa) <= MAX_SPAN_WORDS and len(sb) <= MAX_SPAN_WORDS:
                spans.append((" ".join(sa), " ".join(sb)))
    return Structure(True, "", tuple(spans), judged.spans)


def spans_agree(spans, vectors: np.ndarray, min_cosine: float = SPAN_MIN_COSINE,
                reason: str = "spans") -> tuple[bool, str]:
    """``vectors``: the unit embeddings of every span, ``a`` then ``b`` of each pair, in order."""
    for i in range(len(spans)):
        if float(vectors[2 * i] @ vectors[2 * i + 1]) < min_cosine:
            return False, reason
    return True, ""
