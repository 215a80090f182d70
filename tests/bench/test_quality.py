"""bench/quality.py: a work folder that would silently resume an old draw is refused."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("bench_quality", Path(__file__).parents[2] / "bench" / "quality.py")
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)


def test_a_work_dir_holding_the_seeds_checkpoint_is_refused_naming_it(tmp_path, capsys) -> None:
    (tmp_path / "ckpt-3").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--seed", "3", "--work-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"already holds {tmp_path / 'ckpt-3'}" in err and "use a fresh folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-3"]  # nothing trained or written
