"""What a near-identical pair of prompts changes must be explained, or the pair is not a paraphrase.

The structural half of the semantic cache's verification (:mod:`extproc_plugins.caching.semantic_verify`
aligns the two prompts; this module judges the shape of the edit between them). Near misses are,
almost by definition, the same sentence with one short span changed ("merge" / "rebase", "for my
brother" / "for my boss", "all customers" / "all customers except those who paid"); paraphrases
mostly rewrite the framing ("What is" / "Can you explain", "How do I" / "What are the steps to")
or use a synonym. So instead of listing which words change an answer, these checks ask which
changes are *explained*:

``edit``      In a near-identical pair (most content words shared, few left over), a content word
              left over on one side must be accounted for: the same word elsewhere in the other
              prompt (moved), a word of the same stem ("alphabetical" / "alphabetically", "app" /
              "application"), or a word of the request's framing (explain, describe, write,
              draft...: a closed class of speech-act words). What is left is an unexplained edit:
              a content word added or dropped with nothing in its place rejects (a restriction or
              qualifier: "reverse", "except", "adult"); a content word replaced by another must be
              a near-synonym by its own embedding (the caller checks ``edit_spans`` against a
              stricter cosine than the loose span check).
``exchange``  The content words that leave one place come back at another: "a letter from a
              professor for a student" / "from a student for a professor", "DD/MM" / "MM/DD".
              Two conjuncts swapped around "and" / "or" / "vs" ("pay off debt or invest" /
              "invest or pay off debt") are not an exchange.
``modal``     The modality of the two prompts, compared by meaning group (obligation: must, need,
              required, have to; permission: can, may, allowed, possible; advice: should,
              recommended, worth; ...), skipping request framing ("can you", "how should I").

Pure: no model, no I/O. Deterministic.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

__all__ = ["Edit", "edit", "exchanged", "modal_groups", "related", "FRAME"]

# The framing of a request: words that say *how* something is asked, not *what*.
FRAME = frozenset("""
explain explanation describe description tell show give help provide share define definition mean
meaning know want wonder please pls plz kindly thank thanks way step method list summarize summarise
summary write draft compose create generate produce craft prepare put turn rewrite outline
question quick idea reason difference differ overview example exactly basically actually really
possibly hey hi hello yo okay ok sure need happen happened say exist make get go look
find use using best easiest simplest good right proper correct below following above given attached
command query syntax approach technique tip advice suggest suggestion recommend recommendation
option info information guide process procedure principle concept
""".split())

_MODAL_GROUPS = {
    "obligation": "must need needed require required requirement mandatory necessary obligatory "
                  "compulsory obliged",
    "permission": "can could may allowed allow permitted permit possible able legal",
    "advice": "should ought recommended recommend advisable wise worth sensible",
    "prohibition": "illegal forbidden prohibited banned",
    "likelihood": "might likely probably probable perhaps maybe unlikely",
    "certainty": "definitely certainly surely guaranteed",
    "option": "optional",
    "future": "will would",
}
_MODAL = {w: g for g, words in _MODAL_GROUPS.items() for w in words.split()}
_WH = frozenset({"how", "what", "which", "where", "when", "who", "why"})
_COORD = frozenset({"and", "or", "vs", "versus", "a", "an", "the", "&"})
_SUBJECT_ME = frozenset({"i", "we"})
_DO = frozenset({"do", "does", "did"})


def related(x: str, y: str) -> bool:
    """The same word, or one stem: one a prefix of the other (at least 3 letters: "app" /
    "application"), or a shared prefix of at least 4 letters and 60 % of the shorter word, each
    word's rest an ending ("alphabetical" / "alphabetically", "summarize" / "summary", "leaky" /
    "leaking"; not "prednisone" / "prednisolone")."""
    if x == y:
        return True
    if not (x.isalpha() and y.isalpha()):
        return False
    short = min(len(x), len(y))
    if short >= 3 and (x.startswith(y) or y.startswith(x)):
        return True
    n = 0
    while n < short and x[n] == y[n]:
        n += 1
    # the rest of each word an ending ("-ize" / "-y"), not another middle (prednisone / prednisolone)
    return n >= 4 and n >= 0.6 * short and _ending(x[n:]) and _ending(y[n:])


_ENDINGS = frozenset("""e y s es ed ing ly al ally ical ic ion ation ions ations ize ise ized ised izing ising
er ers or ors ity ness ment ments able ible ive ively ies ied ier iest ary ery ory ure ance ence ant ent
ous ist ism ian ful less ish ial ially ual ually ar ic ics""".split())


def _ending(rest: str) -> bool:
    """An inflection or derivation ending, or one or two letters of a stem's change ("leak-y")."""
    return len(rest) <= 2 or rest in _ENDINGS or any(rest.endswith(e) and len(rest) - len(e) <= 2 for e in _ENDINGS)


def modal_groups(seq: tuple[str, ...]) -> list[tuple[int, str]]:
    """``(position, group)`` of each modal word that carries modality: not a request's framing
    ("can you", "could you", "would you like"), not right after a question word ("how should I"
    asks what "how do I" asks), not "I need to ..." stating what the user wants."""
    out = []
    for i, w in enumerate(seq):
        group = _MODAL.get(w)
        if group is None:
            continue
        prev = seq[i - 1] if i else ""
        nxt = seq[i + 1] if i + 1 < len(seq) else ""
        if prev in _WH or nxt == "you" or (w == "would" and nxt in ("like", "love", "be")):
            continue
        if w in ("need", "needed") and prev in _SUBJECT_ME and (i < 2 or seq[i - 2] not in _DO):
            continue
        out.append((i, group))
    return out


