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


def resolve(config: str | None, overrides: list[str] | None) -> LeafConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
        raise typer.Exit(2) from None


def not_implemented(verb: str, issue: str) -> None:
    err_console.print(f"[yellow]`leaf-ray {verb}` is not implemented yet[/yellow] ({issue}).")
    raise typer.Exit(3)


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
    from leaf_ray.models import make_tiny_pair

    paths = make_tiny_pair(out_dir, arch=arch, seed=seed)
    for role, p in paths.items():
        console.print(f"{role}: {p}")


@models_app.command("check")
def models_check(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Load teacher and student from their local paths and check they can be distilled together."""
    from leaf_ray.models import (ModelCompatibilityError, ModelLoadError, check_distill_compatible,
                                 load_tokenizer)

    cfg = resolve(config, set_)
    try:
        from transformers import AutoConfig

        t_tok, s_tok = load_tokenizer(cfg.models.teacher), load_tokenizer(cfg.models.student)
        t_cfg = AutoConfig.from_pretrained(cfg.models.teacher.path, local_files_only=True)
        s_cfg = AutoConfig.from_pretrained(cfg.models.student.path, local_files_only=True)
        check_distill_compatible(t_tok, s_tok, t_cfg.vocab_size, s_cfg.vocab_size)
    except (ModelLoadError, ModelCompatibilityError) as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    console.print(f"[green]ok[/green]: teacher vocab {t_cfg.vocab_size}, student vocab {s_cfg.vocab_size}")


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
    not_implemented("detect", "issue 3")


@app.command()
def distill(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Stage 2: hybrid-KL distillation on Ray Train + DeepSpeed, tracked in MLflow."""
    not_implemented("distill", "issue 4")


@app.command()
def generate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Generate responses (vLLM or transformers) as a Ray Data actor pool."""
    not_implemented("generate", "issue 5")


@app.command()
def evaluate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Evaluate a model on math/code benchmarks; log to MLflow."""
    not_implemented("evaluate", "issue 5")


@app.command()
def compare(experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "leaf-ray",
            config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the paper-shaped comparison table from MLflow runs."""
    not_implemented("compare", "issue 5")


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The whole chain: detection -> counterfactuals -> distillation -> evaluation."""
    not_implemented("run", "issue 6")


@app.command()
def demo(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """The main job on the embedded default (local Ray, tiny offline models, local MLflow)."""
    from leaf_ray.demo import run_demo

    cfg = resolve(config or "configs/demo.yaml", set_)
    raise typer.Exit(run_demo(cfg, console))


@app.command()
def inspect(run_dir: Annotated[str, typer.Option("--run", help="Run directory.")],
            sample_id: Annotated[str, typer.Argument()]) -> None:
    """Coloured terminal view of one sample's Δ scores and counterfactuals."""
    not_implemented("inspect", "issue 7")


@bench_app.command("detect")
def bench_detect(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """This pipeline vs a naive per-sample loop mirroring the reference release."""
    not_implemented("bench detect", "issue 3")


@bench_app.command("distill")
def bench_distill(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """This trainer's tokens/s and chunked-loss memory vs the reference-style loop."""
    not_implemented("bench distill", "issue 4")


@bench_app.command("focus")
def bench_focus(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Controlled confounder benchmark: detection P/R/F1 and KD vs LeaF accuracy."""
    not_implemented("bench focus", "issue 7")


if __name__ == "__main__":
    app()
