"""Teacher scores on student tokens when the two tokenizers differ (docs/design.md §1.1: "scored on the same characters").

Both tokenizations cover the same text; tokens are character ranges ``[start, end)``. Destination token j
(a student token) gets the overlap-weighted mean of the source (teacher) scores::

    w_ij = |[a_i, b_i) ∩ [c_j, d_j)|          (characters shared by source token i and destination token j)
    dst_j = sum_i w_ij * src_i / sum_i w_ij

A destination token that overlaps no source token (a zero-length token, or characters no source token covers)
takes the score of the nearest source token by character distance (ties: the lowest index); with no source
token at all it gets 0. Identical tokenizations (same offsets, in order) return the source scores unchanged,
which also covers several tokens sharing one character (byte-split UTF-8), where the mean would mix them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_CHUNK = 256  # destination tokens per block of the dense overlap matrix (bounds memory to 256 x n_src)


def _as_offsets(offsets, name: str) -> torch.Tensor:
    t = torch.as_tensor(offsets, dtype=torch.int64).reshape(-1, 2)
    if (t[:, 1] < t[:, 0]).any():
        i = int((t[:, 1] < t[:, 0]).nonzero()[0])
        raise ValueError(f"{name}[{i}] = {tuple(t[i].tolist())} has end < start")
    return t


def project_scores(src_offsets: Sequence[Sequence[int]], src_scores, dst_offsets: Sequence[Sequence[int]]
                   ) -> torch.Tensor:
    """Scores of the source tokens projected onto the destination tokens (rule in the module docstring).

    Returns a tensor with one score per destination token, in the source scores' float dtype (float32 for
    lists); computed in float64.
    """
    src = _as_offsets(src_offsets, "src_offsets")
    dst = _as_offsets(dst_offsets, "dst_offsets")
    scores = torch.as_tensor(src_scores)
    out_dtype = scores.dtype if scores.is_floating_point() else torch.float32
    scores = scores.flatten()
    if scores.numel() != len(src):
        raise ValueError(f"{scores.numel()} source scores for {len(src)} source tokens")
    if torch.equal(src, dst):
        return scores.clone().to(out_dtype)
    if len(src) == 0:
        return torch.zeros(len(dst), dtype=out_dtype)
    values = scores.double()
    out = torch.empty(len(dst), dtype=torch.float64)
    for lo in range(0, len(dst), _CHUNK):
        block = dst[lo:lo + _CHUNK]
        a, b = block[:, :1], block[:, 1:]  # [m, 1]
        c, d = src[:, 0][None], src[:, 1][None]  # [1, n]
        overlap = (torch.minimum(b, d) - torch.maximum(a, c)).clamp(min=0).double()  # [m, n]
        weight = overlap.sum(1)
        projected = (overlap @ values) / weight.clamp(min=1)
        # Gap between ranges (0 when they overlap or touch): the nearest source for uncovered tokens.
        distance = torch.maximum(c - b, a - d).clamp(min=0)
        nearest = values[distance.argmin(1)]  # argmin returns the first (lowest index) minimum
        out[lo:lo + _CHUNK] = torch.where(weight > 0, projected, nearest)
    return out.to(out_dtype)
