"""Math answer extraction and equivalence (math-verify), including off the main thread."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from leaf_ray.evaluate.answers import answers_match, extract_answer, normalize_answer, score_math_response

# (response, extracted answer)
EXTRACTION = [
    (r"So the result is \boxed{42}.", "42"),
    (r"First \boxed{3}, then corrected: \boxed{5}", "5"),  # last box wins
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces kept whole
    (r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\dfrac{\sqrt{3}}{2}"),
    (r"\boxed{x^{2}+\{1\}}", r"x^{2}+\{1\}"),  # escaped braces do not close the box
    (r"\fbox{7} is it", "7"),
    (r"\boxed 9 apples", "9"),
    (r"\boxed{12} but unclosed \boxed{13", "12"),  # unbalanced box skipped
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,000\n", "1,000"),
    (r"The answer is $\frac{3}{4}$.", r"$\frac{3}{4}$"),
    ("The final answer is 18 dollars.", "18 dollars"),
    ("answer: -5\nsome trailing words", "-5"),
    ("We get 3 and then 4.25 in the end", "4.25"),  # last number fallback
    ("She pays $1,234.50 in total", "1,234.50"),
    ("no digits here at all", None),
    ("", None),
    (r"\boxed{3} beats #### 4 and the answer is 5", "3"),  # precedence: box, ####, phrase, number
    ("#### 4\nso the answer is 5", "4"),  # `#### X` beats the phrase
    ("The answer is 5. Then 6 more.", "5"),  # phrase beats last number
]

# (predicted, reference, match)
EQUIVALENCE = [
    ("42", "42", True),
    ("42", "43", False),
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{3}{4}", "0.75", True),
    (r"\tfrac{3}{4}", r"\frac{3}{4}", True),
    (r"\frac{1}{3}", "0.3333333", True),
    ("1/3", r"\frac13", True),
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("1,234,567", "1234567", True),
    ("18 dollars", "18", True),
    (r"\$18.00", "18", True),
    ("$5$ cm", "5", True),
    (r"12\text{ cm}^2", "12", True),
    (r"90^\circ", "90", True),
    (r"50\%", "50", True),
    ("-3", "-3", True),
    ("\u22123", "-3", True),  # unicode minus
    ("-3", "3", False),
    ("3.", "3", True),  # trailing period
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", True),
    ("x = 5", "5", True),
    (r"\{1, 2\}", r"\{2, 1\}", True),  # sets
    ("[1, 2)", "[1,2)", True),  # intervals
    ("(1, 2)", "[1, 2]", False),
    (r"\left(1, 2\right)", "(1,2)", True),
    ("1/(n+1)", r"\frac{1}{n+1}", True),
    ("No", "no", True),
    ("3 pi", "3", False),  # `pi` is not a unit
    ("2.5", r"\frac{5}{2}", True),
    ("0.33", r"\frac{1}{3}", False),  # 1e-6 rounding, not 2 digits
    (None, "5", False),
    ("", "5", False),
]


@pytest.mark.parametrize("response,expected", EXTRACTION)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("predicted,reference,expected", EQUIVALENCE)
def test_answers_match(predicted, reference, expected):
    assert answers_match(predicted, reference) is expected


def test_table_size():
    assert len(EXTRACTION) + len(EQUIVALENCE) >= 30


def test_normalize_answer_examples():
    assert normalize_answer(r"$\boxed{\dfrac{1}{2}}$") == r"\frac{1}{2}"
    assert normalize_answer(r"\text{\textbf{12}} apples.") == "12"
    assert normalize_answer("US$1,250.00") == "1250"


def test_score_math_response_end_to_end():
    assert score_math_response("Step 1\n\nStep 2\n\nThe answer is \\boxed{1,024}.", "1024") == ("1,024", True)
    assert score_math_response("I am not sure.", "7") == (None, False)
    assert score_math_response(r"\boxed{8}", "7") == ("8", False)


def test_works_off_the_main_thread():
    """math-verify's signal-based timeouts raise off the main thread; our wrapper must disable them there."""
    cases = [(p, r, e) for p, r, e in EQUIVALENCE if p] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: answers_match(c[0], c[1]), cases))
    assert results == [e for _, _, e in cases]

    seen = {}
    worker = threading.Thread(target=lambda: seen.update(ok=answers_match(r"\frac{6}{8}", "0.75")))
    worker.start()
    worker.join(60)
    assert seen == {"ok": True}


def test_main_thread_keeps_a_callers_alarm():
    """A timer armed by the caller (e.g. pytest-timeout) survives math-verify's own alarms."""
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert answers_match(r"\frac{1}{4}", "0.25")
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90.0 < remaining <= 100.0
        assert signal.getsignal(signal.SIGALRM) is not previous  # our handler is back
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired
