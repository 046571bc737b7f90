"""Validate a custom resource the way the API server does with its CRD's structural schema, offline.

The schema is KubeRay's own openAPIV3Schema (tests/data/kuberay/<tag>/, scripts/refresh_kuberay_schemas.py).
It is OpenAPI v3 with Kubernetes' extensions, so plain JSON Schema would be too lenient in places. Mapped here:
- unknown fields: an object schema with `properties` and neither `additionalProperties` nor
  `x-kubernetes-preserve-unknown-fields: true` refuses any other key (what `kubectl apply` does with its
  default --validate=strict; a lenient apply would prune them silently);
- `nullable`: null only where the schema says `nullable: true`;
- `x-kubernetes-int-or-string`: an integer or a string (the schema's anyOf and pattern apply as written);
- `x-kubernetes-list-type`: `set` items unique; `map` items unique by their `x-kubernetes-list-map-keys`
  (e.g. two containers with one name, two ports with one containerPort/protocol);
- `format` int32/int64: range-checked;
- `x-kubernetes-validations` (CEL): not evaluated here, so a document that sets a field carrying a rule fails
  with a message saying so (none of ours does);
- the root `metadata` (`type: object` in every CRD; the API server checks it as ObjectMeta): validated against
  Kubernetes' strict ObjectMeta schema from the kubernetes-validate package.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

SCHEMAS = Path(__file__).parent / "data" / "kuberay"
KINDS = {"RayCluster": "raycluster", "RayJob": "rayjob"}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def to_json_schema(node):
    """A JSON Schema (2020-12) node with the API server's semantics for this structural-schema node."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key == "x-leaf-ray-source":
            continue
        else:
            out[key] = value
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = set()
        for item in instance:
            key = json.dumps(item, sort_keys=True)
            if key in seen:
                yield ValidationError(f"duplicate entry {item!r} in a list of type set")
            seen.add(key)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {k: (schema.get("items", {}).get("properties", {}).get(k) or {}).get("default") for k in keys}
        seen = {}
        for i, item in enumerate(instance):
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(k, defaults[k]) for k in keys)
            if key in seen:
                yield ValidationError(f"items [{seen[key]}] and [{i}] have the same map keys "
                                      f"{dict(zip(keys, key))} in a list of type map")
            seen.setdefault(key, i)


def _cel_rules(validator, rules, instance, schema):
    yield ValidationError("this field carries CEL rules that are not evaluated offline: "
                          + "; ".join(r.get("message", r.get("rule", "")) for r in rules))


CRDValidator = jsonschema.validators.extend(
    Draft202012Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)

FORMATS = FormatChecker(())
for _name, (_lo, _hi) in INT_RANGES.items():
    FORMATS.checks(_name)(lambda v, lo=_lo, hi=_hi: not isinstance(v, int) or lo <= v <= hi)


def kuberay_tags() -> list[str]:
    return sorted(p.name for p in SCHEMAS.iterdir() if p.is_dir())


@cache
def _object_meta_registry(k8s_version: str) -> Registry:
    import importlib.resources

    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads((root / f"v{k8s_version}.0-local-strict" / "_definitions.json").read_text())
    return Registry().with_resource(DEFINITIONS_URI, Resource.from_contents(defs))


@cache
def validator(tag: str, kind: str, k8s_version: str = "1.33") -> CRDValidator:
    raw = json.loads((SCHEMAS / tag / f"{KINDS[kind]}.schema.json").read_text())
    schema = to_json_schema(raw)
    schema["properties"]["metadata"] = {"$ref": f"{DEFINITIONS_URI}#/$defs/{OBJECT_META}"}
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    return CRDValidator(schema, registry=_object_meta_registry(k8s_version), format_checker=FORMATS)


def schema_errors(doc: dict, tag: str, k8s_version: str = "1.33") -> list[str]:
    """Every way `doc` (a RayCluster or RayJob) breaks KubeRay `tag`'s CRD schema, as "path: message"."""
    errors = validator(tag, doc["kind"], k8s_version).iter_errors(doc)
    return sorted(f"{e.json_path}: {e.message}" for e in errors)
