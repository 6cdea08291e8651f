"""User-facing errors: one clear line naming what is wrong and where, never a traceback."""

from __future__ import annotations


class GptossError(Exception):
    """An error the user can act on. The CLI prints it as one line (plus an optional hint) and exits 1."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class SpecError(GptossError):
    """The run spec (file, flags or environment) is invalid."""


class DataError(GptossError):
    """A dataset row or source is malformed."""


class StoreError(GptossError):
    """The object store (S3 or local folder) refused or failed an operation."""


class PlanError(GptossError):
    """The run cannot fit the chosen hardware."""


class BackendError(GptossError):
    """A backend (Kubernetes, Truss, local) failed."""
