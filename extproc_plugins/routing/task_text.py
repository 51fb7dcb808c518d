"""The text the embedding routers judge: what a request *asks*, not the material attached to it.

A user message that fits the encoder's window (:data:`WHOLE_CHARS`, about the 256 word pieces
all-MiniLM-L6-v2 reads) is judged whole, as before. A longer one is nearly always an instruction
plus attached material ("Summarise the report below.\\n\\n<report>", or "<document>\\n\\nQuestion:
..."): the encoder would read the instruction and the first few hundred words of the material, and
the material, not the task, would decide the tier (a long transcript with a one-line extraction
request looked like an analysis). For such a message the task text is its **short blocks at either
end** -- blocks are separated by blank lines; a block of at most :data:`BLOCK_CHARS` characters
counts as instruction-like, the material is the long blocks between -- up to :data:`EDGE_CHARS`
from each end. A message with no short block at either end (a wall of text) is judged on its
first and last :data:`EDGE_CHARS` characters (head + tail truncation, the usual choice for long
documents in a short-window classifier).

How much text is attached still matters where it is a hard limit: ``route_rules`` keeps only the
tiers whose context window holds the whole prompt (``capabilities: true``), before any embedding
router runs. The learned router no longer reads the prompt's length (``router_model``).

:func:`task_embedding` is the request's one embedding of that text: when the task text is the
route text (every short prompt), it is :func:`extproc.embeddings.prompt.prompt_embedding`, shared
with the semantic cache; otherwise it is computed once per request and shared by
``semantic_routes`` and ``learned_router``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from extproc.embeddings import prompt as prompts

if TYPE_CHECKING:
    from extproc.embeddings.prompt import PromptEmbedder
    from extproc.framework.context import RequestContext

WHOLE_CHARS = 1000
"""Messages up to this many characters (after stripping) are judged whole."""

BLOCK_CHARS = 300
"""A blank-line-separated block this short (or shorter) reads as instruction, not material."""

EDGE_CHARS = 400
"""At most this much text is taken from each end of a long message."""

_BLOCKS = re.compile(r"\n[ \t]*\n")
_WINDOW = 4 * WHOLE_CHARS  # characters looked at from each end of a long message
_TEXT_KEY, _KEY = "routing.task_text", "routing.task_embedding"


def task_text(text: str) -> str:
    """What a message asks, for routing (see the module docstring)."""
    text = text.strip()
    if len(text) <= WHOLE_CHARS:
        return text
    if len(text) > 2 * _WINDOW:  # only the ends can hold the task: never split a huge prompt whole
        head = _edge(_blocks(text[:_WINDOW])[:-1])  # the window's last block may be cut: never taken
        tail = _edge(_blocks(text[-_WINDOW:])[1:][::-1])[::-1]
    else:
        blocks = _blocks(text)
        head = _edge(blocks)
        tail = _edge(blocks[len(head):][::-1])[::-1]
    if not head and not tail:
        return f"{text[:EDGE_CHARS].rstrip()}\n\n{text[-EDGE_CHARS:].lstrip()}"
    return "\n\n".join(head + tail)


def _blocks(text: str) -> list[str]:
    return [b.strip() for b in _BLOCKS.split(text) if b.strip()]


def _edge(blocks: list[str]) -> list[str]:
    """The leading short blocks, while they fit in :data:`EDGE_CHARS`."""
    taken: list[str] = []
    used = 0
    for block in blocks:
        if len(block) > BLOCK_CHARS or used + len(block) > EDGE_CHARS:
            break
        taken.append(block)
        used += len(block)
    return taken


def request_task_text(ctx: "RequestContext") -> str:
    """:func:`task_text` of the last user message (chat) or of the prompt (completions), once per request."""
    held = ctx.plugin_state.get(_TEXT_KEY)
    if held is None:
        held = ctx.plugin_state[_TEXT_KEY] = task_text(prompts.last_user_text(ctx))
    return held


async def task_embedding(ctx: "RequestContext", embedder: "PromptEmbedder | None" = None) -> np.ndarray:
    """The embedding of :func:`request_task_text`, computed at most once per request."""
    text = request_task_text(ctx)
    if text == prompts.route_text(ctx):
        return await prompts.prompt_embedding(ctx, embedder)
    held = ctx.plugin_state.get(_KEY)
    if held is not None:
        return held
    embedder = embedder or prompts.prompt_embedder()
    vector, source = await embedder.embed_text_traced(text)
    if source is not None:
        ctx.embedding_calls += 1
        ctx.embedding_sources.append(source)
    ctx.plugin_state[_KEY] = vector
    return vector
