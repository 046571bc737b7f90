"""The KubeRay manifests have the structure the paper setting needs and agree with the configs.

Schema validation (KubeRay's CRDs, Kubernetes' schemas, `kubectl kustomize`) is in test_kuberay_schema.py and
the operator's admission rules in test_kuberay_rules.py. Here: Ray's own KubeRay autoscaler code
(`_derive_autoscaling_config_from_ray_cr`) turns our RayCluster into the autoscaler's node types exactly as the
autoscaler sidecar will, and every Ray resource request in configs/paper-*.yaml is checked against them; and
the operational choices of the manifests (storage ownership, rollout strategy, credentials) are pinned.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

from leaf_ray.config import LeafConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "kuberay"
PAPER = sorted((ROOT / "configs").glob("paper-*.yaml"))
GPU_GROUPS = {"student-saliency", "teacher-saliency", "train"}
WORKER_GROUPS = {"cpu-workers"} | GPU_GROUPS
IMAGE_ROOT = PurePosixPath("/app")  # where kuberay/Dockerfile puts the repository


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]


def _one(name: str, kind: str) -> dict:
    found = [d for d in _docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _one("raycluster.yaml", "RayCluster")


@pytest.fixture(scope="module")
def node_types(raycluster) -> dict[str, dict]:
    """The autoscaler's view of the cluster, derived by Ray's own KubeRay code (schema-validated)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {**raycluster, "metadata": {**raycluster["metadata"], "namespace": "leaf-ray"}}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def _pod_specs(raycluster) -> dict[str, dict]:
    specs = {"head": raycluster["spec"]["headGroupSpec"]["template"]["spec"]}
    for g in raycluster["spec"]["workerGroupSpecs"]:
        specs[g["groupName"]] = g["template"]["spec"]
    return specs


def _all_pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template in every manifest, RayCluster groups and RayJob included."""
    out = []
    for f in sorted(KUBERAY.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if not d or d.get("kind") == "Kustomization":
                continue
            if d["kind"] == "RayCluster":
                out += [(f"{f.name}:{k}", v) for k, v in _pod_specs(d).items()]
            elif d["kind"] == "RayJob":
                out.append((f"{f.name}:submitter", d["spec"]["submitterPodTemplate"]["spec"]))
            elif d["kind"] in ("Deployment", "StatefulSet"):
                out.append((f"{f.name}:{d['metadata']['name']}", d["spec"]["template"]["spec"]))
    return out


def _pool_demands(cfg: LeafConfig) -> dict[str, tuple[dict[str, float], int]]:
    """Each Ray resource bundle the config asks for, with how many of them run at once (at most), taken from
    the code that makes the requests: `PoolConfig.ray_resources` (every actor pool) and the trainer's
    `worker_resources` (Ray Train's resources_per_worker)."""
    from leaf_ray.distill.driver import worker_resources

    det, tr = cfg.detection, cfg.distill.resources
    train = worker_resources(cfg)
    return {
        "detection.student_pool": (det.student_pool.ray_resources(), det.student_pool.max_actors),
        "detection.teacher_pool": (det.teacher_pool.ray_resources(), det.teacher_pool.max_actors),
        "generation.pool": (cfg.generation.pool.ray_resources(), cfg.generation.pool.max_actors),
        "distill.resources": (train, tr.num_workers),
    }


def _fits(demand: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in demand.items() if v)


def _per_node(demand: dict[str, float], node: dict[str, float]) -> int:
    return int(min(node.get(k, 0) // v for k, v in demand.items() if v))


# --------------------------------------------------------------------------- every manifest


def test_every_manifest_parses_and_is_in_the_kustomization():
    files = sorted(p.name for p in KUBERAY.glob("*.yaml") if p.name != "kustomization.yaml")
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == files
    assert kustomization["namespace"] == "leaf-ray"
    for name in files:
        for doc in _docs(name):
            assert doc.get("apiVersion") and doc.get("kind"), f"{name}: a document lacks apiVersion/kind"
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]), name
    kinds = {d["kind"] for n in files for d in _docs(n)}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet", "PersistentVolumeClaim",
            "Namespace"} <= kinds


