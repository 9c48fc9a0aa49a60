"""Fitting surrogates on fe2ml logs: ``fe2ml train CONFIG.yaml [--resume CKPT]``.

The config is :mod:`fe2ml.surrogate.config`; the checkpoint it writes and everything needed to use it is
:mod:`fe2ml.surrogate.checkpoint`. This module only fits: data loading and splitting, the Sobolev loss, the
ensemble spread over ranks, metrics and plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import torch
from scipy.spatial import cKDTree

from fe2ml.data.reader import StreamedField, read_logs
from fe2ml.errors import ConfigError, Fe2mlError
from fe2ml.materials.hyperelastic import fibre_families, same_fibres
from fe2ml.plotting import plot_calibration, plot_lines, plot_parity
from fe2ml.surrogate.checkpoint import (
    FORMAT_VERSION,
    EnsembleModel,
    LocalizationNet,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
)
from fe2ml.surrogate.config import TrainConfig
from fe2ml.surrogate.gate import (
    MAGNITUDE_BINS,
    MIN_PER_BIN,
    STRESS_FLOOR,
    point_factors,
    relative_error,
    relative_spread,
    stress_magnitude,
    uncertainty,
)
from fe2ml.surrogate.models import build_model, with_parameters

__all__ = ["TrainingFailed", "assemble_checkpoint", "calibration_summary", "fit_members", "load_data", "member_device",
           "split_indices", "train", "train_localization"]

log = logging.getLogger(__name__)

STREAM_METRIC_RECORDS = 20000  # a streamed fit's train-split metrics are measured on this many of its records
VALIDATION_CHUNK = 8192  # records per piece of the validation loss (its tangents' intermediates grow with it)


REALIZATION = "mesh.seed"
"""The parameter that numbers RVE realizations: categorical in a parametric model (``levels``)."""


def _rel(a, b):
    return float(np.sqrt(np.sum((a - b) ** 2)) / max(np.sqrt(np.sum(b**2)), 1e-300))


def load_data(cfg: TrainConfig):
    """Records for training: (F, P, A, info) with NaN/inf records removed (counted).

    With ``train.stream`` the tangents stay in the log files: A is a :class:`~fe2ml.data.reader.StreamedField`
    (``A[idx]`` reads those records), and records whose tangent is not finite are dropped where they are read.
    """
    stream = cfg.train.get("stream", False)
    data = read_logs(cfg.data, fingerprint=cfg.fingerprint, source=cfg.source, converged_only=True,
                     fields=["F", "P", "converged"] if stream else ["F", "P", "A", "converged"], locate=stream)
    F, P = data["F"], data["P"]
    need_A = cfg.loss["tangent"] > 0
    ok = np.isfinite(F).all(axis=(1, 2)) & np.isfinite(P).all(axis=(1, 2))
    if need_A and not stream:
        hasA = np.isfinite(data["A"]).reshape(len(F), -1).all(axis=1)
        if len(F) and not hasA.any():
            raise ConfigError(f"{cfg.path}: loss.tangent > 0 but the logs hold no tangents; set loss.tangent: 0")
        ok &= hasA
    skipped = int((~ok).sum())
    F, P = F[ok], P[ok]
    A = StreamedField(data.parts, data.locations[ok], "A") if stream else data["A"][ok]
    if len(F) < 20:
        raise ConfigError(f"{cfg.path}: only {len(F)} usable records (need at least 20 for train/validation/test)")
    info = {"fingerprint": data.fingerprint, "dim": data.dim, "kinematics": data.kinematics, "skipped": skipped,
            "records": int(len(F)), "rve": data.rve}
    if "p" in data.arrays:  # a parametric campaign: the parameters ride along with F (models.with_parameters)
        names = json.loads(data.attrs[0]["parameters"])
        if any(json.loads(a.get("parameters", "[]")) != names for a in data.attrs):
            raise ConfigError(f"{cfg.path}: data: the logs hold parametric campaigns of different parameters; "
                              "train on one family at a time")
        boxes = [json.loads(a.get("parameter_box", "{}")) for a in data.attrs]
        info["parameters"] = {"names": names,
                              "box": {n: [min(b[n][0] for b in boxes if n in b), max(b[n][1] for b in boxes if n in b)]
                                      for n in names}}
        F = with_parameters(F, data["p"][ok])
    return F, P, A, info


def _finite_tangents(A, idx: np.ndarray, path) -> np.ndarray:
    """The records of ``idx`` whose streamed tangent is finite (validation and test splits of a streamed fit)."""
    ok = np.isfinite(A[idx].reshape(len(idx), -1)).all(axis=1)
    if len(idx) and not ok.any():
        raise ConfigError(f"{path}: loss.tangent > 0 but the logs hold no tangents; set loss.tangent: 0")
    return idx[ok]


class TrainingFailed(Fe2mlError):
    """A fit produced no finite loss (diverged, or non-finite data)."""


def split_indices(n: int, split: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices of n records (a seeded permutation; ``split`` as in the train YAML)."""
    rng = np.random.default_rng(split["seed"])
    perm = rng.permutation(n)
    n_val = max(1, int(round(split["validation"] * n)))
    n_test = int(round(split["test"] * n))
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def _fit_member(model, F, P, A, tr_idx, va_idx, loss_w, tcfg, seed, progress=None, reinit=True,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
    """Fit one member on ``device`` in ``dtype`` (initialised reproducibly on the CPU in float64 first).

    ``A`` is an array, or a :class:`~fe2ml.data.reader.StreamedField` (``train.stream``): then the mini-batches'
    tangents are read from the logs by a DataLoader with ``train.workers`` processes, F̄ and P̄ stay in memory.
    """
    torch.manual_seed(seed)
    if reinit:
        for prm in model.parameters():  # initialise reproducibly
            if prm.dim() > 1:
                torch.nn.init.xavier_uniform_(prm)
            else:
                torch.nn.init.zeros_(prm)
        net = getattr(model, "net", None)
        if hasattr(net, "start_small"):  # input-convex networks: small non-negative weights
            net.start_small()
    model.to(device=device, dtype=dtype)
    stream = isinstance(A, StreamedField)
    Ft, Pt = (torch.as_tensor(x).to(device=device, dtype=dtype) for x in (F, P))
    A_va = np.asarray(A[va_idx])  # read once when streamed
    if stream:
        A.close()  # no open file before the DataLoader forks
        At = None
    else:
        At = torch.as_tensor(A).to(device=device, dtype=dtype)
    Ava_t = torch.as_tensor(A_va).to(device=device, dtype=dtype)
    if loss_w["tangent"] > 0:  # the tangent's scale: over the training records (the validation ones when streamed)
        a_scale = float(np.sqrt(np.mean(A_va ** 2))) if stream else float(np.sqrt(np.mean(A[tr_idx] ** 2)))
    else:
        a_scale = 1.0
    tr_idx, va_idx = (torch.as_tensor(i, device=device) for i in (tr_idx, va_idx))
    p_scale = float(model.p_scale)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg["lr"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(tcfg["patience"] // 4, 10))

    # relative: weigh each record by 1 / (its stress magnitude² + (floor · RMS)²), so that the small-strain
    # regime (small stresses) counts as much as large deformations
    if loss_w.get("relative"):
        mag = (Pt ** 2).reshape(len(Pt), -1).mean(1)
        wts = 1.0 / (mag + (loss_w.get("floor", 0.1) * p_scale) ** 2)
        wts = wts / wts[tr_idx].mean()
    else:
        wts = torch.ones(len(Pt), dtype=dtype, device=device)

    def loss_of(idx, Ab, create_graph):
        Pp, Ap = model.stress_tangent(Ft[idx], create_graph=create_graph)
        lp = torch.mean(wts[idx][:, None, None] * (Pp - Pt[idx]) ** 2) / p_scale**2
        la = (torch.mean((Ap - Ab) ** 2) / a_scale**2 if loss_w["tangent"] > 0
              else torch.zeros((), dtype=dtype, device=device))
        return loss_w["stress"] * lp + loss_w["tangent"] * la

    def step(idx, Ab):
        opt.zero_grad()
        lb = loss_of(idx, Ab, True)
        lb.backward()
        opt.step()
        return lb.detach() * len(idx)

    def validation_loss() -> float:
        with torch.no_grad():  # the closed-form tangent where the model has one: no graph for validation
            lv = sum(float(loss_of(va_idx[i:i + VALIDATION_CHUNK], Ava_t[i:i + VALIDATION_CHUNK], False))
                     * len(va_idx[i:i + VALIDATION_CHUNK]) for i in range(0, len(va_idx), VALIDATION_CHUNK))
        lv /= max(len(va_idx), 1)  # the mean over the records, computed in chunks of bounded memory
        return lv if np.isfinite(lv) else np.inf

    best = (np.inf, None, 0)
    hist = {"train": [], "validation": []}
    bs = tcfg.get("batch_size")
    gen = torch.Generator().manual_seed(seed)  # the order of the mini-batches: on the CPU, reproducible anywhere
    loader = None
    if stream:
        workers = tcfg.get("workers", 0)
        blocks = A.blocks(tr_idx.cpu().numpy(), bs)
        # the sampler has its own generator: the DataLoader draws worker seeds from its generator once per
        # iterator, which with and without persistent workers would shift a shared one
        loader = torch.utils.data.DataLoader(blocks, batch_size=None,
                                             sampler=torch.utils.data.RandomSampler(blocks, generator=gen),
                                             generator=torch.Generator().manual_seed(seed),
                                             num_workers=workers, persistent_workers=workers > 0)
    for ep in range(tcfg["epochs"]):
        if loader is not None:  # mini-batches of streamed tangents; lt: the epoch's mean batch loss
            total, count = torch.zeros((), dtype=dtype, device=device), 0
            for ridx, Ab in loader:
                if len(ridx):
                    ridx = ridx.to(device)
                    total += step(ridx, Ab.to(device=device, dtype=dtype))
                    count += len(ridx)
            lt = total / max(count, 1)
        elif bs is None or bs >= len(tr_idx):  # full batch
            lt = step(tr_idx, At[tr_idx]) / len(tr_idx)
        else:  # one optimiser step per mini-batch of a fresh permutation; lt: the epoch's mean batch loss
            perm = tr_idx[torch.randperm(len(tr_idx), generator=gen).to(device)]
            total = torch.zeros((), dtype=dtype, device=device)
            for i in range(0, len(perm), bs):
                total += step(perm[i:i + bs], At[perm[i:i + bs]])
            lt = total / len(perm)
        lv = validation_loss()
        sched.step(lv)
        hist["train"].append(float(lt))
        hist["validation"].append(lv)
        if lv < best[0]:
            best = (lv, {k: v.detach().clone() for k, v in model.state_dict().items()}, ep)
        elif ep - best[2] > tcfg["patience"]:
            break
        if progress is not None and (ep % 100 == 0 or ep == tcfg["epochs"] - 1):
            progress(ep, float(lt), lv)
    del loader
    if tcfg.get("polish") and best[1] is not None:
        hist["polish_from"] = len(hist["train"])
        best = _polish(model, best, hist, loss_of, validation_loss, tr_idx, At[tr_idx], tcfg["polish"], progress)
    hist["best"] = best[2]
    if best[1] is None:
        raise TrainingFailed(f"member with seed {seed}: the loss was never finite (train {hist['train'][-1]:.3g})")
    model.load_state_dict(best[1])
    model.to(device="cpu", dtype=torch.float64)  # the checkpoint is device-independent and float64
    return hist, best[2]


POLISH_INNER = 20
"""L-BFGS iterations per step of a polish (the validation loss is checked after each step)."""


def _polish(model, best, hist, loss_of, validation_loss, tr_idx, A_tr, iterations: int, progress=None):
    """``train.polish``: L-BFGS on the full-batch training loss from the first-order fit's best state.

    A strong Wolfe line search; the state of least validation loss is kept (the first-order one where the polish does
    not lower it). Quasi-Newton steps follow the loss's curvature, where Adam's steps stall on ill-conditioned
    directions (such as the small-stress records).
    """
    model.load_state_dict(best[1])
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=POLISH_INNER, history_size=50,
                            line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)

    def closure():
        opt.zero_grad()
        lb = loss_of(tr_idx, A_tr, True)
        lb.backward()
        return lb

    ep0 = len(hist["train"])
    for k in range(-(-iterations // POLISH_INNER)):
        lt = float(opt.step(closure).detach())
        lv = validation_loss()
        hist["train"].append(lt)
        hist["validation"].append(lv)
        if not np.isfinite(lt):
            break
        if lv < best[0]:
            best = (lv, {n: v.detach().clone() for n, v in model.state_dict().items()}, ep0 + k)
        if progress is not None:
            progress(ep0 + k, lt, lv)
    return best


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The split-conformal quantile: the ⌈(n + 1) level⌉-th smallest of n calibration scores (inf beyond n).

    For a new point exchangeable with the calibration points, P(score ≤ q) ≥ level (Vovk et al. 2005; Angelopoulos
    & Bates 2023): a finite-sample guarantee with no assumption on the distribution of the scores.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    k = int(np.ceil((len(s) + 1) * level))
    return float(s[k - 1]) if 1 <= k <= len(s) else float("inf")


def calibration_summary(calibration: dict) -> dict:
    """The calibration without its per-test-point lists (for metrics.json)."""
    return {k: v for k, v in calibration.items() if k not in ("spread", "uncertainty", "error", "factor_per_point")}


def _factors(ratio: np.ndarray) -> tuple[float, float]:
    """Split-conformal 90 % and 95 % quantiles of the scores error/spread (95 %: the largest with too few)."""
    f90, f95 = conformal_quantile(ratio, 0.90), conformal_quantile(ratio, 0.95)
    if not np.isfinite(f95):
        f95 = float(ratio.max())
    return min(f90, f95), f95


def magnitude_bins(ratio: np.ndarray, magnitude: np.ndarray) -> dict | None:
    """Mondrian split-conformal factors: the scores binned by the predicted stress magnitude, a quantile per bin.

    Where the stresses are small (small strains) the spread can predict the relative error worse than elsewhere;
    one pooled quantile then holds its level on average over all points but not among the small ones. Bins at the
    quantiles of the calibration points' magnitudes (``MAGNITUDE_BINS``, at least ``MIN_PER_BIN`` points each; None
    when there are too few for 2 bins) each get their own quantile, whose level holds within the bin (Vovk et al.
    2005, Mondrian conformal prediction): a bin is a function of the point's prediction, not of its error.
    """
    nb = min(MAGNITUDE_BINS, len(ratio) // MIN_PER_BIN)
    if nb < 2:
        return None
    edges = np.quantile(magnitude, np.arange(1, nb) / nb)
    which = np.searchsorted(edges, magnitude)
    fb = [_factors(ratio[which == b]) for b in range(nb)]
    return {"magnitude_edges": edges.tolist(), "factor90": [f[0] for f in fb], "factor95": [f[1] for f in fb],
            "n": [int(np.sum(which == b)) for b in range(nb)]}


OFFSET_RECORDS = 2000  # training records whose median error sets the calibration's offset


def _calibrate(ens: EnsembleModel, F, P, va, te, floor: float, tr=None) -> dict:
    """How the per-point uncertainty predicts the error: split-conformal factors on validation, coverage on test.

    A point's uncertainty is u = spread + offset / (magnitude + 1) (:func:`~fe2ml.surrogate.gate.uncertainty`): its
    relative ensemble spread plus the ensemble's typical absolute error, the median over (up to
    ``OFFSET_RECORDS``) training records of |P̄_mean − P̄| (``offset``, in units of the stress floor), relative to
    the point's stress. Where the members agree but err alike (small strains, where few records lie) the spread
    alone predicts too small an error; the offset term keeps the bound from falling below the typical error there,
    and it shrinks where the stress is large. The offset comes from the training split, so the validation split's
    scores stay exchangeable with new points (locally weighted split-conformal prediction, Lei et al. 2018).

    The scores are error/u on the validation split. factor90 and factor95 are their split-conformal 90 % and 95 %
    quantiles (:func:`conformal_quantile`): a new point's error is at most factor90 x its u with probability ≥ 90 %
    (the hybrid's ``threshold: error`` uses this bound). The calibrated uncertainty is factor x u with factor =
    factor95 / 2, so that 2 x the calibrated uncertainty is the 95 % bound (a Gaussian's 2σ). Coverage (k = 1, 2, 3):
    the fraction of test points (validation when there is no test split) whose true error is at most k x the
    calibrated uncertainty, measured on points the factors never saw. The validation split also picks the members'
    early-stopping epoch, a weak use that the test coverage checks. With enough validation points the factors are
    also fitted per bin of the predicted stress magnitude (:func:`magnitude_bins`); the hybrid's gate and the
    coverage use each point's bin.
    """
    def spread_error(idx):
        Ps = np.asarray(ens.evaluate_members(F[idx])[0])
        return (relative_spread(Ps, floor), relative_error(np.mean(Ps, axis=0), P[idx], floor),
                stress_magnitude(Ps, floor))

    offset = 0.0
    if tr is not None and len(tr):
        sub = tr[:OFFSET_RECORDS]  # tr is a permutation: a random subset
        Pm = np.mean(np.asarray(ens.evaluate_members(F[sub])[0]), axis=0)
        offset = float(np.median(np.linalg.norm((Pm - P[sub]).reshape(len(sub), -1), axis=1))) / floor
    s_va, e_va, m_va = spread_error(va)
    u_va = uncertainty(s_va, m_va, offset)
    ratio = e_va / np.maximum(u_va, 1e-300)
    f90, f95 = _factors(ratio)
    factor = 0.5 * f95
    out = {"method": "split-conformal", "offset": offset, "factor": factor, "factor50": float(np.quantile(ratio, 0.5)),
           "factor90": f90, "factor95": f95}
    bins = magnitude_bins(ratio, m_va)
    if bins is not None:
        out["bins"] = bins
    split, idx = ("test", te) if len(te) else ("validation", va)
    s_te, e_te, m_te = spread_error(idx)
    u_te = uncertainty(s_te, m_te, offset)
    f90_te, f95_te = point_factors(out, m_te)
    return out | {"split": split, "n": int(len(idx)), "n_calibration": int(len(va)),
                  "coverage": [float(np.mean(e_te <= k * 0.5 * f95_te * u_te)) for k in (1, 2, 3)],
                  "coverage90": float(np.mean(e_te <= f90_te * u_te)),
                  "spread": s_te.tolist(), "uncertainty": u_te.tolist(), "error": e_te.tolist(),
                  "factor_per_point": (0.5 * f95_te).tolist()}


def _density(model, F) -> dict:
    """Training records in normalised feature space and the 99th percentile of their nearest-neighbour distances."""
    x_scale = model.x_scale.detach().numpy().copy()
    X = model.features_of(torch.as_tensor(F)).detach().numpy() / x_scale
    if len(X) > 20000:  # a fixed subsample keeps the checkpoint small
        X = X[np.random.default_rng(0).choice(len(X), 20000, replace=False)]
    d, _ = cKDTree(X).query(X, k=2)
    return {"points": X.astype(np.float64), "x_scale": x_scale, "scale": float(max(np.quantile(d[:, 1], 0.99), 1e-12))}


def _bounds(model, F):
    x = model.features_of(torch.as_tensor(F)).detach().numpy()
    F = F[:, :, :F.shape[1]]  # without the parameter columns of a parametric model
    lam = np.sqrt(np.clip(np.linalg.eigvalsh(np.einsum("nki,nkj->nij", F, F)), 0, None))
    return {"feature_min": x.min(axis=0).tolist(), "feature_max": x.max(axis=0).tolist(),
            "stretch_min": float(lam.min()), "stretch_max": float(lam.max()),
            "J_min": float(np.linalg.det(F).min()), "J_max": float(np.linalg.det(F).max())}


def model_fibres(margs: dict, rve_desc: dict, where: str, what: str, kinematics: str) -> dict:
    """``{"fibres": [...]}`` for an anisotropic potential model from its RVE's description (else ``{}``).

    Raises:
        ConfigError: invariant features with small kinematics; anisotropic features and an RVE without fibres.
    """
    feats = margs.get("features", "general")
    if feats != "general" and kinematics != "finite":
        raise ConfigError(f"{where}: {feats} invariant features need finite kinematics; {what} is {kinematics} "
                          "strain (use features: general)")
    if feats != "anisotropic":
        return {}
    fib = fibre_families((rve_desc or {}).get("materials", {}).values())
    if not fib:
        names = sorted({m.get("type", "?") for m in (rve_desc or {}).get("materials", {}).values()})
        raise ConfigError(f"{where}: anisotropic needs fibre directions, and {what} has none (materials: "
                          f"{', '.join(names) or 'unknown'}); use features: isotropic or general, or an RVE with "
                          "fibres (hgo, energy with fibres)")
    return {"fibres": fib}


def member_device(device: torch.device | str, k: int, n_gpus: int | None = None) -> torch.device:
    """Where member k is fitted: ``cuda`` without an index spreads the members over the GPUs of the node.

    Member k goes to GPU k mod (number of GPUs). Rank r fits the members k = r, r + size, ..., so the members the
    ranks fit at the same time sit on different GPUs when there are as many GPUs as ranks. ``cuda:K`` and ``cpu``
    are kept as given.
    """
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    n = torch.cuda.device_count() if n_gpus is None else n_gpus
    return torch.device(f"cuda:{k % max(n, 1)}")


def fit_members(comm, F, P, A, tr, va, *, kind: str, margs: dict, dim: int, kinematics: str, loss: dict,
                train: dict, ensemble: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
                start: list | None = None, progress=None):
    """Fit the members of an ensemble, member k on rank k % size (collective).

    Args:
        comm: the communicator the members are spread over.
        F: all records' F̄ (n, d, d).
        P: their P̄ (n, d, d).
        A: their Ā (n, d, d, d, d).
        tr: the training indices.
        va: the validation indices (early stopping).
        kind: the model kind (:func:`fe2ml.surrogate.models.build_model`).
        margs: the model arguments.
        dim: 2 or 3.
        kinematics: finite or small.
        loss: the Sobolev loss weights (as in the train YAML).
        train: the optimiser settings (as in the train YAML).
        ensemble: number of members (seeds ``train['seed'] + k``).
        device: where the members are fitted (``cuda``: spread over the node's GPUs, :func:`member_device`).
        dtype: of the fit.
        start: member state dicts to warm-start from (member k from ``start[k % len(start)]``, its input and stress
            scales kept); None: fresh members, scaled on the training records.
        progress: ``progress(k, epoch, train_loss, validation_loss)`` every 100 epochs.

    Returns:
        On rank 0 ``(states, histories)``: the member state dicts in order and their loss histories; None elsewhere.

    Raises:
        TrainingFailed: on every rank, when a member's loss was never finite.
    """
    members, hists, failed = {}, {}, None
    for k in range(ensemble):
        if k % comm.size != comm.rank:
            continue
        model = build_model(kind, dim, kinematics, **margs)
        if start is not None:
            model.load_state_dict({n: torch.as_tensor(v) for n, v in start[k % len(start)].items()})
        else:
            x = model.features_of(torch.as_tensor(F[tr])).detach()
            model.x_scale[:] = torch.clamp(x.std(0), min=1e-8) if len(tr) > 1 else 1.0
            if hasattr(model, "p_mean"):  # parametric: centre the parameters too
                model.p_mean[:] = x[:, model.n_in:].mean(0)
            model.p_scale.fill_(float(np.sqrt(np.mean(P[tr] ** 2))) or 1.0)
        prog = (lambda ep, lt, lv, k=k: progress(k, ep, lt, lv)) if progress is not None else None
        try:
            hist, _ = _fit_member(model, F, P, A, tr, va, loss, train, train["seed"] + k, prog,
                                  reinit=start is None, device=member_device(device, k), dtype=dtype)
        except TrainingFailed as e:
            failed = str(e)
            continue
        members[k] = {n: v.clone() for n, v in model.state_dict().items()}
        hists[k] = hist
    errors = [e for e in comm.allgather(failed) if e is not None]
    if errors:
        raise TrainingFailed(errors[0])
    gathered = comm.gather((members, hists), root=0)
    if comm.rank != 0:
        return None
    allm, allh = {}, {}
    for m_, h_ in gathered:
        allm.update(m_)
        allh.update(h_)
    return [allm[k] for k in range(ensemble)], allh


def assemble_checkpoint(states: list, kind: str, margs: dict, dim: int, kinematics: str, F, P, A, tr, va, te,
                        tr_metrics=None):
    """The data-dependent part of a checkpoint: model, members, metrics, training box, density, floor, calibration.

    ``tr_metrics``: the training records the train split's metrics are computed on (default all of ``tr``).

    Returns:
        ``(core, predictions)``: the checkpoint entries and the ensemble's (P̄, Ā) predictions per split.
    """
    ens = EnsembleModel.from_states(kind, dim, kinematics, margs, states)
    metrics, preds = {}, {}
    for name, idx in (("train", tr if tr_metrics is None else tr_metrics), ("validation", va), ("test", te)):
        if len(idx) == 0:
            continue
        Pp, Ap = ens.evaluate(F[idx])
        preds[name] = (Pp, Ap)
        metrics[name] = {"stress_rel_l2": _rel(Pp, P[idx]), "tangent_rel_l2": _rel(Ap, A[idx]), "n": int(len(idx))}
    floor = STRESS_FLOOR * float(np.sqrt(np.mean(np.sum(P[tr].reshape(len(tr), -1) ** 2, axis=1))))
    core = {"format_version": FORMAT_VERSION, "model": {"kind": kind, **margs}, "members": states, "dim": dim,
            "kinematics": kinematics, "metrics": metrics, "bounds": _bounds(ens.members[0], F[tr]),
            "validation_spread": ens.spread(F[va]), "stress_floor": floor,
            "density": _density(ens.members[0], F[tr]),
            "calibration": _calibrate(ens, F, P, va, te, floor, tr) if len(states) >= 2 else None}
    return core, preds


def train(comm, cfg: TrainConfig, *, resume: str | None = None) -> dict:
    """Train (an ensemble of) surrogate(s); rank 0 writes the checkpoint and the report.

    Args:
        comm: communicator (ensemble members are spread over its ranks).
        cfg: :class:`TrainConfig`.
        resume: checkpoint to start the members from (same model arguments; refined on the data of cfg).

    Returns:
        The metrics dict (rank 0).
    """
    torch.set_default_dtype(torch.float64)
    if cfg.model["kind"] == "localization":
        return train_localization(comm, cfg)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device, f"{cfg.path}: device")  # before anything is read or written
    start = load_checkpoint(resume) if resume is not None else None  # refused before the data is read
    F, P, A, info = load_data(cfg)
    if start is not None:
        if start["dim"] != info["dim"] or start["kinematics"] != info["kinematics"]:
            raise ConfigError(f"--resume {resume}: checkpoint is {start['dim']}D {start['kinematics']}, the data "
                              f"{info['dim']}D {info['kinematics']}")
        if start["rve_fingerprint"] != info["fingerprint"]:
            raise ConfigError(f"--resume {resume}: checkpoint was trained on RVE {start['rve_fingerprint']}, the data "
                              f"is of RVE {info['fingerprint']}")
        if start["model"]["kind"] != cfg.model["kind"]:
            raise ConfigError(f"--resume {resume}: checkpoint model kind {start['model']['kind']} differs from "
                              f"model.kind {cfg.model['kind']}")
    if comm.rank == 0:
        try:
            cfg.output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{cfg.path}: output {cfg.output} cannot be created ({e.strerror})") from None
    tr, va, te = split_indices(len(F), cfg.split)
    tr_metrics = None
    if cfg.train.get("stream"):
        tr_metrics = tr[:STREAM_METRIC_RECORDS]  # a random subset (tr is a permutation): the tangents stay on disk
        A.keep(np.concatenate([va, te, tr_metrics]))  # read once for every member's validation and the metrics
        if cfg.loss["tangent"] > 0:
            va, te = _finite_tangents(A, va, cfg.path), _finite_tangents(A, te, cfg.path)
            tr_metrics = _finite_tangents(A, tr_metrics, cfg.path)
    margs = {k: v for k, v in cfg.model.items() if k != "kind"}
    if cfg.model["kind"] == "plain":
        margs = {"hidden": tuple(cfg.model["hidden"])}
    else:
        margs["hidden"] = tuple(margs["hidden"])
        margs.update(model_fibres(margs, info["rve"], f"{cfg.path}: model.features",
                                  f"the RVE of the data ({info['fingerprint']})", info["kinematics"]))
    if "parameters" in info:
        if cfg.model["kind"] != "potential":
            raise ConfigError(f"{cfg.path}: model.kind: the data is a parametric campaign "
                              f"({', '.join(info['parameters']['names'])}); it needs kind: potential")
        if "fibre.angle" in info["parameters"]["names"] and margs.get("features") == "anisotropic":
            raise ConfigError(f"{cfg.path}: model.features: anisotropic invariants use fixed fibre directions, and "
                              "the data varies fibre.angle; use features: general or isotropic")
        margs["parameters"] = list(info["parameters"]["names"])
        if REALIZATION in margs["parameters"]:  # realizations: one level per seed of the data
            j = margs["parameters"].index(REALIZATION)
            margs["levels"] = {REALIZATION: sorted({float(v) for v in F[:, 0, F.shape[1] + j]})}
    if start is not None and list(start["model"].get("parameters") or []) != list(margs.get("parameters") or []):
        raise ConfigError(f"--resume {resume}: checkpoint parameters {start['model'].get('parameters') or []} differ "
                          f"from those of the data {margs.get('parameters') or []}")
    if start is not None and not same_fibres(start["model"].get("fibres", []), margs.get("fibres", [])):
        raise ConfigError(f"--resume {resume}: checkpoint fibre families {start['model'].get('fibres', [])} differ "
                          f"from those of the data's RVE {margs.get('fibres', [])}")
    if comm.rank == 0:
        log.info(f"fe2ml train: {info['records']} records ({info['skipped']} NaN/inf skipped) of RVE "
              f"{info['fingerprint']}, "
              f"{info['dim']}D {info['kinematics']}; split {len(tr)}/{len(va)}/{len(te)}; {cfg.model['kind']} model "
              f"{margs}; ensemble {cfg.ensemble} on {comm.size} rank(s), device {device}, {cfg.dtype}")
    def prog(k, ep, lt, lv):
        if comm.rank == 0:
            log.info(f"  member {k}: epoch {ep:5d} train loss {lt:.3e} validation loss {lv:.3e}")

    fitted = fit_members(comm, F, P, A, tr, va, kind=cfg.model["kind"], margs=margs, dim=info["dim"],
                         kinematics=info["kinematics"], loss=cfg.loss, train=cfg.train, ensemble=cfg.ensemble,
                         device=device, dtype=torch.float32 if cfg.dtype == "float32" else torch.float64,
                         start=start["members"] if start is not None else None, progress=prog)
    if comm.rank != 0:
        return {}
    states, allh = fitted
    core, preds = assemble_checkpoint(states, cfg.model["kind"], margs, info["dim"], info["kinematics"], F, P, A,
                                      tr, va, te, tr_metrics)
    metrics, calibration = core["metrics"], core["calibration"]
    dfp = hashlib.sha256(np.ascontiguousarray(F).tobytes() + np.ascontiguousarray(P).tobytes()).hexdigest()[:16]
    ckpt = {**core, "rve_fingerprint": info["fingerprint"],
            "data_fingerprint": dfp, "records": info["records"], "skipped": info["skipped"],
            "rve": info["rve"], "config": cfg.path.read_text(), "resumed_from": str(resume) if resume else None,
            "parameters": info.get("parameters"),
            "train_s": time.perf_counter() - t0}
    save_checkpoint(ckpt, cfg.output / "checkpoint.pt")
    report = {k: v for k, v in ckpt.items() if k not in ("members", "config", "rve", "density")}
    # per member: optimiser steps (epochs, then L-BFGS polish steps from `polished_from`) and the one kept
    report["fit"] = [{"steps": len(h["train"]), "polished_from": h.get("polish_from"), "kept": h.get("best")}
                     for _, h in sorted(allh.items())]
    if calibration is not None:
        report["calibration"] = calibration_summary(calibration)
        plot_calibration(np.asarray(calibration["factor_per_point"]) * np.asarray(calibration["uncertainty"]),
                         np.asarray(calibration["error"]),
                         cfg.output / "calibration.png",
                         title=f"calibration (test split): {100 * calibration['coverage'][1]:.0f} % within 2x")
    (cfg.output / "metrics.json").write_text(json.dumps(report, indent=1))
    plot_lines({f"member {k} {s}": (np.arange(len(h[s])), h[s]) for k, h in allh.items()
                for s in ("train", "validation")}, cfg.output / "loss.png", xlabel="epoch (then L-BFGS step)",
               ylabel="loss", title="training", logy=True, markers=False)
    name = "test" if "test" in preds else "validation"
    idx = te if name == "test" else va
    plot_parity(P[idx], preds[name][0], cfg.output / "parity_P.png", title=f"P̄ parity ({name})", symbol="P")
    plot_parity(A[idx].reshape(len(idx), info["dim"] ** 2, -1), preds[name][1].reshape(len(idx), info["dim"] ** 2, -1),
                cfg.output / "parity_A.png", title=f"Ā parity ({name})", symbol="A")
    if log.isEnabledFor(logging.INFO):
        for s, m in metrics.items():
            log.info(f"  {s:>10}: stress rel. L2 {100 * m['stress_rel_l2']:.3f} %, tangent rel. L2 "
                  f"{100 * m['tangent_rel_l2']:.3f} % ({m['n']} records)")
        if calibration is not None:
            cov = calibration["coverage"]
            log.info(f"  calibration ({calibration['split']} split, {calibration['n']} points): true error <= k x "
                     f"calibrated uncertainty for {100 * cov[0]:.1f} % (k = 1), {100 * cov[1]:.1f} % (k = 2), "
                     f"{100 * cov[2]:.1f} % (k = 3; split-conformal, 2 x is the 95 % bound); error <= factor90 x "
                     "uncertainty "
                     f"(the 90 % bound) for {100 * calibration['coverage90']:.1f} %")
        log.info(f"  wrote {cfg.output}/checkpoint.pt, metrics.json, loss.png, parity_P.png, parity_A.png"
                 f"{', calibration.png' if calibration is not None else ''} ({time.perf_counter() - t0:.1f} s)")
    return report


def train_localization(comm, cfg: TrainConfig) -> dict:
    """Fit the per-cell largest principal stretch and J as functions of F̄ (rank 0)."""
    t0 = time.perf_counter()
    if comm.rank != 0:
        return {}
    data = read_logs(cfg.data, fingerprint=cfg.fingerprint, source=cfg.source, converged_only=True,
                     fields=["F", "cells/stretch", "cells/J"])
    F = data["F"]
    lam = data["cells/stretch"][..., 0]
    J = data["cells/J"]
    ok = np.isfinite(F).all(axis=(1, 2)) & np.isfinite(lam).all(axis=1) & np.isfinite(J).all(axis=1)
    skipped = int((~ok).sum())
    F, lam, J = F[ok], lam[ok], J[ok]
    if len(F) < 20:
        raise ConfigError(f"{cfg.path}: only {len(F)} usable records with cell quantities (need at least 20)")
    nc = lam.shape[1]
    Y = np.concatenate([lam - 1.0, J - 1.0], axis=1)
    tr, va, te = split_indices(len(F), cfg.split)
    torch.manual_seed(cfg.train["seed"])
    m = LocalizationNet(data.dim, nc, cfg.model["hidden"], data.kinematics)
    for prm in m.net.parameters():
        if prm.dim() > 1:
            torch.nn.init.xavier_uniform_(prm)
        else:
            torch.nn.init.zeros_(prm)
    X = m.features(F)
    m.x_scale = torch.clamp(X[tr].std(0), min=1e-8)
    Yt = torch.as_tensor(Y)
    m.y_mean = Yt[tr].mean(0)
    m.y_scale = torch.clamp(Yt[tr].std(0), min=1e-8)
    Xn = X / m.x_scale
    Yn = (Yt - m.y_mean) / m.y_scale
    opt = torch.optim.Adam(m.net.parameters(), lr=cfg.train["lr"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(cfg.train["patience"] // 4, 10))
    best = (np.inf, None, 0)
    hist = {"train": [], "validation": []}
    trt, vat = torch.as_tensor(tr), torch.as_tensor(va)
    for ep in range(cfg.train["epochs"]):
        opt.zero_grad()
        lt = torch.mean((m.net(Xn[trt]) - Yn[trt]) ** 2)
        lt.backward()
        opt.step()
        with torch.no_grad():
            lv = float(torch.mean((m.net(Xn[vat]) - Yn[vat]) ** 2))
        sched.step(lv)
        hist["train"].append(float(lt.detach()))
        hist["validation"].append(lv)
        if lv < best[0]:
            best = (lv, {k: v.clone() for k, v in m.net.state_dict().items()}, ep)
        elif ep - best[2] > cfg.train["patience"]:
            break
        if ep % 500 == 0:
            log.info(f"  epoch {ep:5d} train loss {float(lt.detach()):.3e} validation loss {lv:.3e}")
    m.net.load_state_dict(best[1])
    metrics = {}
    for name, idx in (("train", tr), ("validation", va), ("test", te)):
        if len(idx) == 0:
            continue
        pr = m.predict(F[idx])
        metrics[name] = {
            "stretch_rel": float(np.mean(np.abs(pr["stretch"] - lam[idx]) / lam[idx])),
            "J_rel": float(np.mean(np.abs(pr["J"] - J[idx]) / J[idx])),
            "stretch_minus_1_rel_l2": _rel(pr["stretch"] - 1, lam[idx] - 1),
            "J_minus_1_rel_l2": _rel(pr["J"] - 1, J[idx] - 1), "n": int(len(idx))}
    cfg.output.mkdir(parents=True, exist_ok=True)
    ck = {"format_version": FORMAT_VERSION, "model": {"kind": "localization", "hidden": list(cfg.model["hidden"])},
          "members": [m.net.state_dict()], "dim": data.dim, "kinematics": data.kinematics,
          "rve_fingerprint": data.fingerprint, "n_cells": nc, "x_scale": m.x_scale, "y_mean": m.y_mean,
          "y_scale": m.y_scale, "metrics": metrics, "records": int(len(F)), "skipped": skipped,
          "config": cfg.path.read_text(), "train_s": time.perf_counter() - t0}
    save_checkpoint(ck, cfg.output / "checkpoint.pt")
    report = {k: v for k, v in ck.items() if k not in ("members", "config", "x_scale", "y_mean", "y_scale")}
    (cfg.output / "metrics.json").write_text(json.dumps(report, indent=1))
    plot_lines({s: (np.arange(len(h)), h) for s, h in hist.items()}, cfg.output / "loss.png", xlabel="epoch",
               ylabel="loss", title="localization training", logy=True, markers=False)
    idx = te if len(te) else va
    pr = m.predict(F[idx])
    plot_parity(lam[idx], pr["stretch"], cfg.output / "parity_stretch.png", title="cell stretch parity",
                symbol="cell")
    if log.isEnabledFor(logging.INFO):
        for s_, mm in metrics.items():
            log.info(f"  {s_:>10}: cell stretch rel. error {100 * mm['stretch_rel']:.3f} % (of λ−1: "
                  f"{100 * mm['stretch_minus_1_rel_l2']:.2f} %), J {100 * mm['J_rel']:.3f} % (of J−1: "
                  f"{100 * mm['J_minus_1_rel_l2']:.2f} %)")
        log.info(f"  wrote {cfg.output}/checkpoint.pt, metrics.json, loss.png, parity_stretch.png")
    return report
