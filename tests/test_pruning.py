"""Counterfactuals remove exactly a span's characters, also in non-ASCII text."""

from __future__ import annotations

import pytest

from leaf_ray.data.chat import render
from leaf_ray.detect.pruning import make_counterfactuals, offsets_within, span_char_range

TEXT = "Tom has 3 red apples."
# hand-made tokens: "Tom" " has" " 3" " red" " apples" "."
OFFSETS = [(0, 3), (3, 7), (7, 9), (9, 13), (13, 20), (20, 21)]


def test_per_span_by_hand():
    out = make_counterfactuals(TEXT, OFFSETS, [(3, 4), (0, 2)])
    assert [(c.span_index, c.char_start, c.char_end, c.removed_text, c.text) for c in out] == [
        (0, 9, 13, " red", "Tom has 3 apples."),
        (1, 0, 7, "Tom has", " 3 red apples."),
    ]
    assert make_counterfactuals(TEXT, OFFSETS, []) == []


def test_collective_removes_all_spans_at_once():
    (out,) = make_counterfactuals(TEXT, OFFSETS, [(3, 4), (0, 2)], mode="collective")
    assert out.span_index == -1
    assert out.text == " 3 apples."
    assert out.char_ranges == [(0, 7), (9, 13)]
    assert (out.char_start, out.char_end, out.removed_text) == (0, 13, "Tom has red")
    assert make_counterfactuals(TEXT, OFFSETS, [], mode="collective") == []


@pytest.mark.parametrize("text", [
    "Café crème: 3 apples cost 5€ in total.",
    "数学 问题: Tom has 3 apples and 数学 books.",
    "Count the emoji 😀😀 and the cats 🐈‍⬛ please.",
])
def test_character_exact_on_real_tokenizer_offsets(tiny_tokenizer, text):
    """Every span of 1..3 tokens, located by the tokenizer's offsets: removal is exactly those characters,
    and a character split over several byte-level tokens is removed whole, never half."""
    enc = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    assert any(b - a == 1 and ord(text[a]) > 127 for a, b in offsets)  # non-ASCII tokens are present
    spans = [(i, j) for i in range(len(offsets)) for j in range(i + 1, min(i + 4, len(offsets) + 1))]
    for cf, (first, last) in zip(make_counterfactuals(text, offsets, spans), spans):
        start, end = offsets[first][0], offsets[last - 1][1]
        assert (cf.char_start, cf.char_end) == (start, end)
        assert cf.text == text[:start] + text[end:]
        assert cf.removed_text == text[start:end]
        assert len(cf.text) + len(cf.removed_text) == len(text)
        cf.text.encode("utf-8")  # a valid string: no lone surrogate, no broken character


def test_byte_split_character_is_removed_whole(tiny_tokenizer):
    text = "I like 😀 a lot"
    enc = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    emoji = text.index("😀")
    pieces = [i for i, o in enumerate(offsets) if o == (emoji, emoji + 1)]
    assert len(pieces) > 1  # the emoji's 4 UTF-8 bytes span several tokens sharing one character
    (cf,) = make_counterfactuals(text, offsets, [(pieces[0], pieces[0] + 1)])
    assert cf.text == "I like  a lot" and cf.removed_text == "😀"
    # collective pruning of two spans sharing that character removes it once
    (both,) = make_counterfactuals(text, offsets, [(pieces[0], pieces[0] + 1), (pieces[1], pieces[1] + 1)],
                                   mode="collective")
    assert both.text == "I like  a lot" and both.char_ranges == [(emoji, emoji + 1)]


def test_instruction_inside_rendered_chat(tiny_tokenizer):
    """The pipeline's path: scored tokens of a rendered chat, offsets made relative to the instruction."""
    instruction = "Café owner Zoë sells 数学 books: 3 for 5€. How many for 15€?"
    sample = render(tiny_tokenizer, instruction, "\\boxed{9}")
    a, b = sample.scored_span
    assert sample.text[a:b] == instruction
    offsets = offsets_within([sample.offsets[i] for i in sample.scored_token_idx], a, b)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(instruction)
    texts = [instruction[s:e] for s, e in offsets]
    k = next(i for i, t in enumerate(texts) if "数" in t)
    (cf,) = make_counterfactuals(instruction, offsets, [(k, k + 1)])
    assert cf.removed_text == texts[k]
    assert cf.text == instruction[:offsets[k][0]] + instruction[offsets[k][1]:]


def test_offsets_within_clips():
    assert offsets_within([(3, 8), (8, 12), (12, 20)], 5, 15) == [(0, 3), (3, 7), (7, 10)]


def test_bad_spans_and_offsets_are_rejected():
    with pytest.raises(ValueError, match="pruning mode"):
        make_counterfactuals(TEXT, OFFSETS, [(0, 1)], mode="all")
    with pytest.raises(ValueError, match=r"span \(2, 2\)"):
        make_counterfactuals(TEXT, OFFSETS, [(2, 2)])
    with pytest.raises(ValueError, match=r"span \(5, 7\)"):
        make_counterfactuals(TEXT, OFFSETS, [(5, 7)])
    with pytest.raises(ValueError, match=r"token 1 offsets \(3, 99\)"):
        make_counterfactuals(TEXT, [(0, 3), (3, 99)], [(0, 1)])
    assert span_char_range(OFFSETS, (1, 3)) == (3, 9)
