"""KubeRay's admission rules that its CRD schema cannot express, checked offline.

The KubeRay operator (v1.5.1 to v1.7.0) validates every RayCluster and RayJob in its reconciler and, when
installed, in a validating webhook (ray-operator/controllers/ray/utils/validation.go and
ray-operator/pkg/webhooks/v1/*_webhook.go). A resource that breaks one of these rules passes
`kubectl apply` without the webhook, then sits in a failed state (a RayJob in `ValidationFailed`, never
submitted). This module re-states the rules that apply to manifests like kuberay/ so that they fail here,
before a cluster sees them. Rules that depend on operator feature gates or on fields we never set (GCS fault
tolerance, deletion strategies, network policies, TLS, history server) are not re-stated; a manifest that
uses them needs the operator's own check (`kubectl apply --dry-run=server` with the webhook installed).

    from leaf_ray.kuberay_rules import admission_errors
    for doc in yaml.safe_load_all(open("kuberay/rayjob.yaml")):
        print(admission_errors(doc))     # [] when the operator accepts it

Each error names the resource, the field path and what is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

# ray-operator/controllers/ray/utils/constant.go: names of derived objects (services, pods) get suffixes.
MAX_RAYCLUSTER_NAME = 53
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
# k8s.io/apimachinery/pkg/util/validation: IsDNS1035Label, IsQualifiedName, IsValidLabelValue
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
# rayStartParams that declare a group's Ray resources; KubeRay refuses them beside the group's `resources`.
RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
CLUSTER_SELECTOR_KEY = "ray.io/cluster"


class AdmissionError(ValueError):
    """One or more resources the KubeRay operator would refuse; the message lists every error."""


def admission_errors(doc: dict) -> list[str]:
    """Every rule `doc` breaks, as "Kind name: field: what is wrong". Kinds other than RayCluster and
    RayJob have no KubeRay rules and give []."""
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name", "")
    if kind == "RayCluster":
        errors = _name_errors("RayCluster", name, MAX_RAYCLUSTER_NAME)
        errors += _cluster_spec_errors(doc.get("spec") or {}, "spec")
    elif kind == "RayJob":
        errors = _name_errors("RayJob", name, MAX_RAYJOB_NAME)
        errors += _rayjob_spec_errors(doc.get("spec") or {})
    else:
        return []
    return [f"{kind} {name or '<no name>'}: {e}" for e in errors]


def check_manifests(paths) -> int:
    """Raise AdmissionError listing every rule broken by the RayCluster/RayJob documents in the YAML files
    `paths`; return how many such documents were checked."""
    errors, checked = [], 0
    for path in map(Path, paths):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in ("RayCluster", "RayJob"):
                checked += 1
                errors += [f"{path}: {e}" for e in admission_errors(doc)]
    if errors:
        raise AdmissionError("\n".join(errors))
    return checked


def rayjob_name(config_path: str | Path, prefix: str = "leaf-ray-") -> str:
    """The RayJob name for a config file: its stem, lower-cased, every character a DNS label refuses
    (`.`, `_`) made a `-` (`paper-llama3.2-1b-math.yaml` -> `leaf-ray-paper-llama3-2-1b-math`)."""
    stem = re.sub(r"[^a-z0-9-]+", "-", Path(config_path).stem.lower()).strip("-")
    name = f"{prefix}{stem}"
    if errors := _name_errors("RayJob", name, MAX_RAYJOB_NAME):
        raise ValueError(f"{config_path}: no valid RayJob name: {'; '.join(errors)}")
    return name


# --------------------------------------------------------------------------- metadata


def _name_errors(kind: str, name: str, max_len: int) -> list[str]:
    errors = []
    if len(name) > max_len:
        errors.append(f"metadata.name: {name!r} has {len(name)} characters, a {kind} name at most {max_len}")
    if not DNS1035_LABEL.fullmatch(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label (lower-case letters, digits and '-', "
                      "starting with a letter, ending with a letter or digit; no '.')")
    return errors


# --------------------------------------------------------------------------- RayCluster spec


def _groups(spec: dict, at: str) -> list[tuple[str, int | None, dict]]:
    """(field path, worker index or None for the head, group spec) for the head and every worker group."""
    out = [(f"{at}.headGroupSpec", None, spec.get("headGroupSpec") or {})]
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        out.append((f"{at}.workerGroupSpecs[{i}]", i, g))
    return out


def _pod(group: dict) -> dict:
    return (group.get("template") or {}).get("spec") or {}


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or []}


def _autoscaling(spec: dict) -> bool:
    return bool(spec.get("enableInTreeAutoscaling"))


def _autoscaler_v2(spec: dict) -> bool:
    """KubeRay's IsAutoscalingV2Enabled: autoscalerOptions.version v2, or the env var on the head."""
    if (spec.get("autoscalerOptions") or {}).get("version") == "v2":
        return True
    head = _pod(spec.get("headGroupSpec") or {}).get("containers") or [{}]
    value = (_env(head[0]).get(AUTOSCALER_V2_ENV) or {}).get("value", "")
    return value.lower() in ("1", "true")


