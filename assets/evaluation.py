"""The ``iou_evaluation`` asset: Hungarian-matched IoU of the trained model beside its controls (the untrained
model of the same config, k-means on RGB, the constant predictor), at K = classes and, by majority vote, K = 8.

Labels are used here and nowhere else. Every registered dataset whose shards carry labels is scored;
the summary JSON (metrics, datasets, data versions) is what the export reads and records.
"""

import json
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from assets.datasets import DATASETS
from assets.lineage import content_version, latest_evaluation, latest_training
from assets.resources import ProjectPaths
from assets.training import trained_model
from runtime_export.atomic import atomic_write_text
from runtime_export.errors import DatasetError
from training_core.datasets.built import built_header
from training_core.eval.picture import render_comparison
from training_core.eval.report import BASELINE, MODEL, UNTRAINED, EvalReport, verdicts
from training_core.eval.scoring import dataset_label_space, evaluate_checkpoint
from training_core.shards.index import read_manifest

EVALUATION_GROUP = "evaluation"
# Bump when the same checkpoint and shards would score differently (v2: verdicts need the decision margin).
CODE_VERSION = "iou-v2"
DECIMALS = 4  # of every score the summary and the metadata show


class EvaluationConfig(dg.Config):
    k: int | None = Field(None, description="clusters per tile; default one per class of each dataset (at least 2)")
    seed: int = Field(0, description="seed of the k-means-RGB baseline")


@dg.asset(
    deps=[trained_model],
    group_name=EVALUATION_GROUP,
    kinds={"scipy"},
    code_version=CODE_VERSION,
    description="Per-class IoU and mIoU on val (mapping fitted on metrics_train), the model beside its controls: "
    "the untrained model, k-means on RGB and the constant predictor. Data version: the summary's metrics.",
)
def iou_evaluation(
    context: dg.AssetExecutionContext, config: EvaluationConfig, paths: ProjectPaths
) -> dg.MaterializeResult:
    training = latest_training(context.instance, context.run.run_id)
    dataset_ids = labeled_datasets(context.instance, paths.processed_root)
    if not dataset_ids:
        raise dg.Failure(f"no registered dataset under {paths.processed_root} has labeled val tiles to score")
    out_dir = Path(paths.artifacts_root) / "evaluations" / context.run.run_id
    reports: dict[str, EvalReport] = {}
    pictures: dict[str, Path] = {}
    for dataset_id in dataset_ids:
        report = evaluate_checkpoint(training.checkpoint_path, paths.processed_root, dataset_id, config.k, config.seed)
        reports[dataset_id] = report
        pictures[dataset_id] = render_comparison(report, out_dir / f"{dataset_id}.png")
        context.log.info(
            f"{dataset_id}: K={report.k} model mIoU {report.miou(MODEL)}, "
            f"untrained {report.miou(UNTRAINED)}, k-means {report.miou(BASELINE)}"
        )
    summary = evaluation_summary(reports, training.checkpoint_path, training.checkpoint_sha256)
    summary_path = write_json_atomic(out_dir / "summary.json", summary)
    metrics = summary["metrics"]
    return dg.MaterializeResult(
        metadata={
            "val_miou": metrics["val_miou"],
            "baseline_val_miou": metrics["baseline_val_miou"],
            "untrained_val_miou": metrics["untrained_val_miou"],
            "model_beats_baseline": metrics["model_beats_baseline"],
            "model_minus_baseline": metrics["model_minus_baseline"],
            "training_helped": metrics["training_helped"],
            "model_minus_untrained": metrics["model_minus_untrained"],
            "decision_margin": metrics["decision_margin"],
            "controls": controls_table(reports),
            "per_class_iou": per_class_table(reports, class_names(paths.processed_root, dataset_ids)),
            "per_dataset": metrics["per_dataset"],
            "comparison": dg.MetadataValue.md(comparison_markdown(pictures)),
            "datasets": dataset_ids,
            "data_versions": summary["data_versions"],
            "checkpoint_path": dg.MetadataValue.path(training.checkpoint_path),
            "checkpoint_sha256": training.checkpoint_sha256,
            "training_run": dg.MetadataValue.dagster_run(training.run_id),
            "summary_path": dg.MetadataValue.path(str(summary_path)),
        },
        data_version=content_version(metrics),
    )


