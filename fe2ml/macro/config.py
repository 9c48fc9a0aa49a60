"""``fe2ml run`` configuration: validated up front, errors name the file, key and what is allowed.

Keys::

    dim: 2 | 3                                    required
    mesh: {generate: rectangle|box|plate_with_hole|ring|tiled_rve, ...} | {file: PATH}
    material:
      kind: rve | analytic
      rve: {mesh, phases, bc, formulation, degree, newton, ...}   (the homogenize keys; or a path to
                                                                   a homogenize YAML file)
      phases: {TAG: {material: ...}}              analytic: one material per macro phase tag
      material: {material: ...}                   analytic: one material everywhere
    kinematics: finite | small                    default: finite with hyperelastic materials
    degree: 1 | 2                                 macro displacement degree (default 1)
    quadrature_degree: int                        default 1 (P1) / 2 (P2)
    bcs: [{boundary: NAME, components: [0, 1], value: EXPR(x, y, z, t)}]
    tractions: [{boundary: NAME, value: [EXPR(t), ...]}]   (nominal traction, dead load)
    pressures: [{boundary: NAME, value: EXPR(t)}]          (pressure, follows the deformation)
    material.balance: true                        kind rve/hybrid: spread the RVE solves over the ranks by cost
    material.learn: {min_new: 64, every: 1, epochs: 300, first_epochs: 2000, members: 2, lr: 0.01,
                     warm_lr: 0.002, patience: 200, seed: 0, data: PATH | [PATH], model: {...}, loss: {...}}
                                                  kind hybrid: refit the surrogate during the run on its fallback
                                                  records (checkpoint: null starts cold; fe2ml.laws.learning)
    material.orientation: EXPR(x, y, z, pi)                2D: angle in degrees of the RVE's x axis
    material.orientation: {e1: [EXPR x3], e2: [EXPR x3]}   3D: the RVE's x and y axes (orthonormalised)
    steps: int                                    load steps over t in (0, 1] (default 10)
    newton: {rtol: 1e-9, atol: 1e-12, max_it: 20, max_cuts: 6}
    solver: {type: auto, rtol: 1e-8, max_it: 2000}   macro linear solver: direct (MUMPS) | iterative (CG/GMRES +
                                                  GAMG) | auto (iterative from 100,000 dofs on)
    warm_start: true                              RVE solves start from the point's last state
    output: PATH                                  run folder (default: results/<config name>)
    log: {folder: PATH, all_iterations: false, cells: true}   log RVE evaluations to HDF5 (material.kind rve)
    localize: false                               cell quantities at every quadrature point and load step
                                                  (material.kind rve), stored in quadrature.h5
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fe2ml.config import (
    MACRO_NEWTON,
    NewtonOptions,
    check_keys,
    flag,
    load_yaml,
    number,
    parse_newton,
    require_dim_mesh,
)
from fe2ml.data.config import RunLogOptions, parse_run_log
from fe2ml.errors import ConfigError
from fe2ml.expr import check_samples, compile_expression
from fe2ml.macro.loads import DirichletSpec, PressureSpec, TractionSpec, frames_from_angle, frames_from_axes
from fe2ml.materials import build_material, fibre_families, same_fibres
from fe2ml.micro.config import HomogenizeConfig, parse_rve_ref
from fe2ml.micro.options import SolverOptions, parse_solver
from fe2ml.surrogate.config import SurrogateOptions, parse_surrogate_options
from fe2ml.surrogate.gate import Gate

__all__ = ["MACRO_AUTO_ITERATIVE_DOFS", "MacroSolverOptions", "MeshSpec", "RunConfig", "check_boundaries",
           "load_run_config", "parse_macro_solver", "parse_mesh"]

RUN_KEYS = ("dim", "mesh", "material", "kinematics", "degree", "quadrature_degree", "bcs", "tractions", "pressures",
            "steps", "newton", "solver", "warm_start", "output", "log", "localize")

MACRO_AUTO_ITERATIVE_DOFS = 100_000  # ``solver: auto`` is iterative from this many macro displacement dofs on


@dataclass(frozen=True)
class MacroSolverOptions(SolverOptions):
    """The linear solver of the macro Newton steps (``solver:`` of a run; the RVE's options, other defaults).

    Attributes:
        type: ``direct`` (MUMPS LU), ``iterative`` (CG, or GMRES with a follower pressure, preconditioned by GAMG
            with the rigid-body near-nullspace), or ``auto`` (iterative from ``MACRO_AUTO_ITERATIVE_DOFS`` dofs on).
        rtol: the loosest relative Krylov tolerance; each Newton step uses min(rtol, 0.01 |R| / |R_0|).
        max_it: the Krylov iteration limit of one Newton step.
    """

    rtol: float = 1e-8
    max_it: int = 2000


def parse_macro_solver(raw, f: str) -> MacroSolverOptions:
    """``solver:`` of a run (errors name the file ``f`` and the key)."""
    return parse_solver(raw, f, MacroSolverOptions)


GENERATORS = {"rectangle": 2, "box": 3, "plate_with_hole": 2, "ring": 2, "tiled_rve": None}
_GEN_KEYS = {"rectangle": ("generate", "size", "n", "cell"), "box": ("generate", "size", "n", "cell"),
             "plate_with_hole": ("generate", "size", "radius", "h", "h_hole"), "ring": ("generate", "radii", "h"),
             "tiled_rve": ("generate", "n", "eps", "rve")}


@dataclass(frozen=True)
class MeshSpec:
    """The macro mesh of a run, validated: a generator with its parameters, or a mesh file (path resolved).

    Attributes:
        kind: ``rectangle``, ``box``, ``plate_with_hole``, ``ring``, ``tiled_rve`` or ``file``.
        size: box lengths (rectangle, box, plate_with_hole).
        n: elements (rectangle, box) or tiles (tiled_rve) per axis.
        cell: cell type (rectangle, box).
        radius, h, h_hole: plate_with_hole (h also ring).
        radii: ring (inner, outer).
        eps: tiled_rve scale (default 1 / max(n)).
        file: the mesh file, resolved against the config's folder (kind ``file``).
    """

    kind: str
    size: tuple[float, ...] = ()
    n: tuple[int, ...] = ()
    cell: str | None = None
    radius: float = 0.5
    h: float = 0.25
    h_hole: float | None = None
    radii: tuple[float, float] = (1.0, 1.5)
    eps: float | None = None
    file: Path | None = None

    def bounding_box(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Corners (lo, hi) of the mesh where the spec alone tells them (generators but tiled_rve), else None."""
        if self.kind in ("rectangle", "box", "plate_with_hole"):
            return np.zeros(len(self.size)), np.asarray(self.size, dtype=float)
        if self.kind == "ring":
            return np.zeros(2), np.full(2, self.radii[1])
        return None


def _positive_ints(v, d: int, where: str) -> tuple[int, ...]:
    if not (isinstance(v, list) and len(v) == d and all(isinstance(k, int) and not isinstance(k, bool) and
                                                         1 <= k <= 10**7 for k in v)):
        raise ConfigError(f"{where}: expected {d} positive integers, got {v!r}")
    return tuple(v)


def _lengths(v, d: int, where: str) -> tuple[float, ...]:
    if not (isinstance(v, list) and len(v) == d):
        raise ConfigError(f"{where}: expected {d} positive lengths, got {v!r}")
    return tuple(number(x, where, positive=True) for x in v)


def parse_mesh(mesh: dict, dim: int, where: str, base: Path) -> MeshSpec:
    """``mesh:`` of a run YAML as a :class:`MeshSpec` (relative files resolved against ``base``)."""
    if "file" in mesh:
        check_keys(mesh, ("file",), where)
        if not isinstance(mesh["file"], str) or not mesh["file"]:
            raise ConfigError(f"{where}.file: expected a path, got {mesh['file']!r}")
        mp = (base / mesh["file"]).resolve()
        if not mp.is_file():
            raise ConfigError(f"{where}.file: {mp} not found")
        return MeshSpec(kind="file", file=mp)
    g = mesh.get("generate")
    if g not in GENERATORS:
        raise ConfigError(f"{where}.generate: expected one of {', '.join(GENERATORS)} (or file: PATH), got {g!r}")
    check_keys(mesh, _GEN_KEYS[g], where)
    if GENERATORS[g] is not None and GENERATORS[g] != dim:
        raise ConfigError(f"{where}.generate: {g} makes {GENERATORS[g]}D meshes but dim is {dim}")
    if g in ("rectangle", "box"):
        cell = mesh.get("cell", "triangle" if dim == 2 else "tetrahedron")
        allowed = ("triangle", "quadrilateral") if dim == 2 else ("tetrahedron", "hexahedron")
        if cell not in allowed:
            raise ConfigError(f"{where}.cell: expected one of {', '.join(allowed)}, got {cell!r}")
        return MeshSpec(kind=g, size=_lengths(mesh.get("size", [1.0] * dim), dim, f"{where}.size"),
                        n=_positive_ints(mesh.get("n", [8] * dim), dim, f"{where}.n"), cell=cell)
    if g == "plate_with_hole":
        size = _lengths(mesh.get("size", [4.0, 2.0]), 2, f"{where}.size")
        r = number(mesh.get("radius", 0.5), f"{where}.radius", positive=True)
        h = number(mesh.get("h", 0.25), f"{where}.h", positive=True)
        h_hole = number(mesh.get("h_hole", h / 4), f"{where}.h_hole", positive=True)
        if not r < min(size) / 2:
            raise ConfigError(f"{where}.radius: expected 0 < radius < {min(size) / 2:g} (half the shorter side), "
                              f"got {r:g}")
        return MeshSpec(kind=g, size=size, radius=r, h=h, h_hole=h_hole)
    if g == "ring":
        radii = mesh.get("radii", [1.0, 1.5])
        if not (isinstance(radii, list) and len(radii) == 2):
            raise ConfigError(f"{where}.radii: expected [inner, outer], got {radii!r}")
        a, b = (number(x, f"{where}.radii", positive=True) for x in radii)
        if not a < b:
            raise ConfigError(f"{where}.radii: expected inner < outer, got {radii!r}")
        h = number(mesh.get("h", (b - a) / 4), f"{where}.h", positive=True)
        if h > b - a:
            raise ConfigError(f"{where}.h: expected at most outer - inner = {b - a:g}, got {h:g}")
        return MeshSpec(kind=g, radii=(a, b), h=h)
    n = _positive_ints(mesh.get("n"), dim, f"{where}.n")  # tiled_rve: tiles per axis
    return MeshSpec(kind=g, n=n, eps=number(mesh.get("eps", 1.0 / max(n)), f"{where}.eps", positive=True))


@dataclass(frozen=True)
class Expression:
    """One expression of a run config: where it is, its compiled form and the names it may use."""

    where: str
    f: Callable
    names: frozenset[str]


@dataclass(frozen=True)
class RunConfig:
    """Validated ``fe2ml run`` configuration: typed values, expressions already turned into callables."""

    path: Path
    dim: int
    mesh: MeshSpec
    kind: str
    rve: HomogenizeConfig | None
    analytic: dict | None
    kinematics: str
    degree: int
    quadrature_degree: int | None
    bcs: list[DirichletSpec]
    tractions: list[TractionSpec]
    steps: int
    newton: NewtonOptions
    warm_start: bool
    output: Path
    raw: dict = field(default_factory=dict)
    log: RunLogOptions | None = None
    surrogate: SurrogateOptions | None = None
    localize: bool = False
    mesh_rve: HomogenizeConfig | None = None  # mesh.rve of a tiled_rve mesh
    pressures: list[PressureSpec] = field(default_factory=list)
    orientation: Callable[[np.ndarray], np.ndarray] | None = None  # frames(X (n, d)) -> Q (n, d, d)
    balance: bool = True  # kinds rve and hybrid: spread the RVE solves over the ranks (fe2ml.laws.farm)
    expressions: tuple[Expression, ...] = ()  # every expression of the config, for check_expressions
    solver: MacroSolverOptions = field(default_factory=MacroSolverOptions)
    parameters: RunParameters | None = None  # the microstructure parameters of a parametric surrogate

    def check_expressions(self, lo, hi) -> None:
        """Evaluate every expression at sample points: t in [0, 1] and the corners and centre of the box [lo, hi].

        Raises:
            ConfigError: ``FILE: KEY: ...`` for the first expression that is not finite at a sample point.
        """
        lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))))
        X = np.zeros((len(corners) + 1, 3))
        X[:, : len(lo)] = np.vstack([corners, (lo + hi) / 2])
        n = min(self.steps, 1000)
        ts = np.unique(np.concatenate([np.linspace(0.0, 1.0, 11), np.arange(1, n + 1) / n]))
        space = {"x": X[:, 0], "y": X[:, 1], "z": X[:, 2], "pi": np.pi}
        for e in self.expressions:
            env = {k: v for k, v in space.items() if k in e.names}
            check_samples(e.f, [{**env, "t": t} for t in ts] if "t" in e.names else [env])
        prm = self.parameters
        if (prm is not None and prm.constant is None and prm.rve_box is not None
                and (self.kind == "hybrid" or (self.surrogate is not None and self.surrogate.audit is not None))):
            # the RVEs a field of parameters asks for, sampled on a grid of the box (the run checks its points)
            grid = np.array(list(itertools.product(*[np.linspace(a, b, 9) for a, b in zip(lo, hi, strict=True)])))
            prm.check_field(prm.values(grid), f"{self.path}: material.parameters", self.dim)


