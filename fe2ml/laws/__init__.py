"""Constitutive laws at macro quadrature points, all behind one contract (:mod:`fe2ml.laws.base`).

- :mod:`fe2ml.laws.rve`: nested FE² (:class:`~fe2ml.laws.rve.RVELaw`) and the linear RVE's C̄
  (:class:`~fe2ml.laws.rve.LinearRVELaw`);
- :mod:`fe2ml.laws.surrogate`: a trained surrogate (:class:`~fe2ml.laws.surrogate.SurrogateLaw`) and the hybrid that
  falls back to the RVE where the surrogate is unsure (:class:`~fe2ml.laws.surrogate.HybridLaw`); imports torch;
- :mod:`fe2ml.laws.analytic`: single-scale materials in UFL (:class:`~fe2ml.laws.analytic.AnalyticLaw`).
"""

from fe2ml.laws.base import ConstitutiveLaw, FormLaw, PointFailure, new_stats

__all__ = ["ConstitutiveLaw", "FormLaw", "PointFailure", "new_stats"]
