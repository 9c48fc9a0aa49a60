"""YAML configuration: loading and validation up front.

Errors name the file, the key (dotted path) and what was expected, and are raised as
:class:`fe2ml.errors.ConfigError` before any expensive work starts. Relative paths in a config
are relative to the config file's folder.

``homogenize`` config keys (see README for the full reference):

    dim: 2 | 3                              required
    mesh: {file: PATH, cell_phases: [..]}   or {generate: NAME, out_dir: PATH, <generator params>}
    phases: {TAG: {material: NAME, ...}}    one material per phase tag
    bc: periodic | affine | traction        default periodic
    degree: 1 | 2                           default 1
    strains: [[..], ..]                     optional list of macro strains (d x d) to report σ̄ for
    tol: float                              periodic node matching tolerance (relative), default 1e-8
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fe2ml.errors import ConfigError, MaterialError

__all__ = ["HomogenizeConfig", "build_material", "load_homogenize_config", "load_rve_mesh", "load_yaml"]

MATERIALS = {
    "linear_elastic": {"required": ("E", "nu"), "optional": ()},
    "anisotropic": {"required": ("C",), "optional": ()},
    "transversely_isotropic": {"required": ("E_L", "E_T", "nu_LT", "nu_TT", "G_LT"), "optional": ("direction",)},
}


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, with a clear error for a missing file or malformed YAML."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        with open(p) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _type_name(v) -> str:
    return type(v).__name__


def _number(v, where: str, *, positive=False) -> float:
    if isinstance(v, str):  # YAML 1.1 reads 7.0e9 (no sign in the exponent) as a string
        try:
            v = float(v)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {v!r} (str)") from None
    if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
        raise ConfigError(f"{where}: expected a number, got {v!r} ({_type_name(v)})")
    if positive and v <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {v!r}")
    return float(v)


def _check_keys(d: dict, allowed, where: str) -> None:
    unknown = sorted(str(k) for k in d if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def build_material(spec: Any, where: str):
    """Create a material from its config mapping ``{material: NAME, ...parameters}``.

    Args:
        spec: the mapping.
        where: location for error messages (``file: phases.2``).

    Returns:
        A material object with ``stiffness(d)``.
    """
    from fe2ml.materials import AnisotropicLinearElastic, LinearElastic, TransverselyIsotropic

    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping like {{material: linear_elastic, E: 1.0, nu: 0.3}}, "
                          f"got {spec!r}")
    name = spec.get("material")
    if name not in MATERIALS:
        raise ConfigError(f"{where}.material: unknown material {name!r}; allowed: {', '.join(MATERIALS)}")
    req, opt = MATERIALS[name]["required"], MATERIALS[name]["optional"]
    _check_keys(spec, ("material", *req, *opt), where)
    miss = [k for k in req if k not in spec]
    if miss:
        raise ConfigError(f"{where}: material {name} needs key(s) {', '.join(miss)}")
    try:
        if name == "linear_elastic":
            return LinearElastic(E=_number(spec["E"], f"{where}.E"), nu=_number(spec["nu"], f"{where}.nu"),
                                 name=where)
        if name == "anisotropic":
            try:
                C = np.asarray([[_number(x, f"{where}.C") for x in row] for row in spec["C"]], dtype=float)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.C: expected a 6x6 list of numbers (Voigt, order 11,22,33,23,13,12)") \
                    from None
            if C.shape != (6, 6):
                raise ConfigError(f"{where}.C: expected a 6x6 Voigt matrix (order 11,22,33,23,13,12), "
                                  f"got shape {C.shape}")
            return AnisotropicLinearElastic(C=C, name=where)
        kw = {k: _number(spec[k], f"{where}.{k}") for k in req}
        if "direction" in spec:
            kw["direction"] = spec["direction"]
        return TransverselyIsotropic(**kw, name=where)
    except MaterialError as e:
        raise MaterialError(str(e)) from None


@dataclass
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
    from fe2ml.micro.geometry import GENERATORS
    from fe2ml.micro.rve import BCS

    p = Path(path)
    raw = load_yaml(p)
    f = str(p)
    _check_keys(raw, ("dim", "mesh", "phases", "bc", "degree", "strains", "tol"), f)
    for k in ("dim", "mesh", "phases"):
        if k not in raw:
            raise ConfigError(f"{f}: missing required key '{k}'")
    dim = raw["dim"]
    if dim not in (2, 3) or isinstance(dim, bool):
        raise ConfigError(f"{f}: dim: expected 2 or 3, got {dim!r}")
    base = p.parent
    mesh = raw["mesh"]
    if not isinstance(mesh, dict):
        raise ConfigError(f"{f}: mesh: expected a mapping {{file: PATH}} or {{generate: NAME, ...}}, got {mesh!r}")
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
        _check_keys(mesh, ("file", "cell_phases"), f"{f}: mesh")
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
    degree = raw.get("degree", 1)
    if degree not in (1, 2) or isinstance(degree, bool):
        raise ConfigError(f"{f}: degree: expected 1 or 2, got {degree!r}")
    tol = _number(raw.get("tol", 1e-8), f"{f}: tol", positive=True)
    strains = raw.get("strains", [])
    if not isinstance(strains, list):
        raise ConfigError(f"{f}: strains: expected a list of {dim}x{dim} matrices, got {strains!r}")
    out = []
    for k, s in enumerate(strains):
        try:
            a = np.asarray(s, dtype=float)
        except (TypeError, ValueError):
            a = np.zeros(0)
        if a.shape != (dim, dim) or not np.all(np.isfinite(a)):
            raise ConfigError(f"{f}: strains[{k}]: expected a {dim}x{dim} list of numbers, got {s!r}")
        out.append(a)
    return HomogenizeConfig(path=p, dim=dim, mesh_file=mesh_file, generator=gen, generator_params=gparams,
                            generator_out=gout, cell_phases=cell_phases, materials=materials, bc=bc,
                            degree=degree, strains=out, tol=tol)


def load_rve_mesh(cfg: HomogenizeConfig, *, comm=None):
    """Read or generate the RVE mesh of a config and check it against the config.

    Args:
        cfg: validated config.
        comm: optional communicator (generation on rank 0 only).

    Returns:
        The :class:`fe2ml.micro.mesh.RVEMesh`.
    """
    from fe2ml.errors import MeshError
    from fe2ml.micro.geometry import generate_mesh
    from fe2ml.micro.mesh import read_mesh

    f = str(cfg.path)
    if cfg.generator is not None:
        path = generate_mesh(cfg.generator, cfg.generator_params, cfg.generator_out, comm=comm)
    else:
        path = cfg.mesh_file
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

