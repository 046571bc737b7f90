"""Connecting to Ray: one place so the CLI, jobs/ and tests agree."""

from __future__ import annotations

import os

from leaf_ray.config import LeafConfig

RUNTIME_ENV_VARS = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1"}


def init_ray(cfg: LeafConfig):
    """Connect to `ray.address`, else the job's cluster (RAY_ADDRESS, set by `ray job submit`), else start
    a fresh local instance. `address="local"` matters: a bare `ray.init()` would silently join whatever
    cluster `ray start` last left on this machine."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = dict(address=address, namespace=cfg.ray.namespace, log_to_driver=True)
    env_vars = {k: os.environ.get(k, v) for k, v in RUNTIME_ENV_VARS.items()}
    if address == "local":
        kwargs.update(num_cpus=cfg.ray.num_cpus, include_dashboard=False,
                      runtime_env={"env_vars": env_vars})
    ray.init(**kwargs)
    return ray
