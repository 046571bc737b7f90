"""What every entrypoint in jobs/ shares: `--config` / `--set` parsing, config errors as one clear message
and a non-zero exit, and printing the stage's report.

The stages themselves are library functions (leaf_ray.*); an entrypoint only resolves the config and calls
one. Inside a `ray job submit` job the stage joins the job's cluster through RAY_ADDRESS
(`leaf_ray.raycluster.init_ray`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

EXIT_CONFIG_ERROR = 2


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config file (omitted: the built-in defaults).")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one key, e.g. --set run.root_dir=/mnt/runs (repeatable).")
    return p


def main(prog: str, description: str, stage: Callable[[Any, argparse.Namespace, Any], Any],
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         argv: list[str] | None = None) -> int:
    """Parse, load the config, run `stage(cfg, args, console)`, print its report. Returns the exit code."""
    from rich.console import Console

    from leaf_ray.config import ConfigError, load_config

    p = parser(prog, description)
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    console = Console()
    console.print(f"[bold]{prog}[/bold]: run directory {cfg.run.dir.resolve()}")
    show(stage(cfg, args, console), console)
    return 0


def show(report: Any, console) -> None:
    """Stage reports print themselves when they can; otherwise as JSON."""
    if report is None:
        return
    if hasattr(report, "print"):
        report.print(console)
        return
    if hasattr(report, "to_dict"):
        report = report.to_dict()
    elif dataclasses.is_dataclass(report):
        report = dataclasses.asdict(report)
    console.print_json(json.dumps(report, default=str))