def _cluster_spec_errors(spec: dict, at: str) -> list[str]:
    errors: list[str] = []
    autoscaling = _autoscaling(spec)
    seen: dict[str, int] = {}
    for path, index, group in _groups(spec, at):
        pod = _pod(group)
        if not pod.get("containers"):
            errors.append(f"{path}.template.spec.containers: a Ray group needs at least one container")
        params = group.get("rayStartParams") or {}
        for key, value in params.items():
            if not isinstance(value, str):
                errors.append(f"{path}.rayStartParams.{key}: {value!r} is a {type(value).__name__}; "
                              f"rayStartParams values must be strings (quote it: \"{value}\")")
        if "labels" in params:
            errors.append(f"{path}.rayStartParams.labels: not supported; use the group's `labels` field")
        set_params = [k for k in RESOURCE_PARAMS if params.get(k)]
        if set_params and group.get("resources"):
            errors.append(f"{path}: Ray resources set both in rayStartParams ({', '.join(set_params)}) and in "
                          "`resources`; use only one")
        for key, value in (group.get("labels") or {}).items():
            if not _qualified_name(key):
                errors.append(f"{path}.labels: {key!r} is not a valid label key")
            if not (isinstance(value, str) and len(value) <= 63 and LABEL_VALUE.fullmatch(value)):
                errors.append(f"{path}.labels.{key}: {value!r} is not a valid label value")
        if autoscaling and _autoscaler_v2(spec):
            policy = pod.get("restartPolicy", "")
            if policy not in ("", "Never"):
                errors.append(f"{path}.template.spec.restartPolicy: {policy!r}; with autoscaler v2 it must be "
                              "Never or unset")
        if index is None:  # the rest is about worker groups
            continue
        name = group.get("groupName")
        if name in seen:
            errors.append(f"{path}.groupName: {name!r} is already the name of workerGroupSpecs[{seen[name]}]; "
                          "worker group names must be unique")
        seen.setdefault(name, index)
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{path}: minReplicas and maxReplicas must both be set when autoscaling is disabled")
        for key, value in (("minReplicas", lo), ("maxReplicas", hi)):
            if value is not None and value < 0:
                errors.append(f"{path}.{key}: {value} is negative")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{path}: minReplicas {lo} is greater than maxReplicas {hi}")
        if autoscaling and group.get("suspend"):
            errors.append(f"{path}.suspend: a worker group cannot be suspended with autoscaling enabled")
    head = (_pod(spec.get("headGroupSpec") or {}).get("containers") or [{}])[0]
    head_env = _env(head)
    if not autoscaling and (head_env.get(AUTOSCALER_V2_ENV) or {}).get("value", "") in ("1", "true"):
        errors.append(f"{at}.headGroupSpec: {AUTOSCALER_V2_ENV} is set while enableInTreeAutoscaling is false")
    options = spec.get("autoscalerOptions") or {}
    if autoscaling and options.get("version") and AUTOSCALER_V2_ENV in head_env:
        errors.append(f"{at}.autoscalerOptions.version and the head's {AUTOSCALER_V2_ENV} env var are both set; "
                      "use only the former")
    if (idle := options.get("idleTimeoutSeconds")) is not None and idle < 0:
        errors.append(f"{at}.autoscalerOptions.idleTimeoutSeconds: {idle} is negative")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = str(spec.get("rayVersion", ""))
        parsed = _version(version)
        if not version:
            errors.append(f"{at}.rayVersion: required with authOptions.mode token (Ray >= 2.52.0)")
        elif parsed is None:
            errors.append(f"{at}.rayVersion: {version!r} is not a version (authOptions.mode token)")
        elif parsed < MIN_RAY_FOR_TOKEN_AUTH:
            errors.append(f"{at}.rayVersion: {version} is older than 2.52.0, the first Ray with token auth")
    return errors


