"""`leaf-ray` command line. Every verb takes `--config FILE` and repeated `--set dotted.key=value`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from leaf_ray.config import ConfigError, LeafConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LeaF confounder detection and causal attention distillation on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the resolved configuration.")
models_app = typer.Typer(no_args_is_help=True, help="Build and check models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print side-by-side ratios.")
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: dotted.key=value (repeatable).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own logs, warnings and progress "
                                          "bars here (by default they go to <run dir>/logs/ray.log).")]


@app.callback()
def main(verbose: VerboseOpt = False) -> None:
    """LeaF confounder detection and causal attention distillation on Ray."""
    if not verbose:
        from leaf_ray import console as quiet

        quiet.enable()


def resolve(config: str | None, overrides: list[str] | None) -> LeafConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
        raise typer.Exit(2) from None


# --------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (defaults + file + overrides) as YAML."""
    cfg = resolve(config, set_)
    sys.stdout.write(cfg.to_yaml())


@config_app.command("reference")
def config_reference() -> None:
    """Print the config reference (Markdown table) generated from the pydantic models."""
    from leaf_ray.docs import config_reference_markdown

    sys.stdout.write(config_reference_markdown())


# --------------------------------------------------------------------------- models


@models_app.command("make-tiny")
def models_make_tiny(
    out_dir: Annotated[str, typer.Argument(help="Directory for teacher/ and student/.")],
    arch: Annotated[str, typer.Option(help="qwen2 | llama")] = "qwen2",
    seed: int = 0,
) -> None:
    """Build a tiny teacher and a smaller student sharing one offline-trained tokenizer."""
    from leaf_ray.tiny_models import make_tiny_pair

    paths = make_tiny_pair(out_dir, arch=arch, seed=seed)
    for role, p in paths.items():
        console.print(f"{role}: {p}")


