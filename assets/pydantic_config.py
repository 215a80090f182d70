"""Dagster run config generated from the library's pydantic models.

``training_core`` never imports dagster, so its models cannot subclass ``dg.Config``, and a ``dg.Config``
cannot nest a plain pydantic model. ``dagster_config`` therefore builds a ``dg.Config`` twin of a model:
the same fields, defaults and descriptions, nested models as nested twins. Dagster's own pydantic support
turns the twin into the launchpad schema (types, Literal choices, defaults, descriptions) and checks keys
and types before a run starts; the op then validates the values with the library model itself, which
holds the bounds (``ge``, ``min_length`` ...) and the cross-field rules.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import BaseModel, Field, create_model


def dagster_config(model_cls: type[BaseModel]) -> type[dg.Config]:
    """A ``dg.Config`` class with the fields, defaults and descriptions of ``model_cls``, nested models included."""
    fields: dict[str, Any] = {}
    for name, info in model_cls.model_fields.items():
        annotation = info.annotation
        # Dagster reads a field's `default`, never its `default_factory`, so factories are called here.
        default = info.get_default(call_default_factory=True)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = dagster_config(annotation)
            default = annotation()  # an instance default makes Dagster list the section's own defaults
        fields[name] = (annotation, Field(default, description=info.description))
    return create_model(model_cls.__name__, __base__=dg.Config, __doc__=model_cls.__doc__, **fields)
