"""The RVEs of a parametric family on one rank, for runs whose microstructure parameters vary in space.

A hybrid run with a field of parameters falls back, at each point, to the RVE of that point's parameters. Parameters
that change the mesh (``mesh.*``) select it; the others (phase moduli, energy parameters, ``fibre.angle``) are the
values of dolfinx ``Constant`` objects in forms compiled once. So :class:`RVEFamily` builds one RVE per mesh (and per
formulation, which ``auto`` resolves from the moduli) and, before a point's solve, sets its phases' values
(:meth:`~fe2ml.micro.finite.HyperelasticRVE.set_materials`): the answer is that of an RVE built from scratch with
these parameters (:func:`fe2ml.micro.parameters.rve_with`), with no form compiled again.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np

from fe2ml.errors import ConfigError
from fe2ml.micro.config import load_rve_mesh
from fe2ml.micro.finite import HyperelasticRVE, resolve_formulation
from fe2ml.micro.parameters import ParameterBox, rve_with

__all__ = ["RVEFamily"]


class RVEFamily:
    """This rank's RVEs of a parametric family (on ``MPI.COMM_SELF``; meshes generated on demand).

    Args:
        box: the family's parameters and base RVE config (:func:`~fe2ml.micro.parameters.parse_parameter_box`).
        dim: the run's dimension.
        keep: how many RVEs (meshes) are kept; the least recently used one is freed beyond it.
        where: the config location for messages.

    Attributes:
        built: how many RVEs this rank has built (one per mesh and formulation met, again after an eviction).
    """

    def __init__(self, box: ParameterBox, dim: int, *, keep: int = 8, where: str = "material.rve"):
        self.box, self.dim, self.keep, self.where = box, dim, max(1, int(keep)), where
        self._rves: OrderedDict[str, HyperelasticRVE] = OrderedDict()
        self._bound: dict[str, tuple] = {}  # the parameter vector each kept RVE holds now
        self.built = 0

    def rve(self, p) -> HyperelasticRVE:
        """The RVE of parameter vector p (k,), its phases set to p's values.

        Raises:
            ConfigError: the RVE config at p is invalid (e.g. a modulus <= 0) or not finite strain.
        """
        p = self.box.snap(np.asarray(p, dtype=np.float64))
        cfg = rve_with(self.box, p, self.where, self.dim)
        if cfg.kinematics != "finite":
            raise ConfigError(f"{self.where}: a family of RVEs for a hybrid run must be finite strain")
        form = resolve_formulation(list(cfg.materials), cfg.materials, cfg.formulation)
        key = json.dumps([cfg.generator, cfg.generator_params, str(cfg.mesh_file), cfg.cell_phases, form, cfg.degree,
                          cfg.bc, cfg.tol], sort_keys=True, default=str)
        rve = self._rves.get(key)
        if rve is None:
            rve = HyperelasticRVE(load_rve_mesh(cfg), cfg.materials, bc=cfg.bc, formulation=form, degree=cfg.degree,
                                  tol=cfg.tol, newton=cfg.newton, solver=cfg.solver, variable=True)
            self.built += 1
            self._rves[key] = rve
            self._bound[key] = tuple(p)
            while len(self._rves) > self.keep:
                old, gone = self._rves.popitem(last=False)
                self._bound.pop(old, None)
                gone.close()
        else:
            self._rves.move_to_end(key)
            if self._bound.get(key) != tuple(p):
                rve.set_materials(cfg.materials)
                self._bound[key] = tuple(p)
        return rve

    def close(self) -> None:
        """Free every RVE's PETSc objects."""
        for rve in self._rves.values():
            rve.close()
        self._rves.clear()
        self._bound.clear()
