"""Per-request metrics, usage records and the request log."""
