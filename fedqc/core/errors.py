"""Errors fedqc raises on bad input: each names the file or config key at fault.

The CLI catches :class:`FedqcError` and prints its message without a traceback, so every
user-facing failure must be one of these (or a subclass), never a bare ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path


class FedqcError(Exception):
    """Base class for all errors fedqc reports to a user."""


class DataError(FedqcError):
    """A data file (or folder) is unusable; the message names it.

    Args:
        path: the file or folder at fault.
        problem: what is wrong with it, in plain words.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(FedqcError):
    """A configuration value is wrong; the message names the key path (e.g. ``sites[1].filter``).

    Args:
        key: dotted key path inside the config, or the config file for file-level errors.
        problem: what is wrong and, where it helps, the allowed values.
        source: the config file, when known.
    """

    def __init__(self, key: str, problem: str, source: str | Path | None = None):
        self.key = key
        self.problem = problem
        self.source = None if source is None else Path(source)
        where = f"{self.source}: " if self.source else ""
        if key.startswith("<"):  # the file as a whole (<file>) or its top level (<root>)
            super().__init__(f"{where}{problem}")
        else:
            super().__init__(f"{where}config key '{key}': {problem}")
