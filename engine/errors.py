"""Errors that the CLI turns into one line on stderr and exit status 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a file, a field, a setting). The message is one line naming the field,
    the problem and the first offending index."""


class CheckFailed(RuntimeError):
    """A strict check failed (e.g. ``analysis=convergence analysis.strict=true``): exit status 1."""


class StorageError(RuntimeError):
    """The run directory could not be written (e.g. no space left on device). One line at the
    CLI, exit status 1; finished chunks are kept and a rerun resumes."""
