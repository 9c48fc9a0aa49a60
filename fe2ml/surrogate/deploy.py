"""Deploying a surrogate without torch: a safe reader of checkpoints and the ensemble's numpy closed forms.

A macro run on the CPU evaluates its ensemble by the closed forms of :mod:`fe2ml.surrogate.closed_form`, which need
the members' weights and feature definitions only. This module gives it those from the checkpoint file directly:

- :func:`read_checkpoint` reads the file ``torch.save`` wrote (a zip of a pickle and raw storages) with an unpickler
  that knows four names: the tensor rebuild function, the storage types of numeric dtypes and ``OrderedDict``. Any
  other object in the file is refused before anything is built, so reading a file from anyone runs no code, as
  with ``torch.load(weights_only=True)`` (:func:`fe2ml.surrogate.checkpoint.load_checkpoint`), and tensors come
  back as numpy arrays;
- :class:`NumpyEnsemble` answers like :class:`fe2ml.surrogate.checkpoint.EnsembleModel` on the CPU, for the model
  kinds with a closed form (every non-parametric potential and plain model).

A surrogate run then never imports torch: about 1.3 s of start-up, 0.7 s at exit and 0.6 GiB of memory per rank.
Parametric models, accelerators and in-run learning use torch (:class:`~fe2ml.surrogate.checkpoint.EnsembleModel`).
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from fe2ml.errors import ConfigError
from fe2ml.surrogate.closed_form import CPU_CHUNK, chunked, evaluator
from fe2ml.surrogate.gate import rows_equal

__all__ = ["NumpyEnsemble", "NumpyMember", "check_checkpoint", "check_format", "gate_pass", "one_for_all",
           "read_checkpoint", "read_torch_file", "torch_free"]

FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # format 2 differs only in how it was stored; one that loads safely is still usable
RESAVE_HINT = ("re-save it with `fe2ml export --resave CHECKPOINT OUT.pt` from a trusted copy, or retrain it with "
               "fe2ml train")

_STORAGES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
             "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
             "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _Refused(Exception):
    """A name in the pickle that the reader does not build."""


class _Storage:
    """A storage type of the pickle: its numpy dtype."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """A tensor's values (a copy) from its storage, element offset, shape and element strides."""
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile | None, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGES:
            return _Storage(_STORAGES[name])
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if self.archive is None or not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                                        and isinstance(pid[1], _Storage)):
            raise _Refused(f"persistent object {str(pid)[:60]}")
        raw = self.archive.read(f"{self.prefix}data/{pid[2]}")
        return np.frombuffer(raw, dtype=pid[1].dtype.newbyteorder("<"))


