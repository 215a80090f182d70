"""iou_evaluation's metadata reads as a person needs it: classes named by the header, scores rounded, the
training run as a link, the comparison pictures as files instead of inline copies."""

from pathlib import Path

import dagster as dg
import pytest

from assets.datasets import dataset_header, processed_shards
from assets.evaluation import evaluation_summary, iou_evaluation, model_beats_baseline
from assets.training import trained_model
from runtime_export.errors import DatasetError
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import HEADER_FILENAME, dump_header, header_from_dict
from training_core.eval.report import BASELINE, DECISION_MARGIN, MODEL, UNTRAINED, EvalReport, MethodReport
from training_core.metrics import Scores

TINY = {"device": "cpu", "steps": 2, "checkpoint_every": 2, "model": {"embed_dim": 8, "max_k": 4}}
NAMES = {1: "background", 2: "building"}


def header_with_label_names(dataset_dir: Path, names: dict[int, str], modality: int = 1) -> dict:
    data = extract_header(dataset_dir).model_dump()
    data["modalities"][modality]["label_names"] = names
    return data


def test_label_names_must_name_label_values_of_a_target(extracted_root: Path) -> None:
    dataset_dir = extracted_root / "quebec_buildings"
    header = header_from_dict(header_with_label_names(dataset_dir, NAMES), dataset_dir)
    assert header.target.label_names == NAMES
    with pytest.raises(DatasetError, match=r"label_names names \[7\], not in label_values"):
        header_from_dict(header_with_label_names(dataset_dir, {7: "water"}), dataset_dir)
    with pytest.raises(DatasetError, match="label_names are for targets only"):
        header_from_dict(header_with_label_names(dataset_dir, NAMES, modality=0), dataset_dir)


def test_evaluation_metadata_names_classes_rounds_scores_and_links_files_and_runs(
    resources: dict, instance: dg.DagsterInstance, extracted_root: Path
) -> None:
    dataset_dir = extracted_root / "quebec_buildings"
    committed = header_from_dict(header_with_label_names(dataset_dir, NAMES), dataset_dir)
    dump_header(committed, dataset_dir / HEADER_FILENAME)
    for dataset_id in ("quebec_buildings", "unlabeled_scenes"):
        assert dg.materialize(
            [dataset_header, processed_shards], resources=resources, instance=instance, partition_key=dataset_id
        ).success
    training = dg.materialize(
        [processed_shards, trained_model],
        selection=[trained_model],
        resources=resources,
        instance=instance,
        run_config={"ops": {"trained_model": {"config": TINY}}},
    )
    result = dg.materialize(
        [trained_model, iou_evaluation, model_beats_baseline],
        selection=[iou_evaluation],
        resources=resources,
        instance=instance,
    )
    assert result.success
    (event,) = result.asset_materializations_for_node("iou_evaluation")
    metadata = event.metadata
    # The verdicts come with the margin they need and the differences they rest on, in the check too.
    difference = metadata["model_minus_baseline"].value
    assert difference == round(metadata["val_miou"].value - metadata["baseline_val_miou"].value, 4)
    assert metadata["decision_margin"].value == DECISION_MARGIN
    assert metadata["model_beats_baseline"].value == (difference > DECISION_MARGIN)
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "model_beats_baseline" and check.passed == metadata["model_beats_baseline"].value
    assert check.metadata["model_minus_baseline"].value == difference
    assert check.metadata["decision_margin"].value == DECISION_MARGIN
    assert f"{difference:+.4f}, passes above +{DECISION_MARGIN}" in check.description

    rows = [row.data for row in metadata["per_class_iou"].records]
    assert {(row["class"], row["name"]) for row in rows} == set(NAMES.items())
    scores = [row["model_iou"] for row in rows] + [metadata["val_miou"].value]
    assert all(score is None or round(score, 4) == score for score in scores)
    assert metadata["training_run"] == dg.MetadataValue.dagster_run(training.run_id)
    assert "base64" not in metadata["comparison"].value
    picture = Path(metadata["summary_path"].value).with_name("quebec_buildings.png")
    assert f"`{picture}`" in metadata["comparison"].value and picture.is_file()
    assert event.tags["dagster/data_version"]


def _report(model: float, baseline: float, untrained: float) -> EvalReport:
    def scored(miou: float) -> MethodReport:
        scores = Scores("hungarian", 2, miou, None, {}, [1, 2], 100)
        return MethodReport(hungarian=scores, majority=None, majority_k8=None, proxies={}, cluster_shares=[0.5, 0.5])

    methods = {MODEL: scored(model), BASELINE: scored(baseline), UNTRAINED: scored(untrained)}
    return EvalReport("kampala_buildings", 2, 8, 0, "metrics_train", 1, 1, methods, data_version="v1")


def test_summary_verdicts_need_the_decision_margin_and_report_the_differences() -> None:
    """kampala 0.4655 vs its untrained twin's 0.4653: a tie, not "training helped"; the same rule as the eval JSON."""
    metrics = evaluation_summary({"kampala_buildings": _report(0.4655, 0.4420, 0.4653)}, "ckpt.pt", "sha")["metrics"]
    assert metrics["training_helped"] is False and metrics["model_minus_untrained"] == 0.0002
    assert metrics["model_beats_baseline"] is True and metrics["model_minus_baseline"] == 0.0235
    assert metrics["decision_margin"] == DECISION_MARGIN
    per_dataset = metrics["per_dataset"]["kampala_buildings"]
    assert per_dataset["val_miou"] == 0.4655 and per_dataset["untrained_miou"] == 0.4653
