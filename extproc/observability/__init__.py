"""Metrics, usage records, the cost model, Triton's metrics and the reports built on them."""
