"""Macro meshes (generated or read) distributed over the caller's communicator, and named boundaries.

Generators (``generate:`` in the run YAML):

- ``rectangle``: ``size: [Lx, Ly]``, ``n: [nx, ny]``, ``cell: triangle | quadrilateral``.
- ``box``: ``size: [Lx, Ly, Lz]``, ``n: [nx, ny, nz]``, ``cell: tetrahedron | hexahedron``.
- ``plate_with_hole``: ``size: [Lx, Ly]``, ``radius``, ``h`` (mesh size), ``h_hole`` (size at the hole).
- ``ring``: quarter ring ``radii: [inner, outer]`` in the first quadrant, ``h``; boundaries ``inner`` and
  ``outer`` (arcs), ``left`` (x = 0) and ``bottom`` (y = 0) for symmetry conditions.
- ``tiled_rve``: the RVE mesh repeated ``n: [nx, ny(, nz)]`` times and scaled by ``eps`` (periodic copies,
  for direct numerical simulation); cell tags are the RVE phases. ``rve``: the RVE to tile (homogenize keys
  or a path; default ``material.rve``).

Named boundaries: the faces of the bounding box are always available as ``left``/``right`` (x min/max),
``bottom``/``top`` (y), ``back``/``front`` (z); ``hole`` is every boundary facet not on the bounding box.
A mesh file adds its tagged boundary facets (lines in 2D, faces in 3D) as boundaries named by their gmsh
physical names (``tag_N`` for unnamed tags); a facet may carry several names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mpi4py import MPI

import basix.ufl
import dolfinx
import numpy as np
import ufl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from fe2ml.errors import ConfigError, MeshError
from fe2ml.macro.config import MeshSpec, parse_mesh
from fe2ml.micro.geometry import _gmsh_start
from fe2ml.micro.mesh import CELL_TYPES, TAG_KEYS, read_mesh, read_meshio

__all__ = ["MacroMesh", "create_macro_mesh"]

BOX_FACES = {"left": (0, 0), "right": (0, 1), "bottom": (1, 0), "top": (1, 1), "back": (2, 0), "front": (2, 1)}


@dataclass
class MacroMesh:
    """A distributed macro mesh with optional phase tags and named boundary locators.

    Attributes:
        mesh: dolfinx mesh on the caller's communicator.
        cell_tags: MeshTags of phases (or None).
        boundaries: name -> array of local boundary facet indices.
        lo, hi: bounding box corners (global).
    """

    mesh: object
    cell_tags: object
    boundaries: dict
    lo: np.ndarray
    hi: np.ndarray


def _boundaries(msh, lo, hi):
    d = msh.topology.dim
    fdim = d - 1
    msh.topology.create_connectivity(fdim, d)
    tol = 1e-8 * float(np.max(hi - lo))
    out = {}
    on_box = np.zeros(0, dtype=np.int32)
    for name, (axis, side) in BOX_FACES.items():
        if axis >= d:
            continue
        val = hi[axis] if side else lo[axis]
        f = dolfinx.mesh.locate_entities_boundary(msh, fdim, lambda x, a=axis, v=val: np.abs(x[a] - v) < tol)
        out[name] = f
        on_box = np.union1d(on_box, f)
    allb = dolfinx.mesh.exterior_facet_indices(msh.topology)
    out["hole"] = np.setdiff1d(allb, on_box).astype(np.int32)
    return out


def _facet_groups(m, dim: int) -> dict:
    """Tagged facets (lines in 2D, triangles/quadrilaterals in 3D) of a ``meshio.Mesh``: name -> facet midpoints.

    Names come from gmsh physical names (``field_data``); unnamed tags are called ``tag_N``.
    """
    ftypes = {2: ("line",), 3: ("triangle", "quad")}[dim]
    names = {int(v[0]): str(k) for k, v in (m.field_data or {}).items()
             if len(np.atleast_1d(v)) >= 2 and int(np.atleast_1d(v)[1]) == dim - 1}
    key = next((k for k in TAG_KEYS if k in m.cell_data), None)
    if key is None:
        return {}
    out: dict = {}
    for block, data in zip(m.cells, m.cell_data[key], strict=True):
        if block.type not in ftypes:
            continue
        mids = m.points[block.data][:, :, :dim].mean(axis=1)
        data = np.asarray(data).astype(np.int64).ravel()
        for t in np.unique(data):
            name = names.get(int(t), f"tag_{int(t)}")
            prev = out.get(name)
            out[name] = mids[data == t] if prev is None else np.concatenate([prev, mids[data == t]])
    return out


def _match_facet_groups(comm, msh, groups: dict, lo, hi) -> dict:
    """Boundary facets of the distributed mesh whose midpoints are those of a file's facet group."""
    d = msh.topology.dim
    fdim = d - 1
    msh.topology.create_connectivity(fdim, d)
    ext = dolfinx.mesh.exterior_facet_indices(msh.topology)
    mids = dolfinx.mesh.compute_midpoints(msh, fdim, ext)[:, :d] if len(ext) else np.zeros((0, d))
    tol = 1e-8 * float(np.max(hi - lo))
    out = {}
    for name, gm in groups.items():
        if len(ext) and len(gm):
            dist, _ = cKDTree(gm).query(mids, distance_upper_bound=tol)
            f = ext[np.isfinite(dist)].astype(np.int32)
        else:
            f = np.zeros(0, dtype=np.int32)
        if comm.allreduce(len(f)) > 0:  # groups of interior facets (interfaces) are not boundaries
            out[name] = f
    return out


