"""Regenerate tests/data/kuberay/<tag>/*.schema.json from a KubeRay git checkout.

    python scripts/refresh_kuberay_schemas.py /path/to/kuberay v1.5.0 v1.5.1 v1.7.0

For each tag it reads the RayCluster and RayJob CRDs that the release ships
(ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml, the same files as the Helm chart's crds/),
keeps the openAPIV3Schema of the served storage version (v1), drops the prose `description` fields (half the
size; they carry no rule) and writes it with its source recorded under `x-leaf-ray-source`. Nothing else is
changed: every type, enum, required list and x-kubernetes-* extension stays as the API server sees it.
The tags the tests pin are listed in tests/data/kuberay/README.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRDS = {"raycluster": "rayclusters", "rayjob": "rayjobs"}
CRD_PATH = "ray-operator/config/crd/bases/ray.io_{plural}.yaml"
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kuberay"
# Keys whose values are maps of name -> schema (the names are field names, never keywords).
SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
SCHEMA_ONE = ("items", "additionalProperties", "not")


def strip_descriptions(node):
    """The schema without its `description` keywords (a property *named* description is kept)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key in SCHEMA_MAPS:
            out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS:
            out[key] = [strip_descriptions(sub) for sub in value]
        elif key in SCHEMA_ONE and isinstance(value, dict):
            out[key] = strip_descriptions(value)
        else:
            out[key] = value
    return out


def crd_schema(checkout: Path, tag: str, plural: str) -> dict:
    path = CRD_PATH.format(plural=plural)
    text = subprocess.run(["git", "-C", str(checkout), "show", f"{tag}:{path}"], check=True,
                          capture_output=True, text=True).stdout
    crd = yaml.safe_load(text)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"], f"{tag} {plural}: v1 is not the served storage version"
    commit = subprocess.run(["git", "-C", str(checkout), "rev-list", "-n1", tag], check=True,
                            capture_output=True, text=True).stdout.strip()
    schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
    schema["x-leaf-ray-source"] = {"repository": "ray-project/kuberay", "tag": tag, "commit": commit,
                                   "path": path, "version": "v1", "descriptions": "removed"}
    return schema


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    checkout, tags = Path(argv[0]), argv[1:]
    for tag in tags:
        for kind, plural in CRDS.items():
            schema = crd_schema(checkout, tag, plural)
            dest = OUT / tag / f"{kind}.schema.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
            print(f"{dest.relative_to(OUT.parents[2])}: {dest.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