def read_torch_file(path) -> Any:
    """The object a ``torch.save`` zip file holds, with numpy arrays for tensors, or refuse it (no code runs).

    Raises:
        ConfigError: not such a file, or it holds Python objects other than tensors, numbers, strings, None and plain
            containers (named in the message).
    """
    p = Path(path)
    try:
        if not zipfile.is_zipfile(p):  # a bare pickle (torch's legacy format among others): read as one, refused
            with open(p, "rb") as f:  # at its first object that is not a plain value
                return _Unpickler(f, None, "").load()
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if len(names) != 1:
                raise ConfigError(f"{p}: not a readable checkpoint (no single data.pkl in the archive)")
            prefix = names[0][: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in z.namelist() and z.read(order).strip() != b"little":
                raise ConfigError(f"{p}: not a readable checkpoint (big-endian storages)")
            with z.open(names[0]) as f:
                return _Unpickler(f, z, prefix).load()
    except _Refused as e:
        raise ConfigError(f"{p}: the checkpoint holds Python objects other than tensors, numbers and plain "
                          f"containers ({e}) and was not loaded (loading it would run code from the file); "
                          f"{RESAVE_HINT}") from None
    except ConfigError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, OSError) as e:
        raise ConfigError(f"{p}: not a readable checkpoint ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def check_format(ck, p: Path) -> None:
    """Refuse what is not a surrogate checkpoint of a format this fe2ml reads (format 1: localization only)."""
    version = ck.get("format_version") if isinstance(ck, dict) else None
    if version == 1 and ck.get("model", {}).get("kind") != "localization":
        raise ConfigError(f"{p}: checkpoint of format 1, without the data this fe2ml needs to gate the surrogate "
                          f"(format {FORMAT_VERSION}); retrain it with fe2ml train")
    if not isinstance(ck, dict) or version not in (1, *READABLE_VERSIONS) or not isinstance(ck.get("model"), dict) \
            or not isinstance(ck.get("members"), list):
        raise ConfigError(f"{p}: not an fe2ml surrogate checkpoint of format {FORMAT_VERSION}")


def read_checkpoint(path) -> dict:
    """A checkpoint read without torch: every tensor, the members' weights too, as a numpy array.

    The same checks as :func:`fe2ml.surrogate.checkpoint.load_checkpoint`: a checkpoint a :class:`NumpyEnsemble`
    serves has its members' weights checked against the networks its description builds.

    Raises:
        ConfigError: missing, unreadable, unsafe, of another format, or with weights that do not fit.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: checkpoint not found")
    ck = read_torch_file(p)
    check_format(ck, p)
    if torch_free(ck):
        for st in ck["members"]:
            NumpyMember(ck, st, p)
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


def torch_free(ck: dict, device: str = "cpu") -> bool:
    """Whether a :class:`NumpyEnsemble` serves the checkpoint on ``device`` (else the torch ensemble does)."""
    m = ck["model"]
    return device == "cpu" and m.get("kind") in ("potential", "plain") and not m.get("parameters")


def _margs(ck: dict) -> dict:
    return {k: v for k, v in ck["model"].items() if k != "kind"}


class NumpyMember:
    """One member of a non-parametric checkpoint: its weights and feature definition in numpy.

    The attributes are those the closed form reads (:func:`fe2ml.surrogate.closed_form.evaluator`); the weights are
    checked against the network the checkpoint's description builds (names and shapes, as ``load_state_dict``).

    Raises:
        ConfigError: weights that do not fit (a checkpoint of an fe2ml with other networks).
    """

    def __init__(self, ck: dict, state: dict, path=None):
        from fe2ml.materials.hyperelastic import fibre_families

        kind, d = ck["model"]["kind"], int(ck["dim"])
        margs = _margs(ck)
        self.dim, self.kinematics = d, ck["kinematics"]
        self.kind = kind
        hidden = [int(h) for h in margs.get("hidden", (16, 16))]
        if kind == "plain":  # no ``features`` attribute: the closed form's F − I -> P network
            n_in, n_out, convex, monotone = d * d, d * d, False, ()
            want: dict[str, tuple[int, ...]] = {"x_scale": (n_in,)}
        else:
            self.features = margs.get("features", "general")
            convex = bool(margs.get("convex", False))
            self.fibres = fibre_families([{"fibres": margs.get("fibres")}]) if self.features == "anisotropic" else []
            self.idx = [(i, j) for i in range(d) for j in range(i, d)]
            n_in = len(self.idx) if self.features == "general" else 4 + 3 * len(self.fibres)
            n_out = 1
            monotone = () if self.features == "general" else (0, 1, *range(4, n_in))
            want = {"x_scale": (n_in,)}
            if self.fibres:
                want["a"] = (len(self.fibres), 3)
        want["p_scale"] = ()
        dims = [n_in, *hidden]
        if convex:
            for k, h in enumerate(hidden):
                want[f"net.Vs.{k}.weight"], want[f"net.Vs.{k}.bias"] = (h, n_in), (h,)
            for k in range(len(hidden) - 1):
                want[f"net.Ws.{k}"] = (hidden[k + 1], hidden[k])
            want["net.W_out"], want["net.V_out.weight"], want["net.V_out.bias"] = (n_out, hidden[-1]), (n_out, n_in), \
                (n_out,)
        else:
            for k, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
                want[f"net.layers.{k}.weight"], want[f"net.layers.{k}.bias"] = (b, a), (b,)
            want["net.out.weight"], want["net.out.bias"] = (n_out, hidden[-1]), (n_out,)
        have = {k: tuple(np.shape(v)) for k, v in state.items()}
        if have != want:
            missing = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
            why = "; ".join(f"{what}: {', '.join(ks[:3])}" for what, ks in
                            (("missing", missing), ("unexpected", extra), ("of another shape", wrong)) if ks)
            raise ConfigError(f"{path}: the checkpoint's weights do not fit the {kind} model this fe2ml builds from "
                              f"its description ({why}); it was written by an fe2ml with other networks: retrain it "
                              "with fe2ml train")
        self.x_scale = np.asarray(state["x_scale"], dtype=np.float64)
        self.p_scale = np.asarray(state["p_scale"], dtype=np.float64)
        self.net = ({k[4:]: np.asarray(v, dtype=np.float64) for k, v in state.items() if k.startswith("net.")},
                    monotone)
        self.n_in = n_in
        self._closed_form: dict = {}

    def numpy_evaluator(self, tangent: str = "double"):
        """The member's closed form, F (n,d,d) -> (P, A) (:func:`fe2ml.surrogate.closed_form.evaluator`).

        Prepared on first use, per tangent precision: reading a checkpoint checks its weights only.
        """
        if tangent not in self._closed_form:
            self._closed_form[tangent] = evaluator(self, "numpy", tangent=tangent)
        return self._closed_form[tangent]

    def features_of(self, F) -> np.ndarray:
        """The unscaled network inputs (n, n_in), as :meth:`fe2ml.surrogate.models.PotentialModel.features_of`."""
        F = np.asarray(F, dtype=np.float64)
        d = self.dim
        if self.kind == "plain":
            return (F - np.eye(d)).reshape(-1, d * d)
        ctx = self.numpy_evaluator().prepare(F)
        if self.features == "general":
            return np.array(ctx[1])
        y = ctx["y"]  # the closed form's invariants take J once; the network's inputs J − 1 and 1 − J
        return np.concatenate([y[:, :3], -y[:, 2:3], y[:, 3:]], axis=1)


class NumpyEnsemble:
    """The K members of a non-parametric checkpoint on the CPU, by their numpy closed forms (no torch).

    ``tangent``: the precision of the tangent's products (``double`` or ``single``:
    :func:`~fe2ml.surrogate.closed_form.evaluator`); the stresses are float64 either way.

    The interface of :class:`fe2ml.surrogate.checkpoint.EnsembleModel` that a run uses: :meth:`evaluate`,
    :meth:`evaluate_gate`, :meth:`evaluate_members`, :meth:`features`, :meth:`augment`.
    """

    device = "cpu"
    parameters: list[str] = []

    def __init__(self, ck: dict, path=None, tangent: str = "double"):
        self.members = [NumpyMember(ck, st, path) for st in ck["members"]]
        self.dim = self.members[0].dim
        self.kinematics = self.members[0].kinematics
        self.tangent_precision = tangent
        self._np = [m.numpy_evaluator(tangent) for m in self.members]

    def augment(self, F) -> np.ndarray:
        """F itself (no parameters), as float64."""
        return np.asarray(F, dtype=np.float64)

    def features(self, F) -> np.ndarray:
        """The unscaled network inputs of each point, (n, m)."""
        return self.members[0].features_of(F)

    def evaluate_members(self, F):
        """Per-member predictions: lists of (n,d,d) and (n,d,d,d,d) arrays."""
        F = self.augment(F)
        out = [chunked(f, F) for f in self._np]
        return [o[0] for o in out], [o[1] for o in out]

    def evaluate(self, F):
        """Mean P (n,d,d) and A (n,d,d,d,d)."""
        P, A, _, _ = self.evaluate_gate(F)
        return P, A

    def evaluate_gate(self, F, chunk: int = CPU_CHUNK, *, tangent: bool = True, out: np.ndarray | None = None):
        """As :meth:`fe2ml.surrogate.checkpoint.EnsembleModel.evaluate_gate` (:func:`gate_pass`)."""
        return gate_pass(self.augment(F), self._np, self.dim, chunk, tangent=tangent, out=out)


def one_for_all(answer: tuple, n: int, out: np.ndarray | None = None) -> tuple:
    """A gate pass's answer (P, A, Ps, ok) at one point as the answer of n points with the same F (A into ``out``)."""
    P1, A1, Ps1, ok1 = answer
    A = None
    if A1 is not None:
        A = out if out is not None else np.empty((n, *A1.shape[1:]))
        A[:] = A1
    return np.repeat(P1, n, axis=0), A, np.repeat(Ps1, n, axis=1), np.repeat(ok1, n)


