"""The dataset header (v0): a pydantic model read from and written to YAML.

Unknown keys are rejected with the key named. Every path a header holds (``source_root``, each
modality's ``pattern``, ``splits.manifest_files``) is relative and stays inside the dataset folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime_export.atomic import atomic_write_text
from runtime_export.errors import DatasetError
from runtime_export.numpy_runtime.pixels import DEFAULT_BANDS, PixelRule

HEADER_FILENAME = "dataset_header.yaml"
HEADER_VERSION = 0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _relative_inside(value: str, field: str) -> str:
    parts = PurePosixPath(value).parts
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or ".." in parts or not parts:
        raise ValueError(f"{field} {value!r} must be a relative path inside the dataset folder")
    return value


class Modality(_Strict):
    """One raster modality. ``crs``: the CRSs its files have (inferred at extraction) or may have (declared).

    Inputs may have any number of bands (``channels``); ``bands`` says which are R, G, B and
    ``alpha_band`` which one marks valid pixels. Non-uint8 inputs need ``value_range``.
    ``ground_resolution_m`` (inputs) is descriptive: filled from the files when a header leaves it out.
    """

    name: str = Field(min_length=1)
    role: Literal["input", "target"]
    kind: Literal["raster"] = "raster"
    pattern: str = Field(description="glob relative to source_root; `{split}` captures the raw split")
    channels: int | None = Field(None, ge=1, description="bands in each file (targets: 1)")
    dtype: str | None = None
    nodata: float | None = Field(None, description="used (and written to tiles) where a file has no nodata of its own")
    georef_required: bool = False
    label_values: list[int] | None = Field(None, description="values allowed in targets (found when inferred)")
    label_names: dict[int, str] | None = Field(None, description="targets: class value -> name shown in reports")
    crs: list[str] | None = Field(None, description="CRSs allowed (found when inferred); none = any")
    bands: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=3, max_length=3, description="inputs: source bands read as R, G, B (1-based); none = 1, 2, 3"
    )
    alpha_band: int | None = Field(None, ge=1, description="inputs: band whose 0 marks invalid pixels")
    value_range: tuple[float, float] | None = Field(
        None, description="inputs: source values mapped to 0 and 255 (required for non-uint8 inputs)"
    )
    ground_resolution_m: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] | None = Field(
        None,
        description=(
            "inputs: [min, max] ground metres per pixel over the georeferenced inputs (rasters.ground_pixel_size), "
            "null when none is; found when left out, checked against every input when declared"
        ),
    )

    @field_validator("pattern")
    @classmethod
    def _pattern_is_relative(cls, pattern: str) -> str:
        _relative_inside(pattern, "pattern")
        if pattern.count("{split}") > 1 or re.search(r"\{(?!split\})", pattern):
            raise ValueError(f"pattern {pattern!r}: only one `{{split}}` placeholder is allowed")
        return pattern

    @field_validator("value_range")
    @classmethod
    def _value_range_is_a_scale(cls, value_range: tuple[float, float] | None) -> tuple[float, float] | None:
        # An infinite or NaN bound maps every value to 0 or NaN, and lo >= hi has no scale: both train silently
        # on constant pixels, so they are refused here, naming the field.
        if value_range is not None and not (all(map(math.isfinite, value_range)) and value_range[0] < value_range[1]):
            raise ValueError(f"value_range {list(value_range)}: need [lo, hi], two finite numbers with lo below hi")
        return value_range

    @model_validator(mode="after")
    def _input_fields(self) -> Modality:
        if self.role == "target":
            input_only = (self.bands, self.alpha_band, self.value_range, self.ground_resolution_m)
            if any(value is not None for value in input_only):
                raise ValueError(
                    f"modality {self.name!r}: bands, alpha_band, value_range, ground_resolution_m are for inputs only"
                )
            unknown = sorted(set(self.label_names or {}) - set(self.label_values)) if self.label_values else []
            if unknown:
                raise ValueError(f"modality {self.name!r}: label_names names {unknown}, not in label_values")
            if self.channels not in (None, 1):
                raise ValueError(f"modality {self.name!r}: channels must be 1 for a target, got {self.channels}")
            return self
        if self.label_names is not None:
            raise ValueError(f"modality {self.name!r}: label_names are for targets only")
        if self.ground_resolution_m is not None and self.ground_resolution_m[0] > self.ground_resolution_m[1]:
            raise ValueError(
                f"modality {self.name!r}: ground_resolution_m {list(self.ground_resolution_m)} is not [min, max]"
            )
        try:
            rule = self.pixel_rule()
        except ValueError as exc:
            raise ValueError(f"modality {self.name!r}: {exc}") from None
        if self.channels is not None and self.channels < rule.band_count_needed:
            raise ValueError(
                f"modality {self.name!r}: channels {self.channels} is short of the declared bands {list(rule.indexes)}"
            )
        if self.dtype is not None:
            try:
                rule.check_dtype(self.dtype)
            except ValueError as exc:
                raise ValueError(f"modality {self.name!r}: {exc}") from None
        return self

    def pixel_rule(self) -> PixelRule:
        """The rule every stage reads this (input) modality's pixels with."""
        return PixelRule(
            bands=tuple(self.bands or DEFAULT_BANDS),
            alpha_band=self.alpha_band,
            nodata=self.nodata,
            value_range=self.value_range,
        )


class Pairing(_Strict):
    strategy: Literal["by_stem"] = "by_stem"
    input_modality: str
    target_modality: str | None = None


SplitName = Literal["train", "metrics_train", "val"]


