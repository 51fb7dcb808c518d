"""Request normalisation and fingerprints for the caching policies (pure functions, no I/O).

A cache key must change with everything that changes the answer and with nothing that does not:

* **in the key**: the tenant (so tenant A never gets tenant B's answer), the tier and its upstream
  model (``small`` and its alias ``llm-small`` are the same model and share entries; ``auto`` is
  keyed on the tier it was routed to), the endpoint, every message (role, text, name, tool calls),
  the prompt, and every sampling or output parameter (``max_tokens`` resolved to the tier's default
  when absent, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``, penalties, ``logprobs``,
  ``tools``, ``tool_choice``, ``response_format``, ``logit_bias``...), including any field this
  gateway does not know (an OpenAI-compatible upstream may act on it);
* **not in the key**: ``stream`` and ``stream_options`` (an answer is replayed as JSON or SSE,
  whichever the client asked for), ``user``, ``metadata``, ``store``, and the spelling of the
  request: JSON key order, Unicode composition (NFC), runs of whitespace, a text-only content array
  versus the same text as a string, the order of ``stop`` strings.

Further normalisation steps (NFKC, lower-casing) are opt-in through :class:`Normalization`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from extproc.formats.openai import ChatMessage, OpenAIRequest

__all__ = [
    "Normalization",
    "normalize_text",
    "deterministic",
    "canonical_request",
    "fingerprint",
    "exact_key_parts",
    "exact_fingerprint",
    "semantic_parts",
    "body_hash",
    "KEY_VERSION",
]

#: Bumped when the key layout changes, so old entries are simply never found again.
KEY_VERSION = 1

#: Body fields that never change the answer.
IGNORED_FIELDS = frozenset({"model", "stream", "stream_options", "user", "metadata", "store"})

#: Raw body fields covered by the typed fields of :class:`OpenAIRequest` (read from there, so a
#: policy that edited the request in place is honoured).
_TYPED_FIELDS = frozenset({
    "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
    "seed", "n", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "tools",
    "tool_choice", "response_format", "logit_bias", "best_of", "echo", "suffix",
})

_WS = re.compile(r"\s+")


class Normalization(BaseModel):
    """How prompt text is normalised before hashing or embedding (also a settings block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unicode_form: Literal["NFC", "NFKC"] = "NFC"
    collapse_whitespace: bool = Field(True, description="runs of whitespace -> one space, ends stripped")
    lowercase: bool = Field(False, description="off by default: case can change the answer ('US' vs 'us')")


_DEFAULT_NORM = Normalization()


def deterministic(req: "OpenAIRequest", *, max_temperature: float = 0.0, default_temperature: float = 1.0) -> bool:
    """Whether the answer to ``req`` may be reused for another request: its temperature (or
    ``default_temperature`` when it sent none: OpenAI's default is 1) is at most ``max_temperature``,
    and it asks for one answer."""
    temperature = req.temperature if req.temperature is not None else default_temperature
    return temperature <= max_temperature and req.n == 1


def normalize_text(text: str, norm: Normalization = _DEFAULT_NORM) -> str:
    """``text`` in the normal form ``norm`` asks for."""
    if not text.isascii():
        text = unicodedata.normalize(norm.unicode_form, text)
    if norm.collapse_whitespace:
        text = _WS.sub(" ", text).strip()
    if norm.lowercase:
        text = text.lower()
    return text


def _message(m: "ChatMessage", norm: Normalization) -> dict:
    content = m.content
    if type(content) is list:
        if all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = normalize_text(m.text, norm)  # text parts == the same text as a string
        else:
            content = [({**p, "text": normalize_text(p["text"], norm)}
                        if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) else p)
                       for p in content]
    elif type(content) is str:
        content = normalize_text(content, norm)
    d: dict[str, Any] = {"role": m.role, "content": content}
    if m.name is not None:
        d["name"] = m.name
    if m.tool_calls is not None:
        d["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.extra:
        d["extra"] = m.extra
    return d


def _params(req: "OpenAIRequest", default_max_tokens: int | None) -> dict:
    """Every parameter that changes the answer, absent ones left out."""
    max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
    p: dict[str, Any] = {
        "endpoint": req.endpoint,
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": sorted(set(req.stop)) or None,
        "seed": req.seed,
        "n": req.n if req.n != 1 else None,
        "presence_penalty": req.presence_penalty or None,
        "frequency_penalty": req.frequency_penalty or None,
        "logprobs": req.logprobs or None,
        "top_logprobs": req.top_logprobs,
        "tools": req.tools,
        "tool_choice": req.tool_choice,
        "response_format": req.response_format,
        "logit_bias": req.logit_bias or None,
        "best_of": req.best_of if req.best_of not in (None, 1) else None,
        "echo": req.echo or None,
        "suffix": req.suffix,
    }
    extra = {k: v for k, v in req.raw.items() if k not in _TYPED_FIELDS and k not in IGNORED_FIELDS}
    if extra:
        p["extra"] = extra
    return {k: v for k, v in p.items() if v is not None}


def canonical_request(req: "OpenAIRequest", norm: Normalization = _DEFAULT_NORM, *,
                      default_max_tokens: int | None = None) -> dict:
    """The request as a canonical dict: everything that changes the answer, in normal form."""
    d = _params(req, default_max_tokens)
    if req.endpoint == "chat":
        d["messages"] = [_message(m, norm) for m in req.messages or ()]
    else:
        d["prompt"] = normalize_text(req.prompt or "", norm)
    return d


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def fingerprint(parts: Any) -> str:
    """A 128-bit hex digest of the canonical JSON of ``parts`` (key order does not matter)."""
    return hashlib.blake2b(_canonical_json(parts), digest_size=16).hexdigest()


def exact_key_parts(req: "OpenAIRequest", *, tenant: str, tier: str | None, model: str | None,
                    norm: Normalization = _DEFAULT_NORM, default_max_tokens: int | None = None) -> dict:
    """What the exact cache (and coalescing) fingerprint: scope + the canonical request."""
    return {"v": KEY_VERSION, "tenant": tenant, "tier": tier, "model": model,
            "request": canonical_request(req, norm, default_max_tokens=default_max_tokens)}


_EXACT_MEMO = "_exact_fingerprint"


def exact_fingerprint(ctx, *, norm: Normalization = _DEFAULT_NORM, default_max_tokens: int | None = None) -> str:
    """:func:`fingerprint` of :func:`exact_key_parts` for ``ctx``'s request, tenant and tier.

    Computed once per request and kept in ``ctx.plugin_state``: the exact cache and coalescing
    both key on it, one after the other in the request phase (the canonical JSON and its digest cost
    about 30 us). A different scope, normalisation or request object computes afresh."""
    tier, request = ctx.tier_config, ctx.request
    scope = (ctx.tenant, ctx.tier, tier.model if tier else None, norm, default_max_tokens)
    memo = ctx.plugin_state.get(_EXACT_MEMO)
    if memo is not None and memo[0] is request and memo[1] == scope:
        return memo[2]
    digest = fingerprint(exact_key_parts(request, tenant=ctx.tenant, tier=ctx.tier, model=scope[2], norm=norm,
                                         default_max_tokens=default_max_tokens))
    ctx.plugin_state[_EXACT_MEMO] = (request, scope, digest)
    return digest


def semantic_parts(req: "OpenAIRequest", *, tenant: str, tier: str | None, model: str | None,
                   mode: Literal["last_user", "conversation"] = "last_user",
                   norm: Normalization = _DEFAULT_NORM, default_max_tokens: int | None = None,
                   ) -> tuple[dict, str] | None:
    """``(scope, text)`` for the semantic cache, or None when the request has no text to match.

    The scope holds everything that must be *equal* for two requests to share an answer; the
    text is what is compared by meaning.

    * ``last_user``: the text is the last user message; the scope holds every other message
      exactly (system prompt, earlier turns), so only the final question may be paraphrased.
      A conversation that does not end with a user message has nothing to match.
    * ``conversation``: the text is every user and assistant turn (``role: text`` lines); the
      scope holds the system/developer messages.

    For ``/v1/completions`` the text is the prompt. Sampling parameters, tier, model and tenant
    are always in the scope.
    """
    params = _params(req, default_max_tokens)
    if req.endpoint == "chat":
        messages = req.messages or []
        if not messages:
            return None
        if mode == "last_user":
            last = messages[-1]
            if last.role != "user" or type(last.content) is list and not all(
                    isinstance(p, dict) and p.get("type") == "text" for p in last.content):
                return None
            text = normalize_text(last.text, norm)
            context = [_message(m, norm) for m in messages[:-1]]
            if last.name is not None:
                context.append({"last_user_name": last.name})
        else:
            turns, context = [], []
            for m in messages:
                if m.role in ("system", "developer"):
                    context.append(_message(m, norm))
                elif m.role in ("user", "assistant") and m.tool_calls is None:
                    turns.append(f"{m.role}: {normalize_text(m.text, norm)}")
                else:
                    return None  # tool traffic is not matched by meaning
            text = "\n".join(turns)
        params["context"] = context
    else:
        text = normalize_text(req.prompt or "", norm)
    if not text:
        return None
    scope = {"v": KEY_VERSION, "mode": mode, "tenant": tenant, "tier": tier, "model": model, "params": params}
    return scope, text


def body_hash(raw: dict) -> str:
    """A digest of a request body's JSON content (key order and spacing do not matter)."""
    return fingerprint(raw)