def gate_pass(F: np.ndarray, evs: list, d: int, chunk: int = CPU_CHUNK, *, tangent: bool = True,
              out: np.ndarray | None = None):
    """What a gate needs from the members' numpy closed forms ``evs``, chunk by chunk.

    Returns mean P (n,d,d), mean A (n,d,d,d,d) (None unless ``tangent``), the members' stresses Ps (K,n,d,d) and
    which points every member answered with a finite P (and A) (n,). The members share a chunk's features, and the
    mean tangent comes from the members' mean feature-space derivatives by one chain rule
    (:class:`~fe2ml.surrogate.closed_form.ClosedForm`) where they share the feature definition. When every point has
    the same F (e.g. F̄ = I before the first load step) one evaluation serves all.

    Memory: the mean tangent and K stresses per point (no member's tangent is kept), (81 + 9 (K + 1)) · 8 bytes per 3D
    point.
    """
    n, K = len(F), len(evs)
    if rows_equal(F):
        return one_for_all(gate_pass(F[:1], evs, d, chunk, tangent=tangent), n, out)
    P = np.empty((n, d, d))
    A = (out if out is not None else np.empty((n, d, d, d, d))) if tangent else np.empty(0)
    Ps, ok = np.empty((K, n, d, d)), np.ones(n, dtype=bool)
    f0 = evs[0]
    shared = all(f.key == f0.key for f in evs)
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        ctx = f0.prepare(F[sl])
        gm: Any = None
        Hm: Any = None
        for k, f in enumerate(evs):
            if not shared and k:
                ctx = f.prepare(F[sl])
            g, H = f.derivatives(ctx, tangent)
            Pk = Ps[k, sl] = f.stress(ctx, g)
            # a sum is finite only where every term is (or where it overflows: flagged too)
            fin = Pk.sum(axis=(1, 2)) if H is None else Pk.sum(axis=(1, 2)) + H.sum(axis=(1, 2))
            ok[sl] &= np.isfinite(fin)
            if tangent and not shared:
                Ak = f.tangent_of(ctx, g, H)[1]
                A[sl] = Ak if k == 0 else A[sl] + Ak
            elif tangent:
                gm, Hm = (g, H) if k == 0 else (gm + g, Hm + H)
        if tangent and shared:
            f0.tangent_of(ctx, gm / K, Hm / K, out=A[sl])
        elif tangent:
            A[sl] /= K
        if tangent:
            ok[sl] &= np.isfinite(A[sl].sum(axis=(1, 2, 3, 4)))
    P[:] = Ps.mean(axis=0)
    return P, (A if tangent else None), Ps, ok
