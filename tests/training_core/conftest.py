"""The export tests (``test_export.py``) share the numpy runtime tests' fixtures: a calibrated model, its artifact,
real tiles (``tests/runtime_export/conftest.py``)."""

from tests.runtime_export.conftest import (  # noqa: F401 (fixtures, found by pytest by name)
    artifact_dir,
    learned_config,
    model,
    sample_tiles,
    umask_022,
)