def load_run_config(path, *, output: str | None = None, base: Path | None = None) -> RunConfig:
    """Load and validate a run YAML.

    Args:
        path: the YAML file.
        output: override of the output folder.
        base: the folder relative paths are relative to (default: the config's folder; a restart reads the run
            folder's copy of the config with the original's folder).

    Returns:
        :class:`RunConfig`.
    """
    p = Path(path)
    raw = load_yaml(p)
    f = str(p)
    base = p.parent if base is None else Path(base)
    check_keys(raw, RUN_KEYS, f)
    dim, mesh = require_dim_mesh(raw, ("dim", "mesh", "material"), f)
    mesh_spec = parse_mesh(mesh, dim, f"{f}: mesh", base)
    exprs: list[Expression] = []
    mesh_rve = None
    if mesh_spec.kind == "tiled_rve" and "rve" in mesh:  # the RVE to tile (direct numerical simulation)
        mesh_rve = parse_rve_ref(mesh["rve"], p, f"{f}: mesh.rve", base, dim)
        if mesh_rve.dim != dim:
            raise ConfigError(f"{f}: mesh.rve: the RVE is {mesh_rve.dim}D but dim is {dim}")
    m = _material(raw["material"], p, base, dim, exprs)
    if m.kind == "analytic" and mesh_spec.kind == "tiled_rve" and mesh_rve is None:
        raise ConfigError(f"{f}: mesh.rve: generate tiled_rve with analytic materials needs the RVE to tile "
                          "(homogenize keys or the path of a homogenize YAML)")
    kin = raw.get("kinematics", m.kinematics)
    if kin not in ("small", "finite"):
        raise ConfigError(f"{f}: kinematics: expected small or finite, got {kin!r}")
    if kin != m.kinematics:
        raise ConfigError(f"{f}: kinematics {kin} does not fit the materials (they are {m.kinematics}-strain laws)")
    degree = raw.get("degree", 1)
    if degree not in (1, 2) or isinstance(degree, bool):
        raise ConfigError(f"{f}: degree: expected 1 or 2, got {degree!r}")
    qd = raw.get("quadrature_degree")
    if qd is not None and (not isinstance(qd, int) or isinstance(qd, bool) or not 1 <= qd <= 8):
        raise ConfigError(f"{f}: quadrature_degree: expected an integer 1..8, got {qd!r}")
    steps = raw.get("steps", 10)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 100000:
        raise ConfigError(f"{f}: steps: expected an integer >= 1, got {steps!r}")
    bcs, trs, prs = _loads(raw, f, dim, exprs)
    ws = flag(raw.get("warm_start", True), f"{f}: warm_start")
    out = output if output is not None else raw.get("output", str(Path("results") / p.stem))
    if not isinstance(out, str):
        raise ConfigError(f"{f}: output: expected a folder path, got {out!r}")
    log = None
    if raw.get("log") is not None:
        log = parse_run_log(raw["log"], f"{f}: log", base)
        if m.kind != "rve":
            raise ConfigError(f"{f}: log: logging needs material.kind rve (there are no RVE evaluations to log)")
    loc = flag(raw.get("localize", False), f"{f}: localize")
    if loc and m.kind != "rve":
        raise ConfigError(f"{f}: localize: true needs material.kind rve (use fe2ml localize --model for surrogates)")
    cfg = RunConfig(path=p, dim=dim, mesh=mesh_spec, kind=m.kind, rve=m.rve, analytic=m.analytic, kinematics=kin,
                    degree=degree, quadrature_degree=qd, bcs=bcs, tractions=trs, steps=steps,
                    newton=parse_newton(raw.get("newton"), f, defaults=MACRO_NEWTON), warm_start=ws,
                    output=(base / out) if output is None else Path(out), raw=raw, log=log, surrogate=m.surrogate,
                    localize=loc, mesh_rve=mesh_rve, pressures=prs, orientation=m.orientation, balance=m.balance,
                    expressions=tuple(exprs), solver=parse_macro_solver(raw.get("solver"), f),
                    parameters=m.parameters)
    box = mesh_spec.bounding_box()
    if box is not None:  # otherwise (a mesh file, tiled RVEs) once the mesh is there: check_config, run.build
        cfg.check_expressions(*box)
    return cfg


