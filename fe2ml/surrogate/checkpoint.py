"""Using a trained surrogate: loading and checking checkpoints, the ensemble evaluator, the localization network.

Deploying a model (a macro run, localization, export) imports this module and never the trainer.

Checkpoint (``torch.save`` dict, ``format_version`` 2): model kind and arguments, the members' weights,
normalisation buffers, dim, kinematics, RVE fingerprint, training-data fingerprint, metrics, bounds of
the training data (feature box, principal stretch and J ranges), and what the uncertainty gate of a hybrid run
needs (:class:`Gate`):

- ``stress_floor``: a fixed stress scale (5 % of the RMS of |P̄| over the training records); per-point relative
  quantities are taken relative to |P̄| + floor, so they do not depend on which other points share a rank;
- ``density``: the training records in normalised feature space (the points of a KD-tree) and the 99th percentile
  of their nearest-neighbour distances (the data-density scale);
- ``calibration`` (ensembles of 2 or more): how the per-point ensemble spread predicts the true per-point error,
  fitted on the validation split and measured on the test split (coverage for k = 1, 2, 3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fe2ml.errors import ConfigError
from fe2ml.surrogate.models import MLP, PotentialModel, build_model

__all__ = ["FORMAT_VERSION", "EnsembleModel", "LocalizationNet", "build_localization_model", "check_checkpoint",
           "load_checkpoint", "resolve_device"]

FORMAT_VERSION = 2

def resolve_device(spec: str, where: str = "device") -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:k`` as a torch device.

    Raises:
        ConfigError: an unknown name, or CUDA requested on a machine without it (or without device k).
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: {spec} requested, but this machine has no CUDA device "
                              "(torch.cuda.is_available() is False); use cpu or auto")
        k = int(spec[5:]) if ":" in spec else 0
        if k >= torch.cuda.device_count():
            raise ConfigError(f"{where}: {spec} requested, but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s)")
        return torch.device(spec)
    raise ConfigError(f"{where}: expected auto, cpu, cuda or cuda:K, got {spec!r}")


class EnsembleModel:
    """K members of one architecture: mean prediction and spread."""

    def __init__(self, members, *, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.members = [m.to(self.device) for m in members]
        self.dim = members[0].dim
        self.kinematics = members[0].kinematics
        # closed forms in numpy on the CPU (None: the torch path, which runs on the members' device)
        self._np = [m.numpy_evaluator() if self.device.type == "cpu" else None for m in self.members]

    def fast_evaluator(self):
        """The single member's numpy closed form F (n,d,d) -> (P, A), or None (several members or no closed form).

        The fast path of a one-member surrogate law: no ensemble bookkeeping, no torch per-call overhead.
        """
        return self._np[0] if len(self.members) == 1 else None

    @classmethod
    def from_states(cls, kind, dim, kinematics, margs, states, *, device: torch.device | str = "cpu"):
        """Build members from state dicts (on ``device``)."""
        ms = []
        for st in states:
            m = build_model(kind, dim, kinematics, **margs)
            m.load_state_dict(st)
            m.eval()
            ms.append(m)
        return cls(ms, device=device)

    def evaluate_members(self, F):
        """Per-member predictions: lists of (n,d,d) and (n,d,d,d,d) arrays."""
        out = []
        for m, f in zip(self.members, self._np, strict=True):
            if f is None:
                out.append(m.evaluate(F))
            else:  # numpy closed form in chunks (cache friendly, no torch overhead for small batches)
                F = np.asarray(F, dtype=np.float64)
                parts = [f(F[i:i + 1024]) for i in range(0, len(F), 1024)] or [f(F)]  # f(F) for no points
                out.append((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))
        return [o[0] for o in out], [o[1] for o in out]

    def evaluate(self, F):
        """Mean P (n,d,d) and A (n,d,d,d,d)."""
        Ps, As = self.evaluate_members(F)
        return np.mean(Ps, axis=0), np.mean(As, axis=0)

    def spread(self, F) -> float:
        """Median relative spread (std over members / RMS stress) on the given points (0 for K = 1)."""
        if len(self.members) < 2 or len(F) == 0:
            return 0.0
        Ps, _ = self.evaluate_members(F)
        Ps = np.array(Ps)
        scale = np.sqrt(np.mean(Ps**2))
        return float(np.median(Ps.std(axis=0).reshape(len(F), -1).max(axis=1)) / max(scale, 1e-300))


def load_checkpoint(path) -> dict:
    """Load a checkpoint with clear errors (missing, unreadable, wrong format)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: checkpoint not found")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{p}: not a readable checkpoint ({msg})") from None
    if isinstance(ck, dict) and ck.get("format_version") in (1,) and ck.get("model", {}).get("kind") != "localization":
        raise ConfigError(f"{p}: checkpoint of format {ck['format_version']}, without the data this fe2ml needs to "
                          f"gate the surrogate (format {FORMAT_VERSION}); retrain it with fe2ml train")
    if not isinstance(ck, dict) or ck.get("format_version") not in (1, FORMAT_VERSION):
        raise ConfigError(f"{p}: not an fe2ml surrogate checkpoint of format {FORMAT_VERSION}")
    return ck