@pytest.mark.parametrize("where,pod", _all_pod_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_pods_run_as_non_root(where, pod):
    sc = pod.get("securityContext", {})
    assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
    assert sc.get("runAsUser", 1) != 0, f"{where}: runs as uid 0"
    assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
    for c in pod["containers"] + pod.get("initContainers", []):
        csc = c.get("securityContext", {})
        assert csc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
        assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
        assert not csc.get("privileged"), f"{where}/{c['name']}"


def test_every_claim_a_pod_mounts_exists():
    claims = {d["metadata"]["name"] for d in _docs("storage.yaml") if d["kind"] == "PersistentVolumeClaim"}
    used = set()
    for where, pod in _all_pod_specs():
        mounted = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{where}: unknown claim"
                used.add(v["persistentVolumeClaim"]["claimName"])
            assert v["name"] in mounted, f"{where}: volume {v['name']} is never mounted"
    assert used == claims, f"claims nobody mounts: {claims - used}"


# --------------------------------------------------------------------------- RayCluster


def test_raycluster_autoscaling_v2_and_cpu_only_head(raycluster):
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["autoscalerOptions"]["securityContext"]["runAsNonRoot"] is True
    assert spec["authOptions"]["mode"] == "token"  # Ray 2.60 requires token auth by default
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must schedule no work"
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits


def test_raycluster_ray_version_matches_the_image(raycluster):
    import ray

    assert raycluster["spec"]["rayVersion"] == ray.__version__
    base = next(line.split()[1] for line in (KUBERAY / "Dockerfile").read_text().splitlines()
                if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")
    images = {c["image"] for _, pod in _all_pod_specs() for c in pod["containers"]
              if not c["image"].startswith("postgres:")}
    assert images == {"leaf-ray:0.1.0"}, "every Ray/MLflow pod must run the one leaf-ray image"


def test_worker_groups_and_scale_from_zero(raycluster, node_types):
    groups = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == WORKER_GROUPS
    for name, g in groups.items():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert node_types[name]["resources"].get("GPU", 0) == gpus, f"{name}: Ray sees another GPU count"
        assert node_types[name]["min_workers"] == g["minReplicas"]
        assert node_types[name]["max_workers"] == g["maxReplicas"]
        if name in GPU_GROUPS:
            assert gpus >= 1 and g["minReplicas"] == 0, f"{name}: a GPU group must scale from 0"
            assert g["template"]["spec"]["restartPolicy"] == "Never"
    resources = {name: t["resources"] for name, t in node_types.items()}
    assert resources["student-saliency"]["GPU"] == 1
    assert resources["teacher-saliency"]["GPU"] == 8
    # The head takes no work, so Ray Data's CPU tasks need the CPU group.
    assert resources["cpu-workers"]["CPU"] > 0 and resources["headgroup"]["CPU"] == 0


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_config_requests_fit_the_worker_groups(path, node_types):
    """Each pool's bundle fits the one group its custom resources name, and the group can hold as many
    of them as the pool may start (max actors / training workers)."""
    cfg = load_config(path)
    workers = {k: v for k, v in node_types.items() if k != "headgroup"}
    for pool, (demand, count) in _pool_demands(cfg).items():
        custom = {k for k in demand if k not in ("CPU", "GPU", "memory")}
        assert custom, f"{path.name} {pool}: no custom resource pins it to a worker group"
        named = [g for g, n in workers.items() if custom <= set(n["resources"])]
        assert len(named) == 1, f"{path.name} {pool}: {sorted(custom)} names groups {named}"
        group = named[0]
        node = workers[group]["resources"]
        assert _fits(demand, node), f"{path.name} {pool}: {demand} does not fit {group} {node}"
        if demand.get("GPU"):
            assert group in GPU_GROUPS and demand["GPU"] == int(demand["GPU"])
        capacity = _per_node(demand, node) * workers[group]["max_workers"]
        assert count <= capacity, f"{path.name} {pool}: {count} needed, {group} holds {capacity}"


def test_every_gpu_group_is_used_by_a_paper_config(node_types):
    asked = set()
    for path in PAPER:
        for demand, _ in _pool_demands(load_config(path)).values():
            asked |= set(demand)
    for group in GPU_GROUPS:
        custom = {k for k in node_types[group]["resources"] if k not in ("CPU", "GPU", "memory")}
        assert custom and custom <= asked, f"{group} advertises {custom}, no config asks for it"


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_config_paths_are_on_volumes_every_ray_pod_mounts(path, raycluster):
    cfg = load_config(path)
    writable = {"run.root_dir": cfg.run.root_dir}
    readable = {"models.teacher.path": cfg.models.teacher.path, "models.student.path": cfg.models.student.path}
    readable |= {f"data.paths[{i}]": p for i, p in enumerate(cfg.data.paths)}
    readable |= {f"evaluation.{b.name}.path": b.path for b in cfg.evaluation.benchmarks if b.path}
    for where, pod in _pod_specs(raycluster).items():
        mounts = pod["containers"][0]["volumeMounts"]
        for key, p in (readable | writable).items():
            covering = [m for m in mounts if PurePosixPath(p).is_relative_to(m["mountPath"])]
            assert covering, f"{path.name} {key}={p} is not on a volume of the {where} pod"
            if key in writable:
                assert not covering[0].get("readOnly"), f"{path.name} {key}: read-only in {where}"


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_config_tracking_uri_is_the_mlflow_service(path):
    service = next(d for d in _docs("mlflow.yaml") if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    uri = urlparse(load_config(path).tracking.tracking_uri)
    assert (uri.hostname, uri.port) == ("mlflow", service["spec"]["ports"][0]["port"])


# --------------------------------------------------------------------------- RayJob


def test_rayjob_runs_the_chain_with_a_paper_config(raycluster):
    job = _one("rayjob.yaml", "RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["leaf-ray", "run"]
    config = PurePosixPath(argv[argv.index("--config") + 1])
    assert config.is_relative_to(IMAGE_ROOT / "configs") and config.name.startswith("paper-")
    assert (ROOT / config.relative_to(IMAGE_ROOT)).is_file(), f"{config} is not in configs/"
    load_config(ROOT / config.relative_to(IMAGE_ROOT))
    # The image carries configs/ at /app/configs and installs the `leaf-ray` script.
    assert "COPY --chown=1000:100 configs /app/configs" in (KUBERAY / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^leaf-ray = "leaf_ray\.cli:app"', pyproject, re.MULTILINE)
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    assert "command" not in submitter["containers"][0], "KubeRay fills in the `ray job submit` command"
    yaml.safe_load(spec["runtimeEnvYAML"])


# --------------------------------------------------------------------------- MLflow


def test_mlflow_server_uses_the_database_and_artifact_volume():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs("mlflow.yaml")}
    deploy = docs[("Deployment", "mlflow")]
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else True for a in container["args"]}
    env = [e["name"] for e in container["env"]]
    uri = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    backend = urlparse(uri)
    assert backend.scheme == "postgresql"
    pg_service = docs[("Service", backend.hostname)]
    assert backend.port == pg_service["spec"]["ports"][0]["port"]
    pg = docs[("StatefulSet", "mlflow-postgres")]
    assert pg_service["spec"]["selector"].items() <= pg["spec"]["template"]["metadata"]["labels"].items()
    assert pg["spec"]["volumeClaimTemplates"], "the database needs persistent storage"
    # Credentials come from the one Secret, in the database and in the server.
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    pg_refs = {e["secretRef"]["name"] for e in pg["spec"]["template"]["spec"]["containers"][0]["envFrom"]}
    assert secret_refs == pg_refs == {"mlflow-db"}
    # The kubelet expands $(VAR) only from variables defined earlier in the list.
    for var in re.findall(r"\$\((\w+)\)", uri):
        assert var in env[:env.index("MLFLOW_BACKEND_STORE_URI")], var
    # Artifacts are proxied by the server into a mounted claim.
    assert args["--serve-artifacts"] is True
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert args["--artifacts-destination"] in mounts
    service = docs[("Service", "mlflow")]
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in pod["containers"][0]["ports"]}


def test_mlflow_accepts_the_in_cluster_host_header():
    """MLflow 3 rejects unknown Host headers (DNS-rebinding guard): the Ray pods' `mlflow:5000` must pass,
    checked with MLflow's own matcher."""
    from mlflow.server.security_utils import is_allowed_host_header

    deploy = _one("mlflow.yaml", "Deployment")
    arg = next(a for a in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
               if a.startswith("--allowed-hosts="))
    allowed = arg.split("=", 1)[1].split(",")
    for host in ("mlflow:5000", "mlflow.leaf-ray.svc.cluster.local:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")


def test_mlflow_database_password_is_never_an_argument():
    """The URI with the password reaches `mlflow server` through MLFLOW_BACKEND_STORE_URI (an option's
    environment variable in MLflow's own CLI), not through argv, which any process on the node can read."""
    from mlflow.cli import server

    container = _one("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    argv = " ".join(container.get("command", []) + container["args"])
    assert "PASSWORD" not in argv and "backend-store-uri" not in argv
    option = next(p for p in server.params if p.name == "backend_store_uri")
    assert option.envvar == "MLFLOW_BACKEND_STORE_URI"


def test_mlflow_is_recent_enough_for_allowed_hosts():
    """`--allowed-hosts` (the Host-header guard) came with MLflow 3.5.0; pyproject must not allow older."""
    from mlflow.cli import server

    assert re.search(r'"mlflow>=3\.5"', (ROOT / "pyproject.toml").read_text())
    assert any(p.name == "allowed_hosts" for p in server.params)


def test_mlflow_deployment_recreates_its_rwo_volume_pod():
    deploy = _one("mlflow.yaml", "Deployment")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in deploy["spec"]["template"]["spec"]["volumes"]}
    modes = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in _docs("storage.yaml")}
    assert any(modes[c] == ["ReadWriteOnce"] for c in claims)
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}, "a rolling update stalls on a RWO claim"


