"""Runs of the same training config and data at once (one SQLite instance): both succeed, and every run exports
exactly the checkpoint its evaluation scored, compared by content whatever file name a run reports."""

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

from assets import checks, datasets, evaluation, export, training
from assets.lineage import latest_artifact, latest_evaluation, latest_training
from assets.resources import TrainingDevice
from pipeline.jobs import observe_raw_datasets, sample_pipeline, train_cpu
from tests.assets.conftest import copy_datasets, make_paths

DATASET_IDS = ["quebec_buildings", "unlabeled_scenes"]
RANGE = {"dagster/asset_partition_range_start": DATASET_IDS[0], "dagster/asset_partition_range_end": DATASET_IDS[-1]}
TINY = {"steps": 2, "checkpoint_every": 2, "model": {"embed_dim": 8, "max_k": 4}, "data": {"patch_size": 32}}
RUN_CONFIG = {"ops": {"trained_model": {"config": TINY}}}


def definitions(work: Path) -> dg.Definitions:
    return dg.Definitions(
        assets=dg.load_assets_from_modules([datasets, training, evaluation, export]),
        asset_checks=dg.load_asset_checks_from_modules([checks, evaluation, export]),
        jobs=[
            observe_raw_datasets,
            sample_pipeline,
            train_cpu,
            dg.define_asset_job("evaluate", selection=[evaluation.iou_evaluation]),
            dg.define_asset_job("export", selection=[export.runtime_artifact]),
        ],
        resources={
            "paths": make_paths(work, work / "extracted"),
            "training_device": TrainingDevice(device="cpu", torch_threads=1),
        },
    )


def run_sample_pipeline(instance_ref: InstanceRef, work: str) -> tuple[bool, str]:
    """One `sample_pipeline` run in its own process (as `dagster job execute` would), on the shared instance."""
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        result = (
            definitions(Path(work))
            .resolve_job_def("sample_pipeline")
            .execute_in_process(instance=instance, tags=RANGE, run_config=RUN_CONFIG, raise_on_error=False)
        )
        return result.success, result.run_id


@pytest.fixture
def work(tmp_path: Path) -> Path:
    copy_datasets(tmp_path / "extracted", DATASET_IDS)
    return tmp_path


@pytest.mark.timeout(600)
def test_two_sample_pipeline_runs_at_once_both_succeed(work: Path) -> None:
    with dg.instance_for_test() as instance:
        assert definitions(work).resolve_job_def("observe_raw_datasets").execute_in_process(instance=instance).success
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = [pool.submit(run_sample_pipeline, instance.get_ref(), str(work)) for _ in range(2)]
            outcomes = [run.result() for run in runs]
        assert [success for success, _ in outcomes] == [True, True], outcomes

        trainings = [latest_training(instance, run_id) for _, run_id in outcomes]
        assert trainings[0].checkpoint_path == trainings[1].checkpoint_path  # one training, waited for
        assert trainings[0].checkpoint_sha256 == trainings[1].checkpoint_sha256
        for _, run_id in outcomes:  # each run exported what it evaluated, and says which runs those were
            artifact = latest_artifact(instance, run_id)
            lineage = json.loads((Path(artifact.artifact_dir) / "meta.json").read_text())["lineage"]
            assert lineage["runs"]["export"] == lineage["runs"]["evaluation"] == lineage["runs"]["training"] == run_id
            assert latest_evaluation(instance, run_id).checkpoint_sha256 == lineage["checkpoint_sha256"]


def test_a_rerun_that_finds_the_training_done_exports_what_was_evaluated(work: Path) -> None:
    """The interleaving of the reported failure: a run evaluates its training, a second run of the same training
    resumes it done (from last.pt), then the first run's export compares the two: same weights, so it exports."""
    defs = definitions(work)
    with dg.instance_for_test() as instance:

        def run(job: str, **kwargs: object) -> dg.ExecuteInProcessResult:
            result = defs.resolve_job_def(job).execute_in_process(instance=instance, **kwargs)
            assert result.success
            return result

        run("observe_raw_datasets")
        first = run("sample_pipeline", tags=RANGE, run_config=RUN_CONFIG)
        again = run("train_cpu", run_config=RUN_CONFIG)
        (resumed,) = again.asset_materializations_for_node("trained_model")
        assert resumed.metadata["resumed_from_step"].value == TINY["steps"]
        assert latest_training(instance).checkpoint_sha256 == latest_training(instance, first.run_id).checkpoint_sha256
        run("export")

        retrained = {**TINY, "seed": 1}  # other weights: what evaluation scored is no longer the latest training
        run("train_cpu", run_config={"ops": {"trained_model": {"config": retrained}}})
        refused = defs.resolve_job_def("export").execute_in_process(instance=instance, raise_on_error=False)
        assert not refused.success
        (failure,) = [event for event in refused.all_events if event.is_step_failure]
        assert "materialize iou_evaluation again first" in failure.step_failure_data.error.message
        run("evaluate")
        run("export")
