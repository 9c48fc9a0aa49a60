from mpi4py import MPI

import numpy as np
import pytest
from helpers import box_mesh, write_meshio

from fe2ml.errors import ConfigError, MeshError
from fe2ml.micro.geometry import generate_mesh
from fe2ml.micro.mesh import make_rve_mesh, periodic_node_map, read_mesh

COMM = MPI.COMM_WORLD


def _fraction(m, tag):
    v = m.element_volumes()
    return v[m.phases == tag].sum() / np.prod(m.lengths)


@pytest.mark.parametrize("aspect", [1.0, 1.6])
def test_cells_2d_periodic_tagged_identified(mesh_dir, aspect):
    p = generate_mesh("cells_2d", dict(n_cells=6, volume_fraction=0.3, aspect=aspect, seed=3, h=0.03),
                      mesh_dir, comm=COMM)
    m = read_mesh(p)
    assert m.tags == [1, 2]
    rep, problems = periodic_node_map(m.points)
    assert problems == [] and (rep != np.arange(len(rep))).sum() > 0
    assert m.n_cells == 6  # cells cut by the boundary count once
    assert abs(_fraction(m, 2) - 0.3) < 0.01  # polygonal approximation of curved boundaries
    assert np.allclose(m.lengths, 1.0)


@pytest.mark.parametrize("gap", [0.02, 0.12])
def test_cells_2d_gap_and_size(mesh_dir, gap):
    # the closest nodes of two different cells (periodic images included) are at least gap apart; size scales the box
    size = [2.0, 1.0]
    m = read_mesh(generate_mesh("cells_2d", dict(n_cells=5, volume_fraction=0.2, seed=1, h=0.04, gap=gap, size=size),
                                mesh_dir, comm=COMM))
    assert np.allclose(m.lengths, size) and m.n_cells == 5
    nodes = [np.unique(m.cells[m.cell_ids == c]) for c in range(m.n_cells)]
    dmin = np.inf
    for i in range(m.n_cells):
        for j in range(i + 1, m.n_cells):
            d = m.points[nodes[i]][:, None, :] - m.points[nodes[j]][None, :, :]
            d -= np.round(d / size) * size  # minimum image
            dmin = min(dmin, np.sqrt((d**2).sum(-1)).min())
    assert dmin >= gap * (1 - 1e-9)


def test_generators_3d_and_laminate(mesh_dir):
    m = read_mesh(generate_mesh("cells_3d", dict(n_cells=3, volume_fraction=0.15, seed=2, h=0.12), mesh_dir,
                                comm=COMM))
    assert m.dim == 3 and m.tags == [1, 2] and m.n_cells == 3
    periodic_node_map(m.points, strict=True)
    assert abs(_fraction(m, 2) - 0.15) < 0.02
    f = read_mesh(generate_mesh("fibres_3d", dict(n_fibres=2, volume_fraction=0.2, seed=1, h=0.15), mesh_dir,
                                comm=COMM))
    assert f.n_cells == 2
    periodic_node_map(f.points, strict=True)
    for dim in (2, 3):
        lam = read_mesh(generate_mesh("laminate", dict(dim=dim, fractions=[0.3, 0.7], n_periods=2, h=0.2),
                                      mesh_dir, comm=COMM))
        assert lam.tags == [1, 2]
        assert abs(_fraction(lam, 1) - 0.3) < 1e-12  # layer-conforming: exact
        periodic_node_map(lam.points, strict=True)
    s = read_mesh(generate_mesh("centred_cell", dict(dim=3, volume_fraction=0.1, aspect=1.5), mesh_dir,
                                comm=COMM))
    assert s.n_cells == 1


@pytest.mark.parametrize("ct,dim,fmt", [("triangle", 2, ".vtu"), ("quad", 2, ".xdmf"), ("tetra", 3, ".mesh"),
                                        ("hexahedron", 3, ".msh"), ("quad", 2, ".msh"), ("tetra", 3, ".vtu")])
def test_import_formats(mpi_tmp_path, ct, dim, fmt):
    X, cells, ct_, ph = box_mesh(dim, 4, cell_type=ct, phase_fn=lambda c: 1 + (np.linalg.norm(c - 0.5, axis=1)
                                                                               < 0.3))
    path = mpi_tmp_path / f"m{fmt}"
    if COMM.rank == 0:
        key = {".vtu": "phase", ".xdmf": "cell_tags", ".mesh": "medit:ref", ".msh": "gmsh:physical"}[fmt]
        write_meshio(str(path), X, cells, ct_, ph, key=key)
    COMM.barrier()
    m = read_mesh(path)
    assert m.cell_type == ct_ and m.dim == dim
    assert np.array_equal(np.sort(m.phases), np.sort(ph))
    assert np.isclose(m.element_volumes().sum(), 1.0)
    periodic_node_map(m.points, strict=True)


def test_non_periodic_mesh_is_reported_precisely():
    X, cells, ct, ph = box_mesh(2, 4)
    X = X.copy()
    X[(np.abs(X[:, 0] - 1) < 1e-12) & (np.abs(X[:, 1] - 0.5) < 1e-12), 1] = 0.55  # move one right-face node
    with pytest.raises(MeshError, match=r"not periodic: 2 of 10 nodes on faces x=0/x=1.*\(1\.0, 0\.55\)"):
        periodic_node_map(X, source="test")


def test_bad_mesh_inputs(mpi_tmp_path):
    with pytest.raises(MeshError, match="not found"):
        read_mesh(mpi_tmp_path / "nope.msh")
    bad = mpi_tmp_path / "bad.msh"
    untagged = mpi_tmp_path / "untagged.vtu"
    if COMM.rank == 0:
        bad.write_text("this is not a mesh\n")
        import meshio

        X, cells, ct, ph = box_mesh(2, 2)
        meshio.write(str(untagged), meshio.Mesh(X, [(ct, cells)]))
    COMM.barrier()
    with pytest.raises(MeshError, match="cannot read mesh"):
        read_mesh(bad)
    with pytest.raises(MeshError, match="no phase tags"):
        read_mesh(untagged)
    X, cells, ct, ph = box_mesh(2, 2)
    with pytest.raises(MeshError, match="cell_phases"):
        make_rve_mesh(X, cells, ct, ph, cell_phases=[5])


def test_generator_bad_parameters(mesh_dir):
    with pytest.raises(ConfigError, match="unknown generator"):
        generate_mesh("spaghetti", {}, mesh_dir, comm=COMM)
    with pytest.raises(ConfigError, match="unknown parameter"):
        generate_mesh("cells_2d", {"radius": 2}, mesh_dir, comm=COMM)
    with pytest.raises(ConfigError, match="volume_fraction"):
        generate_mesh("cells_2d", {"volume_fraction": 1.5}, mesh_dir, comm=COMM)
    with pytest.raises(ConfigError, match="could not place"):
        generate_mesh("cells_2d", {"n_cells": 40, "volume_fraction": 0.7, "aspect": 2.0}, mesh_dir, comm=COMM)