def _content(w: str, stop: frozenset) -> bool:
    return w not in stop and w not in FRAME


def exchanged(ta, tb, ops, stop: frozenset) -> bool:
    """Content words cross between two places in both directions: what leaves place 1 comes back
    at place 2 and what leaves place 2 comes back at place 1 (roles or items exchanged). Two
    conjuncts swapped around a coordination ("debt or invest" / "invest or debt") are not."""
    outs = [{w for w in ta[i1:i2] if _content(w, stop)} for _t, i1, i2, _j1, _j2 in ops]
    ins = [{w for w in tb[j1:j2] if _content(w, stop)} for _t, _i1, _i2, j1, j2 in ops]
    for x in range(len(ops)):
        for y in range(x + 1, len(ops)):
            if outs[x] & ins[y] and outs[y] & ins[x]:
                between = ta[ops[x][2]:ops[y][1]]
                if between and set(between) <= _COORD:
                    continue
                return True
    return False


@dataclass(frozen=True, slots=True)
class Edit:
    """The edit between two aligned prompts: ``reason`` when it rejects, else the replaced content
    spans that must embed as near-synonyms (``spans``)."""

    reason: str = ""
    spans: tuple[tuple[str, str], ...] = ()
    near_identical: bool = False


_RELATION = frozenset({"to", "from", "into", "than"})  # judged by the direction and order checks
_FUNCTION = frozenset({"between", "vs", "versus", "via", "per", "like", "u", "ur", "pls"})
# Determiners and pronouns: which of them a prompt uses is not a change of its framing.
_DETERMINER = frozenset({"a", "an", "the", "this", "that", "these", "those", "my", "your", "our", "their",
                         "its", "his", "her", "some", "any", "me", "i", "you", "we", "it", "they"})


_AUXILIARY = {"does": "do", "did": "do", "are": "is", "was": "is", "were": "is", "am": "is", "be": "is"}


def _frame(seq, stop) -> tuple:
    """The framing of a prompt: the function and framing words before its first content word and
    after its last ("What is the difference between ... ?", "Can you explain ...", "..., how do they
    differ?"), less determiners, pronouns and relation words, auxiliaries by their lemma. A word
    changed between two content words is not a change of framing ("faster to run" / "to write")."""
    def keep(w):
        return w not in _DETERMINER and w not in _RELATION
    content = [i for i, w in enumerate(seq) if _content(w, stop)]
    if not content:
        return tuple(_AUXILIARY.get(w, w) for w in seq if keep(w)), ()
    head = tuple(_AUXILIARY.get(w, w) for w in seq[:content[0]] if keep(w))
    tail = tuple(_AUXILIARY.get(w, w) for w in seq[content[-1] + 1:] if keep(w))
    return head, tail


def edit(ta, tb, ops, stop: frozenset, max_left: int = 3, min_shared: int = 0,
         canon: dict[str, str] | None = None) -> Edit:
    """Judge what the edit ``ops`` (difflib opcodes without "equal") between ``ta`` and ``tb`` leaves
    unexplained. The pair is near-identical when its framing is the same (the same function and
    framing words), at least ``min_shared`` content words are aligned and at most ``max_left``
    content words (both sides together) are left unexplained. ``canon`` maps a word to its class's
    word of the same meaning ("every" -> "all"): those explain each other."""
    stop = stop | _RELATION | _FUNCTION
    canon = canon or {}
    shared = sum(1 for t, i1, i2, *_ in _equal(ta, tb, ops) for w in ta[i1:i2] if _content(w, stop))
    all_a = [canon.get(w, w) for w in ta if _content(w, stop)]
    all_b = [canon.get(w, w) for w in tb if _content(w, stop)]
    left_ops = []
    for _t, i1, i2, j1, j2 in ops:
        la = [w for w in ta[i1:i2] if _content(w, stop) and not any(related(canon.get(w, w), o) for o in all_b)]
        lb = [w for w in tb[j1:j2] if _content(w, stop) and not any(related(canon.get(w, w), o) for o in all_a)]
        if la or lb:
            left_ops.append((la, lb))
    left = sum(len(la) + len(lb) for la, lb in left_ops)
    near = shared >= min_shared and left <= max_left and _frame(ta, stop) == _frame(tb, stop)
    if exchanged(ta, tb, ops, stop):
        return Edit("exchange", near_identical=near)
    ma, mb = modal_groups(ta), modal_groups(tb)
    if Counter(g for _i, g in ma if g != "future") != Counter(g for _i, g in mb if g != "future"):
        return Edit("modal", near_identical=near)
    pa, pb = dict(ma), dict(mb)
    for _t, i1, i2, j1, j2 in ops:  # "could I" / "will I": a modal replaced by a future
        ga = {pa[i] for i in range(i1, i2) if i in pa}
        gb = {pb[j] for j in range(j1, j2) if j in pb}
        if ga and gb and ga != gb:
            return Edit("modal", near_identical=near)
    if not near:
        return Edit()
    spans = []
    for la, lb in left_ops:
        if not la or not lb:
            return Edit("edit:" + ("dropped" if la else "added"), near_identical=True)
        spans.append((" ".join(la), " ".join(lb)))
    return Edit("", tuple(spans), near_identical=True)


def _equal(ta, tb, ops):
    """The "equal" blocks between ``ops`` (difflib opcodes without "equal")."""
    out, i, j = [], 0, 0
    for _t, i1, i2, j1, j2 in ops:
        if i1 > i:
            out.append(("equal", i, i1, j, j1))
        i, j = i2, j2
    if i < len(ta):
        out.append(("equal", i, len(ta), j, len(tb)))
    return out