@models_app.command("check")
def models_check(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Load teacher and student from their local paths and check they can be distilled together."""
    from leaf_ray.models import (
        ModelCompatibilityError,
        ModelLoadError,
        check_pair,
        model_config,
        vocab_size_of,
    )

    cfg = resolve(config, set_)
    try:
        n_tokens = check_pair(cfg.models)
        t_vocab, s_vocab = (vocab_size_of(model_config(ref)) for ref in (cfg.models.teacher, cfg.models.student))
    except (ModelLoadError, ModelCompatibilityError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    console.print(f"[green]ok[/green]: teacher vocab {t_vocab}, student vocab {s_vocab}, tokenizer {n_tokens} tokens "
                  "(logits are cut to the tokenizer's length)")


# --------------------------------------------------------------------------- stages


@app.command()
def ingest(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Read and validate the corpus; write `clean/` and `quarantine/` Parquet under the run directory."""
    from leaf_ray.data.ingest import IngestError, run_ingest

    cfg = resolve(config, set_)
    try:
        report = run_ingest(cfg)
    except IngestError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    report.print(console)


@app.command()
def detect(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Stage 1: gradient-based confounder detection and span-pruned counterfactuals (Ray Data)."""
    from leaf_ray.detect.pipeline import DetectionError, run_detection
    from leaf_ray.models import ModelLoadError

    cfg = resolve(config, set_)
    try:
        report = run_detection(cfg, console=console)
    except (DetectionError, ModelLoadError, OSError) as e:  # OSError: a read-only or full run directory
        from rich.markup import escape

        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    report.print(console)


@app.command()
def distill(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    variant: Annotated[Optional[str], typer.Option(
        help="kd (KD w/o mask) | leaf_instr | leaf_instr_resp. Default: leaf_instr, or kd when "
             "distill.use_counterfactuals is false.")] = None,
    parent_run_id: Annotated[Optional[str], typer.Option(help="MLflow run to nest this run under.")] = None,
) -> None:
    """Stage 2: hybrid-KL distillation on Ray Train + DeepSpeed, tracked in MLflow."""
    from leaf_ray.distill.data import DistillDataError
    from leaf_ray.distill.driver import run_distillation
    from leaf_ray.models import ModelCompatibilityError, ModelLoadError
    from leaf_ray.tracking import TrackingError

    cfg = resolve(config, set_)
    try:
        result = run_distillation(cfg, variant=variant, console=console, parent_run_id=parent_run_id)
    except (DistillDataError, ModelLoadError, ModelCompatibilityError, TrackingError, OSError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    console.print(f"[green]done[/green]: {result.steps} steps, best validation loss {result.best_val_loss} "
                  f"(step {result.best_step})")
    console.print(f"model:      {result.export_dir}", highlight=False)
    if result.mlflow_run_id:
        console.print(f"MLflow run: {result.mlflow_run_id}", highlight=False)


@app.command()
def generate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Teacher responses for `data/clean` (vLLM or transformers, Ray Data actor pool), kept only where the
    final answer matches the reference; written to `<run dir>/generate/teacher_responses/`."""
    from leaf_ray.evaluate.teacher_responses import generate_teacher_responses
    from leaf_ray.generate.backends import GenerationError
    from leaf_ray.models import ModelLoadError

    cfg = resolve(config, set_)
    try:
        report = generate_teacher_responses(cfg)
    except (FileNotFoundError, GenerationError, ModelLoadError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    report.print(console)


@app.command()
def evaluate(
    config: ConfigOpt = None, set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="Model directory (default: the configured student).")] = None,
    label: Annotated[str | None, typer.Option(
        help="Variant label (teacher, pre_kd, kd, leaf_instr, leaf_instr_resp, ...); default from the model.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Log on this MLflow run instead of a new one.")] = None,
) -> None:
    """Evaluate a model on the configured math/code benchmarks; predictions as Parquet, metrics to MLflow."""
    from leaf_ray.config import ModelRef
    from leaf_ray.evaluate.benchmarks import BenchmarkError
    from leaf_ray.evaluate.runner import EvaluationError, default_label, run_evaluation
    from leaf_ray.generate.backends import GenerationError
    from leaf_ray.models import ModelLoadError

    cfg = resolve(config, set_)
    if model is None:
        model_ref = cfg.models.student
    elif model == cfg.models.teacher.path:
        model_ref = cfg.models.teacher
    else:
        model_ref = ModelRef(path=model, dtype=cfg.models.student.dtype)
    try:
        result = run_evaluation(cfg, model_ref, label=label or default_label(cfg, model_ref.path),
                                mlflow_run_id=run_id, console=console)
    except (BenchmarkError, EvaluationError, GenerationError, ModelLoadError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    result.print(console)


@app.command()
def compare(
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: tracking.experiment).")] = None,
    config: ConfigOpt = None, set_: SetOpt = None,
    markdown: Annotated[str | None, typer.Option("--markdown", help="Also write the table as Markdown.")] = None,
    csv_out: Annotated[str | None, typer.Option("--csv", help="Also write the table as CSV.")] = None,
) -> None:
    """Print the paper-shaped comparison table (variants x benchmarks + domain averages) from MLflow runs."""
    from pathlib import Path

    from leaf_ray.evaluate.compare import CompareError, compare_experiment
    from leaf_ray.tracking import tracking_uri

    cfg = resolve(config, set_)
    try:
        table = compare_experiment(tracking_uri(cfg), experiment or cfg.tracking.experiment)
    except CompareError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    console.print(table.to_rich())
    for path, text in ((markdown, table.to_markdown), (csv_out, table.to_csv)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text(), encoding="utf-8")
            console.print(f"wrote {path}")


ManifestOpt = Annotated[str, typer.Option(help="KubeRay RayCluster manifest giving the worker groups (GPUs and "
                                          "host memory per pod).")]


def _plan(cfg: LeafConfig, manifest: str, gpu_mem_gb: float, bandwidth_gbps: float, gpu_tflops: float,
          mfu: float, samples: int | None, mean_tokens: int | None, strict: bool, markdown: bool = False) -> None:
    from leaf_ray.plan import GIB, PlanError, cluster_from_manifest, plan, render

    try:
        cluster = cluster_from_manifest(manifest, gpu_mem_bytes=gpu_mem_gb * GIB, bandwidth_gbps=bandwidth_gbps,
                                        gpu_tflops=gpu_tflops, mfu=mfu)
        plans = plan(cfg, cluster, samples=samples, mean_tokens=mean_tokens)
    except (PlanError, OSError) as e:
        err_console.print(f"[red]plan: {e}[/red]")
        raise typer.Exit(2) from None
    render(plans, console, markdown=markdown)
    misfits = [p for p in plans if not p.fits]
    if strict and misfits:
        for p in misfits:
            err_console.print(f"[red]{p.stage} / {p.rank} does not fit ({p.gpu_total / GIB:.1f} GiB of "
                              f"{p.gpu_budget / GIB:.1f} GiB GPU, {p.host_load / GIB:.1f} GiB of "
                              f"{p.host_budget / GIB:.0f} GiB host): change {p.fix}[/red]")
        raise typer.Exit(1)


@app.command("plan")
def plan_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    manifest: ManifestOpt = "kuberay/raycluster.yaml",
    gpu_mem_gb: Annotated[float, typer.Option(help="Memory of one GPU, GiB.")] = 80.0,
    bandwidth_gbps: Annotated[float, typer.Option(help="Intra-node all-gather bandwidth per GPU, GB/s.")] = 300.0,
    gpu_tflops: Annotated[float, typer.Option(help="Dense peak of one GPU in the stage dtype, TFLOP/s.")] = 989.0,
    mfu: Annotated[float, typer.Option(help="Assumed model FLOPs utilisation.")] = 0.4,
    samples: Annotated[Optional[int], typer.Option(help="Training records (for the run's time).")] = None,
    mean_tokens: Annotated[Optional[int], typer.Option(help="Mean tokens per record (default max_length/2).")] =
        None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when a stage does not fit.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as Markdown (for docs).")] = False,
) -> None:
    """Per stage and rank kind: GPU memory (weights, gathered blocks, activations, optimizer, logits, vLLM),
    host memory at load, time at the stated MFU, and whether it fits (docs/large-teachers.md)."""
    _plan(resolve(config, set_), manifest, gpu_mem_gb, bandwidth_gbps, gpu_tflops, mfu, samples, mean_tokens,
          strict, markdown)


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None,
        plan_first: Annotated[bool, typer.Option("--plan", help="First `leaf-ray plan --strict` (default cluster "
                                                 "shape): a config that does not fit stops before any work.")]
        = False) -> None:
    """The whole chain: detection -> counterfactuals -> distillation -> evaluation (resumes on rerun)."""
    from leaf_ray.pipeline import run_pipeline

    cfg = resolve(config, set_)
    if plan_first:
        _plan(cfg, "kuberay/raycluster.yaml", 80.0, 300.0, 989.0, 0.4, None, None, strict=True)
    result = run_pipeline(cfg, console)
    console.print(f"outputs: {result.run_dir}")


