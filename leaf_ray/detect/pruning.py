"""Counterfactuals by span pruning (docs/design.md §1.3).

A confounder span covers tokens ``first .. last_exclusive-1``; its characters are
``[offsets[first][0], offsets[last_exclusive-1][1])`` of ``text``. The counterfactual is ``text`` with exactly
those characters removed: ``text[:start] + text[end:]``. Nothing else changes: whitespace next to the span
is kept as it is (a byte-level BPE token usually carries its leading space, so removing it leaves normal
spacing; a tokenizer with trimmed offsets may leave a double space, which we keep to stay character-exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Counterfactual:
    """One pruned text. ``span_index`` is -1 for collective pruning, where ``char_start``/``char_end`` are
    the first removed character and the end of the last removed range, ``removed_text`` the removed pieces
    concatenated, and ``char_ranges`` the exact (merged) ranges removed."""

    span_index: int
    char_start: int
    char_end: int
    removed_text: str
    text: str
    char_ranges: list[tuple[int, int]] = field(default_factory=list)


def offsets_within(offsets: Sequence[Sequence[int]], start: int, end: int) -> list[tuple[int, int]]:
    """Offsets of a rendered text made relative to its sub-range ``[start, end)`` (e.g. the instruction),
    clipped to it, so a token straddling the boundary covers only the part inside."""
    return [(min(max(a, start), end) - start, min(max(b, start), end) - start) for a, b in offsets]


def span_char_range(token_char_offsets: Sequence[Sequence[int]], span: Sequence[int]) -> tuple[int, int]:
    """Characters of the tokens ``span = (first, last_exclusive)``: [start of first, end of last)."""
    first, last = int(span[0]), int(span[1])
    if not 0 <= first < last <= len(token_char_offsets):
        raise ValueError(f"span {tuple(span)} is not a non-empty token range within "
                         f"{len(token_char_offsets)} tokens")
    start, end = int(token_char_offsets[first][0]), int(token_char_offsets[last - 1][1])
    if end < start:
        raise ValueError(f"span {tuple(span)}: character range [{start}, {end}) is reversed")
    return start, end


def _check_offsets(text: str, offsets: Sequence[Sequence[int]]) -> None:
    for i, (a, b) in enumerate(offsets):
        if not 0 <= a <= b <= len(text):
            raise ValueError(f"token {i} offsets ({a}, {b}) are outside the text of {len(text)} characters "
                             "(offsets must be relative to `text`; see offsets_within)")


def make_counterfactuals(text: str, token_char_offsets: Sequence[Sequence[int]],
                         spans: Sequence[Sequence[int]], mode: str = "per_span") -> list[Counterfactual]:
    """``per_span``: one counterfactual per span, ``text`` minus that span's characters (k spans -> k items,
    no span -> []). ``collective``: one item with every span removed at once (span_index -1)."""
    if mode not in ("per_span", "collective"):
        raise ValueError(f"pruning mode must be 'per_span' or 'collective', got {mode!r}")
    _check_offsets(text, token_char_offsets)
    ranges = [span_char_range(token_char_offsets, s) for s in spans]
    if mode == "per_span":
        return [Counterfactual(span_index=k, char_start=a, char_end=b, removed_text=text[a:b],
                               text=text[:a] + text[b:], char_ranges=[(a, b)])
                for k, (a, b) in enumerate(ranges)]
    if not ranges:
        return []
    merged: list[list[int]] = []
    for a, b in sorted(ranges):  # tokens sharing a character (byte-split) can make ranges overlap
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    kept, removed, cursor = [], [], 0
    for a, b in merged:
        kept.append(text[cursor:a])
        removed.append(text[a:b])
        cursor = b
    kept.append(text[cursor:])
    return [Counterfactual(span_index=-1, char_start=merged[0][0], char_end=merged[-1][1],
                           removed_text="".join(removed), text="".join(kept),
                           char_ranges=[(a, b) for a, b in merged])]
