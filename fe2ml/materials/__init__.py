"""Phase materials: linear elastic (small strain) and hyperelastic (finite strain), and their YAML registry.

- :mod:`fe2ml.materials.linear`: stiffness tensors C (d, d, d, d) and the Voigt helpers of printed reports;
- :mod:`fe2ml.materials.hyperelastic`: strain energies W(F) in UFL (neo-Hookean, HGO, expressions, callables);
- :mod:`fe2ml.materials.registry`: material names, their keys, and :func:`build_material` for configs.

The public names are re-exported here: ``from fe2ml.materials import LinearElastic, NeoHookean``.
"""

from fe2ml.materials.hyperelastic import (
    ExpressionEnergy,
    HolzapfelGasserOgden,
    HyperelasticMaterial,
    NeoHookean,
    UFLEnergy,
    fibre_families,
    invariants,
    parse_energy,
    plane_strain_3d,
    same_fibres,
)
from fe2ml.materials.linear import (
    VOIGT_ORDER,
    AnisotropicLinearElastic,
    LinearElastic,
    LinearMaterial,
    TransverselyIsotropic,
    from_voigt,
    isotropic_tensor,
    to_voigt,
)
from fe2ml.materials.registry import HYPERELASTIC, MATERIALS, build_material

__all__ = [
    "HYPERELASTIC",
    "MATERIALS",
    "VOIGT_ORDER",
    "AnisotropicLinearElastic",
    "ExpressionEnergy",
    "HolzapfelGasserOgden",
    "HyperelasticMaterial",
    "LinearElastic",
    "LinearMaterial",
    "NeoHookean",
    "TransverselyIsotropic",
    "UFLEnergy",
    "build_material",
    "from_voigt",
    "fibre_families",
    "invariants",
    "isotropic_tensor",
    "parse_energy",
    "plane_strain_3d",
    "same_fibres",
    "to_voigt",
]
