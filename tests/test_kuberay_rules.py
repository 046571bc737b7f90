"""leaf_ray.kuberay_rules: each KubeRay admission rule refuses the one change that breaks it (made to our own
kuberay/ manifests, which pass), with an error naming the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from leaf_ray.kuberay_rules import AdmissionError, admission_errors, check_manifests, rayjob_name

KUBERAY = Path(__file__).resolve().parents[1] / "kuberay"


def _doc(name: str) -> dict:
    return next(d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d)


CLUSTER = _doc("raycluster.yaml")
JOB = _doc("rayjob.yaml")


def _embed(job: dict) -> dict:
    """`job` (our RayJob) bringing its own cluster instead of selecting ours."""
    del job["spec"]["clusterSelector"]
    job["spec"]["rayClusterSpec"] = copy.deepcopy(CLUSTER["spec"])
    job["spec"]["shutdownAfterJobFinishes"] = True
    return job


def _embedded_job() -> dict:
    return _embed(copy.deepcopy(JOB))


def _head(spec):
    return spec["headGroupSpec"]


def _worker(spec, i=0):
    return spec["workerGroupSpecs"][i]


def _head_env(spec):
    return _head(spec)["template"]["spec"]["containers"][0].setdefault("env", [])


# (rule, which document, the breaking change, a part of the error)
CLUSTER_CASES = [
    ("name too long", lambda d: d["metadata"].update(name="r" * 54), "at most 53"),
    ("name not a DNS-1035 label", lambda d: d["metadata"].update(name="leaf.ray"), "not a DNS-1035 label"),
    ("name starting with a digit", lambda d: d["metadata"].update(name="1leaf"), "not a DNS-1035 label"),
    ("head without containers", lambda d: _head(d["spec"])["template"]["spec"].update(containers=[]),
     "spec.headGroupSpec.template.spec.containers: a Ray group needs at least one container"),
    ("worker without containers", lambda d: _worker(d["spec"], 2)["template"]["spec"].update(containers=[]),
     "spec.workerGroupSpecs[2].template.spec.containers"),
    ("group names unique", lambda d: _worker(d["spec"], 3).update(groupName="cpu-workers"),
     "spec.workerGroupSpecs[3].groupName: 'cpu-workers' is already the name of workerGroupSpecs[0]"),
    ("rayStartParams values are strings", lambda d: _worker(d["spec"], 1)["rayStartParams"].update(
        {"num-gpus": 1}), "spec.workerGroupSpecs[1].rayStartParams.num-gpus: 1 is a int"),
    ("no rayStartParams labels", lambda d: _head(d["spec"])["rayStartParams"].update(labels="a=b"),
     "rayStartParams.labels: not supported"),
    ("resources in one place", lambda d: _worker(d["spec"], 1).update(resources={"GPU": "1"}),
     "spec.workerGroupSpecs[1]: Ray resources set both in rayStartParams (num-gpus, resources)"),
    ("group label key", lambda d: _worker(d["spec"]).update(labels={"-bad": "x"}), "'-bad' is not a valid label key"),
    ("group label value", lambda d: _worker(d["spec"]).update(labels={"zone": "a b"}),
     "labels.zone: 'a b' is not a valid label value"),
    ("minReplicas <= maxReplicas", lambda d: _worker(d["spec"]).update(minReplicas=9),
     "minReplicas 9 is greater than maxReplicas 8"),
    ("replicas not negative", lambda d: _worker(d["spec"]).update(minReplicas=-1), "minReplicas: -1 is negative"),
    ("min/max required without autoscaling", lambda d: (d["spec"].update(enableInTreeAutoscaling=False),
                                                        _worker(d["spec"]).pop("maxReplicas")),
     "minReplicas and maxReplicas must both be set when autoscaling is disabled"),
    ("autoscaler v2 restartPolicy", lambda d: _worker(d["spec"], 2)["template"]["spec"].update(
        restartPolicy="Always"), "workerGroupSpecs[2].template.spec.restartPolicy: 'Always'; with autoscaler v2"),
    ("autoscaler v2 restartPolicy (head)", lambda d: _head(d["spec"])["template"]["spec"].update(
        restartPolicy="OnFailure"), "headGroupSpec.template.spec.restartPolicy: 'OnFailure'"),
    ("v2 version and env not both", lambda d: _head_env(d["spec"]).append(
        {"name": "RAY_enable_autoscaler_v2", "value": "1"}), "use only the former"),
    ("v2 env needs autoscaling", lambda d: (d["spec"].update(enableInTreeAutoscaling=False), _head_env(
        d["spec"]).append({"name": "RAY_enable_autoscaler_v2", "value": "true"})),
     "RAY_enable_autoscaler_v2 is set while enableInTreeAutoscaling is false"),
    ("no suspended group with autoscaling", lambda d: _worker(d["spec"]).update(suspend=True),
     "cannot be suspended with autoscaling enabled"),
    ("idleTimeoutSeconds not negative", lambda d: d["spec"]["autoscalerOptions"].update(idleTimeoutSeconds=-5),
     "idleTimeoutSeconds: -5 is negative"),
    ("token auth needs rayVersion", lambda d: d["spec"].pop("rayVersion"), "spec.rayVersion: required"),
    ("token auth needs Ray >= 2.52", lambda d: d["spec"].update(rayVersion="2.51.1"), "older than 2.52.0"),
    ("rayVersion parses", lambda d: d["spec"].update(rayVersion="latest"), "'latest' is not a version"),
]

JOB_CASES = [
    ("name too long", lambda d: d["metadata"].update(name="j" * 48), "at most 47"),
    ("name not a DNS-1035 label", lambda d: d["metadata"].update(name="leaf-ray-paper-llama3.2-1b-math"),
     "'leaf-ray-paper-llama3.2-1b-math' is not a DNS-1035 label"),
    ("cluster or selector", lambda d: d["spec"].pop("clusterSelector"),
     "one of rayClusterSpec or clusterSelector must be set"),
    ("selector names a cluster", lambda d: d["spec"].update(clusterSelector={"team": "a"}),
     "needs a non-empty 'ray.io/cluster'"),
    ("selector not in SidecarMode", lambda d: (d["spec"].update(submissionMode="SidecarMode"),
                                               d["spec"].pop("submitterPodTemplate")),
     "clusterSelector: not supported in SidecarMode"),
    ("no submitter in SidecarMode", lambda d: _embed(d)["spec"].update(submissionMode="SidecarMode"),
     "spec.submitterPodTemplate: not supported in SidecarMode"),
    ("selector cannot suspend", lambda d: d["spec"].update(suspend=True, shutdownAfterJobFinishes=True),
     "suspend: not supported with clusterSelector"),
    ("suspend needs shutdown", lambda d: _embed(d)["spec"].update(suspend=True, shutdownAfterJobFinishes=False),
     "shutdownAfterJobFinishes false cannot be suspended"),
    ("ttl not negative", lambda d: d["spec"].update(ttlSecondsAfterFinished=-1), "-1 is negative"),
    ("ttl needs shutdown", lambda d: d["spec"].update(ttlSecondsAfterFinished=60),
     "ttlSecondsAfterFinished: needs shutdownAfterJobFinishes true"),
    ("backoffLimit not negative", lambda d: d["spec"].update(backoffLimit=-1), "backoffLimit: -1 is negative"),
    ("no retries in InteractiveMode", lambda d: d["spec"].update(submissionMode="InteractiveMode", backoffLimit=2),
     "backoffLimit: not supported in InteractiveMode"),
    ("activeDeadlineSeconds positive", lambda d: d["spec"].update(activeDeadlineSeconds=0),
     "activeDeadlineSeconds: 0 is not positive"),
    ("runtimeEnvYAML is YAML", lambda d: d["spec"].update(runtimeEnvYAML="env_vars: {a: 1"),
     "spec.runtimeEnvYAML: not valid YAML"),
    ("runtimeEnvYAML is a mapping", lambda d: d["spec"].update(runtimeEnvYAML="- pip"), "a mapping is required"),
]


def test_our_manifests_pass():
    assert admission_errors(CLUSTER) == [] and admission_errors(JOB) == []
    assert admission_errors(_embedded_job()) == []
    assert check_manifests(sorted(KUBERAY.glob("*.yaml"))) == 2


CASES = [("RayCluster", CLUSTER, *case) for case in CLUSTER_CASES] + [("RayJob", JOB, *case) for case in JOB_CASES]


@pytest.mark.parametrize("kind,base,rule,change,expected", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_admission_rule(kind, base, rule, change, expected):
    """Each rule, broken alone in a copy of our manifest: exactly one error, naming the object."""
    doc = copy.deepcopy(base)
    change(doc)
    errors = admission_errors(doc)
    assert len(errors) == 1 and expected in errors[0], errors
    assert errors[0].startswith(f"{kind} {doc['metadata']['name']}: ")


def test_rayjob_embedded_cluster_gets_the_cluster_rules():
    job = _embedded_job()
    _worker(job["spec"]["rayClusterSpec"], 3).update(groupName="train", minReplicas=2)
    [error] = admission_errors(job)
    assert "spec.rayClusterSpec.workerGroupSpecs[3]" in error and "minReplicas 2 is greater" in error


def test_check_manifests_names_file_and_field(tmp_path):
    bad = copy.deepcopy(JOB)
    bad["metadata"]["name"] = "a.b"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump_all([{"kind": "ConfigMap"}, bad]))
    with pytest.raises(AdmissionError, match=r"job\.yaml: RayJob a\.b: metadata\.name: 'a\.b' is not a DNS-1035"):
        check_manifests([tmp_path / "job.yaml"])


def test_rayjob_name():
    assert rayjob_name("configs/paper-qwen2.5-math-1.5b.yaml") == "leaf-ray-paper-qwen2-5-math-1-5b"
    assert rayjob_name("/app/configs/My_Run.yml") == "leaf-ray-my-run"
    with pytest.raises(ValueError, match="at most 47"):
        rayjob_name("x" * 50 + ".yaml")
