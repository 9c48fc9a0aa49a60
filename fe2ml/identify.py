"""``fe2ml identify``: microstructure parameters from macro measurements, with their uncertainty.

Given a run whose material is a parametric surrogate (``material.kind: surrogate``, ``material.parameters``), the
unknown parameters θ (a subset of p, constant over the body) and measured reaction curves and boundary mean
displacements (a CSV with the columns of the run's ``reactions.csv``), find θ by Gauss–Newton (Levenberg–Marquardt)
on the weighted least-squares misfit plus a Gaussian prior, where every Jacobian comes from the forward
sensitivities of the macro equilibrium (:meth:`fe2ml.macro.problem.MacroProblem.parameter_sensitivities`: one
tangent and k solves per load step, not a run per parameter). The uncertainty is the Laplace approximation of the
posterior at the estimate, Σ = (Jᵀ W J + Σ_prior⁻¹)⁻¹ with W the inverse noise variances; correlations above 0.95
flag parameter pairs the data cannot separate. An optional final FE² run with nested RVEs at the estimate shows
whether the surrogate was right there.

Config keys::

    run: PATH                                 the run YAML (a parametric surrogate; its values start the search)
    unknowns: {NAME: {prior: uniform | {mean: m, std: s}, start: x}}   NAME: a parameter of the checkpoint
    data: {file: PATH, columns: [right_R1, right_u2_mean, ...]}          CSV with a column t (load steps of the run)
    experiments: [{run: PATH, data: {...}}, ...]   instead of run and data: several tests of the same tissue (e.g.
                                              uniaxial and confined), all with the same parametric checkpoint
    noise: {relative: auto | s} | {absolute: {COLUMN: sigma}}            default relative: auto (estimated)
    check: true | false                        final nested FE² run at the estimate (needs material.rve)
    correct: 0 | N                             FE² output-correction rounds: nested FE² at the estimate gives the
                                               surrogate's discrepancy d, and the search is repeated on y(θ) + d
    max_iterations: 30
    output: PATH                               identify.json and identify.png
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fe2ml.config import check_keys, load_yaml, number
from fe2ml.errors import ConfigError, Fe2mlError
from fe2ml.macro.config import RunConfig, load_run_config

__all__ = ["Experiment", "ForwardModel", "IdentifyConfig", "identify", "load_identify_config"]

log = logging.getLogger(__name__)

CORRELATED = 0.95
"""|correlation| above which two parameters are reported as not separately identifiable by the data."""


@dataclass(frozen=True)
class Experiment:
    """One measured test.

    Its run config, the data times (T,), columns (C,) and values (T, C), and the named points of its
    point-displacement columns ({name: (d,)}).
    """

    run: RunConfig
    times: np.ndarray
    columns: tuple
    data: np.ndarray
    points: dict


@dataclass(frozen=True)
class IdentifyConfig:
    """Validated ``fe2ml identify`` configuration."""

    path: Path
    run: RunConfig           # the first experiment's run (the parameters and their box)
    unknowns: tuple          # names, in order
    start: np.ndarray        # (m,)
    lo: np.ndarray           # (m,) the trained box (the search stays inside it)
    hi: np.ndarray
    prior_mean: np.ndarray   # (m,) nan where uniform
    prior_std: np.ndarray    # (m,) inf where uniform
    experiments: tuple       # Experiment, ...
    noise: dict
    check: bool
    max_iterations: int
    correct: int
    output: Path
    mcmc: int = 0            # random-walk Metropolis samples of the posterior with the surrogate (0: none)


_COLUMN = re.compile(r"^(?P<b>.+)_(?:R(?P<r>\d)|u(?P<u>\d)_mean|u(?P<q>\d))$")
_POINT = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def load_identify_config(path, *, output: str | None = None) -> IdentifyConfig:
    """Load and validate an identify YAML (errors name the file and the key)."""
    p = Path(path)
    raw = load_yaml(p)
    f = str(p)
    check_keys(raw, ("run", "unknowns", "data", "experiments", "noise", "check", "correct", "max_iterations",
                     "mcmc", "output"), f)
    if "experiments" in raw:
        if "run" in raw or "data" in raw:
            raise ConfigError(f"{f}: give either run and data, or experiments (a list of {{run, data}})")
        exps = raw["experiments"]
        if not isinstance(exps, list) or not exps or not all(isinstance(e, dict) for e in exps):
            raise ConfigError(f"{f}: experiments: expected a list of {{run: PATH, data: {{file, columns}}}}")
        for k, e in enumerate(exps):
            check_keys(e, ("run", "data"), f"{f}: experiments[{k}]")
        where = [f"{f}: experiments[{k}]" for k in range(len(exps))]
    else:
        exps = [{"run": raw.get("run"), "data": raw.get("data")}]
        where = [f]
    if "unknowns" not in raw:
        raise ConfigError(f"{f}: missing required key 'unknowns'")
    runs = []
    for e, w in zip(exps, where, strict=True):
        for key in ("run", "data"):
            if e.get(key) is None:
                raise ConfigError(f"{w}: missing required key '{key}'")
        if not isinstance(e["run"], str):
            raise ConfigError(f"{w}: run: expected the path of a run YAML, got {e['run']!r}")
        rp = p.parent / e["run"]
        if not rp.is_file():
            raise ConfigError(f"{w}: run: {rp} not found")
        run = load_run_config(rp)
        if run.kind != "surrogate" or run.parameters is None:
            raise ConfigError(f"{w}: run: {rp} must use a parametric surrogate (material.kind: surrogate with "
                              f"material.parameters); it has material.kind {run.kind}"
                              + ("" if run.parameters is not None else " without parameters"))
        if run.parameters.constant is None:
            raise ConfigError(f"{w}: run: material.parameters of {rp} must be constants (the unknowns are constant "
                              "over the body)")
        if runs and (run.parameters.names != runs[0].parameters.names or run.parameters.box != runs[0].parameters.box):
            raise ConfigError(f"{w}: run: {rp} uses another parametric checkpoint than the first experiment")
        runs.append(run)
    run = runs[0]
    rp = run.path
    pr = run.parameters
    unk = raw["unknowns"]
    if not isinstance(unk, dict) or not unk:
        raise ConfigError(f"{f}: unknowns: expected a mapping of parameter names, e.g. "
                          f"{{{pr.names[0]}: {{prior: uniform}}}}")
    names, start, lo, hi, pm, ps = [], [], [], [], [], []
    for name, spec in unk.items():
        name = str(name)
        w = f"{f}: unknowns.{name}"
        if name not in pr.names:
            raise ConfigError(f"{w}: not a parameter of the checkpoint; its parameters are {list(pr.names)}")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise ConfigError(f"{w}: expected a mapping {{prior: uniform | {{mean: M, std: S}}, start: X}}")
        check_keys(spec, ("prior", "start"), w)
        a, b = pr.box[name]
        prior = spec.get("prior", "uniform")
        if prior == "uniform":
            pm.append(np.nan)
            ps.append(np.inf)
        elif isinstance(prior, dict) and set(prior) == {"mean", "std"}:
            pm.append(number(prior["mean"], f"{w}.prior.mean"))
            ps.append(number(prior["std"], f"{w}.prior.std", positive=True))
        else:
            raise ConfigError(f"{w}.prior: expected uniform (over the trained box [{a:g}, {b:g}]) or "
                              f"{{mean: M, std: S}}, got {prior!r}")
        i = pr.names.index(name)
        x0 = number(spec.get("start", pr.constant[i]), f"{w}.start")
        if not a <= x0 <= b:
            raise ConfigError(f"{w}.start: {x0:g} is outside the trained box [{a:g}, {b:g}]")
        names.append(name)
        start.append(x0)
        lo.append(a)
        hi.append(b)
    experiments = []
    all_cols: list[str] = []
    for e, w, run_k in zip(exps, where, runs, strict=True):
        experiments.append(_experiment(e["data"], run_k, w, p.parent))
        all_cols += list(experiments[-1].columns)
    noise = raw.get("noise", {"relative": "auto"})
    if not isinstance(noise, dict) or len(noise) != 1 or next(iter(noise)) not in ("relative", "absolute"):
        raise ConfigError(f"{f}: noise: expected {{relative: auto | S}} or {{absolute: {{COLUMN: SIGMA}}}}, "
                          f"got {noise!r}")
    if "relative" in noise and noise["relative"] != "auto":
        noise = {"relative": number(noise["relative"], f"{f}: noise.relative", positive=True)}
    if "absolute" in noise:
        ab = noise["absolute"]
        if not isinstance(ab, dict) or set(map(str, ab)) != set(all_cols):
            raise ConfigError(f"{f}: noise.absolute: expected a standard deviation for every data column "
                              f"{sorted(set(all_cols))}")
        noise = {"absolute": {str(k): number(v, f"{f}: noise.absolute.{k}", positive=True) for k, v in ab.items()}}
    mi = raw.get("max_iterations", 30)
    if not isinstance(mi, int) or isinstance(mi, bool) or not 1 <= mi <= 1000:
        raise ConfigError(f"{f}: max_iterations: expected an integer 1..1000, got {mi!r}")
    check = raw.get("check", False)
    if not isinstance(check, bool):
        raise ConfigError(f"{f}: check: expected true or false, got {check!r}")
    mcmc = raw.get("mcmc", 0)
    if not isinstance(mcmc, int) or isinstance(mcmc, bool) or not 0 <= mcmc <= 100_000:
        raise ConfigError(f"{f}: mcmc: expected the number of posterior samples 0..100000 (0: none), got {mcmc!r}")
    corr = raw.get("correct", 0)
    if not isinstance(corr, int) or isinstance(corr, bool) or not 0 <= corr <= 10:
        raise ConfigError(f"{f}: correct: expected the number of FE² correction rounds 0..10, got {corr!r}")
    if (check or corr) and any(r.rve is None for r in runs):
        raise ConfigError(f"{f}: check and correct: the FE² runs need material.rve in every run (the base RVE of "
                          "the campaign)")
    out = output if output is not None else raw.get("output", str(Path("results") / p.stem))
    return IdentifyConfig(path=p, run=run, unknowns=tuple(names), start=np.array(start), lo=np.array(lo),
                          hi=np.array(hi), prior_mean=np.array(pm), prior_std=np.array(ps),
                          experiments=tuple(experiments), noise=noise, check=check, correct=corr,
                          max_iterations=mi, mcmc=mcmc,
                          output=Path(out) if output is not None else p.parent / out)


def _experiment(dat, run: RunConfig, f: str, base: Path) -> Experiment:
    """Validate one experiment's ``data`` against its run's boundaries and load steps."""
    if not isinstance(dat, dict) or "file" not in dat or "columns" not in dat:
        raise ConfigError(f"{f}: data: expected {{file: measured.csv, columns: [right_R1, right_u2_mean], "
                          "points: {A: [x, y]} (optional)}")
    check_keys(dat, ("file", "columns", "points"), f"{f}: data")
    cols = dat["columns"]
    if not isinstance(cols, list) or not cols or not all(isinstance(c, str) for c in cols):
        raise ConfigError(f"{f}: data.columns: expected a list of column names, got {cols!r}")
    points = {}
    raw_pts = dat.get("points", {}) or {}
    if not isinstance(raw_pts, dict):
        raise ConfigError(f"{f}: data.points: expected a mapping {{NAME: [x, y{', z' if run.dim == 3 else ''}]}}, "
                          f"got {raw_pts!r}")
    for name, X in raw_pts.items():
        w = f"{f}: data.points.{name}"
        if not isinstance(name, str) or not _POINT.match(name):
            raise ConfigError(f"{w}: a point name is a letter followed by letters or digits (it names the columns "
                              f"NAME_u1 .. NAME_u{run.dim})")
        if not isinstance(X, list) or len(X) != run.dim:
            raise ConfigError(f"{w}: expected {run.dim} coordinates, got {X!r}")
        points[name] = tuple(number(x, f"{w}[{i}]") for i, x in enumerate(X))
    reac = [s.boundary for s in run.bcs]
    reported = list(dict.fromkeys(reac + [s.boundary for s in run.tractions] + [s.boundary for s in run.pressures]))
    allowed = ([f"{b}_R{c + 1}" for b in dict.fromkeys(reac) for c in range(run.dim)]
               + [f"{b}_u{c + 1}_mean" for b in reported for c in range(run.dim)]
               + [f"{q}_u{c + 1}" for q in points for c in range(run.dim)])
    bad = [c for c in cols if c not in allowed]
    if bad:
        raise ConfigError(f"{f}: data.columns: {bad} do not match the run's boundaries or data.points; allowed: "
                          f"{', '.join(allowed)}")
    times, values = _read_csv(base / str(dat["file"]), cols, f"{f}: data.file")
    steps = np.arange(1, run.steps + 1) / run.steps
    off = [t for t in times if np.min(np.abs(steps - t)) > 1e-9]
    if off:
        raise ConfigError(f"{f}: data.file: time(s) {off[:3]} are not load steps of the run (t = k/{run.steps}, "
                          f"k = 1..{run.steps}; t = 0 carries no information)")
    return Experiment(run=run, times=times, columns=tuple(cols), data=values, points=points)


def _read_csv(path: Path, cols, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Columns t and ``cols`` of a CSV file, (T,) and (T, C), with one-line errors."""
    if not path.is_file():
        raise ConfigError(f"{where}: {path} not found")
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{where}: {path} cannot be read ({e})") from None
    if not rows:
        raise ConfigError(f"{where}: {path} is empty")
    head = [h.strip() for h in rows[0]]
    missing = [c for c in ["t", *cols] if c not in head]
    if missing:
        raise ConfigError(f"{where}: {path} has no column(s) {missing}; its columns are {head}")
    idx = [head.index(c) for c in ["t", *cols]]
    try:
        arr = np.array([[float(r[i]) for i in idx] for r in rows[1:] if r], dtype=float)
    except (ValueError, IndexError):
        raise ConfigError(f"{where}: {path}: a row is short or not numeric") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ConfigError(f"{where}: {path}: no rows, or a value that is not finite")
    keep = arr[:, 0] > 1e-12
    return arr[keep, 0], arr[keep, 1:]