@dataclass(frozen=True)
class _Material:
    """The ``material:`` section of a run, validated (what :class:`RunConfig` takes from it)."""

    kind: str
    kinematics: str  # what the materials are: small or finite strain
    rve: HomogenizeConfig | None = None
    analytic: dict | None = None
    surrogate: SurrogateOptions | None = None
    orientation: Callable[[np.ndarray], np.ndarray] | None = None
    balance: bool = True
    parameters: RunParameters | None = None


@dataclass(frozen=True)
class RunParameters:
    """``material.parameters`` of a run with a parametric surrogate.

    Attributes:
        names: the checkpoint's parameter names, in its order; box: its trained {name: [lo, hi]}.
        constant: the parameter vector (k,) when every value is a number, else None (a field).
        values: X (n, d) -> p (n, k), the parameters at the macro points.
        family: the fingerprint of the RVE family of ``material.rve`` (None without it).
        rve_box: the family's :class:`~fe2ml.micro.parameters.ParameterBox` (None without ``material.rve``): a hybrid
            run or an audit with a field of parameters solves the RVE of each point's parameters from it.
    """

    names: tuple
    box: dict
    constant: np.ndarray | None
    values: Callable[[np.ndarray], np.ndarray]
    family: str | None = None
    realizations: tuple = ()  # material.realizations: the seeds (mesh.seed levels) to run, one macro run each
    rve_box: Any = None

    def check_field(self, p: np.ndarray, where: str, dim: int) -> None:
        """Check that the RVE config is valid over the range of the parameter vectors p (n, k).

        Checked at the corners of the box they span (a modulus is valid on an interval, so its ends decide).

        Raises:
            ConfigError: the RVE at a corner is invalid (e.g. a modulus <= 0 there), naming the range.
        """
        from fe2ml.micro.parameters import rve_with

        k = len(self.names)
        if self.rve_box is None or not len(p) or k > 10:  # beyond 2^10 corners each RVE is checked when built
            return
        lo, hi = np.min(p, axis=0), np.max(p, axis=0)
        span = ", ".join(f"{n} in [{a:g}, {b:g}]" for n, a, b in zip(self.names, lo, hi, strict=True))
        for bits in range(2**k):
            rve_with(self.rve_box, np.where([(bits >> j) & 1 for j in range(k)], hi, lo),
                     f"{where} (the field spans {span})", dim)


