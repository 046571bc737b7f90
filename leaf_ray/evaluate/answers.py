"""Math scoring: pull the final answer out of a response, then check it against the reference.

Extraction (:func:`extract_answer`), first rule that matches wins:

1. the **last** ``\\boxed{...}`` or ``\\fbox{...}`` (braces balanced, so ``\\boxed{\\frac{1}{2}}`` is whole;
   ``\\boxed 5`` without braces takes the next token);
2. else the last ``#### X`` (GSM8K style; X = rest of that line);
3. else the last "the (final) answer is X" or "answer: X" (case-insensitive; X = rest of the sentence);
4. else the last number in the text (``-1,234.5``, ``3/4`` and ``.5`` included);
5. else ``None`` (no answer: never matched).

Equivalence (:func:`answers_match`): both sides are normalised (:func:`normalize_answer`: ``$``/``\\(``
delimiters, ``\\text{}``/``\\mathrm{}`` wrappers, ``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``, spacing
macros, degree signs, currency, ``%``, thousands separators, trailing units after a number and trailing
punctuation are removed); equal strings (case-insensitive) match; otherwise both are parsed and compared with
``math-verify`` (numeric within 1e-6, symbolic, sets/intervals, equations such as ``x=5`` vs ``5``).

math-verify guards parsing/comparison with ``signal.alarm``, which only works on a process's main thread
(elsewhere it raises). On the main thread we keep its 5 s guards (and restore any alarm a caller had armed,
e.g. pytest-timeout); on any other thread (threaded Ray actors, thread pools) its timeouts are disabled and
the only guard is :data:`MAX_ANSWER_CHARS` on the inputs.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from contextlib import contextmanager

MAX_ANSWER_CHARS = 400
"""Longer extracted answers are not handed to sympy (a pathological expression could run unbounded)."""

VERIFY_TIMEOUT_S = 5
"""math-verify's per-parse / per-comparison timeout when running on the main thread."""

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*(.+?)(?:\.(?!\d)|\n|$)", re.IGNORECASE
)
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces (unclosed ones skipped)."""
    found = None
    for m in _BOX_RE.finditer(text):
        if m.group(1) is None:  # `\boxed 5`: the next whitespace-delimited token
            token = re.match(r"([^\s$]+)", text[m.end():])
            if token:
                found = token.group(1)
            continue
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0) if text[i - 1] != "\\" else 0
            i += 1
        if depth == 0:
            found = text[m.end():i - 1]
    return found


def extract_answer(text: str | None) -> str | None:
    """The final answer stated in `text` (rules and precedence in the module docstring), stripped."""
    if not text:
        return None
    candidates = (
        last_boxed(text),
        _last_group(_HASH_RE, text),
        _last_group(_ANSWER_IS_RE, text),
        _last_number(text),
    )
    for answer in candidates:
        if answer is not None and answer.strip(" \t\n$.,;:"):
            return answer.strip().rstrip(".").strip()
    return None


def _last_group(pattern: re.Pattern, text: str) -> str | None:
    matches = [m.group(1) for m in pattern.finditer(text) if m.group(1).strip()]
    return matches[-1] if matches else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


# --------------------------------------------------------------------------- normalisation

_WRAPPERS_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DROP = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\quad", r"\qquad", r"\displaystyle", "~")
_DEGREE_RE = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_CURRENCY_RE = re.compile(r"\\\$|(?<![\\\w])(?:US\$|\$|£|€|¥|₹)")
_THOUSANDS_RE = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+)(?![\d,]|\.\d*,)")
_NUMBER_WITH_UNIT_RE = re.compile(
    # a unit is a word of 2+ letters (not `pi`), maybe squared: "5 cm^2", "18 dollars", "3 apples"
    r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?)\s*(?!pi\b)[a-zA-Z]{2}[a-zA-Z .]*(?:\^\{?\d\}?)?$"
)


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer (see the module docstring); never raises."""
    s = _CURRENCY_RE.sub("", answer.strip()).replace("$", "")  # the `$` left are math delimiters
    for left, right in ((r"\(", r"\)"), (r"\[", r"\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left):len(s) - len(right)].strip()
    if s.startswith(("\\boxed", "\\fbox")) and last_boxed(s) is not None:
        s = last_boxed(s)
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").replace("{,}", "")
    while True:  # nested wrappers: \text{\textbf{x}}
        unwrapped = _WRAPPERS_RE.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    for token in _DROP:
        s = s.replace(token, "")
    s = _DEGREE_RE.sub("", s).replace("\u2212", "-")  # unicode minus sign
    s = s.replace(r"\%", "").replace("%", "")
    s = _THOUSANDS_RE.sub(lambda m: m.group(1).replace(",", ""), s)
    s = s.strip().rstrip(".;,").strip()
    unit = _NUMBER_WITH_UNIT_RE.match(s)
    if unit:  # "18 dollars", "5 cm^2", "3 apples." -> the number
        s = unit.group(1)
    if re.fullmatch(r"[-+]?\d+\.0*", s):  # "18.00" -> "18"
        s = s.split(".")[0]
    return s.strip()


# --------------------------------------------------------------------------- equivalence


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """True when `predicted` is equivalent to `reference` (normalised text, then math-verify)."""
    if predicted is None or reference is None:
        return False
    pred, gold = normalize_answer(predicted), normalize_answer(reference)
    if not pred or not gold:
        return False
    if pred.casefold() == gold.casefold():
        return True
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    return _math_verify(gold, pred)


def score_math_response(response: str, reference: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) for a model response against the reference answer."""
    predicted = extract_answer(response)
    return predicted, answers_match(predicted, reference)


def _math_verify(gold: str, pred: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    extraction = [LatexExtractionConfig(), ExprExtractionConfig()]
    on_main = threading.current_thread() is threading.main_thread()
    timeout_s = VERIFY_TIMEOUT_S if on_main else None
    with _quiet_math_verify(), _preserve_alarm(on_main):
        gold_parsed = parse(f"${gold}$", extraction_config=extraction, parsing_timeout=timeout_s)
        pred_parsed = parse(f"${pred}$", extraction_config=extraction, parsing_timeout=timeout_s)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


@contextmanager
def _preserve_alarm(on_main: bool):
    """math-verify re-arms SIGALRM and cancels it afterwards: put back any timer a caller had armed."""
    if not on_main or not hasattr(signal, "setitimer"):
        yield
        return
    remaining, interval = signal.getitimer(signal.ITIMER_REAL)
    handler = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, handler)
        if remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, remaining - (time.monotonic() - started)), interval)


@contextmanager
def _quiet_math_verify():
    """math-verify warns once that timeouts are off and logs every unparsable answer; both are expected."""
    loggers = [logging.getLogger(name) for name in ("math_verify", "math_verify.parser", "math_verify.grader")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
