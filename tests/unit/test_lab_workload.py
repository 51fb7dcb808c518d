"""The growth lab's workload model and generator: validation, determinism, every setting honoured.

Statistical checks use fixed seeds and tolerances of several standard errors: they do not flake.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections import Counter, defaultdict

import pytest

from extproc.lab.workload import (
    KINDS, PlannedRequest, RetryPolicy, Workload, WorkloadError, example, example_names, examples_dir, generate,
    load_workload,
)
from extproc.lab.workload.domains import DOMAINS
from extproc.lab.workload.text import approx_tokens

BASE = {
    "name": "t",
    "seed": 3,
    "duration_s": 1000,
    "arrivals": {"base_per_s": 3.0},
    "tenants": {"acme": {}, "beta": {}},
    "workflows": {
        "w": {
            "share": 1.0,
            "tenant": "acme",
            "services": ["svc-a", "svc-b"],
            "domain": "support",
            "prompt_tokens": {"mean": 60, "sd": 20, "min": 20, "max": 200},
        },
    },
}


def workload(**wf) -> Workload:
    """BASE with the workflow's keys replaced (``_root`` for top-level keys)."""
    data = copy.deepcopy(BASE)
    data.update(wf.pop("_root", {}))
    data["workflows"]["w"].update(wf)
    return load_workload(data)


def openings(plan):
    return [p for p in plan if p.turn == 0 and p.kind != "duplicate"]


def template_regex(template: str) -> str:
    return re.sub(r"\\\{\w+\\\}", ".+?", re.escape(template))


def user_text(p: PlannedRequest) -> str:
    return p.body["messages"][-1]["content"] if "messages" in p.body else p.body["prompt"]


# -- validation ---------------------------------------------------------------------------------

def error_of(data) -> str:
    with pytest.raises(WorkloadError) as info:
        load_workload(data)
    return str(info.value)


def with_(path: str, value, base=None):
    data = copy.deepcopy(base or BASE)
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return data


@pytest.mark.parametrize("path, value, expected", [
    ("workflows.w.prompt_tokens.mean", 0, "workflows.w.prompt_tokens.mean: must be > 0"),
    ("workflows.w.strem", 0.5, "workflows.w.strem: unknown key"),
    ("workflows.w.stream", 1.5, "workflows.w.stream: must be <= 1"),
    ("workflows.w.endpoint", "embeddings", "workflows.w.endpoint: Input should be 'chat' or 'completions'"),
    ("workflows.w.difficulty", {"small": 0.5, "large": 0.4}, "workflows.w.difficulty: shares must sum to 1 (got 0.9)"),
    ("workflows.w.tenant", "nobody", "workflows.w.tenant: unknown tenant 'nobody' (known: acme, beta)"),
    ("workflows.w.share", 0.5, "workflows: shares must sum to 1 (got 0.5)"),
    ("workflows.w.sessions.turns", {"mean": 4, "max": 2}, "workflows.w.sessions.turns: mean (4) must be <= max (2)"),
    ("workflows.w.documents", {"attach": 0.5}, "workflows.w.documents: attach > 0 needs a pool"),
    ("workflows.w.retry.retries", -1, "workflows.w.retry.retries: must be >= 0"),
    ("workflows.w.services", [], "workflows.w.services: must have at least 1 item"),
    ("arrivals.base_per_s", 0, "arrivals.base_per_s: must be > 0"),
    ("arrivals.curve", [[0.5, 1.0], [0.2, 2.0]], "arrivals.curve: fractions of the day must increase"),
    ("arrivals", {"base_per_s": 1, "peak_factor": 2, "curve": [[0, 1]]}, "arrivals: give either curve or peak_factor"),
    ("duration_s", None, "duration_s: Input should be a valid number"),
])
def test_errors_name_the_key(path, value, expected):
    assert expected in error_of(with_(path, value))