def _columns(names) -> list[tuple[str, str, int]]:
    """(reactions | mean_displacements | points, boundary or point name, component) of each data column."""
    out = []
    for c in names:
        m = _COLUMN.match(c)
        kind = "reactions" if m.group("r") else "mean_displacements" if m.group("u") else "points"
        out.append((kind, m.group("b"), int(m.group("r") or m.group("u") or m.group("q")) - 1))
    return out


def _probe(prob, exp: Experiment):
    """The point probe of an experiment's named points, {name: row} (collective); None without points.

    Raises:
        ConfigError: a point outside the macro mesh.
    """
    if not exp.points:
        return None
    names = list(exp.points)
    probe = prob.point_probe(np.array([exp.points[q] for q in names]), names)
    if len(probe.missing):
        q = names[int(probe.missing[0])]
        raise ConfigError(f"{exp.run.path}: data.points.{q}: {list(exp.points[q])} lies outside the macro mesh")
    return probe


def _outputs(prob, cols, probe=None) -> np.ndarray:
    """The data columns of a macro problem's converged state (collective)."""
    R = prob.reactions()
    U = prob.mean_displacements()
    X = probe(prob.u) if probe is not None else None
    return np.array([R[b][c] if k == "reactions" else U[b][c] if k == "mean_displacements"
                     else X[probe.rows[b], c] for k, b, c in cols])


