"""Test harness: MPI-safe temporary folders, gc + barrier after each test, serial-only marker.

The suite runs serially (``pytest``) and under ``mpiexec -n 2 python -m pytest``; tests marked
``serial`` (they spawn their own processes or depend on the rank count) are skipped under MPI.
"""

import gc
import shutil
import tempfile
from pathlib import Path

from mpi4py import MPI

import pytest

import fe2ml  # noqa: F401  (dolfinx_solver before mpi4py/petsc4py)


def pytest_collection_modifyitems(config, items):
    if MPI.COMM_WORLD.size > 1:
        skip = pytest.mark.skip(reason="serial-only test (run without mpiexec)")
        for item in items:
            if "serial" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _collective_cleanup():
    yield
    gc.collect()
    MPI.COMM_WORLD.barrier()


def _shared_tmpdir(comm, prefix):
    path = tempfile.mkdtemp(prefix=prefix) if comm.rank == 0 else None
    return Path(comm.bcast(path, root=0))


@pytest.fixture
def mpi_tmp_path():
    """A temporary folder shared by all ranks of COMM_WORLD (rank 0 creates and removes it)."""
    comm = MPI.COMM_WORLD
    path = _shared_tmpdir(comm, "fe2ml-test-")
    yield path
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mesh_dir():
    """Session-wide folder for generated meshes, shared by all ranks."""
    comm = MPI.COMM_WORLD
    path = _shared_tmpdir(comm, "fe2ml-meshes-")
    yield path
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tissue_rve():
    """The small tissue RVE of the tests as YAML text: ``tissue_rve(indent, **generator_args)`` (see helpers)."""
    from helpers import tissue_rve_yaml

    return tissue_rve_yaml
