"""What every bad-input and fault case asserts, in one place.

A case runs a command line (in a child process, as a user would) and then checks the promise of
docs/OPERATIONS.md: a non-zero exit, exactly one line on stderr naming the problem, no traceback,
every input file byte-identical afterwards, and no hidden leftover files.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run_module(module: str, *args: str | Path, cwd: Path | None = None, timeout: float = 300) -> Outcome:
    """``python -m module args`` in a child process with the repository importable; stdout and stderr kept."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not argparse's usage block (``usage:`` and its indented continuation)."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line.startswith(" "):
            continue
        in_usage = False
        if line.strip():
            lines.append(line)
    return lines


def assert_refused(outcome: Outcome, *fragments: str) -> str:
    """Non-zero exit, no traceback, one error line holding every fragment; returns that line."""
    assert outcome.returncode != 0, f"exit 0 on bad input; stdout: {outcome.stdout[-500:]!r}"
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    lines = error_lines(outcome.stderr)
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{outcome.stderr[-3000:]}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def file_digests(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a root may be a file), links followed, keyed by path."""
    digests = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def hidden_entries(*roots: Path) -> set[str]:
    """Every file or folder whose name starts with a dot under ``roots`` (temporaries, scratch, staging)."""
    return {str(p) for root in roots if root.is_dir() for p in root.rglob(".*")}


class Untouched:
    """The files under some folders before a run, to assert after it that nothing changed and nothing hid."""

    def __init__(self, *roots: Path) -> None:
        self.roots = roots
        self.digests = file_digests(*roots)
        self.hidden = hidden_entries(*roots)

    def assert_unchanged(self) -> None:
        after = file_digests(*self.roots)
        paths = self.digests.keys() | after.keys()
        changed = sorted(path for path in paths if self.digests.get(path) != after.get(path))
        assert not changed, f"files changed, added or removed: {changed[:20]}"
        assert hidden_entries(*self.roots) == self.hidden, (
            f"hidden leftovers: {sorted(hidden_entries(*self.roots) - self.hidden)[:20]}"
        )
