"""Dagster run-config schemas derived from the library's pydantic models.

Why derive instead of subclassing ``dg.Config``: ``TrainConfig`` lives in ``training_core``, which must
never import dagster, and ``dg.Config`` only nests other ``dg.Config`` classes, so a copy of every
model would be needed and would drift. Why not a permissive dict: the launchpad would show no fields,
no defaults and no types. So the schema (types, defaults, descriptions, Literal choices as enums) is
generated from the pydantic model, and the op validates what it receives with the very same model,
which also enforces the bounds (``ge``, ``min_length`` ...) Dagster's type system cannot express.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

import dagster as dg
from pydantic import BaseModel
from pydantic.fields import FieldInfo

_SCALARS: dict[type, Any] = {int: dg.Int, float: dg.Float, bool: dg.Bool, str: dg.String}


def config_schema_from_model(model_cls: type[BaseModel]) -> dict[str, dg.Field]:
    """A Dagster config schema (``dict`` of ``dg.Field``) with the fields, defaults and docs of ``model_cls``."""
    return {name: _field(model_cls, name, info) for name, info in model_cls.model_fields.items()}


def _field(model_cls: type[BaseModel], name: str, info: FieldInfo) -> dg.Field:
    config_type = _config_type(info.annotation, f"{model_cls.__name__}_{name}")
    if info.is_required():
        return dg.Field(config_type, is_required=True, description=info.description)
    default = info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        # Nested shapes take their defaults from their own fields, so the launchpad shows them expanded.
        return dg.Field(config_type, is_required=False, description=info.description)
    return dg.Field(config_type, default_value=default, is_required=False, description=info.description)


def _config_type(annotation: Any, enum_name: str) -> Any:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{enum_name}: only Optional[X] unions map to Dagster config, got {annotation}")
        return dg.Noneable(_config_type(inner[0], enum_name))
    if origin is Literal:
        return dg.Enum(enum_name, [dg.EnumValue(str(value), python_value=value) for value in args])
    if origin is list:
        return dg.Array(_config_type(args[0], enum_name))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return dg.Shape(config_schema_from_model(annotation))
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    raise TypeError(f"{enum_name}: no Dagster config type for {annotation!r}")
