"""Errors that reach the user as one clear sentence, never a deep traceback."""

from __future__ import annotations

import os


class MeshchopError(Exception):
    """A problem the user can act on; the CLI prints it and exits with status 2."""


class InputError(MeshchopError):
    """A file that cannot be used, with the file named in the message."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class Cancelled(MeshchopError):
    """Long work was stopped by the user; nothing half-made was kept."""

    def __init__(self, what: str = "stopped by the user"):
        super().__init__(what)


def reason(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a message: its first line, or its type's name."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
