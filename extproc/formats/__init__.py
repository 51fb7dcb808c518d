"""Pure translations: OpenAI requests and errors, SSE, Triton generate, chat templates, token counts."""