_MATERIAL_KEYS = {"hybrid": ("kind", "checkpoint", "rve", "threshold", "log", "orientation", "audit", "device",
                             "tangent_precision", "learn", "balance", "parameters"),
                  "surrogate": ("kind", "checkpoint", "rve", "orientation", "audit", "device", "tangent_precision",
                                "parameters", "realizations"),
                  "rve": ("kind", "rve", "orientation", "balance"), "analytic": ("kind", "phases", "material")}


def _material(mat, p: Path, base: Path, dim: int, exprs: list[Expression]) -> _Material:
    """``material:`` of a run: its kind, RVE, analytic laws or surrogate, frame and balance."""
    f = str(p)
    if not isinstance(mat, dict):
        raise ConfigError(f"{f}: material: expected a mapping with kind: rve | analytic")
    kind = mat.get("kind")
    if kind not in _MATERIAL_KEYS:
        raise ConfigError(f"{f}: material.kind: expected rve, analytic, surrogate or hybrid, got {kind!r}")
    check_keys(mat, _MATERIAL_KEYS[kind], f"{f}: material")
    rve = analytic = surrogate = params = None
    if kind == "analytic":
        analytic, kin = _analytic(mat, f)
    else:
        if kind == "rve" and "rve" not in mat:
            raise ConfigError(f"{f}: material.rve: missing (the homogenize keys, or a path to a homogenize YAML)")
        if kind != "rve":
            surrogate = parse_surrogate_options(mat, kind, f, base)
        if "rve" in mat:
            rve = parse_rve_ref(mat["rve"], p, f"{f}: material.rve", base, dim)
            if kind == "rve" and rve.dim != dim:
                raise ConfigError(f"{f}: material.rve: the RVE is {rve.dim}D but dim is {dim}")
        kin = rve.kinematics if kind == "rve" and rve is not None else "finite"
        if surrogate is not None and surrogate.checkpoint is not None:
            kin, params, rve = _check_surrogate(surrogate, mat, kind, f, dim, rve, p, base, exprs)
        elif surrogate is not None and surrogate.learn is not None and rve is not None:
            m = surrogate.learn.model
            if m.get("features") == "anisotropic" and not fibre_families(rve.materials.values()):
                raise ConfigError(f"{f}: material.learn.model.features: anisotropic needs fibre directions, and "
                                  f"material.rve has none (materials: {_material_names(rve)}); use isotropic or "
                                  "general")
    balance = flag(mat.get("balance", True), f"{f}: material.balance")  # kinds rve and hybrid only (check_keys)
    orientation = mat.get("orientation")
    if orientation is not None:
        orientation = _orientation(orientation, f"{f}: material.orientation", dim, exprs)
    if "parameters" in mat and params is None:
        raise ConfigError(f"{f}: material.parameters: only for a parametric surrogate checkpoint (trained on a "
                          "campaign with parameters:)")
    return _Material(kind=kind, kinematics=kin, rve=rve, analytic=analytic, surrogate=surrogate,
                     orientation=orientation, balance=balance, parameters=params)