def test_statefulset_service_is_headless():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs("mlflow.yaml")}
    for (kind, _), sts in docs.items():
        if kind == "StatefulSet":
            service = docs[("Service", sts["spec"]["serviceName"])]
            assert service["spec"]["clusterIP"] == "None"
            assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_fsgroup_changes_ownership_only_on_mismatch():
    for where, pod in _all_pod_specs():
        sc = pod.get("securityContext", {})
        if "fsGroup" in sc:
            assert sc.get("fsGroupChangePolicy") == "OnRootMismatch", where
    assert "fsGroupChangePolicy" in (KUBERAY / "storage.yaml").read_text()  # NFS ownership documented there


def test_gpu_groups_set_num_gpus_explicitly(raycluster, node_types):
    for g in raycluster["spec"]["workerGroupSpecs"]:
        limit = g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        if g["groupName"] in GPU_GROUPS:
            assert g["rayStartParams"]["num-gpus"] == limit, g["groupName"]
            assert node_types[g["groupName"]]["resources"]["GPU"] == int(limit)
        else:
            assert limit is None and "num-gpus" not in g["rayStartParams"]


def test_minimum_kuberay_is_stated_as_1_5_1():
    for name in ("raycluster.yaml", "kustomization.yaml", "README.md"):
        text = (KUBERAY / name).read_text()
        assert "1.5.1" in text and not re.search(r"KubeRay[^.\n]*>= ?1\.5(?![.\d])", text), name


