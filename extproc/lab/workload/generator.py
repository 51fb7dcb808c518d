"""The deterministic generator: a :class:`~extproc.lab.workload.model.Workload` -> planned requests.

``generate(workload, scale, seed)`` draws session arrivals over the compressed day (a Poisson
process whose rate is the diurnal curve times ``scale``; the duration does not change), then plays
each session: its opening request (fresh, a recurring question, or a paraphrase of one), follow-ups
after think time with the history of the previous turns (the generator's own assistant text), and
cross-service duplicates. Every draw comes from a ``random.Random`` seeded with a string built from
the seed (``random`` hashes string seeds with SHA-512, never with the salted ``hash()``), one per
session, recurring question and document, so the same seed gives the same plan.

The opening request is cut to fit the context window of the tier it needs (``context_windows``
times :data:`FIT_MARGIN`, less ``max_tokens``); a follow-up whose history outgrows that window
needs a larger tier, and its ``difficulty`` says so (history beyond ``sessions.history`` turns is
dropped first, as clients do). Requests planned at or after ``duration_s`` are not sent.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

from extproc.lab.workload import text
from extproc.lab.workload.domains import DOMAINS
from extproc.lab.workload.model import TIERS, Workflow, Workload
from extproc.lab.workload.plan import PlannedRequest

__all__ = ["generate", "FIT_MARGIN", "DEFAULT_MAX_TOKENS", "ENDPOINTS"]

#: Share of a tier's context window a planned prompt plus ``max_tokens`` may fill (the token count
#: is an estimate; this leaves room for its error and the chat template's own tokens).
FIT_MARGIN = 0.9
#: The completion budget assumed when a workflow sends no ``max_tokens`` (the tiers' default).
DEFAULT_MAX_TOKENS = 64
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_RANK = {t: i for i, t in enumerate(TIERS)}
_PER_MESSAGE = 4  # role and separators of one chat message


@dataclass(slots=True)
class _Opening:
    """The first request of a session (shared by every repeat of a recurring question)."""

    difficulty: str
    instruction: str
    content: str
    doc: int | None
    facts: dict
    user: str = ""
    question: int | None = None  # the recurring question it is (as written or reworded), if any


@dataclass(slots=True)
class _Draft:
    """A request before sorting (index and kind are known only then)."""

    at: float
    seq: int
    tenant: str
    workflow: str
    service: str
    session: str
    turn: int
    body: dict
    stream: bool
    difficulty: str
    tokens: int
    key: tuple | None = None  # (tenant, workflow, question, text) of a recurring question's opening
    dup_of: int | None = None  # seq of the original of a duplicate


def _tokens(messages: list[dict]) -> int:
    return 3 + sum(text.approx_tokens(m["content"]) + _PER_MESSAGE for m in messages)


class _WorkflowPlan:
    """One workflow's text banks, pools and budgets for a run."""

    def __init__(self, name: str, wf: Workflow, workload: Workload, seed: int):
        self.name, self.wf, self.seed = name, wf, seed
        self.duration = workload.duration_s
        self.domain = DOMAINS[wf.domain]
        self.system = wf.system_prompt if wf.system_prompt is not None else self.domain.system
        self.instructions = self._texts(wf.instructions, self.domain.instructions)
        self.followups = self._texts(wf.followups, self.domain.followups)
        self.followup_mix = wf.followup_difficulty or wf.difficulty
        self.max_tokens = wf.max_tokens or DEFAULT_MAX_TOKENS
        windows = workload.context_windows
        self.budget = {t: int(getattr(windows, t) * FIT_MARGIN) - self.max_tokens for t in TIERS}
        self.zipf_cum = _cumulative((k + 1) ** -wf.repeats.zipf for k in range(wf.repeats.pool))
        self.tenants = list(wf.tenant_shares().items())
        self.tenant_cum = _cumulative(share for _, share in self.tenants)
        self.paraphraser = text.Paraphraser(self.domain.synonyms)
        self._docs: dict[int, tuple[str, str]] = {}
        self._pool: dict[int, _Opening] = {}
        self._variants: dict[tuple[int, int], _Opening] = {}

    @staticmethod
    def _texts(override, default) -> dict[str, tuple[str, ...]]:
        out = {}
        for tier in TIERS:
            given = getattr(override, tier) if override is not None else []
            out[tier] = tuple(given) or default[tier] or default["medium"]
        return out

    # -- pools ------------------------------------------------------------------------------
    def document(self, j: int) -> tuple[str, str]:
        if j not in self._docs:
            rng = random.Random(f"{self.seed}:{self.name}:doc{j}")
            self._docs[j] = text.document(self.domain, rng, self.wf.documents.tokens)
        return self._docs[j]

    def question(self, rng: random.Random) -> int:
        """A recurring question's number, Zipf-distributed (0 the most frequent)."""
        return _pick(self.zipf_cum, rng.random())

    def pooled(self, q: int) -> _Opening:
        """Recurring question ``q`` as written (the same opening every time)."""
        if q not in self._pool:
            op = self.fresh(random.Random(f"{self.seed}:{self.name}:q{q}"))
            op.question = q
            self._pool[q] = op
        return self._pool[q]

    def paraphrase(self, q: int, rng: random.Random) -> _Opening:
        """Recurring question ``q`` reworded: one of its ``variants`` rewordings, or, with no
        ``variants``, a new one drawn with ``rng``."""
        variants = self.wf.paraphrases.variants
        if variants is not None:
            v = rng.randint(1, variants)
            if (q, v) in self._variants:
                return self._variants[(q, v)]
            rng = random.Random(f"{self.seed}:{self.name}:q{q}:v{v}")
        base = self.pooled(q)
        op = _Opening(base.difficulty, self.paraphraser.reword(base.instruction, rng), base.content, base.doc,
                      base.facts, question=q)
        if self.domain.paraphrase_content:
            op.content = self.paraphraser.reword(base.content, rng, polite=False)
        op.user = self._user(op)
        if variants is not None:
            self._variants[(q, v)] = op
        return op

    # -- one opening ------------------------------------------------------------------------
    def fresh(self, rng: random.Random) -> _Opening:
        """A new opening request drawn with ``rng``, fitted to its tier's window."""
        wf = self.wf
        difficulty = wf.difficulty.pick(rng)
        facts = text.Facts(rng)
        instruction = text.fill(rng.choice(self.instructions[difficulty]), facts)
        target = int(round(wf.prompt_tokens.sample(rng)))
        doc = rng.randrange(wf.documents.pool) if rng.random() < wf.documents.attach else None
        room = self.budget[difficulty] - text.approx_tokens(self.system) - 2 * _PER_MESSAGE - 3 - 8
        if doc is not None:
            room -= text.approx_tokens(self._doc_text(doc))
        want = max(8, min(target, room) - text.approx_tokens(instruction))
        body = text.content(self.domain, rng, want, facts)
        op = _Opening(difficulty, instruction, text.clip(body, max(want, 8)), doc, dict(facts))
        op.user = self._user(op)
        return op

    def _doc_text(self, j: int) -> str:
        title, body = self.document(j)
        return f"{self.domain.doc_label}: {title}\n{body}"

    def _user(self, op: _Opening) -> str:
        user = f"{op.instruction}\n\n{self.domain.content_label}:\n{op.content}"
        return user + "\n\n" + self._doc_text(op.doc) if op.doc is not None else user

    # -- bodies -----------------------------------------------------------------------------
    def messages(self, history: list[tuple[str, str]], user: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in history:
            msgs.append({"role": "user", "content": u})
            msgs.append({"role": "assistant", "content": a})
        msgs.append({"role": "user", "content": user})
        return msgs

    def body(self, messages: list[dict], stream: bool) -> dict:
        wf = self.wf
        body: dict = {"model": wf.model}
        if wf.endpoint == "chat":
            body["messages"] = messages
        else:
            body["prompt"] = _render_prompt(messages)
        if wf.max_tokens is not None:
            body["max_tokens"] = wf.max_tokens
        body["temperature"] = wf.temperature
        body["stream"] = stream
        if stream and wf.stream_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    def needed(self, tokens: int) -> str:
        """The smallest tier whose window holds ``tokens`` of prompt (large when none does)."""
        for tier in TIERS:
            if tokens <= self.budget[tier]:
                return tier
        return TIERS[-1]


def _render_prompt(messages: list[dict]) -> str:
    """A completions prompt from chat messages: the system text, then the dialogue."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return f"{system}\n\n{turns[0]['content']}\n\nAnswer:".lstrip()
    lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns]
    return (f"{system}\n\n" if system else "") + "\n\n".join(lines) + "\n\nAssistant:"


def _arrivals(workload: Workload, scale: float, rng: random.Random) -> list[float]:
    """Session start times: a non-homogeneous Poisson process, by thinning."""
    arr, duration = workload.arrivals, workload.duration_s
    peak = arr.max_multiplier()
    rate = arr.base_per_s * peak * scale
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        if rng.random() * peak < arr.multiplier(t / duration):
            out.append(t)


def _cumulative(weights) -> list[float]:
    out, acc = [], 0.0
    for w in weights:
        acc += w
        out.append(acc)
    return out


def _pick(cum: list[float], u: float) -> int:
    return min(bisect.bisect_right(cum, u * cum[-1]), len(cum) - 1)


def _session(plan: _WorkflowPlan, n: int, t0: float, rng: random.Random, drafts: list[_Draft]) -> None:
    wf = plan.wf
    tenant = plan.tenants[_pick(plan.tenant_cum, rng.random())][0]
    service = wf.services[rng.randrange(len(wf.services))]
    session = f"{plan.name}-{n:06d}"
    u = rng.random()
    if u < wf.repeats.share:
        opening = plan.pooled(plan.question(rng))
    elif u < wf.repeats.share + wf.paraphrases.share:
        opening = plan.paraphrase(plan.question(rng), rng)
    else:
        opening = plan.fresh(rng)
    facts = text.Facts(rng)
    facts.update(opening.facts)
    keep = wf.sessions.history
    history: list[tuple[str, str]] = []
    at = t0
    for turn in range(wf.sessions.turns.sample(rng)):
        if at >= plan.duration:  # the day is over: the rest of the session is never sent
            break
        if turn == 0:
            user, difficulty = opening.user, opening.difficulty
        else:
            difficulty = plan.followup_mix.pick(rng)
            user = text.fill(rng.choice(plan.followups[difficulty]), facts)
        kept = history if keep is None or len(history) <= keep + 1 else history[:1] + history[len(history) - keep:]
        messages = plan.messages(kept, user)
        tokens = _tokens(messages)
        while tokens > plan.budget[TIERS[-1]] and len(kept) > 1:  # older turns go first
            kept = kept[:1] + kept[2:]
            messages = plan.messages(kept, user)
            tokens = _tokens(messages)
        if turn > 0:
            need = plan.needed(tokens)
            if _RANK[need] > _RANK[difficulty]:
                difficulty = need
        stream = rng.random() < wf.stream
        body = plan.body(messages, stream)
        if "prompt" in body:
            tokens = text.approx_tokens(body["prompt"])
        draft = _Draft(at, len(drafts), tenant, plan.name, service, session, turn, body, stream, difficulty, tokens)
        if turn == 0 and opening.question is not None:
            draft.key = (tenant, plan.name, opening.question, user)
        drafts.append(draft)
        if wf.duplicates.share > 0 and rng.random() < wf.duplicates.share:
            others = [s for s in wf.services if s != service]
            body = dict(draft.body)
            if "messages" in body:
                body["messages"] = [dict(m) for m in body["messages"]]
            drafts.append(_Draft(at + wf.duplicates.delay_s.sample(rng), len(drafts), tenant, plan.name,
                                 others[rng.randrange(len(others))], session, turn, body, stream, difficulty,
                                 tokens, dup_of=draft.seq))
        history.append((user, text.answer(plan.domain, rng, int(plan.max_tokens * rng.uniform(0.5, 1.0)), facts)))
        at += wf.sessions.think_time_s.sample(rng)


def generate(workload: Workload, scale: float = 1.0, seed: int | None = None) -> list[PlannedRequest]:
    """The planned requests of ``workload`` at ``scale`` times its session arrival rate, sorted by
    ``at`` (seconds from the start; the day lasts ``duration_s`` whatever the scale).

    :param seed: overrides the workload's ``seed``; the same seed gives the same plan.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (got {scale!r})")
    seed = workload.seed if seed is None else int(seed)
    names = list(workload.workflows)
    plans = [_WorkflowPlan(name, workload.workflows[name], workload, seed) for name in names]
    cum = _cumulative(workload.workflows[name].share for name in names)
    drafts: list[_Draft] = []
    for n, t0 in enumerate(_arrivals(workload, scale, random.Random(f"{seed}:arrivals"))):
        rng = random.Random(f"{seed}:session{n}")
        _session(plans[_pick(cum, rng.random())], n, t0, rng, drafts)
    return _finish(workload, drafts)


def _finish(workload: Workload, drafts: list[_Draft]) -> list[PlannedRequest]:
    """Sorted, indexed, with each request's kind and origin."""
    kept = sorted((d for d in drafts if d.at < workload.duration_s), key=lambda d: (d.at, d.seq))
    index_of: dict[int, int] = {}
    exact: dict[tuple, int] = {}
    asked: dict[tuple, int] = {}
    retries = {name: wf.retry.policy() for name, wf in workload.workflows.items()}
    out = []
    for i, d in enumerate(kept):
        index_of[d.seq] = i
        origin = None
        if d.dup_of is not None:
            kind, origin = "duplicate", index_of.get(d.dup_of)
        elif d.turn > 0:
            kind = "followup"
        elif d.key is not None:
            question = d.key[:3]
            if d.key in exact:
                kind, origin = "repeat", exact[d.key]
            elif question in asked:
                kind, origin = "paraphrase", asked[question]
            else:
                kind = "fresh"
            exact.setdefault(d.key, i)
            asked.setdefault(question, i)
        else:
            kind = "fresh"
        wf = workload.workflows[d.workflow]
        out.append(PlannedRequest(
            at=round(d.at, 6), index=i, tenant=d.tenant, workflow=d.workflow, service=d.service,
            session=d.session, turn=d.turn, endpoint=ENDPOINTS[wf.endpoint], body=d.body, stream=d.stream,
            difficulty=d.difficulty, kind=kind, retry=retries[d.workflow],
            headers={"x-tenant-id": d.tenant, "x-workflow": d.workflow, "x-service": d.service},
            prompt_tokens=d.tokens, origin=origin))
    return out
