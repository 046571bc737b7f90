"""The README's config reference, generated from the pydantic models (a test checks the README)."""

from __future__ import annotations

import json

from leaf_ray.config import iter_fields

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def config_reference_markdown() -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, type_name, default, desc in iter_fields():
        d = json.dumps(default, ensure_ascii=False)
        lines.append(f"| `{key}` | {type_name} | `{d}` | {desc.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"
