"""Chat templates: render OpenAI chat messages into a single prompt string.

Hand-written equivalents of the common Hugging Face templates (no Jinja on the hot path):
"chatml" (Qwen, many fine-tunes), "llama3" (Llama 3 / 3.1 instruct), "mistral"
(Mistral / Mixtral instruct, [INST] style) and "plain" (Role: text lines, for base models
and the CPU reference tiers). Only text is rendered: a content array contributes its
`text` parts; assistant tool calls are appended as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Callable, Iterator, Protocol

from extproc.formats.openai import ChatMessage

__all__ = ["render", "TEMPLATES", "ChatTemplate"]


class ChatTemplate(Protocol):
    def __call__(self, messages: list[ChatMessage], add_generation_prompt: bool, include_bos: bool) -> str: ...


def _text(m: ChatMessage) -> str:
    text = m.text
    if m.tool_calls:
        calls = json.dumps(m.tool_calls, ensure_ascii=False, separators=(",", ":"))
        text = f"{text}\n{calls}" if text else calls
    return text


def _chatml(messages: list[ChatMessage], add_generation_prompt: bool, include_bos: bool) -> str:
    parts = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        parts.append(f"<|im_start|>{role}\n{_text(m)}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


_LLAMA3_ROLES = {"developer": "system", "tool": "ipython", "function": "ipython"}


def _llama3(messages: list[ChatMessage], add_generation_prompt: bool, include_bos: bool) -> str:
    parts = ["<|begin_of_text|>"] if include_bos else []
    for m in messages:
        role = _LLAMA3_ROLES.get(m.role, m.role)
        parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{_text(m).strip()}<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _mistral(messages: list[ChatMessage], add_generation_prompt: bool, include_bos: bool) -> str:
    # Mistral has no system role: system text is prepended to the first user turn. Roles must
    # alternate, so consecutive user-side (or assistant) messages are merged with a blank line.
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []
    for m in messages:
        if m.role in ("system", "developer"):
            system.append(_text(m))
            continue
        side = "assistant" if m.role == "assistant" else "user"
        if turns and turns[-1][0] == side:
            turns[-1][1].append(_text(m))
        else:
            turns.append((side, [_text(m)]))
    if system:
        if turns and turns[0][0] == "user":
            turns[0][1][:0] = system
        else:
            turns.insert(0, ("user", system))
    parts = ["<s>"] if include_bos else []
    for side, texts in turns:
        body = "\n\n".join(texts)
        if side == "user":
            parts.append(f"[INST] {body} [/INST]")
        else:
            parts.append(f"{body}</s>")
    # The generation prompt is the trailing [/INST]; nothing to add.
    return "".join(parts)


_PLAIN_ROLES = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
    "function": "Tool",
}


def _plain(messages: list[ChatMessage], add_generation_prompt: bool, include_bos: bool) -> str:
    parts = [f"{_PLAIN_ROLES.get(m.role, m.role.title())}: {_text(m)}\n" for m in messages]
    if add_generation_prompt:
        parts.append("Assistant:")
    return "".join(parts)


class _Templates(Mapping):
    """Read-only name -> template mapping whose KeyError lists the known names."""

    def __init__(self, items: dict[str, Callable]):
        self._items = dict(items)

    def __getitem__(self, name: str) -> ChatTemplate:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown chat template {name!r}; known templates: {', '.join(sorted(self._items))}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


TEMPLATES: Mapping[str, ChatTemplate] = _Templates(
    {"chatml": _chatml, "llama3": _llama3, "mistral": _mistral, "plain": _plain}
)


def render(
    template: str,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    include_bos: bool = True,
) -> str:
    """Render `messages` with the named template into one prompt string.

    `include_bos` adds the template's BOS text (`<|begin_of_text|>`, `<s>`) like the Hugging
    Face templates do; turn it off when the model's tokenizer adds BOS itself.
    Raises KeyError (listing the known names) for an unknown template.
    """
    return TEMPLATES[template](messages, add_generation_prompt, include_bos)