class SplitPolicy(_Strict):
    raw: list[str] = Field(default_factory=list, description="raw split names found through `{split}`")
    seed: int = 42
    labeled_policy: Literal["validation_only_with_metrics_subset"] = "validation_only_with_metrics_subset"
    train_metric_fraction_of_labeled: float = Field(0.25, ge=0, le=1)
    ratios: dict[SplitName, Annotated[float, Field(ge=0, le=1)]] | None = Field(
        None, description="fractions of the labeled items per split (sum 1); replaces the fraction rule"
    )
    manifest_files: dict[SplitName, str] | None = Field(
        None, description="split -> text file (relative to the dataset folder) listing item ids pinned to it"
    )
    preserve_raw_split: bool = False

    @field_validator("ratios")
    @classmethod
    def _ratios_sum_to_one(cls, ratios: dict[str, float] | None) -> dict[str, float] | None:
        if ratios is not None and abs(sum(ratios.values()) - 1.0) > 1e-9:
            raise ValueError(f"ratios must sum to 1, got {sum(ratios.values())}")
        return ratios

    @field_validator("manifest_files")
    @classmethod
    def _manifest_files_inside(cls, files: dict[str, str] | None) -> dict[str, str] | None:
        for split, rel in (files or {}).items():
            _relative_inside(rel, f"manifest_files.{split}")
        return files


class Sharding(_Strict):
    shard_size: int = Field(256, ge=1, description="items per shard directory")
    layout_version: Literal[0] = 0
    copy_mode: Literal["copy"] = "copy"
    force_uncompressed_tiff: bool = Field(True, description="false keeps each source file's compression")
    chip_size: int = Field(
        1024,
        ge=64,
        multiple_of=16,
        description=(
            "rasters taller or wider than this are cut into chips of at most chip_size x chip_size pixels, one "
            "item each: training patches are 256, so a chip holds 16 of them, and a 1024 chip is 3 MB as uint8 "
            "RGB, 8 MB as 4-band uint16, so loaders and evaluation hold one small chip at a time, never a whole "
            "orthophoto; the 256 and 512 sample tiles stay one item each"
        ),
    )


class ValidationMetrics(_Strict):
    iou_ignore_label_leq: int = 0
    iou_average: Literal["macro_over_present_labels"] = "macro_over_present_labels"


class DatasetHeader(_Strict):
    dataset_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: Literal[0] = Field(description="header format version")
    description: str = ""
    licence: str | None = Field(
        None,
        description=(
            "licence of the data, shown to users of models trained on it (meta.json); when left out, the first "
            "line of the dataset folder's LICENSE, LICENCE, LICENSE.txt or LICENCE.txt"
        ),
    )
    source_root: str = Field(".", description="folder the patterns are relative to, relative to the dataset folder")
    modalities: list[Modality] = Field(min_length=1)
    pairing: Pairing
    splits: SplitPolicy = Field(default_factory=SplitPolicy)
    sharding: Sharding = Field(default_factory=Sharding)
    validation_metrics: ValidationMetrics = Field(default_factory=ValidationMetrics)

    @field_validator("source_root")
    @classmethod
    def _source_root_is_inside(cls, source_root: str) -> str:
        return source_root if source_root == "." else _relative_inside(source_root, "source_root")

    @model_validator(mode="after")
    def _pairing_names_modalities(self) -> DatasetHeader:
        roles = {m.name: m.role for m in self.modalities}
        if len(roles) != len(self.modalities):
            raise ValueError("modality names must be unique")
        used = {self.pairing.input_modality, self.pairing.target_modality} - {None}
        if roles.get(self.pairing.input_modality) != "input":
            raise ValueError(f"pairing.input_modality {self.pairing.input_modality!r} is not an input modality")
        target = self.pairing.target_modality
        if target is not None and roles.get(target) != "target":
            raise ValueError(f"pairing.target_modality {target!r} is not a target modality")
        if unused := sorted(set(roles) - used):
            raise ValueError(f"modalities {unused} are not used by pairing")
        return self

    def modality(self, name: str) -> Modality:
        return next(m for m in self.modalities if m.name == name)

    @property
    def input(self) -> Modality:
        return self.modality(self.pairing.input_modality)

    @property
    def target(self) -> Modality | None:
        name = self.pairing.target_modality
        return None if name is None else self.modality(name)

    @property
    def pixel_rule(self) -> PixelRule:
        return self.input.pixel_rule()


def header_from_dict(data: object, source: str | Path) -> DatasetHeader:
    """Validate a parsed header; errors name `source`, each key path and the problem."""
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: a dataset header must be a YAML mapping, got {type(data).__name__}")
    try:
        return DatasetHeader.model_validate(data)
    except ValidationError as exc:
        raise DatasetError(f"{source}: invalid dataset header: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "<header>"
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r}")
        elif error["type"] == "missing":
            problems.append(f"missing key {key!r}")
        else:
            problems.append(f"{key}: {error['msg']}")
    return "; ".join(problems)


def load_header(path: str | Path) -> DatasetHeader:
    """Read a header YAML file; malformed YAML is reported with its line and column."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "not YAML"
        raise DatasetError(f"{where}: malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the dataset header: {exc.strerror}") from None
    return header_from_dict(data, path)


def header_to_yaml(header: DatasetHeader) -> str:
    return yaml.safe_dump(header.model_dump(mode="json", exclude_none=False), sort_keys=False, allow_unicode=True)


def dump_header(header: DatasetHeader, path: str | Path) -> Path:
    """Write the header as YAML atomically."""
    path = Path(path)
    atomic_write_text(path, header_to_yaml(header))
    return path


def header_hash(header: DatasetHeader) -> str:
    canonical = json.dumps(header.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
