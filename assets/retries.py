"""Which failures a retry can cure.

A step's ``RetryPolicy`` is for what may pass: a killed process, a full disk, a lost device. A bad run
config or bad data fails the same way every time, so ``fails_once_on_user_error`` turns the library's user
errors (``ValueError``: pydantic's ``ValidationError``, ``DatasetError``, ``DamagedCheckpointError``) into a
``dg.Failure`` that bypasses the policy, its message one line naming the field or file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import dagster as dg
from pydantic import ValidationError

from runtime_export.cli import error_line
from training_core.config import validation_message

P = ParamSpec("P")
R = TypeVar("R")


def user_error_message(error: ValueError) -> str:
    """One line: pydantic's errors as ``field: problem (got value)``, any other error's text folded."""
    return validation_message(error) if isinstance(error, ValidationError) else error_line(error)


def fails_once_on_user_error(compute: Callable[P, R]) -> Callable[P, R]:
    """An asset body whose user errors fail the step at once; other exceptions keep the retry policy."""

    @functools.wraps(compute)  # Dagster reads the parameters (context, config, resources) through the wrapper
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return compute(*args, **kwargs)
        except ValueError as error:
            raise dg.Failure(
                description=f"{type(error).__name__}: {user_error_message(error)}", allow_retries=False
            ) from error

    return wrapper
