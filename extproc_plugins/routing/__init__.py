"""Model-tier routing: choosing the tier for `model: auto`, pinned models, spill-over and downgrades."""
