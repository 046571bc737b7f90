"""Response level ("Instr & Resp Mask", docs/design.md §1.4): reasoning steps, segments, (prefix, continuation) pairs.

The response is cut into steps after every match of ``pattern`` (blank lines by default); each separator
stays at the end of the step before it, so ``''.join(steps) == response``. Steps are grouped into
``num_segments`` contiguous segments (2 or 3 in the paper). For a prefix of k segments (k = 1 .. m-1) the
context is instruction + prefix, the scored span is the prefix, and the loss covers the continuation.
"""

from __future__ import annotations

import itertools
import re


def _steps(response: str, pattern: str) -> list[str]:
    """Cut after each separator match. A match at the very start has no step before it, and one at the very
    end has none after it, so neither makes an empty or separator-only step."""
    cuts = sorted({m.end() for m in re.finditer(pattern, response) if m.start() > 0 and m.end() < len(response)})
    bounds = [0] + cuts + [len(response)]
    return [response[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def split_steps(response: str, pattern: str = r"\n\s*\n", num_segments: int = 3) -> list[str]:
    """Group the steps of ``response`` into ``num_segments`` contiguous segments; ``''.join(result) == response``.

    With n steps, segment sizes differ by at most one step and the earlier segments take the extra steps
    (n = 7, 3 segments -> 3, 2, 2 steps). Fewer steps than segments -> one segment per step (an empty response
    -> []); a single step gives one segment and therefore no (prefix, continuation) pair.
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"step pattern {pattern!r} is not a valid regex: {e}") from None
    steps = _steps(response, pattern)
    count = min(num_segments, len(steps))
    if count == 0:
        return []
    base, extra = divmod(len(steps), count)
    segments, i = [], 0
    for k in range(count):
        size = base + (1 if k < extra else 0)
        segments.append("".join(steps[i:i + size]))
        i += size
    return segments


def prefix_continuations(segments: list[str]) -> list[tuple[str, str]]:
    """[(segments[:k] joined, segments[k:] joined) for k = 1 .. len(segments)-1]."""
    return [("".join(segments[:k]), "".join(segments[k:])) for k in range(1, len(segments))]