class ForwardModel:
    """The macro problems of the experiments with their parametric surrogate, evaluated at any θ (collective).

    ``y(θ)`` (N,): every experiment's data columns at its data times, flattened and concatenated; with ``jacobian``,
    dy/dθ (N, m) from forward sensitivities.
    """

    def __init__(self, comm, cfg: IdentifyConfig):
        # deferred: dolfinx and torch only where the forward model is built
        from fe2ml.macro.run import build_law, macro_problem

        self.comm = comm
        self.cfg = cfg
        self.parts = []
        for exp in cfg.experiments:
            run = exp.run
            law = build_law(comm, run)
            prob = macro_problem(comm, run, law)
            steps = np.arange(1, run.steps + 1) / run.steps
            self.parts.append({"law": law, "prob": prob, "steps": steps, "cols": _columns(exp.columns),
                               "probe": _probe(prob, exp),
                               "rows": [int(np.argmin(np.abs(steps - t))) for t in exp.times],
                               "base": np.array(run.parameters.constant, dtype=float)})
        pr = cfg.run.parameters
        self.idx = [pr.names.index(n) for n in cfg.unknowns]
        self.runs = 0

    def __call__(self, theta, *, jacobian: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Solve every experiment's load history at θ from the undeformed state; y (N,) and dy/dθ (N, m) or None."""
        ys, Js = [], []
        m = len(self.idx)
        for part in self.parts:
            prob, law = part["prob"], part["law"]
            p = part["base"].copy()
            p[self.idx] = theta
            law.set_parameters(p)
            prob.reset()
            T, C = len(part["steps"]), len(part["cols"])
            y = np.zeros((T, C))
            J = np.zeros((T, C, m))
            want = set(part["rows"])
            for i, t in enumerate(part["steps"]):
                prob.step(float(t))
                if i not in want:
                    continue
                probe = part["probe"]
                y[i] = _outputs(prob, part["cols"], probe)
                if jacobian:
                    sens = prob.parameter_sensitivities(probe)
                    for jc, (k, b, c) in enumerate(part["cols"]):
                        J[i, jc] = (sens[k][b][self.idx, c] if k != "points"
                                    else sens["points"][self.idx, probe.rows[b], c])
            ys.append(y[part["rows"]].ravel())
            Js.append(J[part["rows"]].reshape(-1, m))
        self.runs += 1
        return np.concatenate(ys), (np.concatenate(Js) if jacobian else None)


def _data(cfg: IdentifyConfig) -> np.ndarray:
    """Every experiment's data, flattened and concatenated as :class:`ForwardModel` returns y."""
    return np.concatenate([e.data.ravel() for e in cfg.experiments])


def _weights(cfg: IdentifyConfig, rel: float | None) -> np.ndarray:
    """Inverse noise standard deviations (N,) of the data."""
    d = _data(cfg)
    if "absolute" in cfg.noise:
        return 1.0 / np.concatenate([np.tile([cfg.noise["absolute"][c] for c in e.columns], len(e.times))
                                     for e in cfg.experiments])
    s = cfg.noise["relative"] if rel is None else rel
    return 1.0 / (s * np.maximum(np.abs(d), 1e-12 * np.max(np.abs(d))))


def identify(comm, cfg: IdentifyConfig) -> dict:
    """Run the identification; rank 0 writes identify.json and identify.png and returns the report."""
    t0 = time.perf_counter()
    if comm.rank == 0:
        try:
            cfg.output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{cfg.path}: output {cfg.output} cannot be created ({e.strerror})") from None
    fwd = ForwardModel(comm, cfg)
    t_setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    y0, _ = fwd(cfg.start, jacobian=False)  # one plain surrogate run of every experiment: the cost unit
    t_run = time.perf_counter() - t1
    data = _data(cfg)
    rel0 = cfg.noise.get("relative")
    Wt = _weights(cfg, 0.01 if rel0 == "auto" else None)  # their scale does not move the least-squares estimate
    scale = cfg.hi - cfg.lo
    has_prior = np.isfinite(cfg.prior_std)
    pstd = np.where(has_prior, cfg.prior_std, 1.0)
    pmean = np.nan_to_num(cfg.prior_mean)

    def objective(y, th):
        r = (y - data) * Wt
        pr = np.where(has_prior, (th - pmean) / pstd, 0.0)
        return 0.5 * (r @ r + pr @ pr), r

    def fit(th, offset):
        """Levenberg–Marquardt from θ on the model y(θ) + offset; returns θ, y (with the offset), J, history."""
        y, J = fwd(th)
        y = y + offset
        phi, r = objective(y, th)
        lam = 1e-3
        hist = [{"theta": th.tolist(), "objective": phi}]
        for it in range(cfg.max_iterations):
            Jr = J * Wt[:, None] * scale  # in scaled variables z = θ / scale
            g = Jr.T @ r + np.where(has_prior, (th - pmean) / pstd**2, 0.0) * scale
            H = Jr.T @ Jr + np.diag(np.where(has_prior, (scale / pstd) ** 2, 0.0))
            accepted, step, rel_drop = False, 0.0, 0.0
            for _ in range(12):
                dz = np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12 * np.trace(H)), -g)
                trial = np.clip(th + dz * scale, cfg.lo, cfg.hi)
                try:
                    yt, Jt = fwd(trial)
                except Fe2mlError:
                    lam *= 10
                    continue
                yt = yt + offset
                phit, rt = objective(yt, trial)
                if phit < phi:
                    step = float(np.max(np.abs(trial - th) / scale))
                    rel_drop = (phi - phit) / max(phi, 1e-300)
                    th, y, J, r, phi = trial, yt, Jt, rt, phit
                    lam = max(lam / 10, 1e-9)
                    accepted = True
                    break
                lam *= 10
            hist.append({"theta": th.tolist(), "objective": phi})
            if comm.rank == 0:
                vals = ", ".join(f"{n} = {v:.6g}" for n, v in zip(cfg.unknowns, th, strict=True))
                log.info(f"  iteration {it + 1}: {vals}, misfit {phi:.4e} ({fwd.runs} forward runs)")
            if not accepted or step < 1e-6 or rel_drop < 1e-10:
                return th, y, J, hist, True
        return th, y, J, hist, False

    th, y, J, hist, converged = fit(cfg.start.astype(float).copy(), 0.0)
    t_identify = time.perf_counter() - t0 - t_run  # the reference run is the unit, not part of the search
    surrogate_only = {"estimate": th.tolist(), "forward_runs": fwd.runs, "iterations": len(hist) - 1}
    corrections = []
    offset = np.zeros_like(data)
    for c in range(cfg.correct):  # FE² output correction: the surrogate's discrepancy at the estimate, held fixed
        t1 = time.perf_counter()
        y_fe2 = _fe2_outputs(comm, cfg, th)
        offset = y_fe2 - (y - offset)
        if comm.rank == 0:
            log.info(f"  FE² correction {c + 1}/{cfg.correct}: discrepancy up to "
                     f"{np.max(np.abs(offset) / np.maximum(np.abs(y_fe2), 1e-300)):.2%} of the response")
        th, y, J, h2, converged = fit(th, offset)
        hist += h2
        corrections.append({"theta_fe2": hist[-len(h2)]["theta"], "max_rel_discrepancy":
                            float(np.max(np.abs(offset) / np.maximum(np.abs(y_fe2), 1e-300))),
                            "estimate": th.tolist(), "time_s": time.perf_counter() - t1})
    # Laplace approximation at the estimate
    res = y - data
    N, m = res.size, len(th)
    rel_res = res / np.maximum(np.abs(data), 1e-300)
    if rel0 == "auto":  # the relative noise level from the residuals
        s_hat = float(np.sqrt(np.sum(rel_res**2) / max(N - m, 1)))
        Wt = _weights(cfg, s_hat)
        noise = {"relative": s_hat, "estimated": True}
        from scipy import stats  # lazily: it costs about 1 s to import

        zq = float(stats.t.ppf(0.975, max(N - m, 1)))
    else:
        noise = {**cfg.noise, "estimated": False}
        zq = 1.959963984540054
    Jw = J * Wt[:, None]
    Hp = Jw.T @ Jw + np.diag(np.where(has_prior, 1.0 / pstd**2, 0.0))
    cov = np.linalg.pinv(Hp)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    corr = cov / np.maximum(np.outer(sd, sd), 1e-300)
    pairs = [[cfg.unknowns[a], cfg.unknowns[b], float(corr[a, b])] for a in range(m) for b in range(a + 1, m)
             if abs(corr[a, b]) > CORRELATED]
    report = {
        "unknowns": list(cfg.unknowns), "estimate": th.tolist(), "std": sd.tolist(), "covariance": cov.tolist(),
        "correlation": corr.tolist(), "interval95": np.stack([th - zq * sd, th + zq * sd], 1).tolist(),
        "not_identifiable_pairs": pairs, "noise": noise, "converged": converged, "iterations": len(hist) - 1,
        "forward_runs": fwd.runs, "history": hist, "misfit_rel_rms": float(np.sqrt(np.mean(rel_res**2))),
        "time_s": {"setup": t_setup, "one_surrogate_run": t_run, "identification": t_identify},
        "cost_in_surrogate_runs": t_identify / max(t_setup + t_run, 1e-12),
        "surrogate_only": surrogate_only, "fe2_corrections": corrections,
        "time_s_with_corrections": time.perf_counter() - t0,
        "experiments": _split(cfg, data, y, y0), "start": cfg.start.tolist(),
    }
    if cfg.mcmc:
        lo_, hi_ = cfg.lo, cfg.hi

        def log_post(t):
            if np.any(t < lo_) or np.any(t > hi_):  # the uniform prior's (and the trained box's) support
                return -np.inf
            try:
                yt = fwd(t, jacobian=False)[0] + offset
            except Fe2mlError:
                return -np.inf
            r = (yt - data) * Wt
            pr = np.where(has_prior, (t - pmean) / pstd, 0.0)
            return -0.5 * float(r @ r + pr @ pr)

        report["mcmc"] = _metropolis(comm, log_post, th, cov, cfg.mcmc, cfg.unknowns)
    if cfg.check:
        report["fe2_check"] = fe2_check(comm, cfg, th, y)
    if comm.rank == 0:
        (cfg.output / "identify.json").write_text(json.dumps(report, indent=1))
        plot_identify(report, cfg.output / "identify.png")
        for n, v, s_, (a, b) in zip(cfg.unknowns, th, sd, report["interval95"], strict=True):
            log.info(f"  {n} = {v:.6g} ± {s_:.3g} (95 %: [{a:.6g}, {b:.6g}])")
        for a, b, c in pairs:
            log.warning(f"  {a} and {b} are correlated {c:+.3f} (|correlation| > {CORRELATED}): the data barely "
                        "separate them; their intervals are wide together")
        log.info(f"  {fwd.runs} forward runs in {t_identify:.1f} s = {report['cost_in_surrogate_runs']:.1f} x one "
                 f"surrogate run of the experiments ({t_setup + t_run:.2f} s with set-up); wrote "
                 f"{cfg.output}/identify.json, identify.png")
    return report


