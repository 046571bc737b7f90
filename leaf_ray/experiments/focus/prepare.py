"""`leaf-ray bench focus --prepare`: a distractor-robust tiny teacher and a distractible tiny student, from scratch.

The recipe (all numbers are ``bench.focus.prepare.*`` in the config; defaults in ``leaf_ray/config.py``):

1. **Tokenizer.** One byte-level BPE (``leaf_ray.models.train_tiny_tokenizer``, ``vocab_size`` 512) trained on
   the ``prepare`` split's instructions (with distractors) and solutions, shared by both models, so they can
   be distilled into each other. Training data is tokenized by the tokenizer *as loaded back* from the saved
   model directory (``leaf_ray.models.load_tokenizer``): transformers rebuilds the pre-tokenizer from the
   model type on load (Qwen2's splits digits one by one), so that is what every later stage sees.
2. **Teacher** (Qwen2-style, ``teacher`` sizes: larger) trained on the ``prepare`` problems *with* their
   distractors (0-2 per problem): it learns to find the numbers that belong to the question. Curriculum: its
   first ``teacher_clean_steps`` steps use the clean view (the arithmetic is learnt much faster without
   distractors; trained with them from the start, a tiny teacher copied the right operands but added wrongly
   for hundreds of steps), the rest the problems with their distractors.
3. **Student** (``student`` sizes: smaller) trained on the *same* problems with the distractors left out
   (``clean_instruction``): it never sees a distractor, so it learns "copy the two numbers", which an
   inserted sentence with another number breaks.
4. Both: a plain torch loop, AdamW (weight decay 0.01), a one-cycle schedule (max lr ``lr``), batch
   ``batch_size``, the next-token cross-entropy on the **response tokens only** (the chat-rendered prompt is
   masked out, ``leaf_ray.data.chat.render(...).target_mask``), ``steps`` optimizer steps, fp32 on CPU.
5. Check: greedy answers on the ``validation`` split with and without its distractors (``prepare.json``
   records them). Models and tokenizer are saved with ``save_pretrained`` and loaded back through
   ``leaf_ray.models.load_model`` / ``load_tokenizer`` like any local model.

Measured with ``configs/bench-focus.yaml`` (teacher 192 x 2 layers, 0.93M parameters; student 128 x 2, 0.46M;
1500 steps, the teacher's first 500 clean), validation accuracy with / without distractors: teacher 74.5% /
100% (2 torch threads; 88.5% / 99.5% in a run with 1 thread: the thread count changes float sums and so the
trajectory), student 30.0% / 100% (29.5% / 100%): a robust teacher and a student that the distractors break.
On 2 idle cores: 154 s for the teacher, 74 s for the student.

The result is cached in ``<out_dir>/prepare.json`` keyed by the recipe and task settings: a rerun with the same
settings returns the saved models without training. The models of ``configs/demo.yaml``'s recipe ship in
``leaf_ray/experiments/focus/demo_models/`` (5.5 MB; made by this function, 2 torch threads: teacher 66.5% / 99.5%,
student 23.0% / 100% on 200 validation problems): ``make demo`` copies them instead of training, so its numbers
are the same on every machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from leaf_ray.config import FocusBenchConfig


@dataclass
class PreparedModels:
    teacher: Path
    student: Path
    info: dict  # prepare.json: recipe, losses, validation accuracies, seconds
    cached: bool = False


def _holds(directory: Path, key: str) -> bool:
    """Whether `directory` holds the teacher and student prepared with this key."""
    marker = directory / "prepare.json"
    with contextlib.suppress(OSError, ValueError):
        return (json.loads(marker.read_text()).get("key") == key and (directory / "teacher").is_dir()
                and (directory / "student").is_dir())
    return False


def prepare_key(focus: FocusBenchConfig) -> str:
    """What the prepared models depend on: the task (seed, numbers, prepare/validation sizes) and the recipe."""
    key = {"seed": focus.task_seed, "max_number": focus.max_number, "prepare_size": focus.sizes.prepare,
           "validation_size": focus.sizes.validation,
           # torch_threads too: it changes the float sums, hence the models; unset options leave the key as it
           # was before they existed (the shipped models' key)
           "recipe": {k: v for k, v in focus.prepare.model_dump().items() if v is not None}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# Models this recipe produced for configs/demo.yaml (key in its prepare.json), shipped so that `make demo` on a
# fresh clone does not spend ~15-30 min of 2 CPUs training them; any other recipe is trained on first use.
SHIPPED_DIR = Path(__file__).resolve().parent / "demo_models"


def prepare_models(focus: FocusBenchConfig, out_dir: str | Path, *, console: Console | None = None,
                   force: bool = False, shipped: Path | None = SHIPPED_DIR) -> PreparedModels:
    """Train (or reuse) `out_dir/teacher` and `out_dir/student` by the recipe in the module docstring.

    Reuse: `out_dir` already holds the models of this key, or `shipped` does, or the machine's cache
    (`focus.models_cache`/<key>) does (copied into `out_dir` first). Models trained here are put in that cache
    too, so another run directory (`--quick`, another run.name) does not train them again."""
    import torch

    from leaf_ray.config import ModelRef
    from leaf_ray.experiments.focus.task import clean_view, make_task
    from leaf_ray.models import load_tokenizer
    from leaf_ray.tiny_models import make_tiny_model, train_tiny_tokenizer

    out = Path(out_dir)
    marker = out / "prepare.json"
    key = prepare_key(focus)
    cache = Path(focus.models_cache).expanduser() / key if focus.models_cache else None
    for source, what in ((shipped, "the shipped ones of this recipe"), (cache, "this machine's cached ones")):
        if not force and not _holds(out, key) and source is not None and _holds(source, key):
            copy_whole(source, out)
            if console is not None:
                console.print(f"prepared models: {what} ({source}, key {key})", highlight=False)
    if marker.is_file() and not force and _holds(out, key):
        return PreparedModels(out / "teacher", out / "student", json.loads(marker.read_text()), cached=True)
    started = time.monotonic()
    say = console.print if console is not None else (lambda *a, **k: None)
    recipe = focus.prepare
    torch.set_num_threads(max(1, recipe.torch_threads))
    task = make_task(focus.sizes.model_dump(), seed=focus.task_seed, max_number=focus.max_number)
    prepare_rows = task["prepare"]
    texts = [r["instruction"] for r in prepare_rows] + [r["output"] for r in prepare_rows]
    tokenizer = train_tiny_tokenizer(recipe.vocab_size, seed_texts=texts)

    info: dict = {"key": key, "recipe": recipe.model_dump(), "task_seed": focus.task_seed,
                  "max_number": focus.max_number, "prepare_size": len(prepare_rows), "vocab": len(tokenizer)}
    roles = {"teacher": (prepare_rows, recipe.teacher.model_dump(), recipe.seed),
             "student": (clean_view(prepare_rows), recipe.student.model_dump(), recipe.seed + 1)}
    steps = {"teacher": recipe.teacher_steps or recipe.steps, "student": recipe.steps}
    first_steps = {"teacher": min(recipe.teacher_clean_steps, steps["teacher"]), "student": 0}
    for role, (rows, sizes, seed) in roles.items():
        t0 = time.monotonic()
        model = make_tiny_model(tokenizer, seed=seed, **sizes)
        # Train on the tokens every later stage sees: the tokenizer as loaded back from the saved directory.
        # (transformers rebuilds the pre-tokenizer from the model type on load, e.g. Qwen2 splits digits, so
        # the in-memory tokenizer can tokenize differently.)
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
        loaded = load_tokenizer(ModelRef(path=str(out / role)))
        examples = tokenize_examples(loaded, rows)
        first = tokenize_examples(loaded, clean_view(rows)) if first_steps[role] else None
        say(f"prepare {role}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"{len(examples)} problems{' (distractors removed)' if role == 'student' else ''}, "
            f"{steps[role]} steps" + (f" (the first {first_steps[role]} on the clean view)" if first_steps[role] else ""))
        losses = train_response_lm(model, examples, pad_id=tokenizer.pad_token_id, steps=steps[role],
                                   batch_size=recipe.batch_size, lr=recipe.lr, seed=seed,
                                   first_examples=first, first_steps=first_steps[role],
                                   log=lambda step, loss, role=role, t0=t0: say(
                                       f"  {role} step {step}: loss {loss:.3f} ({time.monotonic() - t0:.0f} s, "
                                       f"{time.process_time():.0f} s CPU)"),
                                   log_every=max(1, steps[role] // 5))
        model.save_pretrained(out / role)
        tokenizer.save_pretrained(out / role)
        info[role] = {"sizes": sizes, "parameters": sum(p.numel() for p in model.parameters()),
                      "final_loss": losses[-1], "seconds": round(time.monotonic() - t0, 1)}
    # The check goes through the same loading path as every later stage.
    for role in roles:
        acc = validation_accuracy(out / role, task["validation"], max_rows=recipe.check_size)
        info[role].update(acc)
        say(f"prepare {role}: validation accuracy {100 * acc['accuracy_distractors']:.1f}% with distractors, "
            f"{100 * acc['accuracy_clean']:.1f}% without")
    info["seconds"] = round(time.monotonic() - started, 1)
    marker.write_text(json.dumps(info, indent=2))
    if cache is not None:
        copy_whole(out, cache)
        say(f"prepared models cached for this machine in {cache}")
    return PreparedModels(out / "teacher", out / "student", info)


def copy_whole(source: Path, target: Path) -> None:
    """`target` becomes a copy of `source`, whole or absent: a copy cut short is not taken for the models."""
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def tokenize_examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per problem: labels = input id on response tokens, -100 elsewhere."""
    from leaf_ray.data.chat import render

    examples = []
    for r in rows:
        rendered = render(tokenizer, r["instruction"], r["output"])
        labels = [t if m else -100 for t, m in zip(rendered.input_ids, rendered.target_mask)]
        examples.append((rendered.input_ids, labels))
    return examples


