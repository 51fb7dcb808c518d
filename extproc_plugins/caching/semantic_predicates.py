"""What each prompt asks of its predicates: the task, the length, the roles, the polarity, the scope.

The third layer of the semantic cache's verification (guard v3), on the tokens of
:func:`extproc_plugins.caching.semantic_verify.tokens`. Each check compares one property of the two
prompts that a sentence embedding barely sees and that the alignment cannot judge from a set of
changed words alone:

``task``      the instruction's verb class ("summarize" / "draft a reply" / "translate" / "critique"
              / "extract" / "rewrite" / "classify"...): when both prompts name a task, the tasks
              must be the same class; a prompt that names none but asks to write, draft, compose,
              create or generate asks to produce ("write a cover letter" / "critique my cover
              letter"). Explain, give, tell are no task.
``length``    a brevity word (short, brief, quick, concise) on one side and a thoroughness word
              (detailed, thorough, in depth, comprehensive) on the other; ``register`` likewise
              plain words (plain, simple, everyday, layman) against technical ones; a negated one
              counts as its opposite ("non-technical" is plain, "no jargon" is plain).
``roles``     a content word marked as a source ("from X") in one prompt and as a goal ("to X",
              "into X") in the other, while another word moves the other way ("from New York to
              London" / "from London to New York", however many words each place has).
``negation``  polarity per clause: both prompts negate and have as many clauses (split at when, if,
              because, unless, but...), but not the same clauses are negated ("not re-render when
              it changes" / "re-render when it does not change"): the negation moved.
``scope``     a quantifier replaced by one of another meaning (any / all / none / only).
``agent``     the same content words, but the user is the subject in one ("how do I give my
              landlord notice") and the object in the other ("how does my landlord give me notice").
``spelling``  a replaced word spelled like its replacement without sharing a stem (epinephrine /
              ephedrine, ethanol / methanol, affect / effect): real synonyms are rarely spelled
              alike. Spelling variants and typos (colour / color, analyse / analyze, recieve /
              receive: one edit, same first and last letter) are not rejected.

Pure: no model, no I/O. Deterministic.
"""

from __future__ import annotations

from difflib import SequenceMatcher

__all__ = ["task_classes", "length_classes", "roles_exchanged", "negation_moved", "quantifier_swapped",
           "spelled_alike", "agent_swapped", "predicates"]

# Task verbs by class (inflections listed; tokens are lower case with a light plural stem).
_TASKS = {
    "summary": "summarize summarise summarizes summarised summarized summarizing summary summaries tldr "
               "recap condense",
    "reply": "reply replies replying respond responds responding response",
    "translate": "translate translates translating translation translated",
    "critique": "critique critiquing criticize criticise review reviewing evaluate evaluating "
                "evaluation assess assessing assessment feedback",
    "extract": "extract extracting extraction",
    "rewrite": "rewrite rewriting rephrase rephrasing paraphrase paraphrasing reword rewording",
    "classify": "classify classifying classification categorize categorise categorizing",
    "proofread": "proofread proofreading",
    "expand": "expand expanding elaborate elaborating",
    "refactor": "refactor refactoring",
    "optimize": "optimize optimise optimizing optimising optimization",
    "debug": "debug debugging troubleshoot troubleshooting",
}
_TASK = {w: c for c, words in _TASKS.items() for w in words.split()}
_PRODUCE = frozenset("write writing draft drafting compose composing create creating generate generating".split())
# Length and register words (tokens: hyphenated words split, so "in-depth" is "in depth").
_BRIEF = frozenset("short shorter brief briefly concise concisely succinct succinctly quick quickly "
                   "terse".split())
_THOROUGH = frozenset("detailed detail thorough thoroughly comprehensive comprehensively depth lengthy "
                      "extensive extensively exhaustive nuanced elaborate".split())
