"""Boundary conditions and loads of the macro problem: one function per physical term.

The problem receives typed specifications whose values are numbers or callables (the config layer parses the
YAML expressions into callables, :mod:`fe2ml.macro.config`):

- :class:`DirichletSpec`: prescribed displacement components, ``value(x, t)`` with x (3, n) the dof coordinates;
- :class:`TractionSpec`: nominal (reference) traction, a dead load, one ``value_i(t)`` per component;
- :class:`PressureSpec`: pressure against the outward normal, ``value(t)``; at finite strain it follows the
  deformation (Nanson: t da = −p J F⁻ᵀ N dA) and its derivative enters the Jacobian.

:func:`mark_boundaries` gives every combination of boundary names one facet tag (a facet may carry several names),
the same on every rank; the terms integrate over the tags of their boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fe2ml.errors import ConfigError

__all__ = ["Boundaries", "DirichletSpec", "Loads", "PressureSpec", "TractionSpec", "dirichlet_conditions",
           "frames_from_angle", "frames_from_axes", "mark_boundaries", "pressure_term", "traction_term"]

Scalar = float | Callable[[float], float]


@dataclass(frozen=True)
class DirichletSpec:
    """Prescribed displacement component(s) on a named boundary.

    Attributes:
        boundary: boundary name.
        components: displacement components (0..d-1).
        value: a number, or ``value(x, t)`` with x the dof coordinates (3, n), returning (n,) values or a number.
    """

    boundary: str
    components: tuple[int, ...]
    value: float | Callable[[np.ndarray, float], Any] = 0.0


@dataclass(frozen=True)
class TractionSpec:
    """Nominal (reference) traction on a named boundary: per component a number or ``value_i(t)``."""

    boundary: str
    value: tuple[Scalar, ...]


@dataclass(frozen=True)
class PressureSpec:
    """Pressure on a named boundary, a number or ``value(t)``: force per current area against the outward normal."""

    boundary: str
    value: Scalar


def frames_from_angle(angle: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """2D material frames: the RVE's x axis at ``angle(X)`` degrees from the macro x axis.

    Returns:
        ``frames(X)``: X (n, d) -> Q (n, 2, 2), columns the RVE axes in macro coordinates.
    """
    def frames(X):
        th = np.radians(np.broadcast_to(np.asarray(angle(X), dtype=float), len(X)))
        c, s = np.cos(th), np.sin(th)
        return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)

    return frames


def frames_from_axes(e1: Callable[[np.ndarray], np.ndarray],
                     e2: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """3D material frames from the RVE's x and y axes at each point (orthonormalised; e3 = e1 × e2).

    Args:
        e1: X (n, 3) -> (n, 3), the RVE's x axis in macro coordinates (need not be unit).
        e2: X (n, 3) -> (n, 3), the RVE's y axis (need not be unit nor orthogonal to e1).

    Returns:
        ``frames(X)``: X (n, 3) -> Q (n, 3, 3), columns e1, e2, e3.

    Raises:
        ConfigError: at a point where e1 vanishes or e2 is parallel to it (the point is named).
    """
    def frames(X):
        a = np.broadcast_to(np.asarray(e1(X), dtype=float), (len(X), 3))
        b = np.broadcast_to(np.asarray(e2(X), dtype=float), (len(X), 3))
        na = np.linalg.norm(a, axis=1)
        a = a / np.where(na > 0, na, 1.0)[:, None]
        b = b - np.sum(a * b, axis=1)[:, None] * a
        nb = np.linalg.norm(b, axis=1)
        bad = (na < 1e-12) | (nb < 1e-9 * np.maximum(na, 1.0))
        if bad.any():
            k = int(np.argmax(bad))
            raise ConfigError(f"orientation: e1 vanishes or e2 is parallel to it at x = {np.round(X[k], 6).tolist()}")
        b = b / nb[:, None]
        return np.stack([a, b, np.cross(a, b)], -1)

    return frames


def _at(value: Scalar, t: float) -> float:
    return float(value(t)) if callable(value) else float(value)


@dataclass
class Boundaries:
    """Named boundaries of a macro mesh as facet tags.

    Attributes:
        names: boundary names.
        tags: facet meshtags, one tag per combination of names.
        ids: name -> the tags of the combinations that contain it.
        size: name -> measure of the boundary (length or area, global).
        facets: name -> local facet indices.
        ds: boundary measure with the tags as subdomain data.
    """

    names: list[str]
    tags: Any
    ids: dict[str, tuple[int, ...]]
    size: dict[str, float]
    facets: dict[str, np.ndarray]
    ds: Any

    def check(self, name: str, what: str) -> tuple[int, ...]:
        """The tags of boundary ``name``; refuses unknown and empty names (``what`` says which load)."""
        if name not in self.names:
            raise ConfigError(f"{what}: unknown boundary {name!r}; available: {', '.join(self.names)}")
        if self.size[name] <= 0:
            raise ConfigError(f"{what}: boundary {name!r} is empty on this mesh")
        return self.ids[name]


def mark_boundaries(comm, msh, boundaries: dict[str, np.ndarray]) -> Boundaries:
    """Facet tags for named boundaries that may overlap (collective).

    Args:
        comm: the mesh communicator.
        msh: the dolfinx mesh.
        boundaries: name -> local facet indices.
    """
    # deferred: the light run config reads the load specs; only the forms need dolfinx/UFL
    import dolfinx
    import ufl

    fdim = msh.topology.dim - 1
    names = list(boundaries)
    if len(names) > 62:
        raise ConfigError(f"mesh: {len(names)} named boundaries; at most 62 are supported")
    imap = msh.topology.index_map(fdim)
    masks = np.zeros(imap.size_local + imap.num_ghosts, dtype=np.int64)
    for k, name in enumerate(names):
        masks[np.asarray(boundaries[name], dtype=np.int32)] |= np.int64(1) << k
    ent = np.flatnonzero(masks).astype(np.int32)
    combos = sorted(set().union(*comm.allgather(set(np.unique(masks[ent]).tolist()))))
    cid = {c: i + 1 for i, c in enumerate(combos)}
    tags = dolfinx.mesh.meshtags(msh, fdim, ent, np.array([cid[int(m)] for m in masks[ent]], dtype=np.int32))
    ds = ufl.Measure("ds", domain=msh, subdomain_data=tags)
    ids = {name: tuple(cid[c] for c in combos if c >> k & 1) for k, name in enumerate(names)}
    one = dolfinx.fem.Constant(msh, 1.0)
    size = {name: comm.allreduce(dolfinx.fem.assemble_scalar(dolfinx.fem.form(one * ds(ids[name]))))
            if ids[name] else 0.0 for name in names}
    facets = {name: np.asarray(boundaries[name], dtype=np.int32) for name in names}
    return Boundaries(names=names, tags=tags, ids=ids, size=size, facets=facets, ds=ds)


@dataclass
class Loads:
    """The load terms of a problem and how to set them at load parameter t.

    Attributes:
        bcs: dolfinx Dirichlet conditions.
        reaction_dofs: Dirichlet boundary name -> owned dofs per component (for reactions).
        external: the external virtual work form (tractions and pressures), or None.
        follower: the part of ``external`` that depends on u (pressures at finite strain), or None.
    """

    bcs: list
    reaction_dofs: dict[str, list[np.ndarray]]
    external: Any
    follower: Any
    _updates: list

    def set(self, t: float) -> None:
        """Set every prescribed displacement, traction and pressure to its value at load parameter t."""
        for update in self._updates:
            update(t)


def dirichlet_conditions(V, bnd: Boundaries, specs: Sequence[DirichletSpec]) -> tuple[list, dict, list]:
    """Dirichlet conditions of ``specs`` on space V: (bcs, reaction dofs per boundary, updates of t)."""
    # deferred: the light run config reads the load specs; only the forms need dolfinx/UFL
    import dolfinx

    msh = V.mesh
    d = msh.geometry.dim
    fdim = msh.topology.dim - 1
    bcs, updates = [], []
    for spec in specs:
        bnd.check(spec.boundary, "Dirichlet condition")
        for c in spec.components:
            if not isinstance(c, int) or not 0 <= c < d:
                raise ConfigError(f"Dirichlet condition on {spec.boundary!r}: component {c!r} does not exist in "
                                  f"{d}D (allowed 0..{d - 1})")
            Vc, _ = V.sub(c).collapse()
            dofs = dolfinx.fem.locate_dofs_topological((V.sub(c), Vc), fdim, bnd.facets[spec.boundary])
            g = dolfinx.fem.Function(Vc)
            bcs.append(dolfinx.fem.dirichletbc(g, dofs, V.sub(c)))

            def update(t, g=g, value=spec.value):
                if callable(value):
                    g.interpolate(lambda x: np.broadcast_to(np.asarray(value(x, t), dtype=float), x.shape[1:]).copy())
                else:
                    g.x.array[:] = float(value)

            updates.append(update)
    nown = V.dofmap.index_map.size_local * V.dofmap.index_map_bs
    reaction_dofs = {}
    for name in dict.fromkeys(s.boundary for s in specs):
        per_c = []
        for c in range(d):
            Vc, _ = V.sub(c).collapse()
            dofs = dolfinx.fem.locate_dofs_topological((V.sub(c), Vc), fdim, bnd.facets[name])[0]
            per_c.append(dofs[dofs < nown])
        reaction_dofs[name] = per_c
    return bcs, reaction_dofs, updates


def traction_term(v, bnd: Boundaries, spec: TractionSpec) -> tuple[Any, Callable[[float], None]]:
    """∫ T·v ds over the boundary for a nominal traction: (form, update of t)."""
    # deferred: the light run config reads the load specs; only the forms need dolfinx/UFL
    import dolfinx
    import ufl

    msh = v.ufl_function_space().mesh
    d = msh.geometry.dim
    ids = bnd.check(spec.boundary, "traction")
    if len(spec.value) != d:
        raise ConfigError(f"traction on {spec.boundary!r}: expected {d} components, got {len(spec.value)}")
    T = dolfinx.fem.Constant(msh, np.zeros(d))

    def update(t):
        T.value[:] = [_at(vi, t) for vi in spec.value]

    return ufl.inner(T, v) * bnd.ds(ids), update


def pressure_term(v, F, bnd: Boundaries, spec: PressureSpec, *, finite: bool) -> tuple[Any, Callable[[float], None]]:
    """External work of a pressure: −∫ p J F⁻ᵀN·v dA (finite strain, follows the deformation) or −∫ p N·v dA."""
    # deferred: the light run config reads the load specs; only the forms need dolfinx/UFL
    import dolfinx
    import ufl

    msh = v.ufl_function_space().mesh
    ids = bnd.check(spec.boundary, "pressure")
    p = dolfinx.fem.Constant(msh, 0.0)
    N = ufl.FacetNormal(msh)

    def update(t):
        p.value = _at(spec.value, t)

    if finite:  # Nanson: -p J F^-T N on the reference boundary
        return -p * ufl.det(F) * ufl.inner(ufl.dot(ufl.inv(F).T, N), v) * bnd.ds(ids), update
    return -p * ufl.inner(N, v) * bnd.ds(ids), update


def build_loads(V, v, F, bnd: Boundaries, *, dirichlet: Sequence[DirichletSpec], tractions: Sequence[TractionSpec],
                pressures: Sequence[PressureSpec], finite: bool) -> Loads:
    """All load terms of a problem: Dirichlet conditions, tractions and pressures."""
    bcs, reaction_dofs, updates = dirichlet_conditions(V, bnd, dirichlet)
    traction_forms, pressure_forms = [], []
    for tspec in tractions:
        form, update = traction_term(v, bnd, tspec)
        traction_forms.append(form)
        updates.append(update)
    for pspec in pressures:
        form, update = pressure_term(v, F, bnd, pspec, finite=finite)
        pressure_forms.append(form)
        updates.append(update)
    return Loads(bcs=bcs, reaction_dofs=reaction_dofs, external=_sum(traction_forms + pressure_forms),
                 follower=_sum(pressure_forms), _updates=updates)


def _sum(forms: list) -> Any:
    """The sum of UFL forms, None for none."""
    return sum(forms[1:], forms[0]) if forms else None
