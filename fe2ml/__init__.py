"""fe2ml: FE² multiscale homogenization with a neural constitutive surrogate.

Importing :mod:`fe2ml` is light: it pulls in neither petsc4py nor torch. The pip route's
``dolfinx_solver`` wheel must be imported before dolfinx/petsc4py; this is done here once,
guarded so that the conda route (where the module is absent) is unaffected.
"""

try:  # pip route: binary wheel of dolfinx with PETSc, must come first
    import dolfinx_solver  # noqa: F401
except ImportError:  # conda route
    pass

from fe2ml.errors import ConfigError, Fe2mlError, MaterialError, MeshError, SolverError

__version__ = "0.1.0"

__all__ = ["ConfigError", "Fe2mlError", "MaterialError", "MeshError", "SolverError", "__version__"]
