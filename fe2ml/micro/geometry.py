"""Periodic RVE geometry generators (gmsh, OpenCASCADE kernel).

Every generator writes a gmsh ``.msh`` file whose volume elements carry a physical tag per phase
(1 = matrix, 2 = inclusions: biological cells or fibres; a laminate numbers its phases 1..P) and
whose nodes on opposite faces of the box match (``gmsh.model.mesh.setPeriodic``). The file is read
back with :func:`fe2ml.micro.mesh.read_mesh`, which identifies each biological cell.

Generators (``GENERATORS`` maps the YAML name to the function):

- ``cells_2d``: N circular or elliptical cells, random non-overlapping placement with periodic
  wrap-around, target volume fraction and seed.
- ``centred_cell``: one circular (2D) or spherical/ellipsoidal (3D) cell in the centre.
- ``laminate``: layers normal to a coordinate axis (2D or 3D); with ``normal: 1`` in 2D these are
  aligned fibre strips.
- ``cells_3d``: N spherical or ellipsoidal cells in a box, random periodic placement.
- ``fibres_3d``: aligned cylindrical fibres along z with random periodic cross-section placement.

Output files are named by a hash of the parameters, so a second call with the same parameters
reuses the mesh.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fe2ml.errors import ConfigError, MeshError
from fe2ml.files import atomic_target

__all__ = ["GENERATORS", "generate_mesh"]

MATRIX, INCLUSION = 1, 2


def _gmsh_start():
    # deferred: gmsh only when a mesh is generated
    import gmsh

    if not gmsh.isInitialized():
        gmsh.initialize(interruptible=False)
    gmsh.option.setNumber("General.Terminal", 0)
    gmsh.option.setNumber("General.Verbosity", 1)
    gmsh.clear()
    # options outlive models in gmsh: restore the defaults that other meshes in this process may change
    for opt, val in (("Mesh.MeshSizeExtendFromBoundary", 1), ("Mesh.MeshSizeFromPoints", 1),
                     ("Mesh.MeshSizeFromCurvature", 0), ("Mesh.MeshSizeMin", 0.0), ("Mesh.MeshSizeMax", 1e22)):
        gmsh.option.setNumber(opt, val)
    return gmsh


def _as_lengths(size, dim: int, key="size") -> np.ndarray:
    if isinstance(size, int | float):
        L = np.full(dim, float(size))
    else:
        L = np.asarray(size, dtype=float)
    if L.shape != (dim,) or np.any(L <= 0) or not np.all(np.isfinite(L)):
        raise ConfigError(f"{key}: expected a positive number or a list of {dim} positive numbers, got {size!r}")
    return L


def _place_random(n, radius_bound, L, gap, rng, max_tries=200000):
    """Random sequential addition of n discs/spheres of circumscribing radius with periodic wrap."""
    d = len(L)
    centres: list[np.ndarray] = []
    tries = 0
    while len(centres) < n:
        tries += 1
        if tries > max_tries:
            raise ConfigError(
                f"could not place {n} non-overlapping cells (placed {len(centres)} after {max_tries} tries); "
                "lower volume_fraction, n_cells, aspect or gap"
            )
        c = rng.uniform(0, 1, d) * L
        ok = True
        for c2 in centres:
            dx = c - c2
            dx -= L * np.round(dx / L)
            if np.linalg.norm(dx) < 2 * radius_bound + gap:
                ok = False
                break
        if ok:
            centres.append(c)
    return centres


def _shifts(centre, extent, L):
    """Periodic image offsets for which a shape with half-extent ``extent`` intersects the box."""
    d = len(L)
    out = []
    for s in np.ndindex(*([3] * d)):
        off = (np.array(s) - 1) * L
        c = centre + off
        if np.all(c + extent > 0) and np.all(c - extent < L):
            out.append(off)
    return out


def _finish_periodic(gmsh, dim, L, inclusion_tags, h, out_path, *, curvature=True):
    """Fragment box with inclusions, drop outside parts, tag phases, make periodic, mesh, write."""
    occ = gmsh.model.occ

    def _box():
        return occ.addRectangle(0, 0, 0, L[0], L[1]) if dim == 2 else occ.addBox(0, 0, 0, *L)

    # clip every inclusion (and periodic image) to the box first: no outside pieces to classify
    # (OCC bounding boxes of curved entities are loose, so classification by bbox is unreliable)
    clipped = []
    for t in inclusion_tags:
        res, _ = occ.intersect([(dim, t)], [(dim, _box())], removeObject=True, removeTool=True)
        clipped.extend(tg for dd, tg in res if dd == dim)
    box = _box()
    if clipped:
        _, out_map = occ.fragment([(dim, box)], [(dim, t) for t in clipped])
    else:
        out_map = [[(dim, box)]]
    occ.synchronize()
    inside = [t for _, t in gmsh.model.getEntities(dim)]
    incl_children = set()
    for m in out_map[1:]:
        incl_children.update(t for _, t in m)
    inc = [t for t in inside if t in incl_children]
    mat = [t for t in inside if t not in incl_children]
    if mat:
        gmsh.model.addPhysicalGroup(dim, mat, MATRIX, name="matrix")
    if inc:
        gmsh.model.addPhysicalGroup(dim, inc, INCLUSION, name="cells")
    _set_periodic(gmsh, dim, L)
    _mesh_and_write(gmsh, dim, h, out_path, curvature=curvature)


def _set_periodic(gmsh, dim, L):
    eps = 1e-6 * L.max()
    for i in range(dim):
        lo_box = [-eps] * 3
        hi_box = [L[0] + eps, L[1] + eps, (L[2] if dim == 3 else 0) + eps]
        hi_lower = list(hi_box)
        hi_lower[i] = eps
        lower = gmsh.model.getEntitiesInBoundingBox(*lo_box, *hi_lower, dim - 1)
        for _, tl in lower:
            b = np.array(gmsh.model.getBoundingBox(dim - 1, tl))
            b[i] += L[i]
            b[i + 3] += L[i]
            cands = gmsh.model.getEntitiesInBoundingBox(*(b[:3] - eps), *(b[3:] + eps), dim - 1)
            match = None
            for _, tu in cands:
                bu = np.array(gmsh.model.getBoundingBox(dim - 1, tu))
                if np.allclose(bu, b, atol=eps * 10):
                    match = tu
                    break
            if match is None:
                raise MeshError(f"periodic geometry: no matching entity for boundary entity {tl} on axis {i}")
            T = np.eye(4)
            T[i, 3] = L[i]
            gmsh.model.mesh.setPeriodic(dim - 1, [match], [tl], T.ravel().tolist())


def _mesh_and_write(gmsh, dim, h, out_path, *, curvature=True):
    gmsh.option.setNumber("Mesh.MeshSizeMax", h)
    gmsh.option.setNumber("Mesh.MeshSizeMin", h / 4)
    gmsh.option.setNumber("Mesh.MeshSizeFromCurvature", 16 if curvature else 0)
    gmsh.option.setNumber("Mesh.Algorithm", 6)
    gmsh.option.setNumber("Mesh.Algorithm3D", 1)
    gmsh.option.setNumber("Mesh.RandomSeed", 1)
    gmsh.model.mesh.generate(dim)
    gmsh.option.setNumber("Mesh.MshFileVersion", 4.1)
    gmsh.option.setNumber("Mesh.SaveAll", 0)
    with atomic_target(out_path) as tmp:
        gmsh.write(str(tmp))


def _check_fraction(vf, key="volume_fraction"):
    if not isinstance(vf, int | float) or not 0 < vf < 1:
        raise ConfigError(f"{key}: expected a number in (0, 1), got {vf!r}")


def _check_pos(v, key):
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise ConfigError(f"{key}: expected a positive number, got {v!r}")


def cells_2d(out_path, *, n_cells: int = 8, volume_fraction: float = 0.3, aspect: float = 1.0,
             size=1.0, seed: int = 0, h: float | None = None, gap: float | None = None):
    """Random periodic 2D cells (discs or ellipses with random orientation) in a matrix.

    Args:
        out_path: ``.msh`` file to write.
        n_cells: number of cells (>= 1).
        volume_fraction: cell area fraction in (0, 1).
        aspect: ellipse axis ratio a/b >= 1 (1 = circles).
        size: box edge length(s).
        seed: random seed of the placement.
        h: target mesh size (default: cell radius / 4).
        gap: minimum distance between cells (default: 0.1 radius).
    """
    if not isinstance(n_cells, int) or n_cells < 1:
        raise ConfigError(f"n_cells: expected an integer >= 1, got {n_cells!r}")
    _check_fraction(volume_fraction)
    if not isinstance(aspect, int | float) or aspect < 1:
        raise ConfigError(f"aspect: expected a number >= 1, got {aspect!r}")
    L = _as_lengths(size, 2)
    area = volume_fraction * L.prod() / n_cells
    b = math.sqrt(area / (math.pi * aspect))
    a = aspect * b
    gap = 0.1 * b if gap is None else gap
    h = b / 4 if h is None else h
    _check_pos(h, "h")
    rng = np.random.default_rng(seed)
    centres = _place_random(n_cells, a, L, gap, rng)
    if 2 * a + gap > L.min():
        raise ConfigError("cells larger than the box: lower volume_fraction or raise n_cells")
    angles = rng.uniform(0, math.pi, n_cells) if aspect > 1 else np.zeros(n_cells)
    gmsh = _gmsh_start()
    try:
        gmsh.model.add("cells_2d")
        occ = gmsh.model.occ
        tags = []
        for c, th in zip(centres, angles, strict=True):
            for off in _shifts(c, np.full(2, a), L):
                cc = c + off
                t = occ.addDisk(cc[0], cc[1], 0, a, b)
                if th:
                    occ.rotate([(2, t)], cc[0], cc[1], 0, 0, 0, 1, th)
                tags.append(t)
        _finish_periodic(gmsh, 2, L, tags, h, out_path)
    finally:
        gmsh.clear()


def centred_cell(out_path, *, dim: int = 2, volume_fraction: float = 0.2, aspect: float = 1.0,
                 size=1.0, h: float | None = None):
    """One circular/elliptical (2D) or spherical/spheroidal (3D) cell centred in the box.

    Args:
        out_path: ``.msh`` file to write.
        dim: 2 or 3.
        volume_fraction: cell volume fraction.
        aspect: axis ratio along x (prolate spheroid / ellipse), >= 1.
        size: box edge length(s).
        h: mesh size (default: radius / 5).
    """
    if dim not in (2, 3):
        raise ConfigError(f"dim: expected 2 or 3, got {dim!r}")
    _check_fraction(volume_fraction)
    L = _as_lengths(size, dim)
    if dim == 2:
        b = math.sqrt(volume_fraction * L.prod() / (math.pi * aspect))
    else:
        b = (volume_fraction * L.prod() / (4 / 3 * math.pi * aspect)) ** (1 / 3)
    a = aspect * b
    if 2 * a >= L[0] or 2 * b >= L[1:].min():
        raise ConfigError(f"volume_fraction {volume_fraction} with aspect {aspect}: the cell does not fit the box")
    h = b / 5 if h is None else h
    _check_pos(h, "h")
    c = L / 2
    gmsh = _gmsh_start()
    try:
        gmsh.model.add("centred_cell")
        occ = gmsh.model.occ
        if dim == 2:
            t = occ.addDisk(c[0], c[1], 0, a, b)
        else:
            t = occ.addSphere(c[0], c[1], c[2], b)
            if aspect != 1:
                occ.dilate([(3, t)], c[0], c[1], c[2], aspect, 1, 1)
        _finish_periodic(gmsh, dim, L, [t], h, out_path)
    finally:
        gmsh.clear()


def cells_3d(out_path, *, n_cells: int = 4, volume_fraction: float = 0.2, aspect: float = 1.0,
             size=1.0, seed: int = 0, h: float | None = None, gap: float | None = None):
    """Random periodic spherical or spheroidal (random orientation) cells in a 3D box.

    Args:
        out_path: ``.msh`` file to write.
        n_cells: number of cells.
        volume_fraction: cell volume fraction.
        aspect: spheroid axis ratio >= 1 (1 = spheres).
        size: box edge length(s).
        seed: random seed.
        h: mesh size (default: radius / 3).
        gap: minimum distance between cells (default: 0.15 radius).
    """
    if not isinstance(n_cells, int) or n_cells < 1:
        raise ConfigError(f"n_cells: expected an integer >= 1, got {n_cells!r}")
    _check_fraction(volume_fraction)
    L = _as_lengths(size, 3)
    vol = volume_fraction * L.prod() / n_cells
    b = (vol / (4 / 3 * math.pi * aspect)) ** (1 / 3)
    a = aspect * b
    gap = 0.15 * b if gap is None else gap
    h = b / 3 if h is None else h
    _check_pos(h, "h")
    rng = np.random.default_rng(seed)
    centres = _place_random(n_cells, a, L, gap, rng)
    gmsh = _gmsh_start()
    try:
        gmsh.model.add("cells_3d")
        occ = gmsh.model.occ
        tags = []
        for c in centres:
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            for off in _shifts(c, np.full(3, a), L):
                cc = c + off
                t = occ.addSphere(cc[0], cc[1], cc[2], b)
                if aspect != 1:
                    occ.dilate([(3, t)], cc[0], cc[1], cc[2], aspect, 1, 1)
                    # rotate x-axis onto the random axis
                    rot = np.cross([1.0, 0, 0], axis)
                    s = np.linalg.norm(rot)
                    if s > 1e-12:
                        occ.rotate([(3, t)], *cc, *(rot / s), math.atan2(s, axis[0]))
                tags.append(t)
        _finish_periodic(gmsh, 3, L, tags, h, out_path)
    finally:
        gmsh.clear()


def fibres_3d(out_path, *, n_fibres: int = 4, volume_fraction: float = 0.3, size=1.0, seed: int = 0,
              h: float | None = None, gap: float | None = None):
    """Aligned cylindrical fibres along z, random periodic placement of the cross-sections.

    Args:
        out_path: ``.msh`` file to write.
        n_fibres: number of fibres.
        volume_fraction: fibre volume fraction.
        size: box edge length(s).
        seed: random seed.
        h: mesh size (default: radius / 3).
        gap: minimum distance between fibres (default: 0.1 radius).
    """
    if not isinstance(n_fibres, int) or n_fibres < 1:
        raise ConfigError(f"n_fibres: expected an integer >= 1, got {n_fibres!r}")
    _check_fraction(volume_fraction)
    L = _as_lengths(size, 3)
    r = math.sqrt(volume_fraction * L[0] * L[1] / (n_fibres * math.pi))
    gap = 0.1 * r if gap is None else gap
    h = r / 3 if h is None else h
    _check_pos(h, "h")
    rng = np.random.default_rng(seed)
    centres = _place_random(n_fibres, r, L[:2], gap, rng)
    gmsh = _gmsh_start()
    try:
        gmsh.model.add("fibres_3d")
        occ = gmsh.model.occ
        tags = []
        for c in centres:
            for off in _shifts(c, np.full(2, r), L[:2]):
                cc = c + off
                tags.append(occ.addCylinder(cc[0], cc[1], 0, 0, 0, L[2], r))
        _finish_periodic(gmsh, 3, L, tags, h, out_path)
    finally:
        gmsh.clear()


def laminate(out_path, *, dim: int = 2, fractions: Sequence[float] = (0.5, 0.5), normal: int = 0,
             n_periods: int = 1, size=1.0, h: float | None = None):
    """Layered medium, layers normal to axis ``normal``; phase p (1-based) fills fraction ``fractions[p-1]``.

    With ``dim: 2, normal: 1`` this is a 2D model of aligned fibre strips along x. The mesh
    conforms to the layer interfaces.

    Args:
        out_path: ``.msh`` file to write.
        dim: 2 or 3.
        fractions: thickness fraction of each phase within one period (sums to 1).
        normal: axis index (0, 1[, 2]) normal to the layers.
        n_periods: number of repetitions of the phase sequence.
        size: box edge length(s).
        h: mesh size (default: thinnest layer / 3).
    """
    if dim not in (2, 3):
        raise ConfigError(f"dim: expected 2 or 3, got {dim!r}")
    fr = np.asarray(fractions, dtype=float)
    if fr.ndim != 1 or len(fr) < 2 or np.any(fr <= 0) or abs(fr.sum() - 1) > 1e-9:
        raise ConfigError(f"fractions: expected >= 2 positive numbers summing to 1, got {fractions!r}")
    if normal not in range(dim):
        raise ConfigError(f"normal: expected an axis index in 0..{dim - 1}, got {normal!r}")
    if not isinstance(n_periods, int) or n_periods < 1:
        raise ConfigError(f"n_periods: expected an integer >= 1, got {n_periods!r}")
    L = _as_lengths(size, dim)
    Lp = L[normal] / n_periods
    h = min(fr) * Lp / 3 if h is None else h
    _check_pos(h, "h")
    gmsh = _gmsh_start()
    try:
        gmsh.model.add("laminate")
        occ = gmsh.model.occ
        pieces = []  # (tag, phase)
        z = 0.0
        for _ in range(n_periods):
            for p, f in enumerate(fr, start=1):
                lo = np.zeros(dim)
                ext = L.copy()
                lo[normal] = z
                ext[normal] = f * Lp
                if dim == 2:
                    t = occ.addRectangle(lo[0], lo[1], 0, ext[0], ext[1])
                else:
                    t = occ.addBox(*lo, *ext)
                pieces.append((t, p))
                z += f * Lp
        _, out_map = occ.fragment([(dim, pieces[0][0])], [(dim, t) for t, _ in pieces[1:]])
        occ.synchronize()
        by_phase: dict[int, list[int]] = {}
        for (_, p), m in zip(pieces, out_map, strict=True):
            by_phase.setdefault(p, []).extend(t for _, t in m)
        for p, ts in sorted(by_phase.items()):
            gmsh.model.addPhysicalGroup(dim, sorted(set(ts)), p, name=f"phase{p}")
        _set_periodic(gmsh, dim, L)
        _mesh_and_write(gmsh, dim, h, out_path, curvature=False)
    finally:
        gmsh.clear()


GENERATORS = {
    "cells_2d": (cells_2d, 2),
    "centred_cell": (centred_cell, None),
    "cells_3d": (cells_3d, 3),
    "fibres_3d": (fibres_3d, 3),
    "laminate": (laminate, None),
}


def generate_mesh(name: str, params: dict, out_dir: str | os.PathLike, *, comm=None) -> Path:
    """Run a generator (once, on rank 0 of ``comm``) and return the path of its ``.msh`` file.

    The file name is ``<name>-<hash of params>.msh``; an existing file with that name is reused.

    Args:
        name: generator name, a key of :data:`GENERATORS`.
        params: keyword arguments of the generator.
        out_dir: folder to write to (created if needed).
        comm: optional MPI communicator; rank 0 writes, the path is broadcast.

    Returns:
        Path of the mesh file.

    Raises:
        ConfigError: unknown generator, unknown or invalid parameter.
    """
    if name not in GENERATORS:
        raise ConfigError(f"mesh.generate: unknown generator {name!r}; allowed: {', '.join(GENERATORS)}")
    fn, _ = GENERATORS[name]
    allowed = [p for p in inspect.signature(fn).parameters if p != "out_path"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"mesh.generate {name}: unknown parameter(s) {unknown}; allowed: {', '.join(allowed)}")
    key = json.dumps({"name": name, **params}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    out_dir = Path(out_dir)
    path = out_dir / f"{name}-{digest}.msh"
    err = None
    if comm is None or comm.rank == 0:
        try:
            if not path.exists():
                out_dir.mkdir(parents=True, exist_ok=True)
                fn(path, **params)
        except (ConfigError, MeshError) as e:
            err = e
        except Exception as e:  # gmsh raises plain Exception
            err = MeshError(f"mesh.generate {name}: gmsh failed ({str(e).splitlines()[0] if str(e) else e!r})")
    if comm is not None:
        err = comm.bcast(err, root=0)
    if err is not None:
        raise err
    return path
