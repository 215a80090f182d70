"""The README's main command, as CI runs it: the whole graph on the sample data through the Dagster CLI
(`dagster job execute ... -j sample_pipeline`), then the artifact loads in the numpy runtime and its
lineage names the datasets and their data versions."""

import json
import os
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from assets.lineage import RUNTIME_ARTIFACT

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATASETS = sorted(p.name for p in (REPO_ROOT / "sample_data" / "extracted").iterdir() if p.is_dir())


LINEAGE_QUERY = """
query Lineage($path: [String!]!) {
  assetNodeOrError(assetKey: {path: $path}) {
    ... on AssetNode {
      dependencyKeys { path }
      assetMaterializations(limit: 20) { runId partition }
    }
  }
}
"""


def upstream_runs_via_graphql(instance: dg.DagsterInstance, env: dict[str, str]) -> dict[str, dict[str | None, str]]:
    """asset -> {partition: run id of its newest materialization}, for everything upstream of runtime_artifact."""
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    found: dict[str, dict[str | None, str]] = {}
    pending = ["runtime_artifact"]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with define_out_of_process_context(str(REPO_ROOT / "pipeline" / "definitions.py"), "defs", instance) as ctx:
            while pending:
                asset = pending.pop()
                result = execute_dagster_graphql(ctx, LINEAGE_QUERY, {"path": [asset]})
                assert not result.errors, result.errors
                node = result.data["assetNodeOrError"]
                newest: dict[str | None, str] = {}
                for materialization in node["assetMaterializations"]:  # newest first
                    newest.setdefault(materialization["partition"], materialization["runId"])
                found[asset] = newest
                pending += [dep["path"][0] for dep in node["dependencyKeys"] if dep["path"][0] not in found]
    return found


@pytest.mark.timeout(900)
def test_bin_run_sample_materializes_the_whole_graph_and_the_artifact_checks_out(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(home), "SEGPIPE_WORK_ROOT": str(tmp_path / "work")}
    env.pop("SEGPIPE_EXTRACTED_ROOT", None)
    result = subprocess.run(
        [str(REPO_ROOT / "bin" / "run-sample")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=880
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (home / "dagster.yaml").is_file()  # the project-local instance was created on first run
    assert 'RUN_SUCCESS - Finished execution of run for "sample_pipeline"' in result.stderr + result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["datasets"] == SAMPLE_DATASETS
    assert set(summary["data_versions"]) == set(SAMPLE_DATASETS)
    artifact = Path(summary["artifact_dir"])
    assert artifact.is_relative_to(tmp_path / "work") and (artifact / "model.npz").is_file()
    meta = json.loads((artifact / "meta.json").read_text())
    assert meta["lineage"]["runs"]["training"] == meta["lineage"]["runs"]["evaluation"]  # one run did it all
    assert (tmp_path / "work" / "artifacts" / "best" / "model.npz").is_file()

    # Each dataset's header and shards have their own content-derived data version, not the run's.
    for stage in ("dataset_header", "processed_shards"):
        versions = meta["lineage"]["asset_data_versions"][stage]
        assert versions.keys() == set(SAMPLE_DATASETS) and len(set(versions.values())) == len(SAMPLE_DATASETS)
        assert meta["lineage"]["runs"]["training"] not in versions.values()

    # What a user browses on the artifact's page: mIoU, data versions, run links; no picture copied into it.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (record,) = instance.fetch_materializations(RUNTIME_ARTIFACT, limit=1).records
    metadata = record.asset_materialization.metadata
    assert metadata["val_miou"].value == meta["metrics"]["val_miou"]
    assert metadata["data_versions"].value == summary["data_versions"]
    assert metadata["training_run"] == dg.MetadataValue.dagster_run(meta["lineage"]["runs"]["training"])
    assert "evaluation_picture" not in metadata
    assert metadata["lineage"].value["runs"]["shards"].keys() == set(SAMPLE_DATASETS)

    # The same lineage reached through GraphQL, walking upstream from the artifact.
    env_for_code_server = {"SEGPIPE_WORK_ROOT": str(tmp_path / "work")}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = upstream_runs_via_graphql(instance, env_for_code_server)
    lineage = meta["lineage"]["runs"]
    assert runs["iou_evaluation"] == {None: lineage["evaluation"]}
    assert runs["trained_model"] == {None: lineage["training"]}
    assert runs["processed_shards"] == lineage["shards"]
    assert runs["dataset_header"] == lineage["header"]