@app.command()
def demo(config: ConfigOpt = None, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """LeaF on the controlled focus task (configs/demo.yaml): tables, heatmaps, report.html, MLflow."""
    from leaf_ray import console as quiet
    from leaf_ray.experiments.focus.demo import run_demo

    if verbose:
        quiet.disable()
    cfg = resolve(config or "configs/demo.yaml", set_)
    raise typer.Exit(run_demo(cfg, console))


@app.command()
def report(run_dir: Annotated[str, typer.Option("--run", help="Run directory (e.g. runs/focus-demo).")],
           out: Annotated[str | None, typer.Option("--out", help="HTML file (default <run>/report.html).")] = None,
           ) -> None:
    """Write the run's static HTML report: comparison, detection quality, heatmaps, Δ distribution, losses."""
    from pathlib import Path

    from leaf_ray.experiments.focus.report import ReportError, write_run_report

    try:
        path = write_run_report(Path(run_dir), out=Path(out) if out else None)
    except ReportError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"report: {path}", highlight=False, soft_wrap=True)


@app.command()
def inspect(run_dir: Annotated[str, typer.Option("--run", help="Run directory.")],
            sample_id: Annotated[str, typer.Argument()]) -> None:
    """Coloured terminal view of one sample's Δ scores and counterfactuals."""
    from leaf_ray.analysis.heatmap import read_sample, rich_view, truth_spans_of

    try:
        rows, counterfactuals = read_sample(run_dir, sample_id)
    except (FileNotFoundError, KeyError) as e:
        from rich.markup import escape

        err_console.print(f"[red]error:[/red] {escape(str(e.args[0] if isinstance(e, KeyError) else e))}",
                          highlight=False)
        raise typer.Exit(1) from None
    truth = truth_spans_of(run_dir, sample_id)
    for row in rows:
        console.print(rich_view(row, [c for c in counterfactuals if c["scope"] == row["scope"]],
                                truth if row["scope"] == "instruction" else ()))
        console.print()