def _bbox(comm, msh):
    x = msh.geometry.x[:, : msh.geometry.dim]
    lo_l = x.min(axis=0) if len(x) else np.full(x.shape[1], np.inf)
    hi_l = x.max(axis=0) if len(x) else np.full(x.shape[1], -np.inf)
    lo, hi = np.empty_like(lo_l), np.empty_like(hi_l)
    comm.Allreduce(np.ascontiguousarray(lo_l), lo, op=MPI.MIN)
    comm.Allreduce(np.ascontiguousarray(hi_l), hi, op=MPI.MAX)
    return lo, hi


def _from_arrays(comm, points, cells, cell_type, phases):
    """Create a distributed mesh from arrays held on rank 0; phases follow original_cell_index."""
    gdim, name, perm = CELL_TYPES[cell_type]
    if comm.rank == 0:
        c = cells if perm is None else cells[:, perm]
        x = np.ascontiguousarray(points[:, :gdim])
        c = np.ascontiguousarray(c, dtype=np.int64)
    else:
        x = np.zeros((0, gdim))
        c = np.zeros((0, cells.shape[1] if cells is not None else {"triangle": 3, "quadrilateral": 4,
                                                                    "tetrahedron": 4, "hexahedron": 8}[name]),
                     dtype=np.int64)
    el = basix.ufl.element("Lagrange", name, 1, shape=(gdim,))
    msh = dolfinx.mesh.create_mesh(comm, c, ufl.Mesh(el), x)
    tags = None
    ph = comm.bcast(phases if comm.rank == 0 else None, root=0)  # every rank takes part
    if ph is not None:
        tdim = msh.topology.dim
        nloc = msh.topology.index_map(tdim).size_local
        orig = np.asarray(msh.topology.original_cell_index)[:nloc]
        tags = dolfinx.mesh.meshtags(msh, tdim, np.arange(nloc, dtype=np.int32), ph[orig].astype(np.int32))
    return msh, tags


def _tile(rm, n, eps):
    """Tile an RVE mesh n times per axis, scale by eps, merge coincident nodes."""
    lo, hi = rm.box
    L = hi - lo
    pts, cells, ph = [], [], []
    off = 0
    for idx in np.ndindex(*n):
        shift = np.array(idx) * L
        pts.append((rm.points - lo + shift) * eps)
        cells.append(rm.cells + off)
        ph.append(rm.phases)
        off += len(rm.points)
    X = np.concatenate(pts)
    C = np.concatenate(cells)
    tree = cKDTree(X)
    pairs = tree.query_pairs(1e-9 * eps * L.max(), output_type="ndarray")
    rep = np.arange(len(X))
    # union of coincident nodes: map each to the smallest index in its group

    G = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(X), len(X)))
    _, lab = connected_components(G, directed=False)
    first = np.full(lab.max() + 1, -1)
    for i in range(len(X) - 1, -1, -1):
        first[lab[i]] = i
    rep = first[lab]
    used, inv = np.unique(rep, return_inverse=True)
    return X[used], inv[C], np.concatenate(ph)