@dg.asset_check(asset=iou_evaluation)
def model_beats_baseline(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The model's mean val mIoU is above the k-means-on-RGB baseline's by more than the decision margin
    (``training_core.eval.report.DECISION_MARGIN``; a warning: quality, not bad data)."""
    evaluation = latest_evaluation(context.instance, context.op_execution_context.run_id)
    model, baseline = evaluation.val_miou, evaluation.baseline_val_miou
    difference, margin = evaluation.model_minus_baseline, evaluation.decision_margin
    lead = "no score to compare" if difference is None else f"{difference:+.4f}, passes above +{margin}"
    return dg.AssetCheckResult(
        passed=bool(evaluation.model_beats_baseline),
        severity=dg.AssetCheckSeverity.WARN,
        description=f"model val mIoU {model} vs k-means-RGB baseline {baseline} ({lead})",
        metadata={
            "val_miou": model,
            "baseline_val_miou": baseline,
            "model_minus_baseline": difference,
            "decision_margin": margin,
        },
    )


def labeled_datasets(instance: dg.DagsterInstance, processed_root: str) -> list[str]:
    """Registered datasets whose built shards hold labeled val items."""
    found = []
    for dataset_id in sorted(instance.get_dynamic_partitions(DATASETS.name)):
        try:
            n_classes, _, _ = dataset_label_space(processed_root, dataset_id)
            n_val = read_manifest(processed_root, dataset_id)["counts"].get("val", 0)
        except DatasetError:
            continue  # not built (yet)
        if n_classes is not None and n_val > 0:
            found.append(dataset_id)
    return found


def evaluation_summary(reports: dict[str, EvalReport], checkpoint: str, checkpoint_sha256: str) -> dict[str, Any]:
    """Metrics the export records and promotion compares: means over datasets of the val mIoU, each score
    rounded to ``DECIMALS`` (the full-precision reports are kept beside them), and the verdicts on those means
    (``training_core.eval.report.verdicts``: a lead of more than the decision margin, with the difference)."""
    per_dataset = {dataset_id: report.to_dict() for dataset_id, report in reports.items()}
    model = _rounded(mean_or_none([report.miou(MODEL) for report in reports.values()]))
    baseline = _rounded(mean_or_none([report.miou(BASELINE) for report in reports.values()]))
    untrained = _rounded(mean_or_none([report.miou(UNTRAINED) for report in reports.values()]))
    return {
        "checkpoint": checkpoint,
        "checkpoint_sha256": checkpoint_sha256,
        "datasets": sorted(reports),
        "data_versions": {dataset_id: report.data_version for dataset_id, report in reports.items()},
        "metrics": {
            "val_miou": model,
            "baseline_val_miou": baseline,
            "untrained_val_miou": untrained,
            **_rounded_verdicts(model, baseline, untrained),
            "per_dataset": {
                dataset_id: {
                    "k": row["k"],
                    "val_miou": _rounded(row["val_miou"]),
                    "baseline_miou": _rounded(row["baseline_miou"]),
                    "untrained_miou": _rounded(row["untrained_miou"]),
                    "scores": {
                        method: {name: _rounded(score) for name, score in scores.items()}
                        for method, scores in row["scores"].items()
                    },
                    "mapping_fitted_on": row["mapping_fitted_on"],
                }
                for dataset_id, row in per_dataset.items()
            },
        },
        "reports": per_dataset,
    }


def controls_table(reports: dict[str, EvalReport]) -> dg.TableMetadataValue:
    """Every method on every dataset: Hungarian mIoU at K = classes, majority mIoU at K = 8."""
    rows = [
        dg.TableRecord(
            {
                "dataset": dataset_id,
                "method": method,
                "k": report.k,
                "hungarian_miou": _rounded(report.miou(method)),
                "majority_k8_miou": _rounded(report.majority_k8_miou(method)),
            }
        )
        for dataset_id, report in reports.items()
        for method in report.methods
    ]
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("dataset", "string"),
            dg.TableColumn("method", "string"),
            dg.TableColumn("k", "int"),
            dg.TableColumn("hungarian_miou", "float"),
            dg.TableColumn("majority_k8_miou", "float"),
        ]
    )
    return dg.MetadataValue.table(rows, schema=schema)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, DECIMALS)


def _rounded_verdicts(model: float | None, baseline: float | None, untrained: float | None) -> dict[str, Any]:
    """``verdicts`` of the rounded means, the differences rounded too (0.4655 - 0.4653 is 0.0002, not
    0.00019999999999997797)."""
    found = verdicts(model, baseline, untrained)
    for key in ("model_minus_baseline", "model_minus_untrained"):
        found[key] = _rounded(found[key])
    return found


def class_names(processed_root: str, dataset_ids: list[str]) -> dict[str, dict[int, str]]:
    """``label_names`` of each dataset's target modality, from the header its shards were built with."""
    names: dict[str, dict[int, str]] = {}
    for dataset_id in dataset_ids:
        target = built_header(processed_root, dataset_id).target
        names[dataset_id] = dict(target.label_names or {}) if target is not None else {}
    return names


def per_class_table(reports: dict[str, EvalReport], names: dict[str, dict[int, str]]) -> dg.TableMetadataValue:
    """The model's and the baseline's IoU of every class, named when the header's target names it."""
    rows = []
    for dataset_id, report in reports.items():
        model, baseline = report.methods[MODEL].hungarian, report.methods[BASELINE].hungarian
        if model is None or baseline is None:
            continue
        for label, iou in model.per_class_iou.items():
            rows.append(
                dg.TableRecord(
                    {
                        "dataset": dataset_id,
                        "class": int(label),
                        "name": names.get(dataset_id, {}).get(int(label), ""),
                        "model_iou": _rounded(iou),
                        "baseline_iou": _rounded(baseline.per_class_iou.get(label)),
                    }
                )
            )
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("dataset", "string"),
            dg.TableColumn("class", "int"),
            dg.TableColumn("name", "string"),
            dg.TableColumn("model_iou", "float"),
            dg.TableColumn("baseline_iou", "float"),
        ]
    )
    return dg.MetadataValue.table(rows, schema=schema)


def comparison_markdown(pictures: dict[str, Path]) -> str:
    """Where each dataset's image | ground truth | model | baseline picture is (PNG files beside summary.json,
    not copied into the event log)."""
    return "\n".join(f"- **{dataset_id}**: `{path}`" for dataset_id, path in pictures.items())


def mean_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def write_json_atomic(path: Path, payload: dict[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))
