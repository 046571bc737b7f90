"""The one rule for devices and collectives (leaf_ray/distributed.py, docs/cuda-audit.md), checked on CPU:
where each group's tensors live, that no module issues a collective around it, how a rank's device and
DeepSpeed's accelerator are chosen, and a real 2-rank gloo all-reduce through the helper."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from leaf_ray import distributed
from leaf_ray.distributed import DeviceError, backend_for, device_for_backend

PACKAGE = Path(distributed.__file__).parent
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier",
               "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv", "init_process_group"}


def test_each_backend_gets_tensors_on_its_own_device():
    assert backend_for("cuda:1") == "nccl" and backend_for(torch.device("cpu")) == "gloo"
    assert device_for_backend("nccl", cuda_index=3) == torch.device("cuda", 3)  # NCCL has no CPU tensors
    assert device_for_backend("gloo") == torch.device("cpu")
    assert device_for_backend("cpu:gloo,cuda:nccl", cuda_index=0) == torch.device("cpu")  # a mixed group takes both


def test_no_module_issues_a_collective_outside_the_helper():
    """Every `torch.distributed` collective (and every group creation) in leaf_ray goes through
    leaf_ray/distributed.py, so the device rule cannot be bypassed by a new call site."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "distributed.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and isinstance(node.value, ast.Name) \
                    and node.value.id in ("dist", "torch_dist", "distributed"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_ray_workers_are_not_forced_onto_deepspeeds_cpu_accelerator():
    from leaf_ray.raycluster import RUNTIME_ENV_VARS

    assert "DS_ACCELERATOR" not in RUNTIME_ENV_VARS


def test_a_gpu_actor_without_cuda_and_an_accelerator_already_fixed_are_clear_errors():
    assert distributed.ray_actor_device(0) == torch.device("cpu")  # a CPU actor: CPU even on a GPU node
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"asked for 1 GPU\(s\) but CUDA is not available"):
            distributed.ray_actor_device(1)
        with pytest.raises(DeviceError, match="asks for a GPU"):
            distributed.inline_device(True)
    from deepspeed.accelerator import get_accelerator  # fixes this process's accelerator (CPU here)

    name = get_accelerator().device_name()
    other = torch.device("cuda", 0) if name == "cpu" else torch.device("cpu")
    with pytest.raises(DeviceError, match="already"):
        distributed.deepspeed_accelerator(other)


def test_deepspeed_builds_the_engine_on_the_assigned_gpu_not_local_rank():
    from leaf_ray.distill.engines import deepspeed_args

    assert deepspeed_args("cuda:3").device_rank == 3  # Ray Train's device index, whatever LOCAL_RANK says
    assert deepspeed_args("cpu") is None


def test_a_device_map_model_offloaded_to_the_cpu_is_refused():
    from leaf_ray.detect.stages import check_on_gpus

    class Placed(torch.nn.Module):
        hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}

    with pytest.raises(ValueError, match=r"teacher does not fit its GPUs.*model.layers.1.*max_memory_per_gpu"):
        check_on_gpus(Placed(), "teacher")
    Placed.hf_device_map = {"model": 0, "lm_head": 1}
    check_on_gpus(Placed(), "teacher")


def test_all_reduce_sum_across_two_real_gloo_ranks(tmp_path):
    """Two processes, one group, the helper's sum (float64, on the group's device) and barrier."""
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.distributed as dist
        from leaf_ray.distributed import all_reduce_sum, barrier, init_group
        rank, init = int(sys.argv[1]), sys.argv[2]
        assert init_group(torch.device("cpu"), rank=rank, world_size=2, init_method=init, timeout_s=60) == "gloo"
        got = all_reduce_sum({"tokens": 10.0 * (rank + 1), "loss": 0.25})
        barrier()
        print(got["tokens"], got["loss"])
        dist.destroy_process_group()
    """))
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), init], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in ranks]
    for p, (out, err) in zip(ranks, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["30.0", "0.5"]
