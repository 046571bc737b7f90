#!/usr/bin/env bash
# `make gpu-wheels`: the Python packages leaf-ray's gpu tier imports that the lent GPU machines' image lacks
# (scripts/gpu_image_packages.txt), as Python 3.12 manylinux wheels in .gpu-wheels/ (at most 60 MiB: it
# travels with the working tree). The set is the dependency closure of ROOTS as this checkout's .venv has it
# (the versions the CPU suite tested), minus the image's packages. A package with no wheel on PyPI (an sdist
# only: cellpylib) or one that must be built without ops (DeepSpeed, DS_BUILD_OPS=0) is built here; only pure-
# Python ones can be. No Ray, MLflow or vLLM: the gpu tier runs each stage's in-process path, tracking off.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PY=${VENV_PY:-.venv/bin/python}
LIMIT_MIB=60
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" - "$DEST" <<'PY'
import re, subprocess, sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

DEVICE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
dest = Path(sys.argv[1])
ROOTS = ["pydantic", "math-verify", "deepspeed", "typing-extensions"]  # not reasoning-gym: pycosat has no 3.12 wheel
BUILD_HERE = {"deepspeed"}          # an sdist on PyPI; built pure-Python (no ops)
KEEP_ANYWAY = {"typing-extensions"}  # pydantic-core needs a newer one than the image may hold
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
image = {norm(l.strip()) for l in Path("scripts/gpu_image_packages.txt").read_text().splitlines()
         if l.strip() and not l.startswith("#")}
wanted, todo = {}, list(ROOTS)
while todo:
    name = norm(todo.pop())
    if name in wanted or (name in image and name not in KEEP_ANYWAY):
        continue
    dist = metadata.distribution(name)
    wanted[name] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(DEVICE_ENV):  # extras and other Pythons left out
            todo.append(req.name)
print("gpu-wheels:", " ".join(f"{n}=={v}" for n, v in sorted(wanted.items())))
pip = [sys.executable, "-m", "pip", "-q"]
for name, version in sorted(wanted.items()):
    spec = f"{name}=={version}"
    if name not in BUILD_HERE:
        got = subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                                    "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
                                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                                    "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(dest), spec],
                             capture_output=True, text=True)
        if got.returncode == 0:
            continue
    env = {"DS_BUILD_OPS": "0", "PATH": "/usr/bin:/bin"}
    built = subprocess.run(pip + ["wheel", "--no-deps", "-w", str(dest), spec], capture_output=True, text=True,
                           env={**__import__("os").environ, **env})
    if built.returncode != 0:
        sys.exit(f"gpu-wheels: no wheel for {spec}:\n{built.stderr[-2000:]}")
    for whl in dest.glob(f"{name.replace('-', '_')}-*.whl"):
        if not whl.name.endswith("-none-any.whl"):
            sys.exit(f"gpu-wheels: {whl.name} built here is not pure Python: it would not run on Python 3.12")
PY
size_kib=$(du -sk "$DEST" | cut -f1)
ls -1 "$DEST"
echo "gpu-wheels: $(ls "$DEST" | wc -l) wheels, $((size_kib / 1024)) MiB in $DEST"
[ "$size_kib" -le $((LIMIT_MIB * 1024)) ] || { echo "gpu-wheels: over $LIMIT_MIB MiB"; exit 1; }
