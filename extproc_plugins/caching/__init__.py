"""Answering repeats without paying again: idempotency, exact and semantic caches, coalescing."""
