"""llm-extproc: a cost-control gateway for self-hosted LLM traffic, as an Envoy ext_proc service.

Plugin authors need only a few names, re-exported here::

    from extproc import hookimpl, Reply, OpenAIError, TierChoice
"""

from extproc.framework.context import RequestContext, ResponseChunk, TierChoice, UpstreamRequest
from extproc.wire.decisions import Continue, Reply
from extproc.framework.hookspecs import hookimpl
from extproc.formats.openai import OpenAIError

__all__ = [
    "Continue", "OpenAIError", "Reply", "RequestContext", "ResponseChunk", "TierChoice",
    "UpstreamRequest", "hookimpl",
]
__version__ = "0.1.0"
