"""How many of the tests pytest selects with the given arguments need system packages (the ``system`` mark).

``python -m tests.needs_system [PYTEST ARGS...]`` prints that count; ``bin/test`` runs ``bin/install-system-deps``
only when it is not 0, so ``bin/test -m "not system"`` (or a path, or ``-k``, selecting none) installs nothing.
The selection is pytest's own: a collection with the same arguments, so ``-m``, ``-k``, paths and ``--lf``
combine exactly as in the real run. Collection errors are left to the real run to report; a usage error stops
here with pytest's message.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest


class _SystemCount:
    def __init__(self) -> None:
        self.count = 0

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # session.items is the selection after -m / -k deselection.
        self.count = sum(item.get_closest_marker("system") is not None for item in session.items)


def main(args: list[str]) -> int:
    counter = _SystemCount()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the listing itself is not wanted
        code = pytest.main(["--collect-only", "-q", *args], plugins=[counter])
    if code in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR):
        print(f"tests.needs_system: pytest {' '.join(args)} cannot collect (exit {int(code)})", file=sys.stderr)
        return int(code)
    print(counter.count)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