def _plate_with_hole(comm, size, radius, h, h_hole):
    # deferred: gmsh only for the generators that mesh with it
    import dolfinx.io.gmsh as dgmsh
    import gmsh

    Lx, Ly = size
    if comm.rank == 0:
        _gmsh_start()
        gmsh.model.add("plate")
        occ = gmsh.model.occ
        rect = occ.addRectangle(0, 0, 0, Lx, Ly)
        disk = occ.addDisk(Lx / 2, Ly / 2, 0, radius, radius)
        out, _ = occ.cut([(2, rect)], [(2, disk)])
        occ.synchronize()
        gmsh.model.addPhysicalGroup(2, [t for _, t in out], 1)
        curves = gmsh.model.getBoundary(out, oriented=False)
        hole = []
        for _, c in curves:
            b = gmsh.model.getBoundingBox(1, c)
            if b[0] > 1e-9 and b[3] < Lx - 1e-9 and b[1] > 1e-9 and b[4] < Ly - 1e-9:
                hole.append(c)
        gmsh.model.mesh.field.add("Distance", 1)
        gmsh.model.mesh.field.setNumbers(1, "CurvesList", hole)
        gmsh.model.mesh.field.add("Threshold", 2)
        gmsh.model.mesh.field.setNumber(2, "InField", 1)
        gmsh.model.mesh.field.setNumber(2, "SizeMin", h_hole)
        gmsh.model.mesh.field.setNumber(2, "SizeMax", h)
        gmsh.model.mesh.field.setNumber(2, "DistMin", 0.2 * radius)
        gmsh.model.mesh.field.setNumber(2, "DistMax", 2.0 * radius)
        gmsh.model.mesh.field.setAsBackgroundMesh(2)
        gmsh.option.setNumber("Mesh.MeshSizeExtendFromBoundary", 0)
        gmsh.option.setNumber("Mesh.MeshSizeFromPoints", 0)
        gmsh.option.setNumber("Mesh.MeshSizeFromCurvature", 0)
        gmsh.option.setNumber("Mesh.MeshSizeMax", h)  # options persist in gmsh: set every one we rely on
        gmsh.option.setNumber("Mesh.MeshSizeMin", min(h, h_hole) / 2)
        gmsh.option.setNumber("Mesh.Algorithm", 6)
        gmsh.model.mesh.generate(2)
    data = dgmsh.model_to_mesh(gmsh.model, comm, 0, gdim=2)
    if comm.rank == 0:
        gmsh.clear()
    return data.mesh, None


def _ring(comm, radii, h):
    """Quarter of a ring a <= r <= b in the first quadrant (e.g. a vessel wall with symmetry planes).

    Returns the mesh and the named facet groups ``inner`` (r = a) and ``outer`` (r = b).
    """
    # deferred: gmsh only for the generators that mesh with it
    import dolfinx.io.gmsh as dgmsh
    import gmsh

    a, b = radii
    if comm.rank == 0:
        _gmsh_start()
        gmsh.model.add("ring")
        geo = gmsh.model.geo
        c = geo.addPoint(0, 0, 0, h)
        p = [geo.addPoint(x, y, 0, h) for x, y in ((a, 0), (b, 0), (0, b), (0, a))]
        bottom = geo.addLine(p[0], p[1])
        outer = geo.addCircleArc(p[1], c, p[2])
        left = geo.addLine(p[2], p[3])
        inner = geo.addCircleArc(p[3], c, p[0])
        geo.addPlaneSurface([geo.addCurveLoop([bottom, outer, left, inner])], 1)
        geo.synchronize()
        gmsh.model.addPhysicalGroup(2, [1], 1, name="wall")
        gmsh.model.addPhysicalGroup(1, [inner], 11, name="inner")
        gmsh.model.addPhysicalGroup(1, [outer], 12, name="outer")
        gmsh.option.setNumber("Mesh.MeshSizeMax", h)
        gmsh.option.setNumber("Mesh.Algorithm", 6)
        gmsh.model.mesh.generate(2)
    data = dgmsh.model_to_mesh(gmsh.model, comm, 0, gdim=2)
    if comm.rank == 0:
        gmsh.clear()
    ft = data.facet_tags
    groups = {name: ft.find(tag) for name, (dim, tag) in data.physical_groups.items() if dim == 1}
    return data.mesh, groups


