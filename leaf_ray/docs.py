"""The configuration reference (docs/configuration.md), generated from the pydantic models by
`leaf-ray config reference` (a test checks that the committed page is what it prints)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from leaf_ray.config import LeafConfig
from leaf_ray.registry import RegisteredName

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def config_reference_markdown() -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, type_name, default, desc in iter_fields():
        d = json.dumps(default, ensure_ascii=False)
        lines.append(f"| `{key}` | {type_name} | `{d}` | {desc.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def _type_name(ann: Any) -> str:
    import typing

    origin = typing.get_origin(ann)
    if origin is Literal:
        return " &#124; ".join(json_repr(a) for a in typing.get_args(ann))
    if origin is not None and str(origin) in ("typing.Union", "<class 'types.UnionType'>"):
        return " &#124; ".join(_type_name(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(ann, "__name__", str(ann))


def json_repr(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def iter_fields(model: type[BaseModel] = LeafConfig, prefix: str = ""):
    """Yield (dotted key, type name, default, description) for the configuration reference."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from iter_fields(ann, key + ".")
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        registered = next((m for m in field.metadata if isinstance(m, RegisteredName)), None)
        if registered is not None:  # the built-in names; a module can register more (docs/extending.md)
            choices = " &#124; ".join(json_repr(c) for c in registered.builtins())
            yield key, f"{choices} &#124; a registered {registered.registry.what}", default, field.description or ""
            continue
        if field.is_required():
            yield key, _type_name(ann) + " (required)", default, field.description or ""
            continue
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        elif isinstance(default, list):
            default = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default]
        yield key, _type_name(ann), default, field.description or ""