def check_checkpoint(ck: dict, path, *, dim: int, kinematics: str | None = None,
                     fingerprint: str | None = None) -> None:
    """Refuse a checkpoint of another dimension, kinematics (when given) or RVE fingerprint (when given)."""
    if ck["dim"] != dim:
        raise ConfigError(f"{path}: checkpoint is for {ck['dim']}D, the run is {dim}D")
    if kinematics is not None and ck["kinematics"] != kinematics:
        raise ConfigError(f"{path}: checkpoint is for {ck['kinematics']} strain, the run is {kinematics}")
    if fingerprint is not None and ck["rve_fingerprint"] != fingerprint:
        raise ConfigError(f"{path}: checkpoint was trained on RVE {ck['rve_fingerprint']}, the run's RVE is "
                          f"{fingerprint}")


class LocalizationNet:
    """Localization network: strain features of F̄ -> (largest principal stretch − 1, J − 1) per cell."""

    def __init__(self, dim, n_cells, hidden, kinematics="finite"):
        self.feat = PotentialModel(dim, kinematics, hidden=(2,))  # only for its objective strain features
        self.n_in = len(self.feat.idx)
        self.net = MLP(self.n_in, list(hidden), 2 * n_cells).double()
        self.n_cells = n_cells
        self.x_scale = torch.ones(self.n_in)
        self.y_mean = torch.zeros(2 * n_cells)
        self.y_scale = torch.ones(2 * n_cells)

    def features(self, F):
        """Objective strain features of F̄ (n, d, d) as a tensor (n, n_in)."""
        return self.feat.features_of(torch.as_tensor(np.asarray(F, dtype=np.float64))).detach()

    def forward(self, F):
        """Network output (n, 2 c): largest principal stretch − 1 and J − 1 of every cell."""
        return self.net(self.features(F) / self.x_scale) * self.y_scale + self.y_mean

    def predict(self, F) -> dict:
        """{"stretch": (n, c), "J": (n, c)}."""
        with torch.no_grad():
            out = []
            for i in range(0, len(F), 65536):
                out.append(self.forward(F[i:i + 65536]).numpy())
            y = np.concatenate(out) if out else np.zeros((0, 2 * self.n_cells))
        c = self.n_cells
        return {"stretch": 1.0 + y[:, :c], "J": 1.0 + y[:, c:]}


def build_localization_model(ck) -> LocalizationNet:
    """Rebuild a localization network from its checkpoint."""
    m = LocalizationNet(ck["dim"], ck["n_cells"], ck["model"]["hidden"], ck["kinematics"])
    m.net.load_state_dict(ck["members"][0])
    m.x_scale = torch.as_tensor(ck["x_scale"])
    m.y_mean = torch.as_tensor(ck["y_mean"])
    m.y_scale = torch.as_tensor(ck["y_scale"])
    return m
