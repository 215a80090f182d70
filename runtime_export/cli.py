"""How every command line of the project reports a user error: one line on stderr, no traceback.

A user error is anything the user can fix by changing what they handed the command (a path, a flag, a
file's contents, free disk space): ``ValueError`` (``DatasetError``, ``ArtifactError``,
``DamagedCheckpointError``, pydantic's ``ValidationError`` are ValueErrors) and ``OSError``. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
USER_ERROR_EXIT = 2  # argparse's own exit code for a bad command line


def error_line(error: BaseException) -> str:
    """The error's message on one line (newlines and runs of spaces folded), never empty."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def report_user_error(prog: str, error: BaseException, stream: TextIO | None = None) -> int:
    """Write ``prog: error: <message>`` as one line and return the exit code for it."""
    (stream or sys.stderr).write(f"{prog}: error: {error_line(error)}\n")
    return USER_ERROR_EXIT


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``, with a user error reported as one line instead of a traceback."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        return report_user_error(prog, error)
