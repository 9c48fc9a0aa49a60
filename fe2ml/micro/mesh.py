"""RVE meshes: import, validation, periodicity check, biological-cell identification.

An :class:`RVEMesh` is a plain-array description of a box-shaped unit cell: node coordinates,
one cell type (triangle, quadrilateral, tetrahedron or hexahedron), per-element phase tags and a
per-element biological-cell id (-1 outside cells). It is independent of dolfinx; the solver turns
it into a dolfinx mesh on ``MPI.COMM_SELF``.

Any meshio-readable file works (gmsh ``.msh``, medit ``.mesh``, ``.vtu``, ``.xdmf``, ...). Phase
tags are read from the first of these cell-data fields found: ``gmsh:physical``, ``medit:ref``,
``phase``, ``cell_tags``, ``CellEntityIds``, ``tag``.

Biological cells are the connected components (elements sharing a node, nodes on opposite faces
identified when the mesh is periodic) of the elements whose phase is in ``cell_phases``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fe2ml.errors import MeshError

__all__ = ["CELL_TYPES", "RVEMesh", "identify_cells", "periodic_node_map", "read_mesh"]

# meshio cell type -> (topological dim, dolfinx cell name, permutation meshio -> dolfinx)
CELL_TYPES = {
    "triangle": (2, "triangle", None),
    "quad": (2, "quadrilateral", [0, 1, 3, 2]),
    "tetra": (3, "tetrahedron", None),
    "hexahedron": (3, "hexahedron", [0, 1, 3, 2, 4, 5, 7, 6]),
}
TAG_KEYS = ("gmsh:physical", "medit:ref", "phase", "cell_tags", "CellEntityIds", "tag")


@dataclass(frozen=True)
class RVEMesh:
    """A box-shaped RVE mesh in plain arrays.

    Attributes:
        points: node coordinates, shape (N, d).
        cells: element connectivity in meshio/VTK node order, shape (M, k).
        cell_type: meshio name: ``triangle``, ``quad``, ``tetra`` or ``hexahedron``.
        phases: phase tag per element, shape (M,), int.
        cell_ids: biological-cell id per element (-1 outside cells), shape (M,), int.
        source: where the mesh came from (file path or generator description).
    """

    points: np.ndarray
    cells: np.ndarray
    cell_type: str
    phases: np.ndarray
    cell_ids: np.ndarray = field(default=None)  # type: ignore[assignment]
    source: str = ""

    def __post_init__(self) -> None:
        if self.cell_ids is None:
            object.__setattr__(self, "cell_ids", -np.ones(len(self.cells), dtype=np.int64))

    @property
    def dim(self) -> int:
        """Geometric dimension d."""
        return self.points.shape[1]

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper corners of the bounding box, each shape (d,)."""
        return self.points.min(axis=0), self.points.max(axis=0)

    @property
    def lengths(self) -> np.ndarray:
        """Box edge lengths, shape (d,)."""
        lo, hi = self.box
        return hi - lo

    @property
    def tags(self) -> list[int]:
        """Sorted distinct phase tags."""
        return sorted(int(t) for t in np.unique(self.phases))

    @property
    def n_cells(self) -> int:
        """Number of identified biological cells."""
        return int(self.cell_ids.max() + 1) if len(self.cell_ids) else 0

    def element_volumes(self) -> np.ndarray:
        """Volume (area in 2D) of each element, shape (M,) (exact for affine simplices/boxes)."""
        x = self.points[self.cells]
        if self.cell_type == "triangle":
            a, b = x[:, 1] - x[:, 0], x[:, 2] - x[:, 0]
            return 0.5 * np.abs(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
        if self.cell_type == "tetra":
            return np.abs(np.linalg.det(x[:, 1:] - x[:, :1])) / 6.0
        if self.cell_type == "quad":  # shoelace
            xs, ys = x[..., 0], x[..., 1]
            return 0.5 * np.abs(np.sum(xs * np.roll(ys, -1, 1) - np.roll(xs, -1, 1) * ys, axis=1))
        # hexahedron: split into 5/6 tets is overkill; use the bounding product for axis-aligned bricks
        # and a 6-tet decomposition otherwise
        tets = [(0, 1, 3, 7), (0, 1, 5, 7), (0, 4, 5, 7), (1, 2, 3, 7), (1, 2, 6, 7), (1, 5, 6, 7)]
        v = np.zeros(len(x))
        for t in tets:
            xt = x[:, list(t)]
            v += np.abs(np.linalg.det(xt[:, 1:] - xt[:, :1])) / 6.0
        return v


def _pick_cells(m, path: str) -> tuple[str, np.ndarray, np.ndarray | None]:
    """Select the volume cell block(s) of the highest dimension and their tags."""
    dims = {ct: CELL_TYPES[ct][0] for ct in (b.type for b in m.cells) if ct in CELL_TYPES}
    if not dims:
        found = sorted({b.type for b in m.cells})
        raise MeshError(
            f"{path}: no supported elements (found {found}; allowed: triangle, quad, tetra, hexahedron)"
        )
    # geometric dimension
    gdim = m.points.shape[1]
    if gdim == 3 and max(dims.values()) == 2 and np.ptp(m.points[:, 2]) == 0.0:
        gdim = 2
    tdim = max(dims.values())
    if tdim != gdim and not (gdim == 3 and tdim == 3):
        raise MeshError(f"{path}: {tdim}D elements in a {gdim}D point set; the RVE needs volume elements")
    types = sorted({ct for ct, dd in dims.items() if dd == tdim})
    if len(types) > 1:
        raise MeshError(f"{path}: mixed element types {types}; one element type per RVE is supported")
    ct = types[0]
    blocks = [i for i, b in enumerate(m.cells) if b.type == ct]
    cells = np.concatenate([m.cells[i].data for i in blocks]).astype(np.int64)
    tags = None
    for key in TAG_KEYS:
        if key in m.cell_data:
            arrs = [np.asarray(m.cell_data[key][i]).reshape(-1) for i in blocks]
            tags = np.concatenate(arrs).astype(np.int64)
            break
    return ct, cells, tags


def read_meshio(path: str | os.PathLike):
    """Read any meshio-readable file as a ``meshio.Mesh``, with one clear error for a missing/unreadable file.

    Raises:
        MeshError: missing or unreadable file.
    """
    # deferred: meshio/scipy only where a mesh is read or checked (the RVE config stays light)
    import contextlib
    import io

    # deferred: meshio/scipy only where a mesh is read or checked (the RVE config stays light)
    import meshio

    p = Path(path)
    if not p.is_file():
        raise MeshError(f"{p}: mesh file not found")
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            return meshio.read(str(p))
    except (Exception, SystemExit) as e:  # meshio raises many types (and exits) for unreadable files
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        msg = str(e).splitlines()[0] if str(e) and not isinstance(e, SystemExit) else (
            lines[-1].removeprefix("Error: ") if lines else type(e).__name__)
        raise MeshError(f"{p}: cannot read mesh ({msg})") from None


def read_mesh(path: str | os.PathLike, *, cell_phases: list[int] | None = None, tol: float = 1e-8,
              meshio_mesh=None) -> RVEMesh:
    """Read an RVE mesh from any meshio-readable file.

    Args:
        path: mesh file (``.msh``, ``.mesh``, ``.vtu``, ``.xdmf``, ...).
        cell_phases: phase tags whose connected components are biological cells. ``None``: every
            tag except the smallest (the matrix), when the mesh has more than one phase.
        tol: relative tolerance for node matching on opposite faces (cell identification).
        meshio_mesh: the file already read by :func:`read_meshio` (not read again).

    Returns:
        The mesh, with phases and cell ids.

    Raises:
        MeshError: missing/unreadable file, no volume elements, no phase tags.
    """
    p = Path(path)
    m = read_meshio(p) if meshio_mesh is None else meshio_mesh
    ct, cells, tags = _pick_cells(m, str(p))
    if tags is None:
        raise MeshError(
            f"{p}: mesh has no phase tags (looked for cell data {', '.join(TAG_KEYS)}); "
            "tag every volume element with its phase"
        )
    points = np.asarray(m.points, dtype=np.float64)
    gdim = CELL_TYPES[ct][0]
    points = points[:, :gdim]
    # drop nodes not used by volume elements (e.g. gmsh geometry points)
    used = np.unique(cells)
    if len(used) < len(points):
        remap = -np.ones(len(points), dtype=np.int64)
        remap[used] = np.arange(len(used))
        points, cells = points[used], remap[cells]
    return make_rve_mesh(points, cells, ct, tags, cell_phases=cell_phases, source=str(p), tol=tol)


def make_rve_mesh(points, cells, cell_type, phases, *, cell_phases=None, source="", tol=1e-8) -> RVEMesh:
    """Build an :class:`RVEMesh` from arrays and identify the biological cells.

    Args:
        points: (N, d) coordinates.
        cells: (M, k) connectivity (meshio order).
        cell_type: meshio cell type name.
        phases: (M,) phase tags.
        cell_phases: tags forming biological cells (``None``: all but the smallest tag).
        source: description for messages.
        tol: relative node-matching tolerance.

    Returns:
        The mesh.
    """
    phases = np.asarray(phases, dtype=np.int64)
    if cell_phases is None:
        tags = np.unique(phases)
        cell_phases = [int(t) for t in tags[1:]] if len(tags) > 1 else []
    unknown = sorted(set(cell_phases) - set(np.unique(phases).tolist()))
    if unknown:
        raise MeshError(f"{source}: cell_phases {unknown} are not phase tags of the mesh (tags: "
                        f"{sorted(np.unique(phases).tolist())})")
    mesh = RVEMesh(points=points, cells=cells, cell_type=cell_type, phases=phases, source=source)
    ids = identify_cells(mesh, cell_phases, tol=tol)
    return RVEMesh(points=points, cells=cells, cell_type=cell_type, phases=phases, cell_ids=ids, source=source)


def periodic_node_map(points: np.ndarray, *, tol: float = 1e-8, strict: bool = True, source: str = ""):
    """Map every node to its periodic representative (the image with no coordinate on an upper face).

    Args:
        points: (N, d) coordinates of a box-shaped domain.
        tol: matching tolerance relative to the largest box length.
        strict: raise if a node on an upper face has no partner on the opposite lower face.
        source: description used in error messages.

    Returns:
        Tuple ``(rep, unmatched)``: rep (N,) int, index of the representative node (itself for
        nodes not on an upper face); unmatched: list of human-readable descriptions of the faces
        that did not match (empty if periodic).

    Raises:
        MeshError: when ``strict`` and the node sets on opposite faces do not match.
    """
    # deferred: meshio/scipy only where a mesh is read or checked (the RVE config stays light)
    from scipy.spatial import cKDTree

    x = np.asarray(points, dtype=np.float64)
    N, d = x.shape
    lo, hi = x.min(axis=0), x.max(axis=0)
    L = hi - lo
    atol = tol * L.max()
    tree = cKDTree(x)
    rep = np.arange(N)
    problems = []
    axis_name = "xyz"
    for i in range(d):
        upper = np.where(np.abs(x[:, i] - hi[i]) < atol)[0]
        lower = np.where(np.abs(x[:, i] - lo[i]) < atol)[0]
        target = x[upper].copy()
        target[:, i] -= L[i]
        dist, j = tree.query(target)
        bad = dist > atol
        # nodes on the lower face without partner on the upper face
        tgt2 = x[lower].copy()
        tgt2[:, i] += L[i]
        dist2, _ = tree.query(tgt2)
        bad2 = dist2 > atol
        if bad.any() or bad2.any():
            k = np.where(bad)[0]
            k2 = np.where(bad2)[0]
            first = x[upper[k[0]]] if len(k) else x[lower[k2[0]]]
            problems.append(
                f"{len(k) + len(k2)} of {len(upper) + len(lower)} nodes on faces "
                f"{axis_name[i]}={lo[i]:.6g}/{axis_name[i]}={hi[i]:.6g} have no partner on the opposite face "
                f"(first at {tuple(np.round(first, 6).tolist())})"
            )
            continue
        # compose: representative of a node is the representative of its lower image
        rep_i = np.arange(N)
        rep_i[upper] = j
        rep = rep_i[rep] if i == 0 else _compose(rep, rep_i)
    if problems and strict:
        raise MeshError(f"{source}: mesh is not periodic: " + "; ".join(problems))
    return rep, problems


def _compose(rep: np.ndarray, rep_i: np.ndarray) -> np.ndarray:
    """Representative after wrapping along one more axis (applied to the current representatives)."""
    return rep_i[rep]


def identify_cells(mesh: RVEMesh, cell_phases: list[int], *, tol: float = 1e-8) -> np.ndarray:
    """Label the biological cells: connected components of elements with a phase in ``cell_phases``.

    Nodes on opposite faces are identified when they match, so a cell cut by the box boundary
    (periodic wrap-around) is one cell.

    Args:
        mesh: the RVE mesh.
        cell_phases: phase tags that form cells.
        tol: relative node matching tolerance.

    Returns:
        (M,) int array, cell id per element (0..n-1, ordered by first element), -1 elsewhere.
    """
    # deferred: meshio/scipy only where a mesh is read or checked (the RVE config stays light)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    M = len(mesh.cells)
    ids = -np.ones(M, dtype=np.int64)
    sel = np.where(np.isin(mesh.phases, list(cell_phases)))[0]
    if len(sel) == 0:
        return ids
    rep, _ = periodic_node_map(mesh.points, tol=tol, strict=False)
    conn = rep[mesh.cells[sel]]
    n_el, k = conn.shape
    N = len(mesh.points)
    rows = np.repeat(np.arange(n_el), k)
    inc = coo_matrix((np.ones(n_el * k), (rows, conn.ravel())), shape=(n_el, N)).tocsr()
    adj = inc @ inc.T
    # elements of different phases are never one cell
    ph = mesh.phases[sel]
    adj = adj.tocoo()
    keep = ph[adj.row] == ph[adj.col]
    adj = coo_matrix((adj.data[keep], (adj.row[keep], adj.col[keep])), shape=(n_el, n_el))
    _, labels = connected_components(adj, directed=False)
    # renumber in order of first appearance (stable, independent of scipy's labelling)
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    relabel = np.empty_like(order)
    relabel[order] = np.arange(len(order))
    ids[sel] = relabel[labels]
    return ids