def _analytic(mat: dict, f: str) -> tuple[dict, str]:
    """Analytic materials (one everywhere, or one per macro phase tag) and their kinematics."""
    if ("phases" in mat) == ("material" in mat):
        raise ConfigError(f"{f}: material: analytic needs exactly one of 'phases' (per macro tag) or 'material'")
    if "material" in mat:
        analytic = {0: build_material(mat["material"], f"{f}: material.material")}
    else:
        if not isinstance(mat["phases"], dict) or not mat["phases"]:
            raise ConfigError(f"{f}: material.phases: expected a mapping tag -> material")
        analytic = {}
        for t, spec in mat["phases"].items():
            try:
                ti = int(t)
            except (TypeError, ValueError):
                raise ConfigError(f"{f}: material.phases: tag {t!r} is not an integer") from None
            analytic[ti] = build_material(spec, f"{f}: material.phases.{ti}")
    hyper = [hasattr(m, "energy") for m in analytic.values()]
    if any(hyper) and not all(hyper):
        raise ConfigError(f"{f}: material: mix of hyperelastic and linear materials")
    return analytic, "finite" if all(hyper) else "small"


def _material_names(rve) -> str:
    return ", ".join(sorted({type(m).__name__ for m in rve.materials.values()}))


def _check_surrogate(s: SurrogateOptions, mat: dict, kind: str, f: str, dim: int, rve, p: Path, base: Path,
                     exprs: list[Expression]):
    """Load the checkpoint safely and check it against the run (and its RVE).

    Returns its kinematics, the run's parameters (a parametric checkpoint) and the RVE (for a parametric hybrid:
    ``material.rve`` with the run's parameters).
    """
    from fe2ml.surrogate.deploy import read_checkpoint, torch_free  # numpy only (no torch)

    device = mat.get("device", "cpu")
    ck = read_checkpoint(s.checkpoint)  # a model the CPU serves without torch has its weights checked here
    if not torch_free(ck, device):  # parametric, or on a GPU: torch serves it, and checks its weights now
        from fe2ml.surrogate.checkpoint import load_checkpoint, resolve_device

        if device != "cpu":  # a CUDA device that is not there
            resolve_device(device, f"{f}: material.device")
        load_checkpoint(s.checkpoint)
    if ck["dim"] != dim:
        raise ConfigError(f"{f}: material.checkpoint: checkpoint is for {ck['dim']}D, the run is {dim}D")
    params = None
    if ck.get("parameters"):
        params, rve = _run_parameters(mat, ck, kind, f, dim, rve, p, base, exprs)
    elif "parameters" in mat:
        raise ConfigError(f"{f}: material.parameters: the checkpoint {s.checkpoint} is not parametric (it was trained "
                          "on one RVE); remove material.parameters")
    if rve is not None and ck["model"].get("features") == "anisotropic":
        mine = fibre_families(rve.materials.values())
        if not same_fibres(ck["model"].get("fibres", []), mine):
            raise ConfigError(f"{f}: material.checkpoint: its anisotropic model has fibre families "
                              f"{ck['model'].get('fibres', [])}, material.rve has "
                              f"{mine or 'none'} ({_material_names(rve)}); train on this RVE's data")
    if kind == "hybrid":
        s.thresholds.check(Gate(ck), f"{f}: material.threshold")
    return ck["kinematics"], params, rve