def test_readme_steps_name_what_the_manifests_create(raycluster):
    """The apply/submit/resume commands of kuberay/README.md name the objects the files actually create."""
    text = (KUBERAY / "README.md").read_text()
    steps = text.split("```bash\n", 1)[1].split("```", 1)[0]
    names = {(d["kind"], d["metadata"]["name"]) for f in KUBERAY.glob("*.yaml") for d in _docs(f.name)
             if d.get("kind") != "Kustomization"}
    cluster = raycluster["metadata"]["name"]
    names |= {("Service", f"{cluster}-head-svc"), ("Secret", cluster)}  # created by KubeRay for the cluster
    namespace = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())["namespace"]
    assert set(re.findall(r"kubectl -n (\S+)", steps)) == {namespace}
    for kind, word in (("RayJob", r"rayjob (\S+)"), ("Service", r"svc/(\S+)"), ("Secret", r"get secret (\S+)")):
        found = re.findall(word, steps)
        assert found and all((kind, n) in names for n in found), (kind, found)
    secret = re.search(r"create secret generic (\S+)", steps).group(1)
    keys = set(re.findall(r"--from-literal=(\w+)=", steps))
    mlflow_env = _one("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in mlflow_env if "valueFrom" in e}
    assert refs == {(secret, k) for k in keys}
    for path in re.findall(r"kubectl apply -[fk] (\S+)", steps):
        assert (ROOT / path).exists(), path
    job = _one("rayjob.yaml", "RayJob")["metadata"]["name"]
    assert f"delete rayjob {job} && kubectl apply -k kuberay/" in steps  # resume
    assert "1.5.1" in text and "1.7.0" in text and "1.30, 1.33, 1.37" in text
