"""Teacher scores projected onto student tokens by character overlap."""

from __future__ import annotations

import pytest
import torch

from leaf_ray.config import ThresholdConfig
from leaf_ray.detect.confounders import score_span
from leaf_ray.detect.cross_tokenizer import project_scores
from leaf_ray.tiny_models import train_tiny_tokenizer

TEXT = "Café owner Zoë sells 数学 books: 3 for 5€. How many books for 15€? 😀"


@pytest.fixture(scope="module")
def two_tokenizers():
    small = train_tiny_tokenizer(vocab_size=300, seed_texts=["apples and pears cost money " * 20,
                                                              "Zoë sells books at the café " * 5])
    large = train_tiny_tokenizer(vocab_size=700, seed_texts=["How many books for the owner? " * 20,
                                                              "数学 问题 sells for 15€ " * 10])
    return small, large


def offsets_of(tokenizer, text):
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(o) for o in enc["offset_mapping"]]


def by_characters(src_offsets, src_scores, dst_offsets):
    """Independent reference: the overlap-weighted mean is the mean over (character, covering source token)
    pairs of the character's source score."""
    out = []
    for a, b in dst_offsets:
        pairs = [float(s) for p in range(a, b) for (c, d), s in zip(src_offsets, src_scores) if c <= p < d]
        out.append(sum(pairs) / len(pairs))
    return out


def test_hand_example():
    # src "abcd|ef" scores 1, 3; dst "ab|cde|f": [1, (2*1 + 1*3)/3, 3]
    got = project_scores([(0, 4), (4, 6)], torch.tensor([1.0, 3.0]), [(0, 2), (2, 5), (5, 6)])
    assert torch.allclose(got, torch.tensor([1.0, 5 / 3, 3.0]))


def test_no_overlap_takes_the_nearest_source_token():
    src, scores = [(0, 2), (5, 8)], [1.0, 4.0]
    # a zero-length token at 3 (gap 1 to the first, 2 to the second), a gap range [2, 5) touching both
    # (tie -> the first), a zero-length token inside the second
    got = project_scores(src, scores, [(3, 3), (2, 5), (6, 6), (9, 9)])
    assert got.tolist() == [1.0, 1.0, 4.0, 4.0]
    assert project_scores([], [], [(0, 1)]).tolist() == [0.0]


def test_two_different_tiny_tokenizers(two_tokenizers):
    small, large = two_tokenizers
    src, dst = offsets_of(small, TEXT), offsets_of(large, TEXT)
    assert src != dst and len(src) != len(dst)
    for offsets in (src, dst):  # both cover the whole text
        assert offsets[0][0] == 0 and offsets[-1][1] == len(TEXT)
    scores = torch.rand(len(src), generator=torch.Generator().manual_seed(0))
    got = project_scores(src, scores, dst)
    assert got.shape == (len(dst),) and got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(by_characters(src, scores.tolist(), dst)), atol=1e-6)
    # a constant score stays constant; projection never leaves the source range
    assert torch.allclose(project_scores(src, torch.full((len(src),), 0.25), dst), torch.full((len(dst),), 0.25))
    assert got.min() >= scores.min() - 1e-6 and got.max() <= scores.max() + 1e-6
    # and the projected teacher scores feed detection on the student's tokens
    student = torch.rand(len(dst), generator=torch.Generator().manual_seed(1))
    out = score_span(student, got, [TEXT[a:b] for a, b in dst], ThresholdConfig())
    assert out.delta.shape == (len(dst),) and out.confounder_mask.any()


def test_identical_tokenizations_are_exact(two_tokenizers):
    small, _ = two_tokenizers
    offsets = offsets_of(small, TEXT)
    assert len(set(offsets)) < len(offsets)  # byte-split characters: several tokens share one range
    scores = torch.rand(len(offsets), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = project_scores(offsets, scores, list(offsets))
    assert torch.equal(got, scores) and got.dtype == torch.float64


def test_bad_input():
    with pytest.raises(ValueError, match="3 source scores for 2 source tokens"):
        project_scores([(0, 1), (1, 2)], [1.0, 2.0, 3.0], [(0, 2)])
    with pytest.raises(ValueError, match=r"dst_offsets\[1\] = \(4, 2\)"):
        project_scores([(0, 1)], [1.0], [(0, 1), (4, 2)])