def test_more_errors_name_their_keys():
    data = copy.deepcopy(BASE)
    del data["workflows"]["w"]["prompt_tokens"]
    assert "workflows.w.prompt_tokens: required" in error_of(data)
    dup = with_("workflows.w.services", ["only"])
    dup["workflows"]["w"]["duplicates"] = {"share": 0.1}
    assert "workflows.w: duplicates.share > 0 needs at least two distinct services" in error_of(dup)
    both = with_("workflows.w.tenants", {"acme": 1.0})
    assert "workflows.w: give exactly one of tenant or tenants" in error_of(both)
    shares = with_("workflows.w.tenants", {"acme": 0.5, "ghost": 0.5})
    del shares["workflows"]["w"]["tenant"]
    assert "workflows.w.tenants.ghost: unknown tenant 'ghost'" in error_of(shares)
    two = with_("workflows.w.repeats", {"share": 0.7})
    two["workflows"]["w"]["paraphrases"] = {"share": 0.5}
    assert "repeats.share + paraphrases.share must be <= 1" in error_of(two)


def test_errors_from_yaml_text_and_files(tmp_path):
    assert "invalid YAML" in error_of("name: [unclosed\nseed: 1")
    assert "a workload is a mapping" in error_of("- just\n- a list\n")
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nduration_s: -5\narrivals: {base_per_s: 1}\ntenants: {a: {}}\n"
                    "workflows: {w: {share: 1, tenant: a, prompt_tokens: {mean: 10}}}\n")
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    assert str(info.value).startswith(f"{path}: duration_s: must be > 0")
    assert info.value.errors == [("duration_s", "must be > 0")]
    assert isinstance(info.value, ValueError)
    assert "cannot read" in error_of(tmp_path / "missing.yaml")


def test_defaults():
    w = workload()
    wf = w.workflows["w"]
    assert (wf.model, wf.endpoint, wf.stream, wf.temperature, wf.max_tokens) == ("auto", "chat", 0.0, 0.0, 64)
    assert wf.retry.policy() == RetryPolicy()
    assert (w.context_windows.small, w.context_windows.medium, w.context_windows.large) == (2048, 4096, 8192)
    assert w.arrivals.multiplier(0.1) == 1.0 == w.arrivals.max_multiplier()


# -- determinism --------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_plan_and_another_seed_another():
    w = example("support")
    a, b = generate(w, 1.0), generate(w, 1.0)
    assert a == b and len(a) > 100
    assert generate(w, 1.0, seed=w.seed) == a
    c = generate(w, 1.0, seed=w.seed + 1)
    assert c != a
    assert [p.at for p in c[:20]] != [p.at for p in a[:20]]


def test_plan_is_sorted_indexed_and_well_formed():
    plan = generate(example("clinical"), 1.0)
    assert [p.index for p in plan] == list(range(len(plan)))
    assert all(x.at <= y.at for x, y in zip(plan, plan[1:]))
    assert all(0 <= p.at < 600 for p in plan)
    for p in plan:
        assert p.kind in KINDS and p.difficulty in ("small", "medium", "large")
        assert p.endpoint == "/v1/chat/completions" and p.body["model"] == "auto"
        assert p.headers == {"x-tenant-id": p.tenant, "x-workflow": p.workflow, "x-service": p.service}
        assert p.body["stream"] is p.stream
        assert ("stream_options" in p.body) is p.stream
        assert p.body["temperature"] == 0
        assert (p.origin is None) == (p.kind in ("fresh", "followup"))
        if p.origin is not None:
            assert p.origin < p.index
        assert p.prompt_tokens > 0


# -- each setting -------------------------------------------------------------------------------

def test_stream_share():
    plan = generate(workload(stream=0.3), 1.0)
    share = sum(p.stream for p in plan) / len(plan)
    assert len(plan) > 2500 and abs(share - 0.3) < 0.03
    assert not any(p.stream for p in generate(workload(stream=0.0), 0.2))


def test_difficulty_mix_and_matching_content():
    mix = {"small": 0.2, "medium": 0.5, "large": 0.3}
    plan = generate(workload(difficulty=mix, domain="clinical", prompt_tokens={"mean": 200}), 1.0)
    counts = Counter(p.difficulty for p in plan)
    for tier, share in mix.items():
        assert abs(counts[tier] / len(plan) - share) < 0.03, (tier, counts)
    cues = {"small": ("Extract", "Classify", "List", "Pull"), "medium": ("Summarize", "Write", "Turn", "Draft"),
            "large": ("step by step", "reason", "Synthesize", "in detail")}
    for p in plan[:300]:
        instruction = user_text(p).split("\n\n", 1)[0]
        assert any(c in instruction for c in cues[p.difficulty]), (p.difficulty, instruction)
        assert any(re.fullmatch(template_regex(t), instruction) for t in DOMAINS["clinical"].instructions[p.difficulty])