def _run_parameters(mat: dict, ck: dict, kind: str, f: str, dim: int, rve, p: Path, base: Path,
                    exprs: list[Expression]):
    """``material.parameters`` against a parametric checkpoint: every name, numbers or expressions of x, y, z."""
    names = tuple(ck["parameters"]["names"])
    box = {n: [float(v) for v in ck["parameters"]["box"][n]] for n in names}
    w = f"{f}: material.parameters"
    if mat.get("learn") is not None:
        raise ConfigError(f"{f}: material.learn: in-run learning refits on the fallback RVE's records, which carry no "
                          "parameters; a parametric checkpoint is refined by a parametric campaign and fe2ml train")
    raw = mat.get("parameters")
    levels = {str(k): [float(x) for x in v] for k, v in (ck["model"].get("levels") or {}).items()}
    seeds: tuple = ()
    if "realizations" in mat:
        if "mesh.seed" not in levels:
            raise ConfigError(f"{f}: material.realizations: the checkpoint has no realizations (train on a campaign "
                              "with parameters: {mesh.seed: [lo, hi]})")
        rz = mat["realizations"]
        if rz == "all":
            seeds = tuple(levels["mesh.seed"])
        elif isinstance(rz, list) and rz and all(isinstance(x, int) and not isinstance(x, bool) for x in rz):
            bad = [x for x in rz if float(x) not in levels["mesh.seed"]]
            if bad:
                raise ConfigError(f"{f}: material.realizations: seed(s) {bad} were not trained; trained seeds: "
                                  f"{[int(x) for x in levels['mesh.seed']]}")
            seeds = tuple(float(x) for x in rz)
        else:
            raise ConfigError(f"{f}: material.realizations: expected all or a list of trained seeds, got {rz!r}")
        if len(seeds) < 2:
            raise ConfigError(f"{f}: material.realizations: need at least 2 realizations for a spread")
        raw = {**(raw or {}), **({} if raw and "mesh.seed" in raw else {"mesh.seed": int(seeds[0])})}
    if not isinstance(raw, dict):
        raise ConfigError(f"{w}: the checkpoint is parametric; give every parameter as a number or an expression of "
                          f"x, y, z: {{{', '.join(f'{n}: VALUE' for n in names)}}} (trained box "
                          f"{', '.join(f'{n} in [{a:g}, {b:g}]' for n, (a, b) in box.items())})")
    unknown = [str(k) for k in raw if str(k) not in names]
    missing = [n for n in names if n not in {str(k) for k in raw}]
    if unknown or missing:
        raise ConfigError(f"{w}: " + (f"unknown parameter(s) {unknown}; " if unknown else "")
                          + (f"missing {missing}; " if missing else "")
                          + f"the checkpoint's parameters are {list(names)}")
    vals = {str(k): v for k, v in raw.items()}
    numbers = all(isinstance(vals[n], int | float) and not isinstance(vals[n], bool) for n in names)
    fields = {}
    for n in names:
        fields[n] = _compiled(vals[n], {"x", "y", "z", "pi"}, f"{w}.{n}", exprs)

    def values(X):
        X = np.asarray(X, dtype=float)
        z = X[:, 2] if X.shape[1] > 2 else np.zeros(len(X))
        return np.stack([np.broadcast_to(np.asarray(fields[n](x=X[:, 0], y=X[:, 1], z=z, pi=np.pi), dtype=float),
                                         len(X)) for n in names], -1)

    const = np.array([float(vals[n]) for n in names]) if numbers else None
    for n, lv in levels.items():
        if not (isinstance(vals[n], int | float) and not isinstance(vals[n], bool)):
            raise ConfigError(f"{w}.{n}: a realization seed is a trained integer, not a field; trained: "
                              f"{[int(x) for x in lv]}")
        if float(vals[n]) not in lv:
            raise ConfigError(f"{w}.{n}: seed {vals[n]} was not trained (the surrogate knows realizations "
                              f"{[int(x) for x in lv]} only)")
    family = pbox = None
    if const is not None:
        out = [n for n, v in zip(names, const, strict=True) if not box[n][0] <= v <= box[n][1]]
        if out:
            msg = f"{w}: " + ", ".join(f"{n} = {vals[n]:g} outside the trained [{box[n][0]:g}, {box[n][1]:g}]"
                                       for n in out)
            if kind == "surrogate":
                raise ConfigError(msg + "; use material.kind: hybrid (it falls back to the RVE) or retrain on a wider "
                                  "box")
            logging.getLogger("fe2ml").warning(msg + ": the hybrid answers with the RVE of these parameters")
    if "rve" in mat:
        # deferred: the parameter module (micro stage) only for parametric runs
        from fe2ml.micro.parameters import family_fingerprint, parse_parameter_box, rve_with

        pbox = parse_parameter_box(box, mat["rve"], f"{f}: material.rve", base, p)
        family = family_fingerprint(pbox, dim)
        if family != ck.get("rve_fingerprint"):
            raise ConfigError(f"{f}: material.rve: its RVE family {family} differs from the checkpoint's "
                              f"{ck.get('rve_fingerprint')} (give the base RVE of the parametric campaign)")
        if const is not None:
            rve = rve_with(pbox, const, f"{f}: material.rve", dim)
    if kind == "hybrid" and "rve" not in mat:
        raise ConfigError(f"{f}: material.rve: a parametric hybrid needs the base RVE of its campaign")
    if const is None and pbox is not None and (kind == "hybrid" or mat.get("audit") is not None):
        if rve is None or rve.kinematics != "finite":
            raise ConfigError(f"{f}: material.rve: a hybrid run or an audit with a field of parameters needs a "
                              "finite-strain RVE")
    return RunParameters(names=names, box=box, constant=const, values=values, family=family,
                         realizations=seeds, rve_box=pbox), rve