def train_response_lm(model, examples: list[tuple[list[int], list[int]]], *, pad_id: int, steps: int,
                      batch_size: int, lr: float, seed: int, weight_decay: float = 0.01,
                      first_examples: list[tuple[list[int], list[int]]] | None = None, first_steps: int = 0,
                      log: Callable[[int, float], None] | None = None, log_every: int = 100) -> list[float]:
    """Plain torch training: shuffled epochs over `examples`, AdamW + OneCycleLR(max_lr=lr), gradient clip 1.0.
    Loss = mean cross-entropy over the label (response) tokens of the batch (HF shifts labels by one).
    Curriculum: the first `first_steps` of the `steps` draw from `first_examples` instead (one schedule).
    Returns the loss of every step."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # OneCycle needs >= 1 warm-up step (pct_start * total >= 2); smoke runs of < 20 steps use its first part.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 20),
                                                   pct_start=0.1)
    orders: dict[int, list[int]] = {}
    losses = []
    for step in range(1, steps + 1):
        pool = first_examples if first_examples is not None and step <= first_steps else examples
        order = orders.setdefault(id(pool), [])
        if len(order) < batch_size:
            fresh = list(range(len(pool)))
            rng.shuffle(fresh)
            order += fresh
        batch = [pool[i] for i in order[:batch_size]]
        del order[:batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (ids, lab) in enumerate(batch):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            labels[b, :len(lab)] = torch.tensor(lab)
            attention[b, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps):
            log(step, sum(losses[-log_every:]) / len(losses[-log_every:]))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss is {losses[-1]} at step {step}")
    model.eval()
    return losses


def greedy_answers(model_dir: str | Path, instructions: list[str], *, max_new_tokens: int = 24,
                   batch_size: int = 64) -> list[str]:
    """Greedy completions of `instructions` through the transformers generation backend (no Ray)."""
    from leaf_ray.config import GenerationConfig, ModelRef
    from leaf_ray.generate.backends import TransformersBackend

    backend = TransformersBackend(ModelRef(path=str(model_dir)),
                                  GenerationConfig(backend="transformers", max_new_tokens=max_new_tokens))
    out = []
    for i in range(0, len(instructions), batch_size):
        out += backend.generate(instructions[i:i + batch_size])
    return out


def accuracy(responses: list[str], answers: list[str]) -> float:
    from leaf_ray.evaluate.answers import answers_match, extract_answer

    right = 0
    for response, answer in zip(responses, answers):
        predicted = extract_answer(response)
        right += predicted is not None and answers_match(predicted, answer)
    return right / max(1, len(answers))


def validation_accuracy(model_dir: str | Path, rows: list[dict], max_rows: int | None = None) -> dict:
    rows = rows[:max_rows] if max_rows else rows
    answers = [r["answer"] for r in rows]
    return {
        "accuracy_distractors": accuracy(greedy_answers(model_dir, [r["instruction"] for r in rows]), answers),
        "accuracy_clean": accuracy(greedy_answers(model_dir, [r["clean_instruction"] for r in rows]), answers),
        "validation_rows": len(rows),
    }
