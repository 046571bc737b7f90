"""Δ, thresholds and spans on hand-made vectors (expected values worked out by hand in the comments); a
threshold rule registered here, chosen from YAML, runs through detection."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from run_data import write_clean

from leaf_ray.config import ConfigError, ThresholdConfig, load_config
from leaf_ray.detect.confounders import minmax, runs, score_span
from leaf_ray.registry import THRESHOLD_RULES

# student g = [1, 3, 5, 2, 9]  -> min 1, max 9  -> ĝS = [0, 0.25, 0.5, 0.125, 1]
# teacher g = [4, 2, 6, 10, 2] -> min 2, max 10 -> ĝT = [0.25, 0, 0.5, 1, 0]
# ĝT - ĝS = [0.25, -0.25, 0, 0.875, -1] -> min -1, range 1.875
# Δ = [1.25, 0.75, 1, 1.875, 0] / 1.875 = [2/3, 0.4, 8/15, 1, 0]; sorted [0, 0.4, 8/15, 2/3, 1]
STUDENT = [1.0, 3.0, 5.0, 2.0, 9.0]
TEACHER = [4.0, 2.0, 6.0, 10.0, 2.0]
TEXTS = ["Tom", " has", " 3", " red", " apples"]
DELTA = [2 / 3, 0.4, 8 / 15, 1.0, 0.0]


def test_minmax_by_hand():
    assert torch.allclose(minmax(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    assert minmax([1, 3]).dtype == torch.float32
    assert minmax(torch.tensor([1.0, 3.0], dtype=torch.float64)).dtype == torch.float64
    assert torch.equal(minmax(torch.tensor([5.0, 5.0, 5.0])), torch.zeros(3))  # constant -> zeros
    assert torch.equal(minmax(torch.tensor([7.0])), torch.zeros(1))
    assert minmax(torch.tensor([])).numel() == 0
    with pytest.raises(ValueError, match="non-finite"):
        minmax(torch.tensor([1.0, float("nan")]))


def test_delta_and_quantile_threshold_by_hand():
    # q = 0.1, the reference's order statistic: sorted(Δ)[int(5 * 0.1)] = sorted(Δ)[0] = 0 -> only token 4
    out = score_span(STUDENT, TEACHER, TEXTS, ThresholdConfig(rule="quantile", quantile=0.1, cap=0.5))
    assert torch.allclose(out.student_normalized, torch.tensor([0, 0.25, 0.5, 0.125, 1], dtype=torch.float64))
    assert torch.allclose(out.teacher_normalized, torch.tensor([0.25, 0, 0.5, 1, 0], dtype=torch.float64))
    assert torch.allclose(out.delta, torch.tensor(DELTA, dtype=torch.float64))
    assert out.threshold == 0.0
    assert out.confounder_mask.tolist() == [False, False, False, False, True]
    # linear interpolation (numpy's quantile) is an explicit option: h = (5-1)*0.1 = 0.4 -> τ = 0.4*0.4 = 0.16
    linear = ThresholdConfig(rule="quantile", quantile=0.1, cap=0.5, interpolation="linear")
    assert score_span(STUDENT, TEACHER, TEXTS, linear).threshold == pytest.approx(0.16)
    assert out.spans == [(4, 5)]
    assert not out.degenerate


def test_cap_limits_the_quantile():
    # q = 0.5: h = 2 -> quantile = 8/15 ≈ 0.533; cap 0.5 -> τ = 0.5 -> Δ <= 0.5: tokens 1 (0.4) and 4 (0)
    out = score_span(STUDENT, TEACHER, TEXTS, ThresholdConfig(rule="quantile", quantile=0.5, cap=0.5))
    assert out.threshold == pytest.approx(0.5)
    assert out.spans == [(1, 2), (4, 5)]
    # cap 1 -> τ = 8/15 -> tokens 1, 2 (8/15 <= 8/15) and 4: runs [1, 3) and [4, 5)
    out = score_span(STUDENT, TEACHER, TEXTS, ThresholdConfig(rule="quantile", quantile=0.5, cap=1.0))
    assert out.threshold == pytest.approx(8 / 15)
    assert out.confounder_mask.tolist() == [False, True, True, False, True]
    assert out.spans == [(1, 3), (4, 5)]


def test_absolute_threshold():
    out = score_span(STUDENT, TEACHER, TEXTS, ThresholdConfig(rule="absolute", tau=0.45))
    assert out.threshold == 0.45
    assert out.spans == [(1, 2), (4, 5)]
    out = score_span(STUDENT, TEACHER, TEXTS, ThresholdConfig(rule="absolute", tau=0.0))
    assert out.spans == [(4, 5)]  # Δ = 0 <= 0


def test_whitespace_tokens_are_never_confounders_and_break_runs():
    texts = ["Tom", " ", " 3", "\n\n", "\u3000"]  # token 1 and 3 whitespace; token 4 an ideographic space
    out = score_span(STUDENT, TEACHER, texts, ThresholdConfig(rule="quantile", quantile=0.5, cap=1.0))
    # Δ <= 8/15 for tokens 1, 2, 4; tokens 1 and 4 are whitespace-only
    assert out.confounder_mask.tolist() == [False, False, True, False, False]
    assert out.spans == [(2, 3)]
    everything = score_span(STUDENT, TEACHER, [" ", "\t", "", "\n", " "], ThresholdConfig(rule="absolute", tau=1.0))
    assert not everything.confounder_mask.any() and everything.spans == []


@pytest.mark.parametrize(("n", "q", "index", "linear"), [
    # Δ = [0, 1, ..., n-1] / (n-1) (shuffled); reference τ = sorted(Δ)[int(n*q)], linear h = (n-1)*q
    (12, 0.10, 1, 1.1 / 11),    # int(1.2) = 1 -> 1/11;   h = 1.1 -> 0.1
    (30, 0.10, 3, 2.9 / 29),    # int(3.0000000000000004) = 3 -> 3/29; h = 2.9
    (7, 0.05, 0, 0.3 / 6),      # int(0.35) = 0 -> 0;     h = 0.3
    (25, 0.15, 3, 3.6 / 24),    # int(3.75) = 3 -> 3/24;  h = 3.6
    (4, 1.0, 3, 1.0),           # q = 1: index clipped to n-1 -> the maximum
])
def test_quantile_is_the_reference_order_statistic(n, q, index, linear):
    from leaf_ray.detect.confounders import quantile_threshold

    delta = torch.arange(n, dtype=torch.float64)[torch.randperm(n, generator=torch.Generator().manual_seed(n))]
    delta = delta / (n - 1)
    reference = ThresholdConfig(rule="quantile", quantile=q, cap=1.0)
    assert quantile_threshold(delta, reference) == pytest.approx(index / (n - 1), abs=1e-15)
    assert sorted(delta.tolist())[min(int(n * q), n - 1)] == pytest.approx(index / (n - 1), abs=1e-15)
    interpolated = ThresholdConfig(rule="quantile", quantile=q, cap=1.0, interpolation="linear")
    assert quantile_threshold(delta, interpolated) == pytest.approx(linear, abs=1e-12)
    if int(n * q) != (n - 1) * q and q < 1:
        assert quantile_threshold(delta, interpolated) != pytest.approx(quantile_threshold(delta, reference))


def test_quantile_linear_option_matches_numpy():
    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 50):
        student = torch.rand(n, generator=generator)
        teacher = torch.rand(n, generator=generator)
        for q in (0.05, 0.1, 0.37):
            cfg = ThresholdConfig(rule="quantile", quantile=q, cap=1.0, interpolation="linear")
            out = score_span(student, teacher, ["x"] * n, cfg)
            assert out.threshold == pytest.approx(float(np.quantile(out.delta.numpy(), q)), abs=1e-12)


def test_degenerate_span_has_no_confounders():
    one = score_span([3.0], [1.0], ["Tom"], ThresholdConfig())  # a one-token span: Δ = [0]
    assert one.degenerate and one.delta.tolist() == [0.0] and one.spans == []
    same = score_span([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], ["a", "b", "c"], ThresholdConfig())
    assert same.degenerate and not same.confounder_mask.any()  # ĝT == ĝS: nothing to tell apart


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="5 student / 4 teacher scores for 5 token texts"):
        score_span(STUDENT, TEACHER[:4], TEXTS, ThresholdConfig())
    with pytest.raises(ValueError, match="no tokens"):
        score_span([], [], [], ThresholdConfig())
    bad = ThresholdConfig.model_construct(rule="nope")  # what validation would refuse (test below)
    with pytest.raises(ValueError, match="unknown threshold rule 'nope'; registered: .*absolute.*quantile"):
        score_span(STUDENT, TEACHER, TEXTS, bad)
    with pytest.raises(ValueError, match="non-finite"):
        score_span([1.0, float("inf")], [1.0, 2.0], ["a", "b"], ThresholdConfig())


@THRESHOLD_RULES.register("test_median")
def median_threshold(delta: torch.Tensor, cfg) -> float:
    """A rule defined here, as docs/extending.md shows: τ = the median of Δ."""
    return float(delta.median())


def test_a_registered_rule_is_chosen_by_name_and_a_duplicate_is_refused():
    assert {"quantile", "absolute", "test_median"} <= set(THRESHOLD_RULES.names())
    assert THRESHOLD_RULES.builtins() == ["absolute", "quantile"]  # what the configuration reference lists
    out = score_span(STUDENT, TEACHER, TEXTS, ThresholdConfig(rule="test_median"))
    assert out.threshold == pytest.approx(8 / 15) and out.spans == [(1, 3), (4, 5)]  # Δ ≤ 8/15: tokens 1, 2, 4
    with pytest.raises(ValueError, match="already registered"):
        THRESHOLD_RULES.register("test_median")(lambda delta, cfg: 0.0)
    with pytest.raises(ValueError, match="(?s)rule.*unknown threshold rule 'nope'; registered: absolute, quantile, "
                                         "test_median"):
        ThresholdConfig(rule="nope")


def test_a_rule_defined_in_this_module_is_chosen_from_yaml_and_runs_through_detection(tmp_path, tiny_pair,
                                                                                      no_ray):
    """`detection.threshold.rule: test_median` in a YAML file: the config accepts it, and `leaf-ray detect`'s
    stage (in process for these few samples) records τ = median(Δ) for every scored unit."""
    from leaf_ray.detect.pipeline import run_detection
    from leaf_ray.store import DetectPaths

    config = tmp_path / "median.yaml"
    config.write_text(f"run: {{name: median, root_dir: {tmp_path / 'runs'}}}\n"
                      f"models: {{teacher: {{path: {tiny_pair['teacher']}}}, student: {{path: {tiny_pair['student']}}}, "
                      "make_tiny_if_missing: false}\n"
                      "detection: {threshold: {rule: test_median}, inline_max_samples: 8}\n")
    cfg = load_config(config)
    assert cfg.detection.threshold.rule == "test_median"
    write_clean(cfg, [{"sample_id": f"s{i}", "instruction": f"Tom has {i + 3} apples and {i} pens. How many?",
                       "output": f"He has {i + 3} apples. \\boxed{{{i + 3}}}", "answer": str(i + 3)}
                      for i in range(3)])
    report = run_detection(cfg)
    assert report.scores == 3
    scores = pq.read_table(DetectPaths.of(cfg).scores).to_pylist()
    assert sorted(s["sample_id"] for s in scores) == ["s0", "s1", "s2"]
    for s in scores:
        assert s["threshold"] == pytest.approx(float(torch.tensor(s["delta"], dtype=torch.float64).median()),
                                               abs=1e-6)
    config.write_text(config.read_text().replace("test_median", "test_mean"))
    with pytest.raises(ConfigError, match="detection.threshold.rule.*unknown threshold rule 'test_mean'"):
        load_config(config)


def test_a_plugin_module_named_in_the_config_registers_its_rule_before_the_rule_is_checked(tmp_path,
                                                                                           monkeypatch):
    """`plugins: [module]` is imported at config load (the rule it registers is then a valid name) and, through
    $LEAF_RAY_PLUGINS, by `import_plugins`, the setup hook `init_ray` gives every local Ray worker."""
    from leaf_ray.registry import PLUGINS_ENV, import_plugins

    for name, rule in (("leaf_ray_test_rules_a", "test_cap_only"), ("leaf_ray_test_rules_b", "test_zero")):
        (tmp_path / f"{name}.py").write_text(
            "from leaf_ray.registry import THRESHOLD_RULES\n\n\n"
            f"@THRESHOLD_RULES.register({rule!r})\ndef rule(delta, cfg):\n    return float(cfg.cap)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "plugin.yaml"
    config.write_text("plugins: [leaf_ray_test_rules_a]\ndetection: {threshold: {rule: test_cap_only, cap: 0.3}}\n")
    cfg = load_config(config)
    assert cfg.plugins == ["leaf_ray_test_rules_a"]
    assert score_span(STUDENT, TEACHER, TEXTS, cfg.detection.threshold).threshold == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="plugins: Value error, cannot import 'no_such_plugin'"):
        load_config(config, ["plugins=[no_such_plugin]"])
    assert "test_zero" not in THRESHOLD_RULES.names()
    monkeypatch.setenv(PLUGINS_ENV, "leaf_ray_test_rules_b")
    import_plugins()  # what a Ray worker runs first
    assert "test_zero" in THRESHOLD_RULES.names()


def test_runs():
    assert runs([]) == []
    assert runs([True, True, False, True]) == [(0, 2), (3, 4)]
    assert runs([False, True, True, True]) == [(1, 4)]