@bench_app.command("detect")
def bench_detect(
    config: ConfigOpt = None, set_: SetOpt = None,
    samples: Annotated[int, typer.Option(help="Instructions scored by every method.")] = 32,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (default: student_pool's).")] = None,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds (fresh processes); the fastest is kept.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed repeats inside each round's process.")] = 1,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all CPUs).")] = None,
    pairs: Annotated[str, typer.Option(help="Comma-separated: tiny, larger.")] = "tiny,larger",
    pipeline: Annotated[bool, typer.Option(help="Also time run_detection end to end on a local Ray.")] = True,
    small_job: Annotated[bool, typer.Option(help="Also time `leaf-ray ingest` + `detect` as commands against "
                                                 "the naive loop as one whole process.")] = True,
) -> None:
    """This pipeline vs a naive per-sample loop mirroring the reference release."""
    from leaf_ray.bench.detect import run_bench

    cfg = resolve(config, set_)
    chosen = tuple(p.strip() for p in pairs.split(",") if p.strip())
    unknown = [p for p in chosen if p not in ("tiny", "larger")]
    if unknown or not chosen:
        err_console.print(f"[red]error:[/red] --pairs: unknown pair(s) {unknown}; choose from tiny, larger")
        raise typer.Exit(2)
    run_bench(cfg, console, samples=samples, batch_size=batch_size, rounds=rounds, repeats=repeats,
              threads=threads, pairs=chosen, pipeline=pipeline, small_job=small_job)


@bench_app.command("ingest")
def bench_ingest(
    config: ConfigOpt = None, set_: SetOpt = None,
    records: Annotated[int, typer.Option(help="JSONL records in the generated corpus.")] = 100_000,
) -> None:
    """Records/s of `leaf-ray ingest` on a large corpus vs a plain Python loop doing the same checks."""
    from leaf_ray.bench.ingest import run_ingest_bench

    run_ingest_bench(resolve(config, set_), console, records=records)


@bench_app.command("sandbox")
def bench_sandbox(
    problems: Annotated[int, typer.Option(help="HumanEval canonical solutions judged by each sandbox.")] = 40,
    workers: Annotated[int, typer.Option(help="Programs at once in the throughput pass.")] = 4,
    baseline_rev: Annotated[str, typer.Option(help="Git revision whose sandbox is the baseline.")] = "cc36edc",
) -> None:
    """Cost per program of the code sandbox vs a baseline revision's (issue 24: within 1.5x)."""
    from leaf_ray.bench.sandbox import run_sandbox_bench

    run_sandbox_bench(console, problems=problems, workers=workers, baseline_rev=baseline_rev)


@bench_app.command("topk")
def bench_topk(
    config: ConfigOpt = None, set_: SetOpt = None,
    rows: Annotated[int, typer.Option(help="Training rows both engines score.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Rows per transformers forward.")] = 8,
) -> None:
    """Teacher target tokens/s building the top-k cache: transformers forward vs vLLM prompt log-probs."""
    from leaf_ray.bench.topk import run_topk_bench

    config_args = (["--config", config] if config else []) + [a for s in (set_ or []) for a in ("--set", s)]
    run_topk_bench(resolve(config, set_), console, rows=rows, batch_size=batch_size, config_args=config_args)


