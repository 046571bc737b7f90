"""A task family whose confounders are known by construction (in the spirit of GSM-IC / GSM-NoOp).

Each problem is a one-step arithmetic word problem ("Ann has 7 pens. She buys 3 more pens. How many pens
does Ann have now?") into which *distractor sentences* are inserted: sentences that carry an irrelevant
number and another person or object ("Bob owns 9 cups.", "Bob is 6 years old."). The answer never depends on
them. Every distractor's character span ``[start, end)`` in the instruction is recorded
(``instruction[start:end]`` is exactly the distractor sentence, without the separating space), and
``clean_instruction`` is the same problem with the distractors left out, so

- a detector's confounder tokens can be scored against ground truth (``leaf_ray.analysis.detection_quality``),
- a student's accuracy can be compared with and without distractors on the very same problems.

Distractors are inserted at a random sentence boundary before the question, so a model that learned "the
first number, then the second number" from clean problems copies the wrong numbers: that is what makes a
student trained on clean problems distractible, and a teacher trained with distractors robust.

The solution has two blank-line separated steps (``"7 + 3 = 10"`` then ``"The answer is \\boxed{10}."``), so
the response level ("Instr & Resp") has a prefix to score.

Splits (:func:`make_task`): ``prepare`` (0-2 distractors per problem: the from-scratch training set; the teacher
trains on it as it is, the student on its ``clean_instruction`` view), ``train`` (0-2 distractors: the corpus
that is ingested, scored by detection and distilled on), ``validation`` (1-2 distractors: checks the prepared
models) and ``test`` (1-2 distractors, held out: the accuracy and attention measurements). Each split has its
own seed derived from the task seed, and the splits are disjoint by clean instruction (a problem an earlier
split holds is drawn again), so no held-out problem was ever trained on, with or without distractors.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

NAMES = ["Ann", "Bob", "Cara", "Dan", "Eva", "Finn", "Gia", "Hal", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned",
         "Ola", "Pat", "Rex", "Sam", "Tia", "Uma"]
OBJECTS = ["apples", "pens", "cards", "books", "shells", "coins", "stamps", "beads", "rocks", "cups",
           "hats", "kites", "eggs", "nuts", "pins", "toys"]
ADD_TEMPLATES = [
    "{name} has {a} {obj}. {pron} buys {b} more {obj}.",
    "{name} has {a} {obj}. {pron} finds {b} more {obj}.",
    "{name} has {a} {obj}. A friend gives {pron_obj} {b} more {obj}.",
]
SUB_TEMPLATES = [
    "{name} has {a} {obj}. {pron} gives away {b} {obj}.",
    "{name} has {a} {obj}. {pron} loses {b} {obj}.",
    "{name} has {a} {obj}. {pron} sells {b} {obj}.",
]
# Irrelevant facts with a number: another person or another object, never the question's entity. Their verbs
# differ from the problem's (has / buys / finds / gives / loses / sells), so "the number after `has`" and "the
# number after the change verb" identify the operands for a model that reads the sentence, while a model
# that learned "the first number, then the second" from clean problems copies the distractor's.
DISTRACTOR_TEMPLATES = [
    "{other} is {n} years old.",
    "{other} walked {n} miles today.",
    "There are {n} {obj2} on the table.",
    "{other} owns {n} {obj2}.",
    "{other} reads {n} pages a day.",
]
QUESTION = "How many {obj} does {name} have now?"

# Per-split seed offsets from the task seed: the splits are independent streams.
SPLIT_SEED_OFFSETS = {"prepare": 3_000, "train": 0, "validation": 1_000, "test": 2_000}
SPLIT_DISTRACTORS = {"prepare": (0, 1, 2), "train": (0, 1, 2), "validation": (1, 2), "test": (1, 2)}
SPLIT_ORDER = ("prepare", "train", "validation", "test")


@dataclass
class FocusProblem:
    id: str
    instruction: str
    output: str
    answer: str
    distractor_spans: list[list[int]] = field(default_factory=list)  # [[char_start, char_end), ...]
    clean_instruction: str = ""  # the same problem without its distractor sentences

    def to_row(self) -> dict:
        return asdict(self)


def make_problem(rng: random.Random, idx: int, prefix: str, num_distractors: int, max_number: int = 20
                 ) -> FocusProblem:
    """One problem: `a + b` or `a - b` (numbers in 1..max_number, differences >= 1) with `num_distractors`
    distractor sentences (numbers in 1..max_number too, so their value never gives them away)."""
    if max_number < 2:
        raise ValueError(f"max_number must be >= 2, got {max_number}")
    name, other = rng.sample(NAMES, 2)
    obj, obj2 = rng.sample(OBJECTS, 2)
    pron, pron_obj = rng.choice([("She", "her"), ("He", "him")])
    if rng.random() < 0.5:
        a, b = rng.randint(1, max_number), rng.randint(1, max_number)
        body, op, ans = rng.choice(ADD_TEMPLATES), "+", a + b
    else:
        a = rng.randint(2, max_number)
        b = rng.randint(1, a - 1)
        body, op, ans = rng.choice(SUB_TEMPLATES), "-", a - b
    sentences = body.format(name=name, a=a, b=b, obj=obj, pron=pron, pron_obj=pron_obj).split(". ")
    sentences = [s if s.endswith(".") else s + "." for s in sentences]
    distractors = [rng.choice(DISTRACTOR_TEMPLATES).format(other=other, n=rng.randint(1, max_number), obj2=obj2)
                   for _ in range(num_distractors)]
    # Insert each distractor at a random sentence boundary before the question.
    tagged = [(s, False) for s in sentences]
    for d in distractors:
        tagged.insert(rng.randint(0, len(tagged)), (d, True))
    question = QUESTION.format(obj=obj, name=name)
    tagged.append((question, False))
    text, spans = "", []
    for sentence, is_distractor in tagged:
        if text:
            text += " "
        if is_distractor:
            spans.append([len(text), len(text) + len(sentence)])
        text += sentence
    output = f"{a} {op} {b} = {ans}\n\nThe answer is \\boxed{{{ans}}}."
    return FocusProblem(id=f"{prefix}-{idx}", instruction=text, output=output, answer=str(ans),
                        distractor_spans=spans, clean_instruction=" ".join(sentences + [question]))


def make_split(size: int, seed: int, prefix: str, distractor_counts: tuple[int, ...] = (0, 1, 2),
               max_number: int = 20, exclude_clean: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """`size` problems; the number of distractors per problem is drawn uniformly from distractor_counts.
    A problem whose clean instruction is in `exclude_clean` (or already in this split) is drawn again."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude_clean)
    while len(rows) < size:
        problem = make_problem(rng, len(rows), prefix, rng.choice(distractor_counts), max_number)
        if problem.clean_instruction in seen:
            continue
        seen.add(problem.clean_instruction)
        rows.append(problem.to_row())
    return rows


