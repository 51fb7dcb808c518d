"""llm-extproc: a cost-control gateway for self-hosted LLM traffic, as an Envoy ext_proc service.

Plugin authors need only a few names, re-exported here::

    from extproc import hookimpl, Reply, OpenAIError, TierChoice
"""

from .context import RequestContext, ResponseChunk, TierChoice, UpstreamRequest
from .decisions import Continue, Reply
from .hookspecs import hookimpl
from .openai_format import OpenAIError

__all__ = [
    "Continue", "OpenAIError", "Reply", "RequestContext", "ResponseChunk", "TierChoice",
    "UpstreamRequest", "hookimpl",
]
__version__ = "0.1.0"