@bench_app.command("distill")
def bench_distill(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    steps: Annotated[int, typer.Option(help="Timed optimizer steps per loop (after warm-up).")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps per loop.")] = 2,
    memory: Annotated[bool, typer.Option(help="Also run the loss peak-memory bench (vocab 32k, seq 2k).")] = True,
    threads: Annotated[int, typer.Option(
        help="torch threads: 1 = what a Ray Train worker with fractional CPUs runs with (more threads make "
             "tiny-model timings erratic on a busy machine).")] = 1,
) -> None:
    """This trainer's tokens/s and chunked-loss memory vs the reference-style loop."""
    from leaf_ray.bench.distill import run_distill_bench

    cfg = resolve(config, set_)
    run_distill_bench(cfg, console, steps=steps, warmup=warmup, memory=memory, threads=threads)


@bench_app.command("load")
def bench_load(
    ranks: Annotated[str, typer.Option(help="Comma-separated rank counts.")] = "2,4",
    modes: Annotated[str, typer.Option(help="Comma-separated: gang, zero3-teacher, zero3-student.")] =
        "gang,zero3-teacher,zero3-student",
    out: Annotated[Optional[str], typer.Option(help="Directory for the random model (reused if there) and "
                                               "bench-load.json; default a new temporary directory.")] = None,
) -> None:
    """Host memory and checkpoint bytes per rank of loading a 484 MB random Llama on N ranks (CPU, gloo):
    every rank from_pretrained (today) beside each rank reading only its own slices (partitioned)."""
    from leaf_ray.bench.load import MODES, run_load_bench

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if bad := [m for m in mode_list if m not in MODES]:
        err_console.print(f"[red]--modes: unknown {bad}; known: {', '.join(MODES)}[/red]")
        raise typer.Exit(2)
    try:
        rank_list = [int(r) for r in ranks.split(",")]
    except ValueError:
        err_console.print(f"[red]--ranks: {ranks!r} is not a comma-separated list of integers[/red]")
        raise typer.Exit(2) from None
    rows = run_load_bench(console, ranks=rank_list, modes=mode_list, out_dir=out)
    missed = [r for r in rows if r["way"] == "partitioned" and not r["meets"]]
    if missed:
        raise typer.Exit(1)


@bench_app.command("gpu")
def bench_gpu(
    smoke: Annotated[bool, typer.Option("--smoke", help="Tiny shapes on CPU in fp32: checks the code runs.")] = False,
    out: Annotated[str | None, typer.Option(help="Write the results as JSON to this path.")] = None,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda; cpu with --smoke).")] = None,
    sections: Annotated[str | None, typer.Option(help="Comma-separated subset of saliency,kl,distill.")] = None,
) -> None:
    """Saliency, hybrid KL and a distillation step at Llama-1B/8B shapes (random weights) on one GPU, with MFU.

    Needs only torch and transformers: `python -m leaf_ray.bench.gpu` runs it without the CLI's packages."""
    from leaf_ray.bench.gpu import run_gpu_bench

    run_gpu_bench(smoke=smoke, out=out, device=device, console=console,
                  sections=tuple(s.strip() for s in sections.split(",") if s.strip()) if sections else None)


@bench_app.command("focus")
def bench_focus(
    config: ConfigOpt = None, set_: SetOpt = None,
    prepare: Annotated[bool, typer.Option("--prepare", help="Train the tiny teacher/student first (cached).")] = False,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Distillation seeds per variant.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="1 seed, bench.focus.quick_variants, no τ/λ sweep; "
                                        "run dir <run.name>-quick.")] = False,
) -> None:
    """Controlled confounder benchmark: detection P/R/F1 and KD vs LeaF (and its controls) accuracy."""
    from leaf_ray.experiments.focus.run import FocusBenchError, run_focus_bench

    overrides = list(set_ or []) + ([f"bench.focus.seeds={seeds}"] if seeds is not None else []) + (
        ["bench.focus.quick=true"] if quick else [])
    cfg = resolve(config or "configs/bench-focus.yaml", overrides)
    try:
        run_focus_bench(cfg, prepare=prepare, console=console)
    except FocusBenchError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