def _loads(raw: dict, f: str, dim: int, exprs: list[Expression]):
    """``bcs``, ``tractions`` and ``pressures`` of a run, their values compiled (and registered in ``exprs``)."""
    bcs = []
    for k, b in enumerate(raw.get("bcs", []) or []):
        w = f"{f}: bcs[{k}]"
        if not isinstance(b, dict):
            raise ConfigError(f"{w}: expected a mapping {{boundary: NAME, components: [0], value: 0.0}}")
        check_keys(b, ("boundary", "components", "value"), w)
        if "boundary" not in b:
            raise ConfigError(f"{w}: missing 'boundary'")
        comps = b.get("components", list(range(dim)))
        if isinstance(comps, int) and not isinstance(comps, bool):
            comps = [comps]
        if not isinstance(comps, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in comps):
            raise ConfigError(f"{w}.components: expected a list of component indices, got {comps!r}")
        bad = [c for c in comps if not 0 <= c < dim]
        if bad:
            raise ConfigError(f"{w}.components: component(s) {bad} do not exist in {dim}D (allowed 0..{dim - 1})")
        bcs.append(DirichletSpec(boundary=str(b["boundary"]), components=tuple(comps),
                                 value=_field(b.get("value", 0.0), f"{w}.value", exprs)))
    trs = []
    for k, b in enumerate(raw.get("tractions", []) or []):
        w = f"{f}: tractions[{k}]"
        if not isinstance(b, dict):
            raise ConfigError(f"{w}: expected a mapping {{boundary: NAME, value: [Tx, Ty]}}")
        check_keys(b, ("boundary", "value"), w)
        val = b.get("value")
        if not isinstance(val, list) or len(val) != dim:
            raise ConfigError(f"{w}.value: expected a list of {dim} numbers or expressions of t, got {val!r}")
        trs.append(TractionSpec(boundary=str(b.get("boundary")),
                                value=tuple(_of_t(v, f"{w}.value", exprs) for v in val)))
    prs = []
    for k, b in enumerate(raw.get("pressures", []) or []):
        w = f"{f}: pressures[{k}]"
        if not isinstance(b, dict):
            raise ConfigError(f"{w}: expected a mapping {{boundary: NAME, value: EXPR(t)}}")
        check_keys(b, ("boundary", "value"), w)
        if "boundary" not in b or "value" not in b:
            raise ConfigError(f"{w}: needs boundary and value")
        prs.append(PressureSpec(boundary=str(b["boundary"]), value=_of_t(b["value"], f"{w}.value", exprs)))
    if not bcs:
        raise ConfigError(f"{f}: bcs: at least one Dirichlet condition is needed to remove rigid motions")
    return bcs, trs, prs


