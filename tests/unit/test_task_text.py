"""task_text: the embedding routers judge what a message asks, not the material attached to it."""

from __future__ import annotations

import time

from extproc.framework.testing import GatewayHarness
from extproc_plugins.routing import task_text as tt

from .routing_helpers import config_with

PARAGRAPH = ("The quarterly review covered shipping delays in the northern region, a change of carrier for "
             "bulk orders and a new returns desk that opens in March; the finance team asked for weekly figures. ")
MATERIAL = "\n".join(f"{'Ana' if i % 2 else 'Ben'}: {PARAGRAPH}" for i in range(10))  # one long block


def test_a_message_the_encoder_reads_whole_is_judged_whole():
    assert tt.task_text("  Extract the order number from: 'order 4411 shipped'.  ") == \
        "Extract the order number from: 'order 4411 shipped'."
    short = "Summarize this.\n\n" + PARAGRAPH
    assert len(short) <= tt.WHOLE_CHARS and tt.task_text(short) == short.strip()


def test_an_instruction_before_long_material_is_the_task():
    text = f"Extract the carrier's name from the notes below.\n\nNotes:\n{MATERIAL}"
    assert tt.task_text(text) == "Extract the carrier's name from the notes below."


def test_a_question_after_long_material_is_the_task():
    text = f"{MATERIAL}\n\n{MATERIAL}\n\nQuestion: when does the returns desk open?"
    assert tt.task_text(text) == "Question: when does the returns desk open?"


def test_short_blocks_at_both_ends_are_kept_within_the_edge_budget():
    text = f"You review meeting notes.\n\nList the decisions.\n\n{MATERIAL}\n\nAnswer in one line."
    assert tt.task_text(text) == "You review meeting notes.\n\nList the decisions.\n\nAnswer in one line."
    many = "\n\n".join(f"Step {i}: keep going with the next short line of text." for i in range(40))
    kept = tt.task_text(many)
    assert len(kept) <= 2 * tt.EDGE_CHARS + 4 and kept.startswith("Step 0:") and kept.endswith("line of text.")


def test_a_wall_of_text_is_judged_on_its_head_and_tail():
    wall = PARAGRAPH * 20
    got = tt.task_text(wall)
    assert got == f"{wall.strip()[:tt.EDGE_CHARS].rstrip()}\n\n{wall.strip()[-tt.EDGE_CHARS:].lstrip()}"


def test_a_huge_message_costs_only_its_ends():
    huge = "Extract the invoice number.\n\n" + ("x" * 79 + "\n") * 20_000 + "\n\nReply with the number only."
    t0 = time.perf_counter()
    got = tt.task_text(huge)
    assert time.perf_counter() - t0 < 0.05
    assert got == "Extract the invoice number.\n\nReply with the number only."


def auto_chain():
    return config_with("semantic_routes", "learned_router")


async def test_both_routers_share_one_embedding_of_a_long_message_and_the_cache_path_is_unchanged():
    async with GatewayHarness(config=auto_chain()) as gw:
        long = await gw.chat(f"Extract the carrier's name from the notes below.\n\nNotes (shared):\n{MATERIAL}")
        short = await gw.chat("What is the capital of Norway? (shared embedding test)")
    assert long.ctx.embedding_calls == 1 and short.ctx.embedding_calls == 1
    assert long.ctx.plugin_state["routing.task_text"] == "Extract the carrier's name from the notes below."
    assert "routing.task_embedding" in long.ctx.plugin_state
    # a short prompt's task text is its route text: the embedding is the one the semantic cache reuses
    assert "routing.embedding" in short.ctx.plugin_state and "routing.task_embedding" not in short.ctx.plugin_state
