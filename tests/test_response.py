"""Response-level splitting: steps, segments, (prefix, continuation) pairs."""

from __future__ import annotations

import pytest

from leaf_ray.data.demo_corpus import generate_problems
from leaf_ray.detect.response import prefix_continuations, split_steps

RESPONSE = "Step one.\n\nStep two.\n \nStep three.\n\n\nStep four.\n\nSo \\boxed{4}."


def test_three_segments_by_hand():
    # 5 steps -> sizes 2, 2, 1; separators stay at the end of the step before them
    assert split_steps(RESPONSE, num_segments=3) == [
        "Step one.\n\nStep two.\n \n",
        "Step three.\n\n\nStep four.\n\n",
        "So \\boxed{4}.",
    ]


def test_two_segments_by_hand():
    # 5 steps -> sizes 3, 2
    assert split_steps(RESPONSE, num_segments=2) == [
        "Step one.\n\nStep two.\n \nStep three.\n\n\n",
        "Step four.\n\nSo \\boxed{4}.",
    ]


def test_join_invariant_on_the_demo_corpus_and_edge_cases():
    texts = [p["output"] for p in generate_problems(20, seed=0)]
    texts += ["", "one step only", "\n\nleading separator\n\nx", "trailing\n\n", "a\n\nb", "\n\n\n\n", "数学\n\n😀\n\né"]
    for text in texts:
        for segments in (2, 3, 5):
            parts = split_steps(text, num_segments=segments)
            assert "".join(parts) == text
            assert all(parts) and len(parts) <= segments


def test_fewer_steps_than_segments():
    assert split_steps("a\n\nb", num_segments=3) == ["a\n\n", "b"]
    assert split_steps("one step", num_segments=3) == ["one step"]
    assert split_steps("", num_segments=3) == []
    assert split_steps("\n\nlead\n\n", num_segments=3) == ["\n\nlead\n\n"]  # no content-less step


def test_custom_patterns():
    text = "Step 1: add. Step 2: multiply. Step 3: answer."
    assert split_steps(text, pattern=r"(?=Step \d)", num_segments=3) == [
        "Step 1: add. ", "Step 2: multiply. ", "Step 3: answer."]
    assert split_steps("a; b; c; d", pattern=r";\s*", num_segments=2) == ["a; b; ", "c; d"]
    with pytest.raises(ValueError, match="not a valid regex"):
        split_steps(text, pattern="(", num_segments=2)


def test_prefix_continuations():
    segments = ["A\n\n", "B\n\n", "C"]
    assert prefix_continuations(segments) == [("A\n\n", "B\n\nC"), ("A\n\nB\n\n", "C")]
    assert prefix_continuations(["only"]) == []
    assert prefix_continuations([]) == []
    for prefix, continuation in prefix_continuations(split_steps(RESPONSE, num_segments=3)):
        assert prefix + continuation == RESPONSE
