"""Connecting to Ray, and what Ray workers need of the driver: one place so the CLI, jobs/ and tests agree."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from leaf_ray.config import LeafConfig, ModelRef
from leaf_ray.registry import PLUGINS_ENV

# No DS_ACCELERATOR here: every process that builds a DeepSpeed engine chooses it from its own device
# (leaf_ray.distributed.deepspeed_accelerator); a fixed "cpu" made GPU workers build CPU engines.
RUNTIME_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1"}


def init_ray(cfg: LeafConfig):
    """Connect to `ray.address`, else the job's cluster (RAY_ADDRESS, set by `ray job submit`), else start
    a fresh local instance. `address="local"` matters: a bare `ray.init()` would silently join whatever
    cluster `ray start` last left on this machine."""
    import ray

    from leaf_ray import console as quiet

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    # A quiet console (the CLI's default, `leaf_ray.console`): Ray's own output goes to <run dir>/logs/ray.log.
    quiet.attach(cfg.run.dir)
    route = quiet.enabled() and quiet.can_route_worker_logs()
    kwargs = {"address": address, "namespace": cfg.ray.namespace, "log_to_driver": route or not quiet.enabled()}
    env_vars = {**quiet.worker_env_vars(), **{k: os.environ.get(k, v) for k, v in RUNTIME_ENV_VARS.items()}}
    runtime_env: dict = {"env_vars": env_vars}
    if cfg.plugins:  # your registered implementations, imported in every worker too (docs/extending.md)
        env_vars[PLUGINS_ENV] = ",".join(cfg.plugins)
        runtime_env["worker_process_setup_hook"] = "leaf_ray.registry.import_plugins"
    if address == "local":
        kwargs.update(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=runtime_env)
    if quiet.enabled():
        quiet.quiet_libraries()
        kwargs.update(configure_logging=False)  # keep the "ray" logger on the run log
    ray.init(**kwargs)
    if route:
        quiet.route_worker_logs()
    quiet.quiet_libraries()
    return ray


def for_workers(cfg: LeafConfig) -> LeafConfig:
    """A copy with every path absolute: Ray workers do not share the driver's working directory."""
    cfg = cfg.model_copy(deep=True)
    cfg.run.root_dir = str(Path(cfg.run.root_dir).resolve())
    cfg.models.teacher = local_model_ref(cfg.models.teacher)
    cfg.models.student = local_model_ref(cfg.models.student)
    if cfg.distill.topk_cache_dir:
        cfg.distill.topk_cache_dir = str(Path(cfg.distill.topk_cache_dir).expanduser().resolve())
    return cfg


def local_model_ref(ref: ModelRef) -> ModelRef:
    """`ref` with its local paths absolute (one that does not exist stays as written, for the error)."""
    update = {name: str(Path(value).expanduser().resolve()) for name in ("path", "tokenizer_path")
              if (value := getattr(ref, name)) and Path(value).expanduser().exists()}
    return ref.model_copy(update=update)


@lru_cache(maxsize=4)
def cached_tokenizer(ref_json: str):
    """One tokenizer per Ray worker process (tasks reuse workers), keyed by the model reference's JSON."""
    from leaf_ray.models import load_tokenizer

    return load_tokenizer(ModelRef.model_validate_json(ref_json))


class StreamStalled(RuntimeError):
    """A stream yielded nothing for longer than its bound (`ray.stall_timeout_s`)."""


def bounded_stream(items, stall_timeout_s: float | None, what: str):
    """Yield from ``items`` (a Ray Data iterator, blocking in Ray's C++ core) through a reader thread, so the
    wait for the next item is bounded: nothing for ``stall_timeout_s`` raises :class:`StreamStalled` naming
    ``what``. The reader thread is a daemon; Ray's shutdown ends the stream it is blocked in."""
    import queue
    import threading

    if not stall_timeout_s:
        yield from items
        return
    box: queue.Queue = queue.Queue(maxsize=64)
    done = object()

    def read():
        try:
            for item in items:
                box.put(("item", item))
            box.put(("done", done))
        except BaseException as e:  # handed to the consumer, raised there
            box.put(("error", e))

    threading.Thread(target=read, name=f"leaf-ray-stream-{what}", daemon=True).start()
    while True:
        try:
            kind, value = box.get(timeout=stall_timeout_s)
        except queue.Empty:
            raise StreamStalled(f"{what}: nothing arrived for {stall_timeout_s:g} s (ray.stall_timeout_s); an actor "
                                "pool may be waiting for resources it will never get (see `ray status`), or an "
                                "actor is wedged. What was committed is kept: a rerun resumes.") from None
        if kind == "done":
            return
        if kind == "error":
            raise value
        yield value