def _qualified_name(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.fullmatch(prefix)):
        return False
    return len(name) <= 63 and bool(QUALIFIED_NAME.fullmatch(name))


def _version(text: str) -> tuple[int, ...] | None:
    """Like k8s version.ParseGeneric: at least major.minor, numeric."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    return tuple(int(x or 0) for x in m.groups()) if m else None


# --------------------------------------------------------------------------- RayJob spec


def _rayjob_spec_errors(spec: dict) -> list[str]:
    errors = []
    mode = spec.get("submissionMode", "K8sJobMode")
    selector = spec.get("clusterSelector") or {}
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if spec.get("suspend") and not shutdown:
        errors.append("spec.suspend: a RayJob with shutdownAfterJobFinishes false cannot be suspended")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        errors.append(f"spec.ttlSecondsAfterFinished: {ttl} is negative")
    elif ttl > 0 and not shutdown:
        errors.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes true")
    if selector:
        if not selector.get(CLUSTER_SELECTOR_KEY):
            errors.append(f"spec.clusterSelector: needs a non-empty {CLUSTER_SELECTOR_KEY!r} (the RayCluster name)")
        if spec.get("suspend"):
            errors.append("spec.suspend: not supported with clusterSelector")
        if mode == "SidecarMode":
            errors.append("spec.clusterSelector: not supported in SidecarMode")
    elif not spec.get("rayClusterSpec"):
        errors.append("spec: one of rayClusterSpec or clusterSelector must be set")
    backoff = spec.get("backoffLimit")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        errors.append("spec.backoffLimit: not supported in InteractiveMode")
    if backoff is not None and backoff < 0:
        errors.append(f"spec.backoffLimit: {backoff} is negative")
    if mode == "SidecarMode":
        for key in ("submitterPodTemplate", "submitterConfig"):
            if spec.get(key):
                errors.append(f"spec.{key}: not supported in SidecarMode")
    if spec.get("rayClusterSpec"):
        errors += _cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec")
    if spec.get("runtimeEnvYAML"):
        try:
            env = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as e:
            errors.append(f"spec.runtimeEnvYAML: not valid YAML ({str(e).splitlines()[0]})")
        else:
            if env is not None and not isinstance(env, dict):
                errors.append(f"spec.runtimeEnvYAML: a mapping is required, got a {type(env).__name__}")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and deadline <= 0:
        errors.append(f"spec.activeDeadlineSeconds: {deadline} is not positive")
    return errors


if __name__ == "__main__":  # python -m leaf_ray.kuberay_rules kuberay/*.yaml
    import sys

    try:
        n = check_manifests(sys.argv[1:])
    except AdmissionError as e:
        sys.exit(str(e))
    print(f"{n} RayCluster/RayJob documents: no KubeRay admission rule broken")
