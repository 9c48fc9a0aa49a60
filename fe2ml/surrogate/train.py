"""Training surrogates on fe2ml logs: ``fe2ml train CONFIG.yaml [--resume CKPT]``.

Config keys::

    data: [PATH, ...]                 log files or folders (relative to the YAML)
    fingerprint: HEX                  RVE fingerprint (needed when the logs hold several)
    source: ID                        only records of this source id / kind (optional)
    model: {kind: potential | plain, hidden: [16, 16], features: general | isotropic, convex: false}
    loss: {stress: 1.0, tangent: 0.1} Sobolev loss weights (tangent > 0 needs tangents in the log)
    split: {validation: 0.15, test: 0.15, seed: 0}
    train: {epochs: 3000, lr: 0.01, patience: 300, seed: 0}
    ensemble: 1                       K members (seeds seed..seed+K-1), spread over the MPI ranks
    output: PATH                      folder for checkpoint.pt, metrics.json, loss.png, parity plots

Checkpoint (``torch.save`` dict, ``format_version`` 1): model kind and arguments, the members' weights,
normalisation buffers, dim, kinematics, RVE fingerprint, training-data fingerprint, metrics, bounds of
the training data (feature box, principal stretch and J ranges) and the prediction spread of the
ensemble on the validation set.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fe2ml.config import check_keys, load_yaml, number
from fe2ml.errors import ConfigError

__all__ = ["FORMAT_VERSION", "TrainConfig", "check_checkpoint", "load_checkpoint", "load_train_config", "train"]

FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    """Validated training configuration."""

    path: Path
    data: list
    fingerprint: str | None
    source: str | None
    model: dict
    loss: dict
    split: dict
    train: dict
    ensemble: int
    output: Path


def load_train_config(path, *, output=None) -> TrainConfig:
    """Load and validate a training YAML (errors name the file and key)."""
    p = Path(path)
    raw = load_yaml(p)
    f = str(p)
    check_keys(raw, ("data", "fingerprint", "source", "model", "loss", "split", "train", "ensemble", "output"), f)
    data = raw.get("data")
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{f}: data: expected a list of log files or folders")
    data = [p.parent / str(d) for d in data]
    for d in data:
        if not d.exists():
            raise ConfigError(f"{f}: data: {d} not found")
    model = dict(raw.get("model", {}) or {})
    check_keys(model, ("kind", "hidden", "features", "convex"), f"{f}: model")
    model.setdefault("kind", "potential")
    if model["kind"] not in ("potential", "plain", "localization"):
        raise ConfigError(f"{f}: model.kind: expected potential, plain or localization, got {model['kind']!r}")
    hid = model.setdefault("hidden", [16, 16])
    if not isinstance(hid, list) or not hid or not all(isinstance(h, int) and h > 0 for h in hid):
        raise ConfigError(f"{f}: model.hidden: expected a list of positive layer widths, got {hid!r}")
    if model["kind"] == "potential":
        model.setdefault("features", "general")
        model.setdefault("convex", False)
        if model["features"] not in ("general", "isotropic"):
            raise ConfigError(f"{f}: model.features: expected general or isotropic, got {model['features']!r}")
        if not isinstance(model["convex"], bool):
            raise ConfigError(f"{f}: model.convex: expected true or false")
    elif "features" in model or "convex" in model:
        raise ConfigError(f"{f}: model: features/convex apply to kind potential only")
    if model["kind"] == "localization" and raw.get("loss") is not None:
        raise ConfigError(f"{f}: loss: not used by model.kind localization (it fits cell stretch and J)")
    loss = dict(raw.get("loss", {}) or {})
    check_keys(loss, ("stress", "tangent", "relative"), f"{f}: loss")
    rel = loss.get("relative", False)
    if not isinstance(rel, bool):
        raise ConfigError(f"{f}: loss.relative: expected true or false, got {rel!r}")
    loss = {"stress": number(loss.get("stress", 1.0), f"{f}: loss.stress"),
            "tangent": number(loss.get("tangent", 0.1), f"{f}: loss.tangent"), "relative": rel}
    if loss["stress"] < 0 or loss["tangent"] < 0 or loss["stress"] + loss["tangent"] == 0:
        raise ConfigError(f"{f}: loss: weights must be >= 0 and not both 0")
    split = dict(raw.get("split", {}) or {})
    check_keys(split, ("validation", "test", "seed"), f"{f}: split")
    split = {"validation": number(split.get("validation", 0.15), f"{f}: split.validation"),
             "test": number(split.get("test", 0.15), f"{f}: split.test"), "seed": int(split.get("seed", 0))}
    if not (0 < split["validation"] < 1 and 0 <= split["test"] < 1 and split["validation"] + split["test"] < 0.9):
        raise ConfigError(f"{f}: split: validation in (0, 1), test in [0, 1), together < 0.9")
    tr = dict(raw.get("train", {}) or {})
    check_keys(tr, ("epochs", "lr", "patience", "seed"), f"{f}: train")
    tr = {"epochs": tr.get("epochs", 3000), "lr": number(tr.get("lr", 0.01), f"{f}: train.lr", positive=True),
          "patience": tr.get("patience", 300), "seed": tr.get("seed", 0)}
    for k in ("epochs", "patience", "seed"):
        if not isinstance(tr[k], int) or isinstance(tr[k], bool) or tr[k] < 0:
            raise ConfigError(f"{f}: train.{k}: expected a non-negative integer, got {tr[k]!r}")
    ens = raw.get("ensemble", 1)
    if not isinstance(ens, int) or isinstance(ens, bool) or not 1 <= ens <= 64:
        raise ConfigError(f"{f}: ensemble: expected an integer 1..64, got {ens!r}")
    out = Path(output) if output is not None else p.parent / str(raw.get("output", f"results/{p.stem}"))
    return TrainConfig(path=p, data=data, fingerprint=raw.get("fingerprint"), source=raw.get("source"), model=model,
                       loss=loss, split=split, train=tr, ensemble=ens, output=out)


def _rel(a, b):
    return float(np.sqrt(np.sum((a - b) ** 2)) / max(np.sqrt(np.sum(b**2)), 1e-300))


def load_data(cfg: TrainConfig):
    """Records for training: (F, P, A, info) with NaN/inf records removed (counted)."""
    from fe2ml.data.reader import read_logs

    data = read_logs(cfg.data, fingerprint=cfg.fingerprint, source=cfg.source, converged_only=True,
                     fields=["F", "P", "A", "converged"])
    F, P, A = data["F"], data["P"], data["A"]
    need_A = cfg.loss["tangent"] > 0
    ok = np.isfinite(F).all(axis=(1, 2)) & np.isfinite(P).all(axis=(1, 2))
    if need_A:
        hasA = np.isfinite(A).reshape(len(A), -1).all(axis=1)
        if len(A) and not hasA.any():
            raise ConfigError(f"{cfg.path}: loss.tangent > 0 but the logs hold no tangents; set loss.tangent: 0")
        ok &= hasA
    skipped = int((~ok).sum())
    F, P, A = F[ok], P[ok], A[ok]
    if len(F) < 20:
        raise ConfigError(f"{cfg.path}: only {len(F)} usable records (need at least 20 for train/validation/test)")
    info = {"fingerprint": data.fingerprint, "dim": data.dim, "kinematics": data.kinematics, "skipped": skipped,
            "records": int(len(F)), "rve": data.rve}
    return F, P, A, info


def _split(n, split):
    rng = np.random.default_rng(split["seed"])
    perm = rng.permutation(n)
    n_val = max(1, int(round(split["validation"] * n)))
    n_test = int(round(split["test"] * n))
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def _fit_member(model, F, P, A, tr_idx, va_idx, loss_w, tcfg, seed, progress=None, reinit=True):
    import torch

    torch.manual_seed(seed)
    if reinit:
        for prm in model.parameters():  # initialise reproducibly
            if prm.dim() > 1:
                torch.nn.init.xavier_uniform_(prm)
            else:
                torch.nn.init.zeros_(prm)
    Ft, Pt, At = (torch.as_tensor(x) for x in (F, P, A))
    a_scale = float(np.sqrt(np.mean(A[tr_idx] ** 2))) if loss_w["tangent"] > 0 else 1.0
    p_scale = float(model.p_scale)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg["lr"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(tcfg["patience"] // 4, 10))

    # relative: weigh each record by 1 / (its stress magnitude² + (0.1 RMS)²), so that the small-strain
    # regime (small stresses) counts as much as large deformations
    if loss_w.get("relative"):
        mag = (Pt ** 2).reshape(len(Pt), -1).mean(1)
        wts = 1.0 / (mag + (0.1 * p_scale) ** 2)
        wts = wts / wts[torch.as_tensor(tr_idx)].mean()
    else:
        wts = torch.ones(len(Pt))

    def loss_on(idx, create_graph):
        Pp, Ap = model.stress_tangent(Ft[idx], create_graph=create_graph)
        lp = torch.mean(wts[idx][:, None, None] * (Pp - Pt[idx]) ** 2) / p_scale**2
        la = torch.mean((Ap - At[idx]) ** 2) / a_scale**2 if loss_w["tangent"] > 0 else torch.zeros(())
        return loss_w["stress"] * lp + loss_w["tangent"] * la

    best = (np.inf, None, 0)
    hist = {"train": [], "validation": []}
    for ep in range(tcfg["epochs"]):
        opt.zero_grad()
        lt = loss_on(tr_idx, True)
        lt.backward()
        opt.step()
        lv = float(loss_on(va_idx, True).detach())
        sched.step(lv)
        hist["train"].append(float(lt.detach()))
        hist["validation"].append(lv)
        if lv < best[0]:
            best = (lv, {k: v.detach().clone() for k, v in model.state_dict().items()}, ep)
        elif ep - best[2] > tcfg["patience"]:
            break
        if progress is not None and (ep % 100 == 0 or ep == tcfg["epochs"] - 1):
            progress(ep, float(lt.detach()), lv)
    model.load_state_dict(best[1])
    return hist, best[2]


def _bounds(model, F):
    import torch

    x = model.features_of(torch.as_tensor(F)).detach().numpy()
    lam = np.sqrt(np.clip(np.linalg.eigvalsh(np.einsum("nki,nkj->nij", F, F)), 0, None))
    return {"feature_min": x.min(axis=0).tolist(), "feature_max": x.max(axis=0).tolist(),
            "stretch_min": float(lam.min()), "stretch_max": float(lam.max()),
            "J_min": float(np.linalg.det(F).min()), "J_max": float(np.linalg.det(F).max())}


def train(comm, cfg: TrainConfig, *, resume: str | None = None, quiet: bool = False) -> dict:
    """Train (an ensemble of) surrogate(s); rank 0 writes the checkpoint and the report.

    Args:
        comm: communicator (ensemble members are spread over its ranks).
        cfg: :class:`TrainConfig`.
        resume: checkpoint to start the members from (same model arguments; refined on the data of cfg).
        quiet: no progress output.

    Returns:
        The metrics dict (rank 0).
    """
    import torch

    from fe2ml.surrogate.models import build_model

    torch.set_default_dtype(torch.float64)
    if cfg.model["kind"] == "localization":
        return train_localization(comm, cfg, quiet=quiet)
    t0 = time.perf_counter()
    F, P, A, info = load_data(cfg)
    start = None
    if resume is not None:
        start = load_checkpoint(resume)
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
    tr, va, te = _split(len(F), cfg.split)
    margs = {k: v for k, v in cfg.model.items() if k != "kind"}
    if cfg.model["kind"] == "plain":
        margs = {"hidden": tuple(cfg.model["hidden"])}
    else:
        margs["hidden"] = tuple(margs["hidden"])
    if not quiet and comm.rank == 0:
        print(f"fe2ml train: {info['records']} records ({info['skipped']} NaN/inf skipped) of RVE "
              f"{info['fingerprint']}, "
              f"{info['dim']}D {info['kinematics']}; split {len(tr)}/{len(va)}/{len(te)}; {cfg.model['kind']} model "
              f"{margs}; ensemble {cfg.ensemble} on {comm.size} rank(s)", flush=True)
    members = {}
    hists = {}
    for k in range(cfg.ensemble):
        if k % comm.size != comm.rank:
            continue
        model = build_model(cfg.model["kind"], info["dim"], info["kinematics"], **margs)
        x = model.features_of(torch.as_tensor(F[tr])).detach()
        model.x_scale[:] = torch.clamp(x.std(0), min=1e-8) if len(tr) > 1 else 1.0
        model.p_scale.fill_(float(np.sqrt(np.mean(P[tr] ** 2))) or 1.0)

        def prog(ep, lt, lv, k=k):
            if not quiet and comm.rank == 0:
                print(f"  member {k}: epoch {ep:5d} train loss {lt:.3e} validation loss {lv:.3e}", flush=True)

        tcfg = dict(cfg.train)
        seed = cfg.train["seed"] + k
        if start is not None:
            model.load_state_dict(start["members"][k % len(start["members"])])
            hist, best = _fit_member(model, F, P, A, tr, va, cfg.loss, tcfg, seed, prog, reinit=False)
        else:
            hist, best = _fit_member(model, F, P, A, tr, va, cfg.loss, tcfg, seed, prog)
        members[k] = {n: v.clone() for n, v in model.state_dict().items()}
        hists[k] = hist
    gathered = comm.gather((members, hists), root=0)
    if comm.rank != 0:
        return {}
    allm, allh = {}, {}
    for m_, h_ in gathered:
        allm.update(m_)
        allh.update(h_)
    states = [allm[k] for k in range(cfg.ensemble)]
    ens = EnsembleModel.from_states(cfg.model["kind"], info["dim"], info["kinematics"], margs, states)
    metrics = {}
    preds = {}
    for name, idx in (("train", tr), ("validation", va), ("test", te)):
        if len(idx) == 0:
            continue
        Pp, Ap = ens.evaluate(F[idx])
        preds[name] = (Pp, Ap)
        metrics[name] = {"stress_rel_l2": _rel(Pp, P[idx]), "tangent_rel_l2": _rel(Ap, A[idx]), "n": int(len(idx))}
    spread = ens.spread(F[va])
    dfp = hashlib.sha256(np.ascontiguousarray(F).tobytes() + np.ascontiguousarray(P).tobytes()).hexdigest()[:16]
    ckpt = {"format_version": FORMAT_VERSION, "model": {"kind": cfg.model["kind"], **margs}, "members": states,
            "dim": info["dim"], "kinematics": info["kinematics"], "rve_fingerprint": info["fingerprint"],
            "data_fingerprint": dfp, "metrics": metrics, "bounds": _bounds(ens.members[0], F[tr]),
            "validation_spread": spread, "records": info["records"], "skipped": info["skipped"],
            "rve": info["rve"], "config": cfg.path.read_text(), "resumed_from": str(resume) if resume else None,
            "train_s": time.perf_counter() - t0}
    import os

    tmp = cfg.output / "checkpoint.pt.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, cfg.output / "checkpoint.pt")
    report = {k: v for k, v in ckpt.items() if k not in ("members", "config", "rve")}
    (cfg.output / "metrics.json").write_text(json.dumps(report, indent=1))
    from fe2ml.plotting import plot_lines, plot_parity

    plot_lines({f"member {k} {s}": (np.arange(len(h[s])), h[s]) for k, h in allh.items()
                for s in ("train", "validation")}, cfg.output / "loss.png", xlabel="epoch", ylabel="loss",
               title="training", logy=True, markers=False)
    name = "test" if "test" in preds else "validation"
    idx = te if name == "test" else va
    plot_parity(P[idx], preds[name][0], cfg.output / "parity_P.png", title=f"P̄ parity ({name})", symbol="P")
    plot_parity(A[idx].reshape(len(idx), info["dim"] ** 2, -1), preds[name][1].reshape(len(idx), info["dim"] ** 2, -1),
                cfg.output / "parity_A.png", title=f"Ā parity ({name})", symbol="A")
    if not quiet:
        for s, m in metrics.items():
            print(f"  {s:>10}: stress rel. L2 {100 * m['stress_rel_l2']:.3f} %, tangent rel. L2 "
                  f"{100 * m['tangent_rel_l2']:.3f} % ({m['n']} records)")
        print(f"  wrote {cfg.output}/checkpoint.pt, metrics.json, loss.png, parity_P.png, parity_A.png "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return report


class EnsembleModel:
    """K members of one architecture: mean prediction and spread."""

    def __init__(self, members):
        self.members = members
        self.dim = members[0].dim
        self.kinematics = members[0].kinematics

    @classmethod
    def from_states(cls, kind, dim, kinematics, margs, states):
        """Build members from state dicts."""
        from fe2ml.surrogate.models import build_model

        ms = []
        for st in states:
            m = build_model(kind, dim, kinematics, **margs)
            m.load_state_dict(st)
            m.eval()
            ms.append(m)
        return cls(ms)

    def evaluate_members(self, F):
        """Per-member predictions: lists of (n,d,d) and (n,d,d,d,d) arrays."""
        if not hasattr(self, "_np"):
            self._np = [getattr(m, "numpy_evaluator", lambda: None)() for m in self.members]
        out = []
        for m, f in zip(self.members, self._np, strict=True):
            if f is None:
                out.append(m.evaluate(F))
            else:  # numpy closed form in chunks (cache friendly, no torch overhead for small batches)
                F = np.asarray(F, dtype=np.float64)
                parts = [f(F[i:i + 1024]) for i in range(0, len(F), 1024)]
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
    import torch

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: checkpoint not found")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{p}: not a readable checkpoint ({msg})") from None
    if not isinstance(ck, dict) or ck.get("format_version") != FORMAT_VERSION:
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


class _LocNet:
    """Localization network: strain features of F̄ -> (largest principal stretch − 1, J − 1) per cell."""

    def __init__(self, dim, n_cells, hidden, kinematics="finite"):
        from fe2ml.surrogate.models import MLP, PotentialModel

        self.feat = PotentialModel(dim, kinematics, hidden=(2,))  # only for its objective strain features
        self.n_in = len(self.feat.idx)
        self.net = MLP(self.n_in, list(hidden), 2 * n_cells).double()
        self.n_cells = n_cells
        import torch

        self.x_scale = torch.ones(self.n_in)
        self.y_mean = torch.zeros(2 * n_cells)
        self.y_scale = torch.ones(2 * n_cells)

    def features(self, F):
        import torch

        return self.feat.features_of(torch.as_tensor(np.asarray(F, dtype=np.float64))).detach()

    def forward(self, F):
        return self.net(self.features(F) / self.x_scale) * self.y_scale + self.y_mean

    def predict(self, F) -> dict:
        """{"stretch": (n, c), "J": (n, c)}."""
        import torch

        with torch.no_grad():
            out = []
            for i in range(0, len(F), 65536):
                out.append(self.forward(F[i:i + 65536]).numpy())
            y = np.concatenate(out) if out else np.zeros((0, 2 * self.n_cells))
        c = self.n_cells
        return {"stretch": 1.0 + y[:, :c], "J": 1.0 + y[:, c:]}


def build_localization_model(ck) -> _LocNet:
    """Rebuild a localization network from its checkpoint."""
    import torch

    m = _LocNet(ck["dim"], ck["n_cells"], ck["model"]["hidden"], ck["kinematics"])
    m.net.load_state_dict(ck["members"][0])
    m.x_scale = torch.as_tensor(ck["x_scale"])
    m.y_mean = torch.as_tensor(ck["y_mean"])
    m.y_scale = torch.as_tensor(ck["y_scale"])
    return m


def train_localization(comm, cfg: TrainConfig, *, quiet=False) -> dict:
    """Fit the per-cell largest principal stretch and J as functions of F̄ (rank 0)."""
    import os

    import torch

    from fe2ml.data.reader import read_logs

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
    tr, va, te = _split(len(F), cfg.split)
    torch.manual_seed(cfg.train["seed"])
    m = _LocNet(data.dim, nc, cfg.model["hidden"], data.kinematics)
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
        if not quiet and ep % 500 == 0:
            print(f"  epoch {ep:5d} train loss {float(lt.detach()):.3e} validation loss {lv:.3e}", flush=True)
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
    tmp = cfg.output / "checkpoint.pt.tmp"
    torch.save(ck, tmp)
    os.replace(tmp, cfg.output / "checkpoint.pt")
    report = {k: v for k, v in ck.items() if k not in ("members", "config", "x_scale", "y_mean", "y_scale")}
    (cfg.output / "metrics.json").write_text(json.dumps(report, indent=1))
    from fe2ml.plotting import plot_lines, plot_parity

    plot_lines({s: (np.arange(len(h)), h) for s, h in hist.items()}, cfg.output / "loss.png", xlabel="epoch",
               ylabel="loss", title="localization training", logy=True, markers=False)
    idx = te if len(te) else va
    pr = m.predict(F[idx])
    plot_parity(lam[idx], pr["stretch"], cfg.output / "parity_stretch.png", title="cell stretch parity",
                symbol="cell")
    if not quiet:
        for s_, mm in metrics.items():
            print(f"  {s_:>10}: cell stretch rel. error {100 * mm['stretch_rel']:.3f} % (of λ−1: "
                  f"{100 * mm['stretch_minus_1_rel_l2']:.2f} %), J {100 * mm['J_rel']:.3f} % (of J−1: "
                  f"{100 * mm['J_minus_1_rel_l2']:.2f} %)")
        print(f"  wrote {cfg.output}/checkpoint.pt, metrics.json, loss.png, parity_stretch.png", flush=True)
    return report
