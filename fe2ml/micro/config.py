"""``fe2ml homogenize`` configuration and the RVE of every other config (``material.rve``, ``rve``).

Keys (see README for the full reference)::

    dim: 2 | 3                              required
    mesh: {file: PATH, cell_phases: [..]}   or {generate: NAME, out_dir: PATH, <generator params>}
    phases: {TAG: {material: NAME, ...}}    one material per phase tag
    bc: periodic | affine | traction        default periodic
    degree: auto | 1 | 2                    auto (default): 2 for a linear RVE with a phase of nu >= 0.4, else 1
    strains: [[..], ..]                     optional list of macro strains (d x d) to report σ̄ for
    tol: float                              periodic node matching tolerance (relative), default 1e-8
    kinematics, formulation, F, load_path, newton, fields   finite strain
    solver: {type: auto | direct | iterative, rtol: 1e-5, max_it: 1000}   the reduced linear systems

:func:`build_rve` is the one place where an RVE solver is built from a validated config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fe2ml.config import NewtonOptions, check_keys, load_yaml, number, parse_newton, require_dim_mesh
from fe2ml.errors import ConfigError, MeshError
from fe2ml.materials import HYPERELASTIC, build_material
from fe2ml.micro.geometry import GENERATORS, generate_mesh
from fe2ml.micro.mesh import RVEMesh, read_mesh
from fe2ml.micro.options import BCS, SolverOptions, parse_solver

if TYPE_CHECKING:  # the solvers, for annotations only
    from fe2ml.micro.finite import HyperelasticRVE
    from fe2ml.micro.linear import LinearRVE

__all__ = [
    "LOAD_PATHS",
    "HomogenizeConfig",
    "build_rve",
    "load_homogenize_config",
    "load_path",
    "load_rve_mesh",
    "parse_homogenize",
    "parse_rve_ref",
]

LOAD_PATHS = ("uniaxial", "biaxial", "shear", "pure_shear")


LOCKING_NU = 0.4
"""Poisson's ratio from which linear (P1) elements lock visibly: the bulk modulus of a random cells_3d RVE with a
ν = 0.45 matrix comes out 19 % above the Hashin–Shtrikman upper bound with P1 and inside it with P2."""


def _poisson(m) -> float | None:
    """ν of an isotropic phase: linear elastic (nu) or hyperelastic with shear and bulk moduli (mu, K)."""
    if hasattr(m, "nu"):
        return float(m.nu)
    mu, K = getattr(m, "mu", None), getattr(m, "K", None)
    if isinstance(mu, int | float) and isinstance(K, int | float) and mu > 0 and K > 0:
        return float((3 * K - 2 * mu) / (2 * (3 * K + mu)))
    return None


def resolve_degree(degree, materials: dict, kinematics: str, formulation: str, where: str) -> int:
    """The displacement degree of ``degree: auto | 1 | 2``, with a warning where P1 locks.

    Small strain: ``auto`` is 2 when a phase has ν ≥ :data:`LOCKING_NU`, else 1. Finite strain: ``auto`` is 1 (the
    mixed u/p formulation, automatic from K/μ ≥ 50, treats near incompressibility). A displacement P1 run with such a
    phase is warned about (its bulk response is too stiff).
    """
    nus = {t: _poisson(m) for t, m in materials.items()}
    locking = {t: nu for t, nu in nus.items() if nu is not None and nu >= LOCKING_NU}
    if degree == "auto":
        degree = 2 if kinematics == "small" and locking else 1
    if degree == 1 and locking and (kinematics == "small" or formulation == "displacement"):
        which = ", ".join(f"phase {t}: nu = {nu:.3g}" for t, nu in sorted(locking.items()))
        logging.getLogger("fe2ml").warning(
            f"{where}: degree 1 with nearly incompressible phase(s) ({which}): linear elements lock and stiffen the "
            f"bulk response (beyond the Hashin-Shtrikman bounds); use degree: 2"
            + (" or formulation: mixed" if kinematics == "finite" else ""))
    return int(degree)


def parse_rve_ref(r, p: Path, f: str, base: Path, dim: int | None) -> HomogenizeConfig:
    """``material.rve`` / ``rve``: a mapping of homogenize keys, or the path of a homogenize YAML."""
    if isinstance(r, str):
        rp = base / r
        if not rp.is_file():
            raise ConfigError(f"{f}: {rp} not found")
        return parse_homogenize(load_yaml(rp), rp, str(rp), rp.parent, require_points=False)
    return parse_homogenize(r, p, f, base, require_points=False, default_dim=dim)


@dataclass(frozen=True)
class HomogenizeConfig:
    """Validated ``fe2ml homogenize`` configuration."""

    path: Path
    dim: int
    mesh_file: Path | None
    generator: str | None
    generator_params: dict
    generator_out: Path
    cell_phases: list[int] | None
    materials: dict
    bc: str = "periodic"
    degree: int = 1
    strains: list = field(default_factory=list)
    tol: float = 1e-8
    kinematics: str = "small"
    formulation: str = "auto"
    F: list = field(default_factory=list)
    load_path: dict | None = None
    newton: NewtonOptions = field(default_factory=NewtonOptions)
    solver: SolverOptions = field(default_factory=SolverOptions)
    fields_points: list = field(default_factory=list)


def load_homogenize_config(path: str | os.PathLike) -> HomogenizeConfig:
    """Load and validate a ``homogenize`` YAML file.

    Args:
        path: the YAML file.

    Returns:
        The validated configuration (materials constructed, paths resolved).

    Raises:
        ConfigError: malformed YAML, unknown keys, wrong types, invalid values.
        MaterialError: invalid material parameters.
    """
    p = Path(path)
    raw = load_yaml(p)
    return parse_homogenize(raw, p, str(p), p.parent)


def parse_homogenize(raw: dict, p: Path, f: str, base: Path, *, require_points: bool = True,
                     default_dim: int | None = None) -> HomogenizeConfig:
    """Validate an RVE mapping (the ``homogenize`` keys).

    Args:
        raw: the mapping.
        p: config file path.
        f: location prefix for messages (``file`` or ``file: material.rve``).
        base: folder that relative paths are relative to.
        require_points: finite strain needs F or load_path (homogenize); not for macro runs.
        default_dim: dimension to use when ``dim`` is absent (macro runs).

    Returns:
        The validated :class:`HomogenizeConfig`.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{f}: expected a mapping of RVE keys, got {raw!r}")
    if "dim" not in raw and default_dim is not None:
        raw = {**raw, "dim": default_dim}
    check_keys(raw, ("dim", "mesh", "phases", "bc", "degree", "strains", "tol", "kinematics", "formulation",
                      "F", "load_path", "newton", "fields", "solver"), f)
    dim, mesh = require_dim_mesh(raw, ("dim", "mesh", "phases"), f)
    cell_phases = mesh.get("cell_phases")
    if cell_phases is not None and (not isinstance(cell_phases, list)
                                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in cell_phases)):
        raise ConfigError(f"{f}: mesh.cell_phases: expected a list of integer phase tags, got {cell_phases!r}")
    mesh_file = gen = None
    gparams: dict = {}
    gout = base / "meshes" / "generated"
    if ("file" in mesh) == ("generate" in mesh):
        raise ConfigError(f"{f}: mesh: give exactly one of 'file' or 'generate'")
    if "file" in mesh:
        check_keys(mesh, ("file", "cell_phases"), f"{f}: mesh")
        if not isinstance(mesh["file"], str):
            raise ConfigError(f"{f}: mesh.file: expected a path string, got {mesh['file']!r}")
        mesh_file = (base / mesh["file"]).resolve()
        if not mesh_file.is_file():
            raise ConfigError(f"{f}: mesh.file: {mesh_file} not found")
    else:
        gen = mesh["generate"]
        if gen not in GENERATORS:
            raise ConfigError(f"{f}: mesh.generate: unknown generator {gen!r}; allowed: {', '.join(GENERATORS)}")
        gparams = {k: v for k, v in mesh.items() if k not in ("generate", "out_dir", "cell_phases")}
        if "out_dir" in mesh:
            gout = (base / str(mesh["out_dir"])).resolve()
        gdim = GENERATORS[gen][1]
        if gdim is not None and gdim != dim:
            raise ConfigError(f"{f}: mesh.generate: generator {gen} makes {gdim}D meshes but dim is {dim}")
        if gdim is None:
            if "dim" in gparams and gparams["dim"] != dim:
                raise ConfigError(f"{f}: mesh.dim {gparams['dim']!r} differs from dim {dim}")
            gparams["dim"] = dim
    phases = raw["phases"]
    if not isinstance(phases, dict) or not phases:
        raise ConfigError(f"{f}: phases: expected a mapping phase tag -> material, got {phases!r}")
    materials = {}
    for tag, spec in phases.items():
        try:
            t = int(tag)
        except (TypeError, ValueError):
            raise ConfigError(f"{f}: phases: tag {tag!r} is not an integer") from None
        if isinstance(tag, bool):
            raise ConfigError(f"{f}: phases: tag {tag!r} is not an integer")
        materials[t] = build_material(spec, f"{f}: phases.{t}")
    bc = raw.get("bc", "periodic")
    if bc not in BCS:
        raise ConfigError(f"{f}: bc: expected one of {', '.join(BCS)}, got {bc!r}")
    degree = raw.get("degree", "auto")
    if degree != "auto" and (degree not in (1, 2) or isinstance(degree, bool)):
        raise ConfigError(f"{f}: degree: expected auto, 1 or 2, got {degree!r}")
    tol = number(raw.get("tol", 1e-8), f"{f}: tol", positive=True)
    strains = raw.get("strains", [])
    if not isinstance(strains, list):
        raise ConfigError(f"{f}: strains: expected a list of {dim}x{dim} matrices, got {strains!r}")
    out = [_matrix(s, dim, f"{f}: strains[{k}]") for k, s in enumerate(strains)]
    names = {str(spec.get("material")) for spec in phases.values()}
    hyper = names & set(HYPERELASTIC)
    kin = raw.get("kinematics", "finite" if hyper else "small")
    if kin not in ("small", "finite"):
        raise ConfigError(f"{f}: kinematics: expected small or finite, got {kin!r}")
    if kin == "finite" and names - set(HYPERELASTIC):
        raise ConfigError(f"{f}: kinematics finite needs hyperelastic materials ({', '.join(HYPERELASTIC)}) for "
                          f"every phase; got {sorted(names - set(HYPERELASTIC))}")
    if kin == "small" and hyper:
        raise ConfigError(f"{f}: kinematics small needs linear materials; got {sorted(hyper)} "
                          "(use kinematics: finite)")
    formulation = raw.get("formulation", "auto")
    if formulation not in ("auto", "displacement", "mixed"):
        raise ConfigError(f"{f}: formulation: expected auto, displacement or mixed, got {formulation!r}")
    degree = resolve_degree(degree, materials, kin, formulation, f)
    if kin == "small" and ("F" in raw or "load_path" in raw):
        raise ConfigError(f"{f}: F and load_path need kinematics: finite (use strains for small strain)")
    if kin == "finite" and "strains" in raw:
        raise ConfigError(f"{f}: strains is for kinematics: small; give F (list of deformation gradients) or "
                          "load_path")
    Fs = []
    Fraw = raw.get("F", [])
    if not isinstance(Fraw, list):
        raise ConfigError(f"{f}: F: expected a list of {dim}x{dim} deformation gradients, got {Fraw!r}")
    for k, s_ in enumerate(Fraw):
        a = _matrix(s_, dim, f"{f}: F[{k}]")
        if np.linalg.det(a) <= 0:
            raise ConfigError(f"{f}: F[{k}]: det F = {np.linalg.det(a):.4g} <= 0; a deformation gradient must "
                              "have positive determinant")
        Fs.append(a)
    lp = raw.get("load_path")
    if lp is not None:
        if not isinstance(lp, dict):
            raise ConfigError(f"{f}: load_path: expected a mapping {{type: uniaxial, max: 0.3, steps: 10}}")
        check_keys(lp, ("type", "max", "steps"), f"{f}: load_path")
        if lp.get("type") not in LOAD_PATHS:
            raise ConfigError(f"{f}: load_path.type: expected one of {', '.join(LOAD_PATHS)}, got {lp.get('type')!r}")
        mx = number(lp.get("max", 0.2), f"{f}: load_path.max")
        if not -0.9 < mx < 5:
            raise ConfigError(f"{f}: load_path.max: expected a stretch-1 (or shear) in (-0.9, 5), got {mx}")
        st = lp.get("steps", 10)
        if not isinstance(st, int) or isinstance(st, bool) or not 1 <= st <= 10000:
            raise ConfigError(f"{f}: load_path.steps: expected an integer in 1..10000, got {st!r}")
        lp = {"type": lp["type"], "max": mx, "steps": st}
        Fs.extend(load_path(lp["type"], mx, st, dim))
    if kin == "finite" and not Fs and require_points:
        raise ConfigError(f"{f}: kinematics finite needs F (list of deformation gradients) or load_path")
    newton = parse_newton(raw.get("newton"), f)
    solver = parse_solver(raw.get("solver"), f, SolverOptions)
    fields_ = raw.get("fields", {}) or {}
    if not isinstance(fields_, dict):
        raise ConfigError(f"{f}: fields: expected a mapping {{points: [0, 3]}}")
    check_keys(fields_, ("points",), f"{f}: fields")
    fpts = fields_.get("points", [])
    if not isinstance(fpts, list) or not all(isinstance(i, int) and 0 <= i < max(len(Fs), 1) for i in fpts):
        raise ConfigError(f"{f}: fields.points: expected a list of point indices in 0..{max(len(Fs), 1) - 1}, "
                          f"got {fpts!r}")
    return HomogenizeConfig(path=p, dim=dim, mesh_file=mesh_file, generator=gen, generator_params=gparams,
                            generator_out=gout, cell_phases=cell_phases, materials=materials, bc=bc,
                            degree=degree, strains=out, tol=tol, kinematics=kin, formulation=formulation,
                            F=Fs, load_path=lp, newton=newton, fields_points=fpts, solver=solver)


