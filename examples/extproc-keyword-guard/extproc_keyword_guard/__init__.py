"""Refuse prompts that contain blocked words; tag every other answer with a response header."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from extproc import OpenAIError, hookimpl


class KeywordGuard:
    """An llm-extproc policy: a plain class whose methods are marked with ``@hookimpl``."""

    class Settings(BaseModel):
        """Validated at gateway start-up; a bad key fails start-up naming it."""

        model_config = ConfigDict(extra="forbid")
        blocked: list[str] = Field(default_factory=list, description="words refused, case-insensitive")
        header: str = "x-keyword-guard"

    def __init__(self, settings: "KeywordGuard.Settings"):
        self.blocked = [w.lower() for w in settings.blocked]
        self.header = settings.header

    @hookimpl
    def extproc_request_parsed(self, ctx):
        req = ctx.request
        text = " ".join(m.text for m in req.messages) if req.messages is not None else (req.prompt or "")
        lowered = text.lower()
        for word in self.blocked:
            if word in lowered:
                raise OpenAIError(400, f"The prompt contains a blocked word ({word!r}).",
                                  type="invalid_request_error", param="messages", code="content_policy")
        ctx.response_headers[self.header] = "checked"
        ctx.response_headers[f"{self.header}-chars"] = str(len(text))
