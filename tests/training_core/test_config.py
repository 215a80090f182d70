"""Config loading (Python module or YAML), range checks, and CLI flags written over a config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from training_core.config import TrainConfig, load_config
from training_core.train import _parse_args, config_from_args


def test_shipped_defaults() -> None:
    """The defaults docs/MODEL_NOTES.md measures (its table describes these values)."""
    config = load_config(None)
    assert (config.model.embed_dim, config.model.max_k) == (96, 16)
    assert (config.k_min, config.cluster_iters, config.data.downsample) == (2, [2, 6], [1, 2])
    assert (config.lr, config.seed, config.device) == (3e-4, 42, "auto")
    assert (config.data.patch_size, config.batch_size, config.steps) == (256, 4, 400)
    assert (config.loss.cross_view_mi, config.augment.colour_jitter) == (3.0, 0.0)


def test_python_module_with_get_config_or_config(tmp_path: Path) -> None:
    with_function = tmp_path / "a.py"
    with_function.write_text(
        "from training_core.config import TrainConfig\ndef get_config():\n    return TrainConfig(steps=7)\n"
    )
    with_constant = tmp_path / "b.py"
    with_constant.write_text("CONFIG = {'steps': 9, 'model': {'embed_dim': 32}}\n")
    assert load_config(with_function).steps == 7
    assert (load_config(with_constant).steps, load_config(with_constant).model.embed_dim) == (9, 32)


def test_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ndata:\n  source: shards\n  dataset_ids: [kampala_buildings]\n")
    config = load_config(path)
    assert (config.steps, config.data.source, config.data.dataset_ids) == (5, "shards", ["kampala_buildings"])


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")))
def test_named_recipes_load_and_are_listed(path: Path) -> None:
    config = load_config(path)
    assert path.name in (path.parent / "README.md").read_text()
    assert path.read_text().startswith("#"), "a recipe says what it is for in its first line"
    assert config.steps >= 1


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "stepz: 5\n", r"bad\.yaml: stepz: Extra inputs are not permitted \(got 5\)$"),
        (
            "type.yaml",
            "model: {max_k: many}\n",
            r"type\.yaml: model\.max_k: Input should be a valid integer, .* \(got 'many'\)$",
        ),
        ("syntax.yaml", "model: {embed_dim: 8\n", r"syntax\.yaml: line 2, column 1: not valid YAML: expected ','"),
        ("list.yaml", "- 1\n", r"list\.yaml: Input should be a valid dictionary"),
        ("range.yaml", "k_min: 20\n", r"range\.yaml: k_min=20 exceeds model\.max_k=16$"),
        ("binary.yaml", "steps: \xff\n", r"binary\.yaml: not a UTF-8 text file"),
        ("syntax.py", "CONFIG = {\n", r"syntax\.py: line 1: Python syntax error: '\{' was never closed"),
        ("empty.py", "X = 1\n", r"empty\.py defines neither get_config\(\) nor CONFIG"),
        ("odd.toml", "", r"odd\.toml: expected \.py, \.yaml or \.yml"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=message) as caught:
        load_config(path)
    assert "\n" not in str(caught.value), "one line: the CLI prints it as is"


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config("nope.py")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k_min": 20}, "k_min=20 exceeds model.max_k=16"),
        ({"cluster_iters": [5, 2]}, r"cluster_iters=\[5, 2\]"),
        ({"data": {"patch_size": 102, "downsample": [1]}}, "patch_size=102 must be divisible by 4"),
        ({"data": {"patch_size": 36, "downsample": [1, 2]}}, "downsample factor 2"),
    ],
)
def test_range_checks(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig.model_validate(fields)


def test_cli_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "base.yaml"
    path.write_text("steps: 5\nlr: 0.01\ndata:\n  num_workers: 3\n")
    flags = "--checkpoint_dir x --steps 2 --data-source shards --processed-root /p --dataset-id a --dataset-id b"
    args = _parse_args(["--config", str(path), *flags.split(), "--amp", "--max-samples", "4"])
    config = config_from_args(args)
    assert (config.steps, config.lr, config.amp) == (2, 0.01, True)
    assert (config.data.source, config.data.processed_root, config.data.dataset_ids) == ("shards", "/p", ["a", "b"])
    assert (config.data.num_workers, config.data.max_samples) == (3, 4)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--steps -3", r"^--steps: Input should be greater than or equal to 1 \(got -3\)$"),
        ("--patch-size 36", r"^data\.downsample factor 2: data\.patch_size=36 must be divisible by 4 \* factor$"),
        ("--lr 0 --batch-size 0", r"^--batch-size: .* \(got 0\); --lr: Input should be greater than 0 \(got 0\.0\)$"),
    ],
)
def test_bad_flag_values_name_the_flag(flags: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_args(_parse_args(["--checkpoint_dir", "x", *flags.split()]))
