"""The one config tree: errors name the file and the dotted key; overrides; shipped YAMLs; the generated
configuration reference (docs/configuration.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from leaf_ray.cli import app
from leaf_ray.config import ConfigError, LeafConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, LeafConfig) and cfg.data.max_length == 2048 and cfg.distill.lambda_ == 0.5


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    path = _write(tmp_path, {"data": {"max_lenght": 128}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "data.max_lenght" in msg and "unknown key" in msg


def test_unknown_nested_section_key(tmp_path):
    path = _write(tmp_path, {"detection": {"threshold": {"quantil": 0.1}}})
    with pytest.raises(ConfigError, match=r"detection\.threshold\.quantil: unknown key"):
        load_config(path)


def test_mistyped_value_names_key_and_expectation(tmp_path):
    path = _write(tmp_path, {"distill": {"epochs": "three"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "distill.epochs" in msg and "integer" in msg and "'three'" in msg


def test_wrong_literal_names_allowed_values(tmp_path):
    path = _write(tmp_path, {"data": {"on_too_long": "drop"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.on_too_long" in str(err.value) and "'quarantine'" in str(err.value)


@pytest.mark.parametrize("tree, key, expected", [
    ({"data": {"validation_fraction": 1.5}}, "data.validation_fraction", "less than 1"),
    ({"data": {"max_length": 4}}, "data.max_length", "greater than or equal to 16"),
    ({"distill": {"lambda": 2.0}}, "distill.lambda", "less than or equal to 1"),
    ({"detection": {"threshold": {"quantile": -0.1}}}, "detection.threshold.quantile", "greater than or equal"),
])
def test_out_of_range_value_names_key_and_range(tmp_path, tree, key, expected):
    path = _write(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and f"{key}:" in msg and expected in msg


def test_cross_field_check_is_named(tmp_path):
    path = _write(tmp_path, {"detection": {"student_pool": {"min_actors": 3, "max_actors": 2}}})
    with pytest.raises(ConfigError, match=r"detection\.student_pool.*min_actors \(3\) must be <= max_actors"):
        load_config(path)


def test_missing_and_invalid_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_set_overrides_apply_on_top_of_the_file(tmp_path):
    path = _write(tmp_path, {"data": {"max_length": 256}, "distill": {"epochs": 2}})
    cfg = load_config(path, ["data.max_length=128", "distill.lambda=0.25", "data.paths=[a.jsonl, b.parquet]",
                             "ray.address=auto", "tracking.tracking_uri=null"])
    assert cfg.data.max_length == 128 and cfg.distill.lambda_ == 0.25 and cfg.distill.epochs == 2
    assert cfg.data.paths == ["a.jsonl", "b.parquet"] and cfg.ray.address == "auto"
    assert cfg.tracking.tracking_uri is None


def test_bad_overrides_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)--set.*data\.max_lenght: unknown key"):
        load_config(None, ["data.max_lenght=5"])
    with pytest.raises(ConfigError, match=r"data\.max_length:.*'many'"):
        load_config(None, ["data.max_length=many"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["data.max_length"])
    with pytest.raises(ConfigError, match=r"data\.max_length: Input should be a valid integer"):
        load_config(None, ["data.max_length.x=1"])
    path = _write(tmp_path, {"data": {"max_length": 128}})
    with pytest.raises(ConfigError, match=f"{path} --set data.max_length.x: `data.max_length` is not a section"):
        load_config(path, ["data.max_length.x=1"])


def test_extends_merges_sections_and_replaces_lists(tmp_path):
    """`extends:` reads another file first: mappings merge key by key, lists and scalars replace, the variant's
    own keys win, and `--set` applies on top of both."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "run": {"name": "base", "seed": 3}, "data": {"max_length": 256},
        "bench": {"focus": {"variants": ["kd", "leaf_instr", "oracle"], "seeds": 5}}}))
    sub = tmp_path / "sub" / "variant.yaml"
    sub.parent.mkdir()
    sub.write_text(yaml.safe_dump({"extends": "../base.yaml", "run": {"name": "variant"},
                                   "bench": {"focus": {"variants": ["kd_on"]}}}))
    cfg = load_config(sub, ["data.max_length=128"])
    assert (cfg.run.name, cfg.run.seed, cfg.data.max_length) == ("variant", 3, 128)
    assert cfg.bench.focus.variants == ["kd_on"] and cfg.bench.focus.seeds == 5


def test_extends_errors_name_the_files(tmp_path):
    missing = _write(tmp_path, {"extends": "nowhere.yaml"})
    with pytest.raises(ConfigError, match=rf"config file not found: .*nowhere\.yaml \(extended by {missing}\)"):
        load_config(missing)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"`extends` cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    bad = _write(tmp_path, {"extends": ["x.yaml"]})
    with pytest.raises(ConfigError, match="`extends` must be the path of another config file"):
        load_config(bad)


def test_every_shipped_yaml_loads():
    files = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs").glob("*.yml"))
    assert files, "configs/ holds no YAML"
    for path in files:
        cfg = load_config(path)
        assert isinstance(cfg, LeafConfig), path


def test_dump_round_trips():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    from leaf_ray.config import config_from_dict

    assert config_from_dict(cfg.dump()).dump() == cfg.dump()


def test_config_show_cli_prints_resolved_yaml(tmp_path):
    runner = CliRunner()
    path = _write(tmp_path, {"data": {"max_length": 300}})
    result = runner.invoke(app, ["config", "show", "--config", str(path), "--set", "distill.lambda=0.75"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown == load_config(path, ["distill.lambda=0.75"]).dump()
    assert shown["data"]["max_length"] == 300 and shown["distill"]["lambda"] == 0.75


def test_config_show_cli_reports_bad_key(tmp_path):
    path = _write(tmp_path, {"data": {"format": "csv"}})
    result = CliRunner().invoke(app, ["config", "show", "--config", str(path)])
    assert result.exit_code == 2
    assert "data.format" in result.output and str(path) in result.output.replace("\n", "")


def test_the_committed_configuration_reference_is_the_generated_one():
    from leaf_ray.docs import BEGIN, END, config_reference_markdown

    generated = config_reference_markdown()
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    hint = (f"docs/configuration.md must hold the output of `leaf-ray config reference` between the lines {BEGIN} "
            f"and {END}")
    assert BEGIN in page and END in page, hint
    between = page.split(BEGIN, 1)[1].split(END, 1)[0]
    assert between.strip() == generated.strip(), hint + " (it is out of date)"
