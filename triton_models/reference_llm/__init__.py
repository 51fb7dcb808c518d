"""NumPy reference LLM shared by the llm-small / llm-medium / llm-large Triton models.

Lives inside ``triton_models/`` (imported as ``reference_llm``; each model.py puts its
repository directory on ``sys.path``).  See ``triton_models/README.md``.
"""

from .engine import DEFAULT_MAX_TOKENS, Engine, Event, GenRequest
from .model import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, TIERS, ReferenceTransformer, TierConfig, tier_config
from .tokenizer import EOS_ID, StopMatcher, StreamDetokenizer, get_encoding, output_vocab

__all__ = [
    "DEFAULT_MAX_TOKENS", "Engine", "Event", "GenRequest", "MAX_NEW_TOKENS", "MAX_PROMPT_TOKENS",
    "TIERS", "ReferenceTransformer", "TierConfig", "tier_config", "EOS_ID", "StopMatcher",
    "StreamDetokenizer", "get_encoding", "output_vocab",
]