def _metropolis(comm, log_post, theta, cov, n: int, names) -> dict:
    """Random-walk Metropolis samples of the posterior from the estimate (collective: every rank runs the model).

    Gaussian proposals with the Laplace covariance scaled by 2.38²/m (the optimal scaling for a Gaussian target);
    rank 0 draws and decides, the other ranks follow its broadcast. Returns the sample mean, standard deviation, 2.5
    and 97.5 % quantiles, acceptance rate, effective sample sizes and the chain.
    """
    m = len(theta)
    w, V = np.linalg.eigh((cov + cov.T) / 2)
    root = V * np.sqrt(np.clip(w, 0, None) * 2.38**2 / m)
    rng = np.random.default_rng(0)
    cur, lp = theta.copy(), log_post(theta)
    chain, accepted = [cur.copy()], 0
    t0 = time.perf_counter()
    for i in range(n):
        prop = comm.bcast(cur + root @ rng.standard_normal(m) if comm.rank == 0 else None, root=0)
        lq = log_post(prop)
        ok = comm.bcast(bool(np.log(rng.random()) < lq - lp) if comm.rank == 0 else None, root=0)
        if ok:
            cur, lp = prop, lq
            accepted += 1
        chain.append(cur.copy())
        if comm.rank == 0 and (i + 1) % max(n // 10, 1) == 0:
            log.info(f"  MCMC {i + 1}/{n} samples, acceptance {accepted / (i + 1):.0%} "
                     f"({time.perf_counter() - t0:.0f} s)")
    X = np.array(chain[1:])
    return {"samples": n, "acceptance": accepted / max(n, 1), "mean": X.mean(0).tolist(),
            "std": X.std(0, ddof=1).tolist() if n > 1 else [0.0] * m,
            "interval95": np.stack([np.quantile(X, 0.025, axis=0), np.quantile(X, 0.975, axis=0)], 1).tolist(),
            "ess": [_ess(X[:, j]) for j in range(m)], "names": list(names), "chain": X.tolist(),
            "time_s": time.perf_counter() - t0}


def _ess(x: np.ndarray) -> float:
    """Effective sample size of a chain, n / τ with τ = −1 + 2 Σ Γ_k, Γ_k = ρ_2k + ρ_2k+1 summed while positive.

    ρ are the chain's autocorrelations (Geyer's initial positive sequence estimator).
    """
    n = len(x)
    x = x - x.mean()
    v = float(x @ x) / n
    if n < 4 or v <= 0:
        return float(n)
    f = np.fft.rfft(x, 2 * n)
    rho = np.fft.irfft(f * np.conj(f))[:n] / (v * n)
    tau = -1.0
    for k in range(0, n - 1, 2):
        pair = rho[k] + rho[k + 1]
        if pair <= 0:
            break
        tau += 2.0 * pair
    return float(n / max(tau, 1e-12))


def _split(cfg: IdentifyConfig, *arrays) -> list[dict]:
    """Per experiment: its run, times, columns, and each flattened array back as (T, C) (data, fit, start fit)."""
    out, k = [], 0
    for e in cfg.experiments:
        n = e.data.size
        parts = [a[k:k + n].reshape(e.data.shape).tolist() for a in arrays]
        out.append({"run": str(e.run.path), "times": e.times.tolist(), "columns": list(e.columns), "data": parts[0],
                    "fit": parts[1], "start_fit": parts[2]})
        k += n
    return out


def fe2_check(comm, cfg: IdentifyConfig, theta, y_sur) -> dict:
    """Nested FE² (the RVE of the estimated parameters at every point) of every experiment against the fit."""
    t0 = time.perf_counter()
    y = _fe2_outputs(comm, cfg, theta)
    err = np.abs(y_sur - y) / np.maximum(np.abs(y), 1e-300)
    data = _data(cfg)
    return {"fe2": _split(cfg, y, y, y), "surrogate_vs_fe2_max_rel": float(err.max()),
            "surrogate_vs_fe2_rel_rms": float(np.sqrt(np.mean(err**2))),
            "data_vs_fe2_rel_rms": float(np.sqrt(np.mean(((data - y) / np.maximum(np.abs(y), 1e-300)) ** 2))),
            "time_s": time.perf_counter() - t0}


def _fe2_outputs(comm, cfg: IdentifyConfig, theta) -> np.ndarray:
    """Every experiment's data columns by nested FE² with the RVE of parameters θ, flattened like y."""
    # deferred: dolfinx only for the check
    from fe2ml.laws.rve import build_rank_rve, rve_law
    from fe2ml.macro.run import macro_problem
    from fe2ml.micro.parameters import parse_parameter_box, rve_with
    from fe2ml.parallel import collective

    ys = []
    for e in cfg.experiments:
        run = e.run
        pr = run.parameters
        p = np.array(pr.constant, dtype=float)
        p[[pr.names.index(n) for n in cfg.unknowns]] = theta
        raw = load_yaml(run.path)["material"]["rve"]
        box = parse_parameter_box(pr.box, raw, f"{run.path}: material.rve", run.path.parent, run.path)
        rcfg = rve_with(box, p, f"{run.path}: material.rve", run.dim)
        rve, _ = build_rank_rve(comm, rcfg)
        law = collective(comm, lambda rve=rve: rve_law(rve, comm=comm))
        prob = macro_problem(comm, run, law)
        cols = _columns(e.columns)
        probe = _probe(prob, e)
        steps = np.arange(1, run.steps + 1) / run.steps
        rows = [int(np.argmin(np.abs(steps - t))) for t in e.times]
        y = np.zeros((len(steps), len(cols)))
        for i, t in enumerate(steps):
            prob.step(float(t))
            if comm.rank == 0:
                log.info(f"  FE² check {run.path.name}: step {i + 1}/{len(steps)}")
            y[i] = _outputs(prob, cols, probe)
        ys.append(y[rows].ravel())
        law.close()
        prob.close()
    return np.concatenate(ys)


def plot_identify(report: dict, path) -> None:
    """Fit (data, start, estimate and FE² check per column) and the Laplace posterior of the first two unknowns."""
    from fe2ml.plotting import _plt  # deferred: matplotlib only when a figure is drawn

    plt = _plt()
    two = len(report["unknowns"]) >= 2
    fig, axs = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 6, 4.2), squeeze=False)
    ax = axs[0, 0]
    fe2 = report.get("fe2_check", {}).get("fe2")
    for k, e in enumerate(report["experiments"]):
        t = np.array(e["times"])
        data, fit, st = np.array(e["data"]), np.array(e["fit"]), np.array(e["start_fit"])
        tag = f"{Path(e['run']).stem}: " if len(report["experiments"]) > 1 else ""
        for c, name in enumerate(e["columns"]):
            s = max(np.max(np.abs(data[:, c])), 1e-300)
            ax.plot(t, data[:, c] / s, "o", label=f"{tag}{name} data")
            ax.plot(t, fit[:, c] / s, "-", label=f"{tag}{name} fit")
            ax.plot(t, st[:, c] / s, ":", color="gray")
            if fe2 is not None:
                ax.plot(t, np.array(fe2[k]["data"])[:, c] / s, "x", color="k")
    ax.set_xlabel("load parameter t")
    ax.set_ylabel("value / max |data|")
    ax.set_title("fit (dotted: start" + ("; x: FE² at the estimate)" if fe2 is not None else ")"))
    ax.legend(fontsize=6)
    if two:
        ax = axs[0, 1]
        mu = np.array(report["estimate"][:2])
        C = np.array(report["covariance"])[:2, :2]
        w, V = np.linalg.eigh(C)
        a = np.linspace(0, 2 * np.pi, 200)
        from scipy import stats  # lazily: it costs about 1 s to import

        for k, lab in ((1.0, "1σ"), (np.sqrt(stats.chi2.ppf(0.95, 2)), "95 %")):
            el = mu[:, None] + V @ (k * np.sqrt(np.clip(w, 0, None))[:, None] * np.array([np.cos(a), np.sin(a)]))
            ax.plot(el[0], el[1], label=lab)
        if "mcmc" in report:
            X = np.array(report["mcmc"]["chain"])
            ax.plot(X[:, 0], X[:, 1], ".", ms=2, alpha=0.4, color="gray",
                    label=f"MCMC ({report['mcmc']['samples']} samples)")
        ax.plot(*mu, "k+", ms=10, label="estimate")
        ax.set_xlabel(report["unknowns"][0])
        ax.set_ylabel(report["unknowns"][1])
        ax.set_title(f"Laplace posterior (correlation {np.array(report['correlation'])[0, 1]:+.2f})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