def test_prompt_length_distribution_and_token_estimate():
    from extproc.formats.tokens import count_text

    plan = generate(workload(domain="clinical", prompt_tokens={"mean": 500, "sd": 100, "min": 200, "max": 900},
                             _root={"arrivals": {"base_per_s": 0.5}}), 1.0)
    system = approx_tokens(DOMAINS["clinical"].system)
    sizes = [approx_tokens(user_text(p)) for p in plan]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 500) < 30, mean
    assert 190 <= min(sizes) and max(sizes) <= 930
    for p in plan[:60]:  # the cheap estimate against tiktoken's cl100k
        real = count_text(user_text(p))
        assert abs(real - approx_tokens(user_text(p))) / real < 0.15
        assert abs(p.prompt_tokens - (approx_tokens(user_text(p)) + system + 11)) <= 2


def test_repeats_share_and_zipf_concentration():
    def top_share(zipf):
        plan = generate(workload(repeats={"share": 0.4, "pool": 50, "zipf": zipf}), 1.0)
        first = openings(plan)
        repeats = [p for p in first if p.kind == "repeat"]
        assert 0.36 < len(repeats) / len(first) < 0.42, len(repeats) / len(first)
        for p in repeats:
            assert p.body["messages"] == plan[p.origin].body["messages"]
            assert plan[p.origin].kind == "fresh"
        groups = Counter(p.origin for p in repeats)
        return groups.most_common(1)[0][1] / len(repeats), len(groups)

    top, distinct = top_share(1.2)
    expected = 1 / sum(k ** -1.2 for k in range(1, 51))  # the most frequent question's share
    assert abs(top - expected) < 0.05, (top, expected)
    flat_top, flat_distinct = top_share(0.0)
    assert flat_top < 0.06 and flat_distinct == 50 and top > 4 * flat_top


def test_repeats_are_per_tenant():
    plan = generate(workload(tenant=None, tenants={"acme": 0.5, "beta": 0.5},
                             repeats={"share": 0.5, "pool": 5}), 0.3)
    assert {p.tenant for p in plan} == {"acme", "beta"}
    for p in plan:
        if p.kind == "repeat":
            assert plan[p.origin].tenant == p.tenant


def test_paraphrases_reword_but_keep_numbers():
    plan = generate(workload(paraphrases={"share": 0.3}, repeats={"share": 0.0, "pool": 40}), 1.0)
    first = openings(plan)
    para = [p for p in first if p.kind == "paraphrase"]
    reworded = [p for p in first if p.kind in ("paraphrase", "repeat")]  # a wording may come back by chance
    assert 0.26 < len(reworded) / len(first) < 0.31 and len(para) > 0.8 * len(reworded)
    for p in para:
        mine, theirs = user_text(p), user_text(plan[p.origin])
        assert mine != theirs
        assert sorted(re.findall(r"\d+", mine)) == sorted(re.findall(r"\d+", theirs))  # numbers kept
        a, b = set(re.findall(r"\w+", mine.lower())), set(re.findall(r"\w+", theirs.lower()))
        assert len(a & b) / len(a | b) > 0.5
    # a fixed number of rewordings per question: asked again, one may come back word for word
    plan = generate(workload(paraphrases={"share": 0.3, "variants": 2}, repeats={"share": 0.0, "pool": 40}), 1.0)
    texts = defaultdict(set)
    for p in openings(plan):
        if p.kind in ("paraphrase", "repeat"):
            texts[p.origin if p.kind == "paraphrase" else plan[p.origin].origin or p.origin].add(user_text(p))
    assert max(len(v) for v in texts.values()) <= 3  # the question as first seen and its 2 rewordings
    assert sum(p.kind == "repeat" for p in openings(plan)) > 0.15 * len(openings(plan))


