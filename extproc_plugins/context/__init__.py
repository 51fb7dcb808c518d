"""Context discipline: caps on prompt and completion tokens, retrieval of the passages that fit."""