def create_macro_mesh(comm, spec: MeshSpec | dict, *, where: str = "mesh", rve_mesh_loader=None) -> MacroMesh:
    """Create the macro mesh of a run.

    Args:
        comm: communicator of the macro problem.
        spec: the validated :class:`~fe2ml.macro.config.MeshSpec` of a run config, or the ``mesh:`` mapping of a
            run YAML (``{generate: NAME, ...}`` or ``{file: PATH}``, relative to the working folder), validated here
            by :func:`~fe2ml.macro.config.parse_mesh`.
        where: config location for messages.
        rve_mesh_loader: callable returning the RVE mesh (for ``tiled_rve``).

    Returns:
        :class:`MacroMesh`.
    """
    if isinstance(spec, dict):
        dim = 3 if spec.get("generate") == "box" or len(spec.get("size", spec.get("n", [0, 0]))) == 3 else 2
        spec = parse_mesh(spec, dim, where, Path("."))
    tags = groups = None
    if spec.kind in ("rectangle", "box"):
        ct = getattr(dolfinx.mesh.CellType, str(spec.cell))
        size, n = list(spec.size), list(spec.n)
        if spec.kind == "rectangle":
            msh = dolfinx.mesh.create_rectangle(comm, [[0.0, 0.0], size], n, ct)
        else:
            msh = dolfinx.mesh.create_box(comm, [[0.0, 0.0, 0.0], size], n, ct)
    elif spec.kind == "plate_with_hole":
        msh, tags = _plate_with_hole(comm, list(spec.size), spec.radius, spec.h, float(spec.h_hole or spec.h / 4))
    elif spec.kind == "ring":
        msh, ring_groups = _ring(comm, spec.radii, spec.h)
    elif spec.kind == "tiled_rve":
        rm = rve_mesh_loader() if rve_mesh_loader is not None else None
        if rm is None:
            raise ConfigError(f"{where}: generate tiled_rve needs the RVE to tile: mesh.rve (or material.rve)")
        if len(spec.n) != rm.dim:
            raise ConfigError(f"{where}.n: expected {rm.dim} positive integers (tiles per axis), got {list(spec.n)}")
        n = list(spec.n)
        eps = spec.eps if spec.eps is not None else 1.0 / max(n)
        if comm.rank == 0:
            X, C, ph = _tile(rm, n, eps)
        else:
            X, C, ph = None, None, None
        msh, tags = _from_arrays(comm, X, C if C is not None else np.zeros((0, rm.cells.shape[1]), dtype=np.int64),
                                 rm.cell_type, ph)
    else:
        path = Path(str(spec.file))
        if not path.is_file():
            raise MeshError(f"{where}.file: {path} not found")
        X = C = ph = ct = err = None
        if comm.rank == 0:
            try:
                m = read_meshio(path)  # read once: volume cells and tagged boundary facets
                rm = read_mesh(path, cell_phases=[], meshio_mesh=m)
                X, C, ph, ct = rm.points, rm.cells, rm.phases, rm.cell_type
                groups = _facet_groups(m, rm.dim)
            except MeshError as e:
                err = e
        ct, err, groups = comm.bcast((ct, err, groups), root=0)
        if err is not None:
            raise err
        msh, tags = _from_arrays(comm, X, C, ct, ph)
    lo, hi = _bbox(comm, msh)
    boundaries = _boundaries(msh, lo, hi)
    if spec.kind == "ring":
        boundaries = {**ring_groups, **boundaries}
    if spec.kind == "file" and groups:
        named = _match_facet_groups(comm, msh, groups, lo, hi)
        boundaries = {**named, **{k: v for k, v in boundaries.items() if k not in named}}  # file names first
    return MacroMesh(mesh=msh, cell_tags=tags, boundaries=boundaries, lo=lo, hi=hi)
