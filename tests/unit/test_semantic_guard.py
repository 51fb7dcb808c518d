"""The semantic guard: near misses that embeddings cannot tell apart, and paraphrases it must let through."""

from __future__ import annotations

import pytest

from extproc_plugins.caching.semantic_guard import GuardChecks, compatible


@pytest.mark.parametrize("a,b,check", [
    ("What is the capital of France?", "What is the capital of Germany?", "entities"),
    ("How do I reverse a list in Python?", "How do I reverse a list in Java?", "entities"),
    ("What is 7 times 8?", "What is 7 times 9?", "numbers"),
    ("Give me three tips for studying.", "Give me five tips for studying.", "numbers"),
    ("What happened in the first world war?", "What happened in the second world war?", "numbers"),
    ("Is coffee good for your health?", "Is coffee not good for your health?", "negation"),
    ("Can dogs eat grapes?", "Why can't dogs eat grapes?", "negation"),
    ("How do I make a cake with eggs?", "How do I make a cake without eggs?", "negation"),
    ("What are the advantages of remote work?", "What are the disadvantages of remote work?", "contrast"),
    ("What is the largest ocean on Earth?", "What is the smallest ocean on Earth?", "contrast"),
    ("How do I zoom in on a Mac?", "How do I zoom out on a Mac?", "contrast"),
    ("What is the most popular language?", "What is the least popular language?", "contrast"),
    ("Best foods to gain weight", "Best foods to lose weight", "contrast"),
    ("Did the team win?", "Did the team lose?", "contrast"),  # a word may oppose several (gain, win)
    ("How do I convert kilograms to pounds?", "How do I convert pounds to kilograms?", "direction"),
    ("How do I convert a string to a list in Python?", "How do I convert a list to a string in Python?", "direction"),
])
def test_near_misses_are_rejected_by_the_right_check(a, b, check):
    assert compatible(a, b) == (False, check)
    assert compatible(b, a)[0] is False
    off = GuardChecks(**{check: False})
    assert compatible(a, b, off) != (False, check)


@pytest.mark.parametrize("a,b", [
    ("What is the capital of France?", "Which city is France's capital?"),
    ("What is the capital of France?", "capital of france?"),
    ("Give me three tips for studying.", "What are 3 tips for studying?"),
    ("What is the currency of the United Kingdom?", "Which currency is used in the UK?"),
    ("Who was the first president of the United States?", "Who served as the first US president?"),
    ("What is the largest ocean on Earth?", "Which ocean is the biggest in the world?"),
    ("What is the GDP of Germany?", "How large is Germany's GDP?"),
    ("Why is the sky blue?", "Explain why the sky appears blue."),
])
def test_paraphrases_pass(a, b):
    assert compatible(a, b) == (True, "")


def test_a_word_opposes_every_word_it_is_listed_against():
    from extproc_plugins.caching.semantic_guard import _CONTRAST, _OPPOSITES

    for i, (a, b) in enumerate(_OPPOSITES):
        for side, words in enumerate((a, b)):
            for w in words.split():
                assert (i, side) in _CONTRAST[w], w


def test_an_acronym_matches_the_initials_of_words_spelled_out():
    assert compatible("What are the signs of COPD?", "What are the signs of chronic obstructive pulmonary disease?")[0]
    assert compatible("Compute YoY revenue growth.", "Compute year-over-year revenue growth.")[0]
    assert compatible("What are the signs of COPD?", "What are the signs of asthma?") == (False, "entities")
