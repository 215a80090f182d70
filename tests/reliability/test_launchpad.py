"""A run config the library refuses fails the training step once, naming the field; Dagster's retry policy
is kept for what a retry can cure."""

from __future__ import annotations

import dagster as dg
import pytest

from assets.resources import TrainingDevice
from assets.retries import fails_once_on_user_error
from assets.training import trained_model
from tests.assets.conftest import make_paths

STEP_EVENTS = ("STEP_START", "STEP_UP_FOR_RETRY", "STEP_RESTARTED", "STEP_FAILURE")


def step_events(result: dg.ExecuteInJobResult) -> list[str]:
    return [event.event_type_value for event in result.all_events if event.event_type_value in STEP_EVENTS]


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"cluster_iters": [6, 2]}, "cluster_iters=[6, 2] must be [min, max] with 0 <= min <= max"),
        ({"k_min": 40}, "k_min=40 exceeds model.max_k=16"),
        ({"model": {"embed_dim": 0}}, "model.embed_dim: Input should be greater than or equal to 1"),
    ],
)
def test_an_invalid_launchpad_config_fails_once_naming_the_field(tmp_path, config: dict, named: str) -> None:
    resources = {"paths": make_paths(tmp_path, tmp_path / "extracted"), "training_device": TrainingDevice(device="cpu")}
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [trained_model],
            instance=instance,
            resources=resources,
            run_config={"ops": {"trained_model": {"config": config}}},
            raise_on_error=False,
        )
    assert not result.success
    assert step_events(result) == ["STEP_START", "STEP_FAILURE"], "a bad config must not be retried"
    failure = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.message
    assert named in message and "ValidationError" in message
    assert len(message.strip().splitlines()) == 1, message


def test_other_failures_keep_the_retry_policy() -> None:
    attempts = []

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=2))
    @fails_once_on_user_error
    def flaky_disk(context) -> None:  # left unannotated: this module's annotations are strings
        attempts.append(context.retry_number)
        raise OSError(28, "No space left on device")

    with dg.instance_for_test() as instance:
        result = dg.materialize([flaky_disk], instance=instance, raise_on_error=False)
    assert not result.success and attempts == [0, 1, 2]
