"""The `leaf-ray` CLI: `--help` on every verb; every verb hands its work to the library; `ingest` end to end."""

from __future__ import annotations

import ast
import inspect
import json
import textwrap

import pytest
import typer
from typer.testing import CliRunner

import leaf_ray.cli
from leaf_ray.cli import app

ROOT = typer.main.get_command(app)


def _verbs(group=ROOT, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """(command path, command) for every leaf verb (typer ships its own click: duck-typed)."""
    found = []
    for name, cmd in sorted(group.commands.items()):
        path = prefix + (name,)
        found += _verbs(cmd, path) if hasattr(cmd, "commands") else [(path, cmd)]
    return found


VERBS = _verbs()


def test_expected_verbs_exist():
    names = {" ".join(p) for p, _ in VERBS}
    assert {"config show", "config reference", "models make-tiny", "models check", "ingest", "detect",
            "distill", "generate", "evaluate", "compare", "run", "demo", "inspect", "bench detect",
            "bench distill", "bench focus"} <= names


def test_top_level_help_lists_verbs():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("ingest", "detect", "distill", "demo", "config", "models", "bench"):
        assert name in result.output


@pytest.mark.parametrize("path", [p for p, _ in VERBS], ids=[" ".join(p) for p, _ in VERBS])
def test_every_verb_has_help(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.strip().splitlines()) > 2


def _leaf_ray_names(nodes) -> set[str]:
    """Names bound by `from leaf_ray... import ...` among `nodes`."""
    return {a.asname or a.name for n in nodes for a in getattr(n, "names", ())
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("leaf_ray")}


def _called(nodes) -> set[str]:
    return {getattr(n.func, "id", getattr(n.func, "attr", None)) for n in nodes if isinstance(n, ast.Call)}


CLI_MODULE = ast.parse(inspect.getsource(leaf_ray.cli))
# What a verb may hand its work to: leaf_ray names the CLI module imports, and its own helpers that call them
# (`resolve` -> `load_config`).
PRODUCT = _leaf_ray_names(CLI_MODULE.body)
PRODUCT |= {f.name for f in CLI_MODULE.body if isinstance(f, ast.FunctionDef)
            and not f.decorator_list and _called(ast.walk(f)) & PRODUCT}


@pytest.mark.parametrize("path", [p for p, _ in VERBS], ids=[" ".join(p) for p, _ in VERBS])
def test_every_verb_hands_its_work_to_the_library(path):
    """A verb's body (past its docstring) calls a function of leaf_ray (imported in the verb or by the CLI
    module) and raises no NotImplementedError: no verb is a placeholder (its own tests run it for real)."""
    cmd = dict(VERBS)[path]
    body = ast.parse(textwrap.dedent(inspect.getsource(cmd.callback))).body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    nodes = list(ast.walk(ast.Module(body, [])))
    handed = _called(nodes) & (PRODUCT | _leaf_ray_names(nodes))
    assert handed, f"`leaf-ray {' '.join(path)}` calls nothing of leaf_ray"
    assert "NotImplementedError" not in {getattr(n, "id", None) for n in nodes}


def test_config_reference_prints_the_table():
    from leaf_ray.docs import config_reference_markdown

    result = CliRunner().invoke(app, ["config", "reference"])
    assert result.exit_code == 0 and result.stdout == config_reference_markdown()
    assert "| `data.max_length` |" in result.stdout


def test_bad_config_exits_2_naming_the_key():
    result = CliRunner().invoke(app, ["ingest", "--set", "data.on_too_long=drop"])
    assert result.exit_code == 2 and "data.on_too_long" in result.output


def test_ingest_rejects_a_missing_path_before_any_work(tmp_path, tiny_pair):
    missing = str(tmp_path / "nothing-here.jsonl")
    result = CliRunner().invoke(app, [
        "ingest", "--set", f"run.root_dir={tmp_path / 'runs'}", "--set", f"data.paths=[{missing}]",
        "--set", f"models.student.path={tiny_pair['student']}"])
    assert result.exit_code == 1
    assert "path does not exist" in result.output and "nothing-here.jsonl" in result.output
    assert not (tmp_path / "runs").exists()


def test_ingest_cli_end_to_end(tmp_path, tiny_pair, ray_local):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([
        json.dumps({"id": "a", "instruction": "Q1", "output": "A1"}),
        "{oops",
        json.dumps({"id": "b", "instruction": "Q2", "output": "   "}),
    ]) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{root_dir: {tmp_path / 'runs'}, name: cli}}\n"
                      f"data: {{paths: [{data}], max_length: 128}}\n"
                      f"models: {{student: {{path: {tiny_pair['student']}}}, teacher: {{path: {tiny_pair['teacher']}}}}}\n")
    result = CliRunner().invoke(app, ["ingest", "--config", str(config)], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "malformed_json" in out and "empty_field" in out and "clean" in out
    manifest = json.loads((tmp_path / "runs" / "cli" / "data" / "ingest_manifest.json").read_text())
    assert manifest["counts"] == {"read": 3, "clean": 1, "quarantined": 2}
    assert str(tmp_path / "runs" / "cli" / "data" / "clean") in out.replace("\n", "")