def _matrix(v, dim: int, where: str) -> np.ndarray:
    """A finite dim x dim matrix from YAML (a list of lists of numbers)."""
    try:
        a = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
        a = np.zeros(0)
    if a.shape != (dim, dim) or not np.all(np.isfinite(a)):
        raise ConfigError(f"{where}: expected a {dim}x{dim} list of numbers, got {v!r}")
    return a


def load_path(kind: str, maximum: float, steps: int, dim: int) -> list[np.ndarray]:
    """Macro deformation gradients along a named load path, excluding F̄ = I.

    Args:
        kind: ``uniaxial`` (F11 = 1 + s, others fixed: uniaxial strain), ``biaxial``
            (F11 = F22 = 1 + s), ``shear`` (simple shear F12 = s), ``pure_shear`` (F11 = 1 + s,
            F22 = 1/(1 + s), others fixed: the isochoric in-plane stretch of a nearly incompressible solid).
        maximum: final s.
        steps: number of points (s = maximum·k/steps, k = 1..steps).
        dim: 2 or 3.

    Returns:
        List of (dim, dim) arrays.
    """
    out = []
    for k in range(1, steps + 1):
        s = maximum * k / steps
        F = np.eye(dim)
        if kind == "uniaxial":
            F[0, 0] += s
        elif kind == "biaxial":
            F[0, 0] += s
            F[1, 1] += s
        elif kind == "pure_shear":
            F[0, 0] += s
            F[1, 1] = 1.0 / (1.0 + s)
        elif kind == "shear":
            F[0, 1] = s
        else:
            raise ConfigError(f"load path type {kind!r}: expected one of {', '.join(LOAD_PATHS)}")
        out.append(F)
    return out


