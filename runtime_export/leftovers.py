"""The temporaries a run makes beside its outputs, named after its process, and those a killed run left.

A run starts their names with ``owned_prefix`` (``<prefix><pid>-``); a later run removes or restores only the
entries of dead processes (``dead_leftovers``), never those of a run still going. Used by the artifact export
(``runtime_export.artifact``: staged and set-aside folders) and ``runtime_export.segment`` (its output staging).
"""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX). Elsewhere always True: Windows' ``os.kill(pid, 0)`` would stop it."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def owned_prefix(prefix: str) -> str:
    """``<prefix><pid>-``: how a run starts the names of the temporaries it makes beside its output, so that a later
    run can tell those of a killed run (``dead_leftovers``) from those of a run still going."""
    return f"{prefix}{os.getpid()}-"


def dead_leftovers(folder: Path, prefix: str) -> list[Path]:
    """The entries of ``folder`` named ``<prefix><pid>-...`` (``owned_prefix``) whose process is gone, sorted."""
    try:
        names = sorted(entry.name for entry in folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    dead = []
    for name in names:
        pid = name[len(prefix) :].split("-", 1)[0] if name.startswith(prefix) else ""
        if pid.isdigit() and not process_alive(int(pid)):
            dead.append(folder / name)
    return dead
