"""One exception hierarchy for deltatune.

Every error a user can cause by passing bad input is a :class:`DeltaConfigError` (a ``ValueError``)
or, where the *type* of a value is wrong, a :class:`DeltaConfigTypeError` (also a ``TypeError``).
Messages name the parameter, the value given and what was expected.
"""

from __future__ import annotations


class DeltaError(Exception):
    """Base class of every error deltatune raises on purpose."""


class DeltaConfigError(DeltaError, ValueError):
    """A configuration value or argument is invalid (raised before any work starts)."""


class DeltaConfigTypeError(DeltaConfigError, TypeError):
    """A configuration value or argument has the wrong type."""


class TargetNotFoundError(DeltaConfigError):
    """``target_modules`` (or another module pattern) matched no module of the model."""


class UnsupportedModuleError(DeltaConfigError):
    """A pattern matched a module whose type the method cannot wrap."""


class AdapterNotFoundError(DeltaConfigError, KeyError):
    """An adapter name was used that is not on the model."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0]) if self.args else ""


class CheckpointError(DeltaError):
    """A delta checkpoint is missing, corrupt, or does not fit the model."""


class MissingPackageError(DeltaError, ImportError):
    """An optional package (or a bundled-model package) is not installed."""


class DataFormatError(DeltaError, ValueError):
    """A data file is malformed; the message names the file and the line or record."""


class FileFormatError(DataFormatError):
    """A config, recipe or data file cannot be read: not UTF-8, invalid YAML/JSON, or a duplicate key.

    The message names the file and the line (and column where known)."""


class ForeignFileError(DeltaError):
    """A directory deltatune would write into or clean up holds files deltatune did not write.

    deltatune never deletes such files; the message names them and says what to do."""