def load_rve_mesh(cfg: HomogenizeConfig, *, comm=None) -> RVEMesh:
    """Read or generate the RVE mesh of a config and check it against the config.

    Args:
        cfg: validated config.
        comm: optional communicator (generation on rank 0 only).

    Returns:
        The :class:`fe2ml.micro.mesh.RVEMesh`.
    """
    f = str(cfg.path)
    path = (generate_mesh(cfg.generator, cfg.generator_params, cfg.generator_out, comm=comm)
            if cfg.generator is not None else Path(str(cfg.mesh_file)))
    mesh = read_mesh(path, cell_phases=cfg.cell_phases, tol=cfg.tol)
    if mesh.dim != cfg.dim:
        raise MeshError(f"{f}: mesh {path} is {mesh.dim}D but dim is {cfg.dim}")
    missing = [t for t in mesh.tags if t not in cfg.materials]
    if missing:
        raise MeshError(f"{f}: phases: mesh {path} has phase tag(s) {missing} without a material "
                        f"(materials given for {sorted(cfg.materials)})")
    extra = [t for t in cfg.materials if t not in mesh.tags]
    if extra:
        raise MeshError(f"{f}: phases: tag(s) {extra} do not occur in mesh {path} (its tags: {mesh.tags})")
    return mesh


def build_rve(cfg: HomogenizeConfig, mesh: RVEMesh) -> LinearRVE | HyperelasticRVE:
    """The RVE solver of a validated config on ``MPI.COMM_SELF``: linear (small strain) or hyperelastic (finite).

    Args:
        cfg: validated RVE config.
        mesh: its mesh (from :func:`load_rve_mesh`).
    """
    # deferred: the solvers import dolfinx and petsc4py; the config module reads without them
    from fe2ml.micro.finite import HyperelasticRVE
    from fe2ml.micro.linear import LinearRVE

    if cfg.kinematics == "finite":
        return HyperelasticRVE(mesh, cfg.materials, bc=cfg.bc, formulation=cfg.formulation, degree=cfg.degree,
                               tol=cfg.tol, newton=cfg.newton, solver=cfg.solver)
    return LinearRVE(mesh, cfg.materials, bc=cfg.bc, degree=cfg.degree, tol=cfg.tol, solver=cfg.solver)
