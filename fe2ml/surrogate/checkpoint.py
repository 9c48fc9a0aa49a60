"""Using a trained surrogate: loading and checking checkpoints, the ensemble evaluator, the localization network.

Deploying a model (a macro run, localization, export) imports this module and never the trainer.

Checkpoint (``format_version`` 3): a dict of tensors, numbers, strings, None and plain containers only, written by
:func:`save_checkpoint` and read by :func:`load_checkpoint` with ``torch.load(weights_only=True)`` (or without torch by
:func:`fe2ml.surrogate.deploy.read_checkpoint`), so that loading a file from anyone never runs code (numpy arrays are
stored as tensors and come back as numpy arrays). It holds:
model kind and arguments, the members' weights,
normalisation buffers, dim, kinematics, RVE fingerprint, training-data fingerprint, metrics, bounds of
the training data (feature box, principal stretch and J ranges), and what the uncertainty gate of a hybrid run
needs (:class:`Gate`):

- ``stress_floor``: a fixed stress scale (5 % of the RMS of |P̄| over the training records); per-point relative
  quantities are taken relative to |P̄| + floor, so they do not depend on which other points share a rank;
- ``density``: the training records in normalised feature space (the points of a KD-tree) and the 99th percentile
  of their nearest-neighbour distances (the data-density scale);
- ``calibration`` (ensembles of 2 or more): how the per-point ensemble spread predicts the true per-point error,
  fitted on the validation split and measured on the test split (coverage for k = 1, 2, 3); with enough validation
  points also per bin of the predicted stress magnitude (``bins``, Mondrian split-conformal).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from fe2ml.errors import ConfigError
from fe2ml.files import atomic_target
from fe2ml.surrogate.deploy import (
    FORMAT_VERSION,
    RESAVE_HINT,
    check_checkpoint,
    check_format,
    gate_pass,
    one_for_all,
)
from fe2ml.surrogate.gate import rows_equal
from fe2ml.surrogate.models import (
    CPU_CHUNK,
    MLP,
    PotentialModel,
    build_model,
    chunked,
    stress_parameter_derivative,
    with_parameters,
)

__all__ = ["FORMAT_VERSION", "EnsembleModel", "LocalizationNet", "build_localization_model", "check_checkpoint",
           "load_checkpoint", "resave_checkpoint", "resolve_device", "save_checkpoint"]


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
        self.parameters: list[str] = list(getattr(members[0], "parameters_", []))
        self._p: np.ndarray | None = None
        self._bound: list | None = None  # closed forms of the members at constant bound parameters
        self._bound_fd: list | None = None

    def bind(self, p) -> None:
        """The microstructure parameters of the points evaluated from now on (parametric members only).

        ``p``: (k,) for every point, or (n, k) for the n points of each later call (a field of parameters).
        """
        p = np.asarray(p, dtype=np.float64)
        if p.shape[-1:] != (len(self.parameters),) or p.ndim > 2:
            raise ValueError(f"parameters: expected {len(self.parameters)} value(s) per point "
                             f"({', '.join(self.parameters)}), got shape {p.shape}")
        self._p = p
        # constant parameters: every member folds them into a plain network with the closed form (far faster than
        # automatic differentiation); a field of parameters stays on the autograd path
        self._bound = ([m.bound(p).numpy_evaluator() for m in self.members]
                       if p.ndim == 1 and self.device.type == "cpu" else None)
        self._bound_fd = None  # (step, members at p + step e_j, at p − step e_j) per parameter j, built on demand

    def augment(self, F) -> np.ndarray:
        """F (n, d, d) with the bound parameters appended (a non-parametric ensemble: F itself)."""
        F = np.asarray(F, dtype=np.float64)
        if not self.parameters or F.shape[-1] != self.dim:
            return F
        if self._p is None:
            raise ValueError(f"a parametric surrogate needs its parameters ({', '.join(self.parameters)}): bind them "
                             "first")
        if self._p.ndim == 2 and len(self._p) != len(F):
            raise ValueError(f"{len(self._p)} parameter vectors are bound for {len(F)} points")
        return with_parameters(F, self._p)

    @classmethod
    def from_states(cls, kind, dim, kinematics, margs, states, *, device: torch.device | str = "cpu"):
        """Build members from state dicts (on ``device``)."""
        ms = []
        for st in states:  # a checkpoint read without torch holds numpy arrays
            m = build_model(kind, dim, kinematics, **margs)
            m.load_state_dict({k: torch.as_tensor(v) for k, v in st.items()})
            m.eval()
            ms.append(m)
        return cls(ms, device=device)

    def features(self, F) -> np.ndarray:
        """The unscaled network inputs of each point (with the bound parameters), (n, m)."""
        x = torch.as_tensor(np.ascontiguousarray(self.augment(F))).to(self.device)
        return self.members[0].features_of(x).detach().to("cpu", torch.float64).numpy()

    def _evaluators(self, F):
        """F as the evaluators take it, and the members' numpy closed forms (None: the torch path).

        At constant bound parameters: the plain F and the closed forms of the folded members.
        """
        if self._bound is not None and np.shape(F)[-1] == self.dim:
            return np.asarray(F, dtype=np.float64), self._bound
        return self.augment(F), self._np

    def evaluate_members(self, F):
        """Per-member predictions: lists of (n,d,d) and (n,d,d,d,d) arrays."""
        F, evs = self._evaluators(F)
        out = []
        for m, f in zip(self.members, evs, strict=True):
            if f is None:
                out.append(m.evaluate(F))
            else:  # numpy closed form in chunks (cache friendly, no torch overhead for small batches)
                out.append(chunked(f, np.asarray(F, dtype=np.float64)))
        return [o[0] for o in out], [o[1] for o in out]

    def evaluate(self, F):
        """Mean P (n,d,d) and A (n,d,d,d,d)."""
        P, A, _, _ = self.evaluate_gate(F)
        return P, A

    def evaluate_gate(self, F, chunk: int = CPU_CHUNK, *, tangent: bool = True, out: np.ndarray | None = None):
        """What a gate needs, chunk by chunk: the mean P and A, the members' stresses and the finite points.

        Returns mean P (n,d,d), mean A (n,d,d,d,d) (None unless ``tangent``), the members' stresses Ps (K,n,d,d) and
        which points every member answered with a finite P (and A) (n,).

        On the CPU the members' closed forms share the features of a chunk, and the mean tangent comes from the
        members' mean feature-space derivatives by one chain rule (:class:`~fe2ml.surrogate.closed_form.ClosedForm`);
        ``tangent=False`` is a stress-only pass (no Hessian), about a third of the cost. ``out``: an (n,d,d,d,d) array
        that receives the mean tangent (a caller's reused buffer).

        Memory: as :func:`fe2ml.surrogate.deploy.gate_pass` on the CPU.
        """
        F, evs = self._evaluators(F)
        n, d, K = len(F), self.dim, len(self.members)
        if any(f is None for f in evs):  # an accelerator: the members' torch path in its own large chunks
            if rows_equal(F):  # one evaluation serves every point (e.g. F̄ = I before the first load step)
                return one_for_all(self.evaluate_gate(F[:1], chunk, tangent=tangent), n, out)
            P = np.empty((n, d, d))
            A = np.empty(0)
            Ps, ok = np.empty((K, n, d, d)), np.ones(n, dtype=bool)
            for k, m in enumerate(self.members):
                Pk, Ak = m.evaluate(F)
                Ps[k] = Pk
                ok &= np.isfinite(Pk.sum(axis=(1, 2)))
                if tangent:
                    ok &= np.isfinite(Ak.sum(axis=(1, 2, 3, 4)))
                    A = Ak if k == 0 else A + Ak
            P[:] = Ps.mean(axis=0)
            if tangent and out is not None:
                out[:] = A / K
                return P, out, Ps, ok
            return P, (A / K if tangent else None), Ps, ok
        return gate_pass(F, evs, d, chunk, tangent=tangent, out=out)

    def parameter_derivative(self, F) -> np.ndarray:
        """Mean ∂P/∂p (n, d, d, k) over the members at F (with the bound parameters).

        At constant bound parameters: central differences of the folded closed forms (step 1e-5 of each
        parameter's scale; a categorical parameter's derivative is 0 either way), far cheaper than automatic
        differentiation; otherwise automatic differentiation.
        """
        if not self.parameters:
            raise ValueError("the surrogate is not parametric: it has no parameter derivative")
        if self._bound is not None and self._p is not None and np.shape(F)[-1] == self.dim:
            F = np.asarray(F, dtype=np.float64)
            p = self._p
            if self._bound_fd is None:  # built once per bound p, reused at every load step
                m0 = self.members[0]
                self._bound_fd = []
                for j in range(len(p)):
                    h = 1e-5 * float(m0.x_scale[m0.n_in + j])
                    evs = []
                    for sign in (1.0, -1.0):
                        q = p.copy()
                        q[j] += sign * h
                        evs.append([m.bound(q).numpy_evaluator() for m in self.members])
                    self._bound_fd.append((h, *evs))
            out = np.zeros((*F.shape, len(p)))
            for j, (h, plus, minus) in enumerate(self._bound_fd):
                Pp = np.mean([chunked(f, F)[0] for f in plus], axis=0)
                Pm = np.mean([chunked(f, F)[0] for f in minus], axis=0)
                out[..., j] = (Pp - Pm) / (2.0 * h)
            return out
        F = self.augment(F)
        x = torch.as_tensor(F, device=self.device)
        return np.mean([stress_parameter_derivative(m, x).cpu().numpy() for m in self.members], axis=0)

    def spread(self, F) -> float:
        """Median relative spread (std over members / RMS stress) on the given points (0 for K = 1)."""
        if len(self.members) < 2 or len(F) == 0:
            return 0.0
        Ps, _ = self.evaluate_members(F)
        Ps = np.array(Ps)
        scale = np.sqrt(np.mean(Ps**2))
        return float(np.median(Ps.std(axis=0).reshape(len(F), -1).max(axis=1)) / max(scale, 1e-300))


def _to_safe(obj, where: str):
    """The checkpoint entry ``obj`` in the types ``torch.load(weights_only=True)`` reads: numpy arrays as tensors."""
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint entry {where}: keys must be strings")
        return {k: _to_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_safe(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint entry {where}: {type(obj).__name__} cannot be stored safely")


def _from_safe(obj, key: str = ""):
    """Inverse of :func:`_to_safe` for everything but the members' state dicts (tensors there stay tensors)."""
    if isinstance(obj, dict):
        return {k: (v if k == "members" and not key else _from_safe(v, k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_safe(v, key) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    return obj


def save_checkpoint(ck: dict, path) -> Path:
    """Write a checkpoint dict atomically in the safe format (see the module docstring); returns the path.

    Raises:
        TypeError: an entry of a type the safe format cannot hold (a bug of the caller, not the user's input).
    """
    safe = _to_safe({**ck, "format_version": FORMAT_VERSION}, "checkpoint")
    with atomic_target(path) as tmp:
        torch.save(safe, tmp)
    return Path(path)


def load_checkpoint(path) -> dict:
    """Load a checkpoint without running any code from it, with clear errors.

    Only tensors, numbers, strings, None and plain containers are read (``torch.load(weights_only=True)``); a file
    that holds anything else, an older fe2ml's checkpoint with numpy objects or a crafted pickle alike, is refused
    before any of it is built.

    Raises:
        ConfigError: missing, unreadable, unsafe or of another format.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files: the error says it
            warnings.simplefilter("ignore")
            ck = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: nothing was constructed from the file
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise ConfigError(f"{p}: the checkpoint holds Python objects other than tensors, numbers and plain "
                              f"containers and was not loaded (loading it would run code from the file); "
                              f"{RESAVE_HINT}") from None
        raise ConfigError(f"{p}: not a readable checkpoint ({_first_line(e)})") from None
    except Exception as e:  # torch raises many types for files that are not checkpoints
        raise ConfigError(f"{p}: not a readable checkpoint ({_first_line(e)})") from None
    return _checked(ck, p)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _checked(ck, p: Path) -> dict:
    """The loaded dict with numpy arrays back, after checking that it is a checkpoint this fe2ml reads."""
    check_format(ck, p)
    ck = _from_safe(ck)
    _check_members(ck, p)
    return ck


def _check_members(ck: dict, p: Path) -> None:
    """Check that every member's weights fit the network its model description builds in this fe2ml.

    A checkpoint of an fe2ml whose networks had other layers is refused here, with its path, not deep inside torch.
    """
    try:
        if ck["model"]["kind"] == "localization":
            for st in ck["members"]:
                build_localization_model({**ck, "members": [st]})
            return
        margs = {k: v for k, v in ck["model"].items() if k != "kind"}
        for st in ck["members"]:
            build_model(ck["model"]["kind"], ck["dim"], ck["kinematics"], **margs).load_state_dict(st)
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise ConfigError(f"{p}: the checkpoint's weights do not fit the {ck['model'].get('kind')} model this fe2ml "
                          f"builds from its description ({_first_line(e)}); it was written by an fe2ml with other "
                          "networks: retrain it with fe2ml train") from None


def resave_checkpoint(src, out) -> Path:
    """Re-save a trusted checkpoint of an earlier fe2ml (format 2, numpy objects inside) in the safe format.

    This is the one place that unpickles arbitrary objects: only for a file the user names as trusted (``fe2ml
    export --resave``). The result is read back through :func:`load_checkpoint` before it replaces ``out``.

    Raises:
        ConfigError: missing or unreadable source, or not a checkpoint.
    """
    p = Path(src)
    if not p.is_file():
        raise ConfigError(f"{p}: checkpoint not found")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False)  # trusted by the user's explicit --resave
    except Exception as e:
        raise ConfigError(f"{p}: not a readable checkpoint ({_first_line(e)})") from None
    ck = _checked(ck, p)
    try:
        safe = _to_safe({**ck, "format_version": FORMAT_VERSION}, "checkpoint")
    except TypeError as e:
        raise ConfigError(f"{p}: {e}") from None
    out = Path(out)
    with atomic_target(out) as tmp:
        torch.save(safe, tmp)
        load_checkpoint(tmp)  # what was written reads back safely
    return out


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
