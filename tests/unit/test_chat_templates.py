"""Unit tests for extproc.formats.chat_templates."""

from __future__ import annotations

import pytest

from extproc.formats.chat_templates import TEMPLATES, render
from extproc.formats.openai import ChatMessage as M

CONV = [M("system", "Be brief."), M("user", "Hi"), M("assistant", "Hello!"), M("user", "2+2?")]


def test_known_templates():
    assert {"chatml", "llama3", "mistral", "plain"} <= set(TEMPLATES)
    assert len(TEMPLATES) == len(list(TEMPLATES)) and "chatml" in TEMPLATES and "nope" not in TEMPLATES


def test_unknown_template_lists_known_names():
    with pytest.raises(KeyError) as ei:
        render("nope", CONV)
    assert "nope" in str(ei.value) and "chatml" in str(ei.value) and "llama3" in str(ei.value)
    with pytest.raises(KeyError):
        TEMPLATES["nope"]


def test_chatml():
    assert render("chatml", CONV) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render("chatml", CONV[:2], add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    assert render("chatml", [M("developer", "d")]).startswith("<|im_start|>system\nd")


def test_llama3():
    assert render("llama3", CONV) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render("llama3", [M("user", "  x \n")], include_bos=False, add_generation_prompt=False) == (
        "<|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>")
    assert "<|start_header_id|>ipython<|end_header_id|>" in render("llama3", [M("tool", "42", tool_call_id="t")])


def test_mistral():
    assert render("mistral", CONV) == "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] 2+2? [/INST]"
    assert render("mistral", [M("user", "a"), M("user", "b")], include_bos=False) == "[INST] a\n\nb [/INST]"
    # system with no user turn, and an assistant first
    assert render("mistral", [M("system", "s")]) == "<s>[INST] s [/INST]"
    assert render("mistral", [M("system", "s"), M("assistant", "a")]) == "<s>[INST] s [/INST]a</s>"


def test_plain():
    assert render("plain", CONV) == "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: 2+2?\nAssistant:"
    assert render("plain", [M("user", "x")], add_generation_prompt=False) == "User: x\n"


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "plain"])
def test_content_parts_and_tool_calls_rendered_as_text(name):
    msgs = [
        M("user", [{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "here"}]),
        M("assistant", None, tool_calls=[{"id": "t1", "function": {"name": "f", "arguments": "{}"}}]),
        M("tool", "result", tool_call_id="t1"),
    ]
    out = render(name, msgs)
    assert "look here" in out and '"name":"f"' in out and "result" in out


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "plain"])
def test_empty_and_unicode(name):
    out = render(name, [M("user", "héllo 🙂"), M("assistant", "")])
    assert "héllo 🙂" in out