_PLAIN = frozenset("plain simple simply simplest everyday layman layperson lay eli5".split())
_TECHNICAL = frozenset("technical technically jargon rigorous rigorously mathematical formalism".split())
_FLIP = {"brief": "thorough", "thorough": "brief", "plain": "technical", "technical": "plain"}
_NEGATING = frozenset({"non", "no", "not", "without"})  # "non-technical", "no jargon", "not too long"
_NOT_LENGTH_AFTER = frozenset({"question", "q", "term", "circuit", "cut", "story", "run"})  # quick question, short-term
_SOURCE = frozenset({"from"})
_GOAL = frozenset({"to", "into", "onto", "toward", "towards"})
_NEGATORS = frozenset({"not", "never", "no"})
_CLAUSE_START = frozenset({"when", "if", "because", "while", "unless", "although", "though", "whereas", "but",
                           "until", "once", "whenever"})
_OBJECT_MARK = frozenset({"this", "the", "that", "these", "those", "my", "your", "our", "their", "his", "her", "its"})
_QUANTIFIERS = {"any": "any", "some": "any", "all": "all", "every": "all", "each": "all", "none": "none",
                "no": "none", "only": "only"}


def task_classes(seq: tuple[str, ...]) -> frozenset[str]:
    """The classes of the task words in ``seq`` that ask for a task: not one after a determiner
    ("reply to this review": "review" is the object; "write a review" asks for one). With none,
    a verb that produces new text (write, draft, compose, create, generate) is the task ``produce``:
    "write a cover letter" is not "critique my cover letter"."""
    found = frozenset(_TASK[w] for i, w in enumerate(seq) if w in _TASK and (i == 0 or seq[i - 1] not in _OBJECT_MARK))
    if not found and any(w in _PRODUCE for w in seq):
        return frozenset({"produce"})
    return found


def length_classes(seq: tuple[str, ...]) -> frozenset[str]:
    """``brief`` / ``thorough`` when ``seq`` asks for a length ("quick question" is framing), and
    ``plain`` / ``technical`` for its register."""
    out = set()
    for i, w in enumerate(seq):
        nxt = seq[i + 1] if i + 1 < len(seq) else ""
        found = []
        if w in _BRIEF and nxt not in _NOT_LENGTH_AFTER:
            found.append("brief")
        elif w in _THOROUGH and nxt not in _NOT_LENGTH_AFTER:
            found.append("thorough")
        if w in _PLAIN:
            found.append("plain")
        elif w in _TECHNICAL:
            found.append("technical")
        negated = any(x in _NEGATING for x in seq[max(0, i - 2):i])
        out.update(_FLIP[c] if negated else c for c in found)
    return frozenset(out)


def _roles(seq, stop) -> dict[str, str]:
    """Each content word (once in ``seq``) with the role of the nearest marker before it: ``source``
    after "from", ``goal`` after "to"/"into", ``""`` before any."""
    role, out, seen = "", {}, set()
    for w in seq:
        if w in _SOURCE:
            role = "source"
        elif w in _GOAL:
            role = "goal"
        elif w not in stop:
            if w in seen:
                out.pop(w, None)
            else:
                out[w] = role
            seen.add(w)
    return out


def roles_exchanged(ta, tb, stop: frozenset) -> bool:
    """A word goes from source to goal (or from unmarked to goal) while another goes the other way."""
    ra, rb = _roles(ta, stop), _roles(tb, stop)
    moves = {(ra[w], rb[w]) for w in ra.keys() & rb.keys() if ra[w] != rb[w]}
    return any((y, x) in moves and "goal" in (x, y) for x, y in moves)


def _clauses(seq) -> list[list[str]]:
    """``seq`` split before each subordinator or contrast (when, if, because, while, unless, but...)."""
    out: list[list[str]] = [[]]
    for w in seq:
        if w in _CLAUSE_START and out[-1]:
            out.append([])
        out[-1].append(w)
    return out


def negation_moved(ta, tb, stop: frozenset, related) -> bool:
    """Both negate, with as many clauses each, but not the same clauses ("not re-render when it
    changes" / "re-render when it does not change"): polarity compared clause by clause."""
    ca, cb = _clauses(ta), _clauses(tb)
    pa = [any(w in _NEGATORS for w in c) for c in ca]
    pb = [any(w in _NEGATORS for w in c) for c in cb]
    return len(ca) == len(cb) > 1 and any(pa) and any(pb) and pa != pb


