"""User-facing errors. Each message names what is wrong and how to fix it; entry points print
the message alone (no traceback) and exit with status 2."""

from __future__ import annotations


class TransferCasesError(Exception):
    """Base class of the errors a user can fix from the config or the command line."""


class ConfigError(TransferCasesError, ValueError):
    """A config value that cannot work: unknown name, cut beyond the body's depth, ..."""


class DataError(TransferCasesError, ValueError):
    """Missing data folder, too few classes, unreadable image."""


class WeightsError(TransferCasesError, RuntimeError):
    """Weights that cannot be had (offline download, missing file) or do not fit the architecture."""


class OutputError(TransferCasesError, OSError):
    """An output that cannot be written: read-only or missing folder, full disk."""
