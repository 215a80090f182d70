"""The artifact format and its writer, without torch: ``meta.json``, the folder written aside and published.

Artifact directory: ``model.npz`` (plain float32 arrays, batch norm folded into the convs),
``meta.json`` (runtime version, the model fields, the input pixel rules, what the training data was, lineage)
and ``metrics.json``. Directories are written aside (with ordinary permissions: the plugin and other
users read them) and renamed into place, so a reader never sees half an artifact. ``model/best`` is
a symlink swapped with one ``os.replace``, so promotion is atomic too.

An existing output folder is replaced only when it is an artifact (``is_artifact_dir``) or empty: any other
folder is refused, nothing touched. What is written aside is named after the exporting process
(``.<out>.export-staging-<pid>-...``, ``.<out>.export-aside-<pid>-...``): the next export to the same folder
removes what a killed one left, and puts back a previous artifact it had moved aside.

The arrays come from a torch model (``training_core.export``, the package above this one); everything here is
numpy and the standard library, so it never imports torch or ``training_core``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime_export.atomic import make_staging_dir
from runtime_export.leftovers import dead_leftovers, owned_prefix
from runtime_export.numpy_runtime.runtime import (
    META_FILENAME,
    METRICS_FILENAME,
    MODEL_FILENAME,
    RUNTIME_VERSION,
    STRIDE,
    load_runtime_model,
)

PROMOTION_METRIC = "val_miou"  # key of metrics.json compared by promote_if_better
ARTIFACT_FILES = frozenset({MODEL_FILENAME, META_FILENAME, METRICS_FILENAME})
RUNTIME_FAMILY = RUNTIME_VERSION.rsplit("/", 1)[0] + "/"  # meta.json's marker, whatever the runtime version


class TrainingConfig(Protocol):
    """What ``meta.json`` reads of a training config (``training_core.config.TrainConfig``, a pydantic model):
    its ``model`` fields, ``k_min`` and its canonical JSON (``config_hash``)."""

    model: Any
    k_min: int

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


def runtime_meta(
    config: TrainingConfig,
    lineage: dict[str, Any],
    metrics: dict[str, Any],
    input_rules: Mapping[str, Mapping[str, Any]],
    training_data: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """``meta.json``: what the runtime needs to run the arrays, plus what the model was trained for and where it
    came from. ``k_range``, ``ground_resolution_m`` and ``training_data``
    (``training_core.export_datasets.training_data_of``) are for the user (a QGIS plugin can show them); the runtime
    ignores them, so they need no new runtime version."""
    model = config.model
    training_data = {dataset_id: dict(entry) for dataset_id, entry in sorted((training_data or {}).items())}
    return {
        "runtime_version": RUNTIME_VERSION,
        "max_k": model.max_k,
        "embed_dim": model.embed_dim,
        "temperature": model.temperature,
        "cluster_iters": model.eval_cluster_iters,
        "smooth_iters": model.smooth_iters,
        "smoothing": model.smoothing,
        "luminance_weight": model.luminance_weight,
        "chroma_weight": model.chroma_weight,
        "input_mean": list(model.input_mean),
        "input_std": list(model.input_std),
        "input_scale": 1.0 / 255.0,  # pixel values times this are the model's [0, 1] input
        "stride": STRIDE,
        "supports_learned_refine": model.smoothing == "learned",
        "input_rules": {dataset_id: dict(rule) for dataset_id, rule in sorted(input_rules.items())},
        "k_range": [config.k_min, model.max_k],  # K drawn per training step; the runtime runs 2..max_k
        "ground_resolution_m": _overall_range(entry["ground_resolution_m"] for entry in training_data.values()),
        "training_data": training_data,
        "lineage": {
            **lineage,
            "config_hash": config_hash(config),
            "code_version": code_version(),
        },
        "metrics": metrics,
    }


def _overall_range(ranges: Iterable[Sequence[float] | None]) -> list[float] | None:
    """[min, max] over the known [min, max] ranges; None when none is known."""
    known = [bounds for bounds in ranges if bounds is not None]
    return [min(lo for lo, _ in known), max(hi for _, hi in known)] if known else None


def config_hash(config: TrainingConfig) -> str:
    """sha256 of the canonical JSON of the training config."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def code_version() -> str:
    """The git commit of this checkout (``+dirty`` when it has changes), else the package version."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"segpipe {version('segpipe')}"
        except PackageNotFoundError:
            return "unknown"
    return f"{sha}+dirty" if dirty else sha


def write_artifact(
    out_dir: str | Path, arrays: Mapping[str, np.ndarray], meta: dict[str, Any], metrics: dict[str, Any]
) -> Path:
    """Write an artifact (``model.npz`` of ``arrays``, ``meta.json``, ``metrics.json``) to ``out_dir`` atomically,
    replacing an artifact or empty folder there and refusing anything else (``check_out_dir``); returns ``out_dir``.
    It is written aside and published only when the numpy runtime loads it."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    reclaim_leftovers(out_dir)
    staging = stage_beside(out_dir)
    try:
        with open(staging / MODEL_FILENAME, "wb") as handle:
            np.savez(handle, **arrays)
        _write_json(staging / META_FILENAME, meta)
        _write_json(staging / METRICS_FILENAME, metrics)
        load_runtime_model(staging)  # never publish an artifact the runtime would reject
        swap_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def promote_if_better(candidate_dir: str | Path, best_dir: str | Path) -> bool:
    """Point ``best_dir`` (a symlink) at a copy of the candidate when its val mIoU is not worse than the best's.

    A candidate without a val mIoU (no labels) is promoted only when there is no best yet. Returns
    whether it was promoted. The swap is one ``os.replace`` of the symlink: readers see the old or
    the new artifact, never a mix.
    """
    candidate_dir, best_dir = Path(candidate_dir), Path(best_dir)
    load_runtime_model(candidate_dir)  # refuse to promote something the runtime cannot run
    candidate_score = _promotion_score(candidate_dir)
    if best_dir.exists() or best_dir.is_symlink():
        if not best_dir.is_symlink():
            raise ValueError(f"{best_dir}: expected a symlink to the best artifact, found a real directory or file")
        best_score = _promotion_score(best_dir) if best_dir.exists() else None
        if best_score is not None and (candidate_score is None or candidate_score < best_score):
            return False
    previous = best_dir.resolve() if best_dir.is_symlink() else None
    versions = best_dir.parent / f".{best_dir.name}-versions"
    staging = make_staging_dir(versions, prefix=".staging-")
    target = versions / staging.name.removeprefix(".staging-")
    try:
        for name in (MODEL_FILENAME, META_FILENAME, METRICS_FILENAME):
            shutil.copy2(candidate_dir / name, staging / name)
        os.rename(staging, target)
        link = best_dir.parent / f".{best_dir.name}.link-{target.name}"
        os.symlink(os.path.relpath(target, best_dir.parent), link)
        os.replace(link, best_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None and previous != target.resolve() and previous.parent == versions.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    return True


def _promotion_score(artifact_dir: Path) -> float | None:
    path = artifact_dir / METRICS_FILENAME
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the metrics promotion compares ({exc})") from exc
    score = metrics.get(PROMOTION_METRIC)
    if score is not None and not isinstance(score, int | float):
        raise ValueError(f"{path}: {PROMOTION_METRIC} must be a number or null, got {score!r}")
    return None if score is None else float(score)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def is_artifact_dir(path: Path) -> bool:
    """Whether ``path`` is a folder an export wrote: nothing but artifact files (``model.npz``, ``meta.json``,
    ``metrics.json``), and a ``meta.json`` that names this runtime (any version)."""
    try:
        names = set(os.listdir(path))
        meta = json.loads((path / META_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not a folder, no or unreadable meta.json, not JSON
        return False
    runtime = meta.get("runtime_version") if isinstance(meta, dict) else None
    return (
        names <= ARTIFACT_FILES
        and all((path / name).is_file() for name in names)
        and isinstance(runtime, str)
        and runtime.startswith(RUNTIME_FAMILY)
    )


def check_out_dir(out_dir: Path, checkpoint: Path | None = None) -> None:
    """Refuse an output folder whose replacement would lose something: an existing path that is not a folder, a
    symbolic link (its target would stay, the link would go), a folder holding the current folder or the checkpoint,
    or a non-empty folder that is not an artifact (``is_artifact_dir``). A ValueError names the folder."""
    if out_dir.is_symlink():
        raise ValueError(f"output folder {out_dir}: is a symbolic link; pass the folder it points to")
    resolved = out_dir.resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        raise ValueError(f"output folder {out_dir}: holds the current folder; choose another folder")
    if checkpoint is not None and checkpoint.resolve().is_relative_to(resolved):
        raise ValueError(f"output folder {out_dir}: holds the checkpoint {checkpoint}; choose a folder of its own")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir}: exists and is not a folder; the artifact is a folder")
    entries = sorted(os.listdir(out_dir))
    if entries and not is_artifact_dir(out_dir):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ValueError(
            f"output folder {out_dir}: not an artifact folder (it holds {shown}); only an artifact or an empty "
            "folder is replaced: choose a new folder"
        )


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.export-staging-"


def _aside_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.export-aside-"


def stage_beside(out_dir: Path) -> Path:
    """A new staging folder beside ``out_dir``, named after this process (``reclaim_leftovers`` removes it once
    the process is dead)."""
    return make_staging_dir(out_dir.parent, prefix=owned_prefix(_staging_prefix(out_dir)))


def reclaim_leftovers(out_dir: Path) -> None:
    """Undo what a killed export of ``out_dir`` left beside it: the previous artifact it had moved aside goes back
    when ``out_dir`` is missing (else it is removed), its staged candidates are removed. Only what dead processes
    left (``dead_leftovers``): a running export's folders stay."""
    asides = sorted(dead_leftovers(out_dir.parent, _aside_prefix(out_dir)), key=lambda path: path.stat().st_mtime)
    if asides and not out_dir.exists() and not out_dir.is_symlink():
        os.rename(asides.pop(), out_dir)
    for leftover in [*asides, *dead_leftovers(out_dir.parent, _staging_prefix(out_dir))]:
        shutil.rmtree(leftover, ignore_errors=True)


def swap_directory(staging: Path, out_dir: Path) -> None:
    """Move a finished directory into place; an existing ``out_dir`` is renamed aside first, then removed. It is
    checked again here: the folder may have changed since the export began."""
    check_out_dir(out_dir)
    if out_dir.exists():
        aside = out_dir.parent / f"{owned_prefix(_aside_prefix(out_dir))}{secrets.token_hex(4)}"
        os.rename(out_dir, aside)
        os.rename(staging, out_dir)
        shutil.rmtree(aside, ignore_errors=True)  # what stays (a failure) is a dead run's for the next export
    else:
        os.rename(staging, out_dir)
