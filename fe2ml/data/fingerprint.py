"""RVE fingerprints: a hash of everything that determines an RVE's response.

mesh (coordinates, connectivity, phases, cell ids), materials (type and parameters), boundary
conditions, kinematics and discretisation (formulation, degree). Two RVEs with the same fingerprint
give the same P̄(F̄) up to solver tolerance; logs never mix fingerprints in one file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json

import numpy as np

from fe2ml.micro.finite import HyperelasticRVE
from fe2ml.micro.linear import LinearRVE

__all__ = ["material_description", "rve_description", "rve_fingerprint"]


def material_description(m) -> dict:
    """JSON-able description of a material (type name and parameters)."""
    out = {"type": type(m).__name__}
    if dataclasses.is_dataclass(m):
        for f in dataclasses.fields(m):
            if f.name.startswith("_") or f.name == "name":  # labels do not change the response
                continue
            v = getattr(m, f.name)
            if callable(v):
                try:
                    v = inspect.getsource(v)
                except (OSError, TypeError):
                    v = getattr(v, "__qualname__", repr(v))
            elif isinstance(v, np.ndarray):
                v = np.round(v, 12).tolist()
            out[f.name] = v
    else:
        out["repr"] = repr(m)
    return json.loads(json.dumps(out, default=lambda o: np.asarray(o).tolist() if hasattr(o, "__len__") else str(o)))


def rve_description(rve: LinearRVE | HyperelasticRVE) -> dict:
    """JSON-able description of an RVE object (LinearRVE or HyperelasticRVE)."""
    mesh = rve.rve_mesh
    h = hashlib.sha256()
    for a in (mesh.points, mesh.cells, mesh.phases, mesh.cell_ids):
        arr = np.ascontiguousarray(a)
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(np.round(arr, 12).tobytes() if arr.dtype.kind == "f" else arr.tobytes())
    return {
        "mesh_sha256": h.hexdigest(),
        "mesh_source": str(mesh.source),
        "cell_type": mesh.cell_type,
        "n_elements": int(len(mesh.cells)),
        "n_cells": int(mesh.n_cells),
        "phase_tags": [int(t) for t in mesh.tags],
        "dim": int(rve.d),
        "materials": {str(t): material_description(m) for t, m in sorted(rve.materials.items())},
        "bc": rve.bc,
        "kinematics": "finite" if isinstance(rve, HyperelasticRVE) else "small",
        "formulation": rve.formulation if isinstance(rve, HyperelasticRVE) else "displacement",
        "degree": int(rve.degree),
    }


def rve_fingerprint(rve: LinearRVE | HyperelasticRVE) -> str:
    """SHA-256 (first 16 hex digits) of :func:`rve_description` without the mesh source path."""
    desc = rve_description(rve)
    desc.pop("mesh_source")
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
