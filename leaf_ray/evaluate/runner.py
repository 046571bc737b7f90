"""Evaluation runner: generate for every configured benchmark, score, write predictions, log to MLflow.

For a model and a label (the variant: teacher, pre_kd, kd, leaf_instr, leaf_instr_resp, or any name):

1. load every benchmark (`load_benchmark`), wrap each problem in the configured math/code instruction;
2. generate all benchmarks' prompts in one pass of the generation actor pool (one model load);
3. score: math = extract the final answer + `answers_match`; code = run the program and tests in the sandbox
   (`evaluation.sandbox.workers` at once; a hostile or broken program is a failure with its reason, never a
   crash; where the sandbox is unisolated — hooks mode, only with `evaluation.sandbox.allow_unisolated` —
   each code row says so in the `unisolated` column and MLflow gets `eval.<benchmark>.unisolated`);
4. write `<run dir>/eval/<label>/<benchmark>.parquet` (one row per problem) and log, per benchmark,
   `eval.<benchmark>.accuracy` (= pass@1 for code, greedy) plus `.correct`/`.n` to MLflow, with the Parquet
   files as artifacts under `eval/<label>/`. Logged on `mlflow_run_id` when given (e.g. the distillation
   run), else on a new run tagged `leaf_ray.variant=<label>`, `leaf_ray.stage=evaluate`.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leaf_ray.config import BenchmarkRef, EvaluationConfig, LeafConfig, ModelRef
from leaf_ray.evaluate.compare import BENCHMARKS_TAG, VARIANT_TAG
from leaf_ray.store import RunDir

STAGE_TAG = "leaf_ray.stage"
_NAME_RE = re.compile(r"^[\w.\- ]+$")  # what MLflow accepts in a metric name (and safe as a file name)


class EvaluationError(ValueError):
    pass


@dataclass
class BenchmarkResult:
    name: str
    kind: str
    n: int
    correct: int
    predictions_path: str
    statuses: dict[str, int] = field(default_factory=dict)
    unisolated: int = 0  # code verdicts given by the unisolated (hooks) sandbox

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class EvalResult:
    label: str
    model_path: str
    run_id: str | None
    benchmarks: list[BenchmarkResult]

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.benchmarks:
            out[f"eval.{b.name}.accuracy"] = b.accuracy
            out[f"eval.{b.name}.correct"] = float(b.correct)
            out[f"eval.{b.name}.n"] = float(b.n)
            if b.kind == "code":
                out[f"eval.{b.name}.pass_at_1"] = b.accuracy
                out[f"eval.{b.name}.unisolated"] = float(b.unisolated)
        for kind in sorted({b.kind for b in self.benchmarks}):
            # Not `eval.<x>.accuracy`: `compare` would read it as a benchmark.
            out[f"eval_avg.{kind}.accuracy"] = statistics.fmean(b.accuracy for b in self.benchmarks
                                                                if b.kind == kind)
        return out

    def print(self, console) -> None:
        from rich.table import Table

        table = Table(title=f"evaluation of {self.label!r} ({self.model_path})")
        for col in ("benchmark", "kind", "n", "correct", "accuracy", "failures"):
            table.add_column(col, justify="right" if col in ("n", "correct", "accuracy") else "left")
        for b in self.benchmarks:
            failures = ", ".join(f"{s}: {n}" for s, n in sorted(b.statuses.items()) if s != "passed")
            if b.unisolated:
                failures += f" [{b.unisolated} verdicts UNISOLATED (hooks sandbox)]"
            table.add_row(b.name, b.kind, str(b.n), str(b.correct), f"{100 * b.accuracy:.1f}%", failures)
        console.print(table)
        if self.run_id:
            console.print(f"MLflow run: {self.run_id}")


def instruction_for(record: dict, evaluation: EvaluationConfig) -> str:
    template = evaluation.code_instruction if record["kind"] == "code" else evaluation.math_instruction
    return template.replace("{prompt}", record["prompt"])


def score_records(records: list[dict], completions: list[str], evaluation: EvaluationConfig) -> list:
    """`Score` per record. Math runs on this thread (math-verify's timeouts need the main thread); code
    runs `sandbox.workers` sandboxes at once (each is its own subprocess)."""
    from leaf_ray.evaluate.benchmarks import score_response

    limits: dict[str, Any] = evaluation.sandbox.limits()
    scores: list[Any] = [None] * len(records)
    code_idx = [i for i, r in enumerate(records) if r["kind"] == "code"]
    for i, record in enumerate(records):
        if record["kind"] != "code":
            scores[i] = score_response(record, completions[i])
    if code_idx:
        with ThreadPoolExecutor(max_workers=evaluation.sandbox.workers) as pool:
            futures = {i: pool.submit(score_response, records[i], completions[i], **limits) for i in code_idx}
            for i, fut in futures.items():
                scores[i] = fut.result()
    return scores


def predictions_table(bench: BenchmarkRef, records: list[dict], instructions: list[str],
                      completions: list[str], scores: list):
    import pyarrow as pa

    def reference_text(ref: Any) -> str:
        return ref if isinstance(ref, str) else json.dumps(ref, ensure_ascii=False, default=str)

    return pa.table({
        "id": pa.array([str(r["id"]) for r in records], pa.string()),
        "benchmark": pa.array([bench.name] * len(records), pa.string()),
        "kind": pa.array([r["kind"] for r in records], pa.string()),
        "instruction": pa.array(instructions, pa.string()),
        "completion": pa.array(completions, pa.string()),
        "predicted": pa.array([s.predicted for s in scores], pa.string()),
        "reference": pa.array([reference_text(r["reference"]) for r in records], pa.string()),
        "correct": pa.array([bool(s.correct) for s in scores], pa.bool_()),
        "status": pa.array([s.status for s in scores], pa.string()),
        "reason": pa.array([s.reason for s in scores], pa.string()),
        "duration_s": pa.array([float(s.duration_s) for s in scores], pa.float64()),
        "unisolated": pa.array([s.unisolated for s in scores], pa.bool_()),
    })


def _check_names(benchmarks: list[BenchmarkRef], label: str) -> None:
    if not benchmarks:
        raise EvaluationError("evaluation.benchmarks is empty: nothing to evaluate")
    names = [b.name for b in benchmarks]
    for name in names + [label]:
        if not _NAME_RE.match(name):
            raise EvaluationError(f"benchmark/label name {name!r}: use letters, digits, '_', '-', '.', ' ' only "
                                  "(it becomes an MLflow metric name and a file name)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationError(f"evaluation.benchmarks: duplicate name(s) {duplicates}")


def run_evaluation(cfg: LeafConfig, model_ref: ModelRef, *, label: str,
                   mlflow_run_id: str | None = None, console=None) -> EvalResult:
    """Evaluate `model_ref` on `cfg.evaluation.benchmarks` (steps in the module docstring)."""
    import pyarrow.parquet as pq

    from leaf_ray.evaluate.benchmarks import load_benchmark
    from leaf_ray.generate.pipeline import generate_rows

    evaluation = cfg.evaluation
    _check_names(evaluation.benchmarks, label)
    loaded = []
    for bench in evaluation.benchmarks:
        records = load_benchmark(bench)
        if not records:
            raise EvaluationError(f"benchmark {bench.name!r} has no records")
        loaded.append((bench, records, [instruction_for(r, evaluation) for r in records]))

    all_instructions = [ins for _, _, instructions in loaded for ins in instructions]
    all_completions = generate_rows(cfg, model_ref, all_instructions, console=console, label=f"evaluate [{label}]")

    out_dir = RunDir.of(cfg).eval(label)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, start = [], 0
    for bench, records, instructions in loaded:
        completions = all_completions[start:start + len(records)]
        start += len(records)
        scores = score_records(records, completions, evaluation)
        path = out_dir / f"{bench.name}.parquet"
        pq.write_table(predictions_table(bench, records, instructions, completions, scores), path)
        statuses: dict[str, int] = {}
        for s in scores:
            statuses[s.status] = statuses.get(s.status, 0) + 1
        results.append(BenchmarkResult(bench.name, bench.kind, len(records), sum(bool(s.correct) for s in scores),
                                       str(path), statuses, sum(s.unisolated for s in scores)))

    result = EvalResult(label, model_ref.path, None, results)
    if cfg.tracking.enabled:
        result.run_id = log_evaluation(cfg, result, mlflow_run_id)
    return result


def log_evaluation(cfg: LeafConfig, result: EvalResult, run_id: str | None) -> str:
    """Metrics, tags and prediction artifacts on `run_id`, or on a new evaluation run; returns the run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from leaf_ray.tracking import setup_mlflow, tracking_uri

    setup_mlflow(cfg)
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    new_run = run_id is None
    if new_run:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        run = client.create_run(exp.experiment_id, run_name=f"eval-{result.label}",
                                tags={VARIANT_TAG: result.label, STAGE_TAG: "evaluate"})
        run_id = run.info.run_id
    else:
        run = client.get_run(run_id)  # raises naming the id when it does not exist
        if VARIANT_TAG not in run.data.tags:
            client.set_tag(run_id, VARIANT_TAG, result.label)
    try:
        # Benchmark order and domain for `compare`; merged with what earlier evaluations of this run logged.
        kinds = json.loads(client.get_run(run_id).data.tags.get(BENCHMARKS_TAG, "[]"))
        known = {name for name, _ in kinds}
        kinds += [[b.name, b.kind] for b in result.benchmarks if b.name not in known]
        tags = [RunTag(BENCHMARKS_TAG, json.dumps(kinds)), RunTag("leaf_ray.eval.model_path", result.model_path),
                RunTag("leaf_ray.eval.label", result.label)]
        params = []
        if new_run:
            g = cfg.generation
            params = [Param(k, str(v)) for k, v in {
                "model_path": result.model_path, "label": result.label, "generation.backend": g.backend,
                "generation.max_new_tokens": g.max_new_tokens, "generation.temperature": g.temperature,
                "benchmarks": ",".join(b.name for b in result.benchmarks)}.items()]
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in result.metrics().items()]
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        for b in result.benchmarks:
            client.log_artifact(run_id, b.predictions_path, artifact_path=f"eval/{result.label}")
    except Exception:
        if new_run:
            client.set_terminated(run_id, status="FAILED")
        raise
    if new_run:
        client.set_terminated(run_id)
    return run_id


def default_label(cfg: LeafConfig, model_path: str) -> str:
    """`teacher` / `pre_kd` for the configured teacher / student, else the model directory's name."""
    p = Path(model_path).resolve()
    if p == Path(cfg.models.teacher.path).resolve():
        return "teacher"
    if p == Path(cfg.models.student.path).resolve():
        return "pre_kd"
    return re.sub(r"[^\w.\-]", "_", p.name) or "model"