def make_task(sizes: dict[str, int], seed: int = 0, max_number: int = 20) -> dict[str, list[dict]]:
    """The splits named in `sizes` ({"prepare", "train", "validation", "test"}, any subset), each from its
    own seed, pairwise disjoint by clean instruction.

    Disjointness is enforced in the fixed order prepare -> train -> validation -> test (a later split redraws
    a problem an earlier one holds), whatever subset is asked for, so a split's content depends only on the
    seed and the sizes of the splits before it in that order."""
    unknown = set(sizes) - set(SPLIT_ORDER)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {list(SPLIT_ORDER)}")
    task: dict[str, list[dict]] = {}
    taken: set[str] = set()
    for split in SPLIT_ORDER:
        if split not in sizes:
            continue
        rows = make_split(sizes[split], seed + SPLIT_SEED_OFFSETS[split], f"focus-{split}",
                          SPLIT_DISTRACTORS[split], max_number, exclude_clean=frozenset(taken))
        taken |= {r["clean_instruction"] for r in rows}
        task[split] = rows
    return task


def clean_view(rows: list[dict]) -> list[dict]:
    """The same problems with their distractors left out (no spans)."""
    return [{**r, "id": f"{r['id']}-clean", "instruction": r["clean_instruction"], "distractor_spans": []}
            for r in rows]


def write_jsonl(rows: list[dict], path: str | Path, fields: tuple[str, ...] | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in fields} if fields else row, ensure_ascii=False) + "\n")
    return p


def write_gsm8k_jsonl(rows: list[dict], path: str | Path) -> Path:
    """The problems in GSM8K's layout (`question`, `answer` = worked solution ending `#### N`), which the
    evaluation's local `gsm8k` benchmark format reads."""
    return write_jsonl([{"id": r["id"], "question": r["instruction"], "answer": f"{r['output']}\n#### {r['answer']}"}
                        for r in rows], path)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
