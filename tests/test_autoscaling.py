"""A GPU-like actor pool makes Ray's autoscaler add a worker node from zero, and remove it when idle.

This is the KubeRay set-up in miniature: the pool asks for a custom resource (`fake_gpu`, standing in for the
`*_slot` resources the paper configs pin their GPU pools with) through the same `PoolConfig` the detection
pipeline turns into Ray Data arguments (`PoolConfig.map_batches_kwargs`), and only a worker node type that
starts at 0 nodes offers it.

The cluster is Ray's fake multi-node autoscaler, started the way `ray.cluster_utils.AutoscalingCluster` does
(`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`, with our own config: the 2.60 wheel lacks
`fake_multi_node/example.yaml`), but without its `ray stop --force`, which would kill every Ray process on the
machine. The head is private to this test (own temp dir and ports, tests/ray_processes.py) and stopped by
signalling exactly its processes, including the nodes the fake provider started. Autoscaler v1 (the monitor
process): the v2 instance manager loads the missing example.yaml for the fake provider.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_processes import free_ports, private_head, ray_env

pytestmark = [pytest.mark.autoscaler, pytest.mark.slow]

WORKER_TYPE = "fake-gpu-worker"
IDLE_TIMEOUT_MINUTES = 0.1  # 6 s: the worker node goes once nothing has used it for that long


def fake_cluster_config(gcs_address: str) -> dict:
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    return {
        "cluster_name": "leaf-ray-fake",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        # use_node_id_as_ip: every fake node shares this machine's IP, so the monitor must tell nodes apart
        # by id to see which one is idle.
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": {
            FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            # The GPU group: scales from 0, one fake GPU per node.
            WORKER_TYPE: {"resources": {"CPU": 1, "fake_gpu": 1}, "node_config": {}, "min_workers": 0,
                          "max_workers": 1},
        },
        "auth": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class WhereAmI:
    """Stands in for a saliency actor: records which node served each row."""

    def __init__(self):
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        import numpy as np

        return {"id": batch["id"], "node_id": np.array([self.node_id] * len(batch["id"]))}


def _fake_gpu_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("fake_gpu")]


def drive(gcs_address: str, pool_json: str, removal_timeout_s: float = 300) -> dict:
    """The driver: runs the pool on the cluster and records what the cluster looked like before, during
    and after. Runs in its own process (see __main__) so it never meets another Ray driver of the test
    session (the `ray_local` fixture)."""
    import ray

    from leaf_ray.config import PoolConfig

    pool = PoolConfig.model_validate_json(pool_json)
    ray.init(address=gcs_address, log_to_driver=False)
    try:
        seen = {"head_node": ray.get_runtime_context().get_node_id(), "gpu_nodes_before": _fake_gpu_nodes(),
                "fake_gpu_before": ray.cluster_resources().get("fake_gpu", 0)}
        rows = ray.data.range(8).map_batches(WhereAmI, batch_format="numpy", **pool.map_batches_kwargs()).take_all()
        seen["ids"] = sorted(int(r["id"]) for r in rows)
        seen["served_by"] = sorted({str(r["node_id"]) for r in rows})
        seen["gpu_nodes_after_run"] = _fake_gpu_nodes()
        # Idle for idle_timeout_minutes -> the autoscaler removes the node again.
        deadline = time.monotonic() + removal_timeout_s
        while _fake_gpu_nodes() and time.monotonic() < deadline:
            time.sleep(1)
        seen["gpu_nodes_end"] = _fake_gpu_nodes()
        seen["fake_gpu_end"] = ray.cluster_resources().get("fake_gpu", 0)
        return seen
    finally:
        ray.shutdown()


@pytest.mark.timeout(900)
def test_gpu_like_pool_scales_a_worker_group_from_zero_and_back(tmp_path):
    from ray._private.services import get_node_ip_address
    from ray.autoscaler._private.util import validate_config

    from leaf_ray.config import config_from_dict

    (gcs_port,) = free_ports(1)
    gcs_address = f"{get_node_ip_address()}:{gcs_port}"
    autoscaling = fake_cluster_config(gcs_address)
    validate_config(autoscaling)  # Ray's autoscaler schema
    config_file = tmp_path / "fake-autoscaling.json"
    config_file.write_text(json.dumps(autoscaling))

    # The pool the detection pipeline would build from this config section.
    cfg = config_from_dict({"detection": {"student_pool": {
        "batch_size": 4, "num_cpus": 0.5, "min_actors": 1, "max_actors": 1, "resources": {"fake_gpu": 1}}}},
        "autoscaling test")
    pool = cfg.detection.student_pool
    assert pool.ray_resources() == {"CPU": 0.5, "fake_gpu": 1.0}

    env = ray_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    with private_head(num_cpus=1, gcs_port=gcs_port, env=env, node_ip=get_node_ip_address(),
                      extra_args=(f"--autoscaling-config={config_file}",)) as head:
        assert head.gcs_address == gcs_address
        driver = subprocess.run([sys.executable, __file__, gcs_address, pool.model_dump_json()],
                                env=ray_env(), check=False, capture_output=True, text=True, timeout=900)
        assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-5000:]
        seen = json.loads(driver.stdout.strip().splitlines()[-1])
        monitor_log = (Path(head.temp_dir) / "session_latest" / "logs" / "monitor.log").read_text()

    assert seen["gpu_nodes_before"] == [] and seen["fake_gpu_before"] == 0, "the GPU group starts at 0 nodes"
    assert seen["ids"] == list(range(8))
    # Every row was served by one actor on a new node, not the head: the autoscaler added exactly that node.
    assert len(seen["served_by"]) == 1 and seen["head_node"] not in seen["served_by"], seen
    assert seen["gpu_nodes_after_run"] == seen["served_by"], seen
    # ... and removed it once idle.
    assert seen["gpu_nodes_end"] == [] and seen["fake_gpu_end"] == 0, seen
    # The autoscaler did both, for this node type, the second for idleness.
    assert f"Adding 1 node(s) of type {WORKER_TYPE}" in monitor_log
    assert f"Removing 1 nodes of type {WORKER_TYPE} (idle)" in monitor_log


if __name__ == "__main__":  # the driver process of the test above
    print(json.dumps(drive(sys.argv[1], sys.argv[2])))
