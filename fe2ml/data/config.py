"""``fe2ml sample`` configuration: the RVE, the design, the output folder; validated up front.

Keys::

    rve: {homogenize keys} | PATH            the RVE to sample
    design: {method, n, seed, space, bounds, symmetric, stretch, rotation, volume, paths}   see data/design.py
    output: PATH                              log folder (default rve_data/<config name>)
    flush_every: int                          records per flush of each part (default 64)
    cells: true                               log cell quantities (finite strain)
    parameters: {NAME: [lo, hi], ...}         a family of RVEs (micro/parameters.py): phases.2.mu, mesh.seed, ...
    parameter_sets: int                       parameter vectors, a scrambled Sobol design over the box (default 8);
                                              the space-filling F̄ points are dealt to them in turn (point i to set
                                              i mod M), every named path runs at every set
    parameter_points: dealt | shared          shared: every set runs every F̄ point (a paired design: the sets'
                                              differences are seen at the same F̄, e.g. realizations mesh.seed)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fe2ml.config import check_keys, flag, load_yaml, number
from fe2ml.data.design import design_points
from fe2ml.errors import ConfigError
from fe2ml.micro.config import LOAD_PATHS, HomogenizeConfig, parse_rve_ref
from fe2ml.micro.parameters import ParameterBox, parameter_sets, parse_parameter_box, rve_with

__all__ = ["RunLogOptions", "SampleConfig", "load_sample_config", "parse_run_log"]


@dataclass(frozen=True)
class SampleConfig:
    """Validated ``fe2ml sample`` configuration."""

    path: Path
    rve: HomogenizeConfig
    design: dict
    output: Path
    flush_every: int
    cells: bool
    text: str
    parameters: ParameterBox | None = None
    parameter_sets: int = 0
    parameter_points: str = "dealt"


def load_sample_config(path, *, output: str | None = None) -> SampleConfig:
    """Load and validate a ``sample`` YAML file (errors name the file and key)."""
    p = Path(path)
    raw = load_yaml(p)
    f = str(p)
    check_keys(raw, ("rve", "design", "output", "flush_every", "cells", "parameters", "parameter_sets",
                     "parameter_points"), f)
    if "rve" not in raw or "design" not in raw:
        raise ConfigError(f"{f}: missing required key '{'rve' if 'rve' not in raw else 'design'}'")
    rve = parse_rve_ref(raw["rve"], p, f"{f}: rve", p.parent, None)
    ds = raw["design"]
    w = f"{f}: design"
    if not isinstance(ds, dict):
        raise ConfigError(f"{w}: expected a mapping {{method: sobol, n: 256, bounds: [-0.2, 0.2]}}")
    check_keys(ds, ("method", "n", "seed", "space", "bounds", "symmetric", "stretch", "rotation", "volume", "paths"),
                w)
    method = ds.get("method", "sobol")
    if method not in ("sobol", "lhs", "none"):
        raise ConfigError(f"{w}.method: unknown sampling method {method!r}; allowed: sobol, lhs, none")
    n = ds.get("n", 0 if method == "none" else 64)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > 10_000_000:
        raise ConfigError(f"{w}.n: expected a non-negative integer, got {n!r}")
    seed = ds.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{w}.seed: expected an integer, got {seed!r}")
    space = ds.get("space", "gradient")
    if space not in ("gradient", "stretch"):
        raise ConfigError(f"{w}.space: expected gradient or stretch, got {space!r}")
    d = rve.dim
    bounds = ds.get("bounds", [-0.1, 0.1])
    try:
        b = np.asarray(bounds, dtype=float)
    except (TypeError, ValueError):
        b = np.zeros(0)
    if b.shape not in ((2,), (d, d, 2)) or not np.all(np.isfinite(b)) or np.any(b[..., 0] > b[..., 1]):
        raise ConfigError(f"{w}.bounds: expected [lo, hi] (lo <= hi) or a {d}x{d} list of [lo, hi], got {bounds!r}")
    sym = flag(ds.get("symmetric", False), f"{w}.symmetric")
    st = ds.get("stretch", [0.8, 1.25])
    rot = ds.get("rotation", [0.0, 0.0])
    for key, val in (("stretch", st), ("rotation", rot)):
        if not (isinstance(val, list) and len(val) == 2):
            raise ConfigError(f"{w}.{key}: expected [lo, hi], got {val!r}")
        number(val[0], f"{w}.{key}")
        number(val[1], f"{w}.{key}")
        if float(val[0]) > float(val[1]):
            raise ConfigError(f"{w}.{key}: lo > hi in {val!r}")
    if float(st[0]) <= 0:
        raise ConfigError(f"{w}.stretch: principal stretches must be > 0, got {st!r}")
    vol = ds.get("volume")
    if vol is not None:
        if space != "stretch":
            raise ConfigError(f"{w}.volume: only for space: stretch (it sets the last principal stretch)")
        if not (isinstance(vol, list) and len(vol) == 2):
            raise ConfigError(f"{w}.volume: expected [lo, hi] of det F̄, got {vol!r}")
        vol = [number(vol[0], f"{w}.volume", positive=True), number(vol[1], f"{w}.volume", positive=True)]
        if vol[0] > vol[1]:
            raise ConfigError(f"{w}.volume: lo > hi in {vol!r}")
    paths = []
    for k, pth in enumerate(ds.get("paths", []) or []):
        pw = f"{w}.paths[{k}]"
        if not isinstance(pth, dict):
            raise ConfigError(f"{pw}: expected {{type: uniaxial, max: 0.3, steps: 10}}")
        check_keys(pth, ("type", "max", "steps"), pw)
        if pth.get("type") not in LOAD_PATHS:
            raise ConfigError(f"{pw}.type: expected one of {', '.join(LOAD_PATHS)}, got {pth.get('type')!r}")
        stp = pth.get("steps", 10)
        if not isinstance(stp, int) or isinstance(stp, bool) or stp < 1:
            raise ConfigError(f"{pw}.steps: expected a positive integer, got {stp!r}")
        paths.append({"type": pth["type"], "max": number(pth.get("max", 0.2), f"{pw}.max"), "steps": stp})
    design = {"method": method, "n": n if method != "none" else 0, "seed": seed, "space": space,
              "bounds": b.tolist(), "symmetric": sym, "stretch": [float(x) for x in st],
              "rotation": [float(x) for x in rot], "paths": paths}
    if vol is not None:  # (absent otherwise: campaign ids of designs without it stay the same)
        design["volume"] = vol
    if design["n"] == 0 and not paths:
        raise ConfigError(f"{w}: the design is empty (n = 0 and no paths)")
    F, _ = design_points(design, d)
    det = np.linalg.det(F)
    if np.any(det <= 0):
        k = int(np.argmin(det))
        raise ConfigError(f"{w}: bounds give det F̄ <= 0 at {int(np.sum(det <= 0))} of {len(F)} design points "
                          f"(first: point {k}, det = {det[k]:.3g}); narrow the bounds")
    fl = raw.get("flush_every", 64)
    if not isinstance(fl, int) or isinstance(fl, bool) or fl < 1:
        raise ConfigError(f"{f}: flush_every: expected a positive integer, got {fl!r}")
    cells = flag(raw.get("cells", True), f"{f}: cells")
    out = output if output is not None else raw.get("output", str(Path("rve_data") / p.stem))
    if not isinstance(out, str):
        raise ConfigError(f"{f}: output: expected a folder path, got {out!r}")
    box, sets = None, 0
    points = raw.get("parameter_points", "dealt")
    if points not in ("dealt", "shared"):
        raise ConfigError(f"{f}: parameter_points: expected dealt or shared, got {points!r}")
    if raw.get("parameters") is not None:
        box = parse_parameter_box(raw["parameters"], raw["rve"], f"{f}: parameters", p.parent, p)
        sets = raw.get("parameter_sets", 8)
        if not isinstance(sets, int) or isinstance(sets, bool) or not 1 <= sets <= 4096:
            raise ConfigError(f"{f}: parameter_sets: expected an integer in 1..4096, got {sets!r}")
        if design["n"] and design["n"] < sets and points == "dealt":
            raise ConfigError(f"{f}: parameter_sets: {sets} sets but design.n = {design['n']} points; every set needs "
                              "at least one point (n >= parameter_sets)")
        for k, pv in enumerate(parameter_sets(box, sets, design["seed"])):
            rve_with(box, pv, f"{f}: parameter set {k}", rve.dim)
    elif "parameter_sets" in raw or "parameter_points" in raw:
        key = "parameter_sets" if "parameter_sets" in raw else "parameter_points"
        raise ConfigError(f"{f}: {key} without parameters; give parameters: {{NAME: [lo, hi]}}")
    return SampleConfig(path=p, rve=rve, design=design, output=Path(out) if output is not None else p.parent / out,
                        flush_every=fl, cells=cells, text=p.read_text(), parameters=box, parameter_sets=sets,
                        parameter_points=points)


@dataclass(frozen=True)
class RunLogOptions:
    """``log:`` of a run: where its RVE evaluations are logged, and what.

    Attributes:
        folder: the log folder (resolved).
        all_iterations: log every Newton iteration's evaluations (default: the converged ones only).
        cells: log the cell-level quantities too.
    """

    folder: Path
    all_iterations: bool = False
    cells: bool = True


def parse_run_log(raw, where: str, base: Path) -> RunLogOptions:
    """Validate a run's ``log:`` mapping (errors name ``where`` and the key)."""
    if not isinstance(raw, dict) or "folder" not in raw:
        raise ConfigError(f"{where}: expected a mapping {{folder: PATH, all_iterations: false, cells: true}}")
    check_keys(raw, ("folder", "all_iterations", "cells"), where)
    return RunLogOptions(folder=base / str(raw["folder"]),
                         all_iterations=flag(raw.get("all_iterations", False), f"{where}.all_iterations"),
                         cells=flag(raw.get("cells", True), f"{where}.cells"))