def _compiled(v, names, where, reg: list[Expression]):
    """Compile an expression and register it for :meth:`RunConfig.check_expressions`."""
    if isinstance(v, str) and not v.strip():
        raise ConfigError(f"{where}: empty expression")
    f = compile_expression(v, names, where=where)
    reg.append(Expression(where=where, f=f, names=frozenset(names)))
    return f


def _field(v, where, reg) -> Callable[[np.ndarray, float], np.ndarray]:
    """A Dirichlet value EXPR(x, y, z, t) as ``value(x, t)``, x the coordinates (3, n)."""
    f = _compiled(v, {"x", "y", "z", "t"}, where, reg)
    return lambda x, t: f(x=x[0], y=x[1], z=x[2], t=t)


def _of_t(v, where, reg) -> Callable[[float], float]:
    """A load value EXPR(t) as ``value(t)``."""
    f = _compiled(v, {"t"}, where, reg)
    return lambda t: float(f(t=t))


def _orientation(v, where, dim: int, reg) -> Callable[[np.ndarray], np.ndarray]:
    """``material.orientation`` as frames(X (n, d)) -> Q (n, d, d).

    2D: EXPR(x, y, z, pi), the angle in degrees of the RVE's x axis. 3D: ``{e1: [3 EXPR], e2: [3 EXPR]}``, the
    RVE's x and y axes at each point (orthonormalised, e3 = e1 × e2).
    """
    names = {"x", "y", "z", "pi"}

    def field(f):
        def value(X):
            z = X[:, 2] if X.shape[1] > 2 else np.zeros(len(X))
            return np.broadcast_to(np.asarray(f(x=X[:, 0], y=X[:, 1], z=z, pi=np.pi), dtype=float), len(X))

        return value

    if dim == 2:
        if isinstance(v, dict):
            raise ConfigError(f"{where}: in 2D an angle in degrees (number or expression of x, y, z, pi)")
        return frames_from_angle(field(_compiled(v, names, where, reg)))
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: in 3D a mapping {{e1: [EXPR, EXPR, EXPR], e2: [EXPR, EXPR, EXPR]}}")
    check_keys(v, ("e1", "e2"), where)
    axes = []
    for key in ("e1", "e2"):
        comps = v.get(key)
        if not isinstance(comps, list) or len(comps) != 3:
            raise ConfigError(f"{where}.{key}: expected a list of 3 numbers or expressions of x, y, z, pi")
        fs = [field(_compiled(c, names, f"{where}.{key}", reg)) for c in comps]
        axes.append(lambda X, fs=fs: np.stack([g(X) for g in fs], -1))
    return frames_from_axes(axes[0], axes[1])


def check_boundaries(cfg: RunConfig, names) -> None:
    """Every boundary a condition names exists on the macro mesh (errors name the file and the key)."""
    keyed = [("bcs", [s.boundary for s in cfg.bcs]), ("tractions", [s.boundary for s in cfg.tractions]),
             ("pressures", [s.boundary for s in cfg.pressures])]
    for key, boundaries in keyed:
        for k, name in enumerate(boundaries):
            if name not in names:
                raise ConfigError(f"{cfg.path}: {key}[{k}].boundary: unknown boundary {name!r}; "
                                  f"available: {', '.join(names)}")