def test_duplicates_from_another_service():
    plan = generate(workload(duplicates={"share": 0.2, "delay_s": {"min": 0.05, "max": 2.0}}), 1.0)
    dups = [p for p in plan if p.kind == "duplicate"]
    assert abs(len(dups) / (len(plan) - len(dups)) - 0.2) < 0.03
    delays = []
    for d in dups:
        o = plan[d.origin]
        assert d.body == o.body and d.body is not o.body
        assert d.service != o.service and d.tenant == o.tenant and d.session == o.session
        delays.append(d.at - o.at)
    assert 0.05 - 1e-6 <= min(delays) and max(delays) <= 2.0 + 1e-6
    median = sorted(delays)[len(delays) // 2]
    assert abs(math.log(median) - (math.log(0.05) + math.log(2.0)) / 2) < 0.3  # log-uniform


def test_turns_think_time_and_history():
    w = workload(sessions={"turns": {"mean": 3, "max": 6}, "think_time_s": {"mean": 10, "sd": 3, "min": 2, "max": 60}},
                 _root={"duration_s": 4000, "arrivals": {"base_per_s": 0.5}})
    plan = generate(w, 1.0)
    sessions = defaultdict(list)
    for p in plan:
        sessions[p.session].append(p)
    done = [s for s in sessions.values() if s[0].at < 3000]  # far from the end of the day
    turns = [len(s) for s in done]
    expected = sum((2 / 3) ** k for k in range(6))  # 1 + geometric, capped at 6
    assert abs(sum(turns) / len(turns) - expected) < 0.12 and max(turns) == 6
    gaps = [b.at - a.at for s in done for a, b in zip(s, s[1:])]
    assert abs(sum(gaps) / len(gaps) - 10) < 0.5 and min(gaps) >= 2
    for s in done:
        assert [p.turn for p in s] == list(range(len(s)))
        assert all(p.kind == "followup" for p in s[1:])
        for p in s:
            msgs = p.body["messages"]
            assert len(msgs) == 2 + 2 * p.turn and msgs[0]["role"] == "system"
            assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * p.turn + ["user"]
            assert msgs[1]["content"] == s[0].body["messages"][1]["content"]  # the same context
    kept = generate(workload(sessions={"turns": {"mean": 6, "max": 6}, "history": 1}), 0.1)
    assert max(len(p.body["messages"]) for p in kept) == 2 + 2 * 2  # the first exchange and the last one


def test_documents_attached_from_a_pool():
    plan = generate(workload(documents={"pool": 5, "tokens": 150, "attach": 0.5}), 1.0)
    first = openings(plan)
    docs = [user_text(p).split("Reference document: ", 1)[1] for p in first if "Reference document: " in user_text(p)]
    assert abs(len(docs) / len(first) - 0.5) < 0.04
    assert len(set(docs)) == 5
    assert all(abs(approx_tokens(d) - 150) < 30 for d in docs)
    assert not any("Reference document" in user_text(p) for p in generate(workload(), 0.2))


def test_retry_policy_carried():
    retry = {"timeout_s": 7.5, "retries": 4, "backoff_s": 0.25, "backoff_factor": 3, "retry_on_status": [429, 503]}
    plan = generate(workload(retry=retry), 0.1)
    assert plan and all(p.retry == RetryPolicy(7.5, 4, 0.25, 3.0, (429, 503)) for p in plan)


def test_scale_multiplies_arrivals_not_duration():
    w = workload(_root={"arrivals": {"base_per_s": 1.0}})
    one, two = generate(w, 1.0), generate(w, 2.0)
    assert 1.85 < len(two) / len(one) < 2.15
    assert max(p.at for p in two) < 1000 and max(p.at for p in two) > 990
    with pytest.raises(ValueError):
        generate(w, 0)


def test_diurnal_curve():
    w = workload(_root={"arrivals": {"base_per_s": 2.0, "peak_factor": 3.0, "trough_factor": 0.5, "peaks_at": 0.5}})
    starts = [p.at / 1000 for p in openings(generate(w, 1.0))]
    peak = sum(0.4 <= f < 0.6 for f in starts)
    trough = sum(f < 0.1 or f >= 0.9 for f in starts)
    assert peak > 3 * trough
    arr = w.arrivals
    assert arr.multiplier(0.5) == pytest.approx(3.0) and arr.multiplier(0.0) == pytest.approx(0.5)
    assert abs(len(starts) - 2.0 * arr.mean_multiplier() * 1000) < 4 * math.sqrt(len(starts))

    curve = workload(_root={"arrivals": {"base_per_s": 2.0, "curve": [[0.2, 0.2], [0.7, 2.0], [0.9, 1.0]]}}).arrivals
    assert curve.multiplier(0.0) == 0.2 and curve.multiplier(1.0) == 1.0
    assert curve.multiplier(0.45) == pytest.approx(1.1) and curve.max_multiplier() == 2.0
    starts = [p.at / 1000 for p in openings(generate(workload(_root={"arrivals": curve.model_dump(exclude_unset=True)}), 1.0))]
    assert sum(0.65 <= f < 0.75 for f in starts) > 4 * sum(f < 0.1 for f in starts)


def test_completions_endpoint():
    plan = generate(workload(endpoint="completions", max_tokens=None, stream=0.5, stream_usage=False), 0.2)
    for p in plan:
        assert p.endpoint == "/v1/completions" and "messages" not in p.body
        assert p.body["prompt"].endswith("Answer:") and "max_tokens" not in p.body
        assert "stream_options" not in p.body


def test_prompts_fit_the_window_of_the_tier_they_need():
    w = workload(domain="clinical", prompt_tokens={"mean": 1800, "sd": 100},
                 documents={"pool": 3, "tokens": 400, "attach": 1.0},
                 difficulty={"small": 0.5, "large": 0.5},
                 sessions={"turns": {"mean": 3, "max": 4}, "think_time_s": {"mean": 5}},
                 _root={"arrivals": {"base_per_s": 0.2}})
    windows = {"small": 2048, "medium": 4096, "large": 8192}
    plan = generate(w, 1.0)
    assert {p.difficulty for p in plan if p.turn == 0} == {"small", "large"}
    for p in plan:
        assert p.prompt_tokens + 64 <= 0.9 * windows[p.difficulty]
    # follow-ups outgrowing the small window need a larger tier
    assert any(p.turn > 0 and p.difficulty == "medium" for p in plan)


# -- the shipped examples -----------------------------------------------------------------------

def test_examples_ship_load_and_generate():
    assert set(example_names()) >= {"clinical", "support", "backoffice"}
    assert (examples_dir() / "clinical.yaml").is_file()
    windows = {"small": 2048, "medium": 4096, "large": 8192}
    for name in ("clinical", "support", "backoffice"):
        w = example(name)
        plan = generate(w, 10.0 if name == "clinical" else 1.0)  # clinical's 1x: ~16 requests a day
        assert len(plan) > 100, name
        kinds = Counter(p.kind for p in plan)
        assert kinds["fresh"] > 0
        for p in plan:
            budget = p.body.get("max_tokens") or 64
            assert p.prompt_tokens + budget <= windows[p.difficulty]
    assert {"followup", "duplicate", "repeat"} <= set(Counter(p.kind for p in generate(example("clinical"), 10.0)))
    support = Counter(p.kind for p in generate(example("support"), 1.0))
    assert support["repeat"] + support["paraphrase"] > 0.1 * sum(support.values())
    back = generate(example("backoffice"), 1.0)
    assert all(p.body["temperature"] == 0 for p in back)
    assert {p.endpoint for p in back} == {"/v1/chat/completions", "/v1/completions"}
    assert sum(p.kind == "duplicate" for p in back) > 0.15 * len(back)
    with pytest.raises(WorkloadError, match="no example workload 'nope'"):
        example("nope")


def test_clinical_prompts_stay_small_enough_for_the_cpu_models():
    plan = generate(example("clinical"), 1.0)
    assert max(p.prompt_tokens for p in plan) < 1600
    assert max(approx_tokens(user_text(p).split("\n\nReference document")[0]) for p in plan) < 1200


def test_generation_is_fast():
    w = example("clinical")
    start = time.perf_counter()
    generate(w, 1.0)
    assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    plan = generate(w, 1500.0)  # ~25,000 requests (the shipped 1x is sized to a 2-core machine)
    elapsed = time.perf_counter() - start
    assert len(plan) > 18000 and elapsed < 5.0, (len(plan), elapsed)