def quantifier_swapped(ops, ta, tb) -> bool:
    """A replaced span holds a quantifier whose meaning differs from the other side's (any / all)."""
    for tag, i1, i2, j1, j2 in ops:
        if tag != "replace":
            continue
        qa = {_QUANTIFIERS[w] for w in ta[i1:i2] if w in _QUANTIFIERS}
        qb = {_QUANTIFIERS[w] for w in tb[j1:j2] if w in _QUANTIFIERS}
        if qa and qb and qa != qb:
            return True
    return False


_SUBJECT = {"i": "1", "we": "1p", "he": "3m", "she": "3f", "they": "3p"}
_OBJECT = {"me": "1", "us": "1p", "him": "3m", "her": "3f", "them": "3p"}


def agent_swapped(ta, tb, stop: frozenset) -> bool:
    """The same content words, and a person who is a subject in one text only an object in the other."""
    if {w for w in ta if w not in stop} != {w for w in tb if w not in stop}:
        return False
    sa, sb = {_SUBJECT[w] for w in ta if w in _SUBJECT}, {_SUBJECT[w] for w in tb if w in _SUBJECT}
    oa, ob = {_OBJECT[w] for w in ta if w in _OBJECT}, {_OBJECT[w] for w in tb if w in _OBJECT}
    return bool((sa - sb) & (ob - oa)) or bool((sb - sa) & (oa - ob))


def _one_edit(x: str, y: str) -> bool:
    """One substitution, insertion, deletion or transposition of neighbours apart."""
    if abs(len(x) - len(y)) > 1:
        return False
    if len(x) == len(y):
        diff = [i for i in range(len(x)) if x[i] != y[i]]
        return len(diff) <= 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and x[diff[0]] == y[diff[1]] and x[diff[1]] == y[diff[0]])
    short, long = sorted((x, y), key=len)
    i = 0
    while i < len(short) and short[i] == long[i]:
        i += 1
    return short[i:] == long[i + 1:]


_VARIANTS = (("our", "or"), ("ise", "ize"), ("yse", "yze"), ("tre", "ter"), ("ll", "l"), ("ogue", "og"),
             ("ae", "e"), ("oe", "e"), ("ement", "ment"))


def _variant(x: str, y: str) -> bool:
    """A spelling variant or a typo: one edit apart with the same first and last letter, or a
    British / American spelling (colour / color, centre / center, judgement / judgment)."""
    if x[0] == y[0] and x[-1] == y[-1] and _one_edit(x, y):
        return True
    for p, q in _VARIANTS:
        for s, t in ((p, q), (q, p)):
            if s in x and x.replace(s, t, 1) == y:
                return True
    return False


def spelled_alike(x: str, y: str, related) -> bool:
    """Two different words spelled alike (character similarity >= 0.6, at least 5 letters) that
    are neither one stem nor a spelling variant of each other."""
    if x == y or not (x.isalpha() and y.isalpha()) or min(len(x), len(y)) < 5:
        return False
    if related(x, y) or _variant(x, y):
        return False
    return SequenceMatcher(None, x, y, autojunk=False).ratio() >= 0.6


def predicates(ta, tb, ops, stop: frozenset, related) -> str:
    """The first of the checks above that rejects the pair (its name), or ``""``."""
    a_tasks, b_tasks = task_classes(ta), task_classes(tb)
    if a_tasks and b_tasks and a_tasks != b_tasks:
        return "task"
    la, lb = length_classes(ta), length_classes(tb)
    for one, other in (("brief", "thorough"), ("plain", "technical")):
        if (one in la and other in lb and one not in lb) or (other in la and one in lb and other not in lb):
            return "length" if one == "brief" else "register"
    if roles_exchanged(ta, tb, stop):
        return "roles"
    if negation_moved(ta, tb, stop, related):
        return "negation:moved"
    if agent_swapped(ta, tb, stop):
        return "agent"
    if quantifier_swapped(ops, ta, tb):
        return "swap:scope"
    for tag, i1, i2, j1, j2 in ops:
        if tag == "replace" and i2 - i1 == 1 and j2 - j1 == 1 and spelled_alike(ta[i1], tb[j1], related):
            return "spelling"
    return ""
