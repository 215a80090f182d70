"""A training step killed with SIGKILL: every retry, and then a re-execution of the failed run, resumes from
the last checkpoint instead of step 0."""

import os
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from assets.datasets import DATASETS
from assets.training import trained_model
from tests.assets.conftest import copy_datasets
from training_core.shards.write import build_shards

TINY_TRAINING = {
    "device": "cpu",
    "steps": 40,
    "checkpoint_every": 2,
    "log_every": 50,
    "model": {"embed_dim": 8, "max_k": 4},
    "data": {"patch_size": 32},
}


def train_cpu_job() -> dg.JobDefinition:
    """Reconstructable in the step subprocess: it imports the code location with this test's environment."""
    from pipeline.definitions import defs

    return defs.resolve_job_def("train_cpu")


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return table


def step_processes() -> list[int]:
    """Pids of the executor's step processes: forked by the forkserver this test process started."""
    table = processes()
    servers = {pid for pid, (parent, cmd) in table.items() if parent == os.getpid() and "forkserver" in cmd}
    return [pid for pid, (parent, cmd) in table.items() if parent in servers and cmd]


def latest_checkpoint_step(checkpoints_root: Path) -> int:
    steps = [int(p.stem.split("-")[1]) for p in checkpoints_root.glob("trained_model/*/step-*.pt")]
    return max(steps, default=0)


def kill_training_repeatedly(checkpoints_root: Path, times: int, killed_at: list[int]) -> None:
    """SIGKILL the training step each time it has written a checkpoint beyond the last kill, ``times`` times."""
    target = 4
    deadline = time.monotonic() + 300
    while len(killed_at) < times and time.monotonic() < deadline:
        done = latest_checkpoint_step(checkpoints_root)
        pids = step_processes() if done >= target else []
        if pids:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed_at.append(done)
            target = done + 2
        time.sleep(0.02)


def resume_steps(instance: dg.DagsterInstance, run_id: str) -> list[int]:
    """The step each attempt of the training step in the run resumed from, from its run-log lines."""
    prefix = "resuming from the checkpoint at step "
    messages = [event.message for event in instance.all_logs(run_id) if event.message]
    return [int(message.removeprefix(prefix).split()[0]) for message in messages if message.startswith(prefix)]


@pytest.mark.timeout(400)
def test_sigkilled_training_resumes_from_its_last_checkpoint_on_reexecution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extracted = copy_datasets(tmp_path / "extracted", ["unlabeled_scenes"])
    work = tmp_path / "work"
    build_shards(extracted, work / "processed", "unlabeled_scenes")
    monkeypatch.setenv("SEGPIPE_EXTRACTED_ROOT", str(extracted))
    monkeypatch.setenv("SEGPIPE_WORK_ROOT", str(work))
    job = dg.reconstructable(train_cpu_job)
    run_config = {"ops": {"trained_model": {"config": TINY_TRAINING}}}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(DATASETS.name, ["unlabeled_scenes"])
        # Every attempt the RetryPolicy allows is killed; each retry must resume past the previous kill.
        attempts = trained_model.op.retry_policy.max_retries + 1
        killed_at: list[int] = []
        killer = threading.Thread(target=kill_training_repeatedly, args=(work / "checkpoints", attempts, killed_at))
        killer.start()
        with dg.execute_job(job, instance, run_config=run_config) as first:
            assert not first.success
        killer.join()
        assert len(killed_at) == attempts, f"the training step finished before it was killed {attempts} times"
        retried_from = resume_steps(instance, first.run_id)
        assert len(retried_from) == attempts - 1 and all(step > 0 for step in retried_from)
        assert retried_from == sorted(retried_from), "a retry went back instead of resuming"

        options = dg.ReexecutionOptions.from_failure(first.run_id, instance)
        with dg.execute_job(job, instance, reexecution_options=options, run_config=run_config) as second:
            assert second.success
            (materialization,) = second.asset_materializations_for_node("trained_model")
        resumed_from = materialization.metadata["resumed_from_step"].value
        # A kill can land before the checkpoint pair of step N is renamed into place: then N - checkpoint_every.
        assert killed_at[-1] - TINY_TRAINING["checkpoint_every"] <= resumed_from < TINY_TRAINING["steps"]
        assert resume_steps(instance, second.run_id) == [resumed_from]
        assert materialization.metadata["steps"].value == TINY_TRAINING["steps"]
