"""Exception types of fe2ml.

Every error a user can cause by bad input is one of these, with a one-line message naming what
is wrong (file, key, tag, point) and what is allowed. The CLI prints the message and exits non-zero.
"""

__all__ = ["ConfigError", "Fe2mlError", "MaterialError", "MeshError", "SolverError"]


class Fe2mlError(Exception):
    """Base class of all errors fe2ml raises for a user's input or a failed solve."""


class ConfigError(Fe2mlError):
    """A configuration file or argument is malformed, has unknown keys or wrong types."""


class MeshError(Fe2mlError):
    """A mesh is missing, unreadable, untagged, or not periodic where periodicity is required."""


class MaterialError(Fe2mlError):
    """Material parameters are invalid (e.g. nu >= 0.5, non-positive-definite stiffness)."""


class SolverError(Fe2mlError):
    """A solve failed (singular system, Newton divergence after all substeps)."""
