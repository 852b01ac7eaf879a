"""Domain errors. Library code raises these; only ``cxrtool.cli`` turns them into one-line messages.

Exit codes: 1 for a runtime failure (bad data, corrupt checkpoint, NaN loss), 2 for a usage error
(unknown name, impossible option combination).
"""

from __future__ import annotations


class CxrtoolError(Exception):
    """Base class: a failure a user can understand and act on, shown as one line."""

    exit_code = 1


class UsageError(CxrtoolError):
    """The command line or config asks for something that cannot be done as stated."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A model / augmentation / explainer / ... name that no plugin registered."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        shown = ", ".join(self.valid) if self.valid else "(none registered)"
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {shown}")


class DataError(CxrtoolError):
    """Missing, empty, unreadable or inconsistent data."""


class ImageReadError(DataError):
    """One image could not be decoded."""


class CheckpointError(CxrtoolError):
    """A checkpoint is missing, corrupt, or belongs to another kind of model."""


class TrainingError(CxrtoolError):
    """Training cannot go on (for example the loss became NaN)."""


class PluginError(CxrtoolError):
    """A plugin is broken: it failed to import, raised in a hook or registered a duplicate name."""
