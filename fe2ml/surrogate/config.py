"""``fe2ml train`` configuration: validated up front, errors name the file and the key.

Keys::

    data: [PATH, ...]                 log files or folders (relative to the YAML)
    fingerprint: HEX                  RVE fingerprint (needed when the logs hold several)
    source: ID                        only records of this source id / kind (optional)
    model: {kind: potential | plain | localization, hidden: [16, 16], features: general | isotropic | anisotropic,
            convex: false}            anisotropic: invariants with the fibre families of the data's RVE
    loss: {stress: 1.0, tangent: 0.1, relative: false, floor: 0.1}   Sobolev loss weights (tangent > 0 needs
                                      tangents); relative: each record weighed by 1 / (|P̄|² + (floor · RMS)²)
    split: {validation: 0.15, test: 0.15, seed: 0}
    train: {epochs: 3000, lr: 0.01, patience: 300, seed: 0, batch_size: null, stream: false, workers: 0}
                                      batch_size: records per optimiser step (null: full batch, for small data)
                                      stream: read the mini-batches' tangents from the logs (F̄, P̄ in memory)
                                      workers: processes reading them (a torch DataLoader), stream only
                                      polish: 0   L-BFGS iterations after the first-order fit (full batch only;
                                      the state of least validation loss is kept)
    ensemble: 1                       K members (seeds seed..seed+K-1), spread over the MPI ranks
    output: PATH                      folder for checkpoint.pt, metrics.json, loss.png, parity plots
    device: auto | cpu | cuda | cuda:K   where the members are fitted (auto: CUDA when available)
    dtype: float64 | float32          of the fit only; the checkpoint is float64 and loads on any machine
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fe2ml.config import check_keys, flag, load_yaml, number
from fe2ml.errors import ConfigError
from fe2ml.surrogate.closed_form import TANGENT_PRECISIONS
from fe2ml.surrogate.gate import LEVELS, AuditOptions, Thresholds

FEATURES = ("general", "isotropic", "anisotropic")  # of potential models (the same as models.FEATURES, torch-free)

__all__ = ["LearnOptions", "SurrogateOptions", "TrainConfig", "load_train_config", "parse_learn",
           "parse_surrogate_options"]


def _loss_floor(loss: dict, relative: bool, where: str) -> float:
    """``loss.floor``: the relative loss's stress floor as a fraction of the RMS stress, in (0, 1]."""
    if "floor" not in loss:
        return 0.1
    if not relative:
        raise ConfigError(f"{where}.floor: applies to the relative loss only (set relative: true)")
    v = number(loss["floor"], f"{where}.floor")
    if not 0.0 < v <= 1.0:
        raise ConfigError(f"{where}.floor: expected a fraction of the RMS stress in (0, 1], got {v!r}")
    return v


@dataclass(frozen=True)
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
    device: str = "auto"
    dtype: str = "float64"


def load_train_config(path, *, output=None) -> TrainConfig:
    """Load and validate a training YAML (errors name the file and key)."""
    p = Path(path)
    raw = load_yaml(p)
    f = str(p)
    check_keys(raw, ("data", "fingerprint", "source", "model", "loss", "split", "train", "ensemble", "output",
                     "device", "dtype"), f)
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or (
            device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{f}: device: expected auto, cpu, cuda or cuda:K, got {device!r}")
    dtype = raw.get("dtype", "float64")
    if dtype not in ("float64", "float32"):
        raise ConfigError(f"{f}: dtype: expected float64 or float32, got {dtype!r}")
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
        if model["features"] not in FEATURES:
            raise ConfigError(f"{f}: model.features: expected {', '.join(FEATURES)}, got {model['features']!r}")
        flag(model["convex"], f"{f}: model.convex")
    elif "features" in model or "convex" in model:
        raise ConfigError(f"{f}: model: features/convex apply to kind potential only")
    if model["kind"] == "localization" and (device not in ("auto", "cpu") or dtype != "float64"):
        raise ConfigError(f"{f}: device/dtype: the localization model trains on the CPU in float64 "
                          f"(got device {device!r}, dtype {dtype!r})")
    if model["kind"] == "localization" and raw.get("loss") is not None:
        raise ConfigError(f"{f}: loss: not used by model.kind localization (it fits cell stretch and J)")
    loss = dict(raw.get("loss", {}) or {})
    check_keys(loss, ("stress", "tangent", "relative", "floor"), f"{f}: loss")
    rel = flag(loss.get("relative", False), f"{f}: loss.relative")
    loss = {"stress": number(loss.get("stress", 1.0), f"{f}: loss.stress"),
            "tangent": number(loss.get("tangent", 0.1), f"{f}: loss.tangent"), "relative": rel,
            "floor": _loss_floor(loss, rel, f"{f}: loss")}
    if loss["stress"] < 0 or loss["tangent"] < 0 or loss["stress"] + loss["tangent"] == 0:
        raise ConfigError(f"{f}: loss: weights must be >= 0 and not both 0")
    split = dict(raw.get("split", {}) or {})
    check_keys(split, ("validation", "test", "seed"), f"{f}: split")
    split = {"validation": number(split.get("validation", 0.15), f"{f}: split.validation"),
             "test": number(split.get("test", 0.15), f"{f}: split.test"), "seed": int(split.get("seed", 0))}
    if not (0 < split["validation"] < 1 and 0 <= split["test"] < 1 and split["validation"] + split["test"] < 0.9):
        raise ConfigError(f"{f}: split: validation in (0, 1), test in [0, 1), together < 0.9")
    tr = dict(raw.get("train", {}) or {})
    check_keys(tr, ("epochs", "lr", "patience", "seed", "batch_size", "stream", "workers", "polish"), f"{f}: train")
    bs = tr.get("batch_size")
    if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
        raise ConfigError(f"{f}: train.batch_size: expected a positive integer or null (full batch), got {bs!r}")
    stream, workers = tr.get("stream", False), tr.get("workers", 0)
    flag(stream, f"{f}: train.stream")
    if not isinstance(workers, int) or isinstance(workers, bool) or not 0 <= workers <= 64:
        raise ConfigError(f"{f}: train.workers: expected an integer 0..64, got {workers!r}")
    if stream and bs is None:
        raise ConfigError(f"{f}: train.stream reads mini-batches from the logs: it needs train.batch_size")
    if workers and not stream:
        raise ConfigError(f"{f}: train.workers are the processes that read streamed mini-batches: they need "
                          "train.stream: true")
    if model["kind"] == "localization" and (bs is not None or stream or workers):
        raise ConfigError(f"{f}: train.batch_size/stream/workers: model.kind localization trains full batch in "
                          "memory")
    if tr.get("polish") and (bs is not None or stream):
        raise ConfigError(f"{f}: train.polish (L-BFGS on the full training loss) needs full batches: "
                          "train.batch_size: null, no stream")
    tr = {"epochs": tr.get("epochs", 3000), "lr": number(tr.get("lr", 0.01), f"{f}: train.lr", positive=True),
          "patience": tr.get("patience", 300), "seed": tr.get("seed", 0), "batch_size": bs, "stream": stream,
          "workers": workers, "polish": tr.get("polish", 0)}
    for k in ("epochs", "patience", "seed", "polish"):
        if not isinstance(tr[k], int) or isinstance(tr[k], bool) or tr[k] < 0:
            raise ConfigError(f"{f}: train.{k}: expected a non-negative integer, got {tr[k]!r}")
    ens = raw.get("ensemble", 1)
    if not isinstance(ens, int) or isinstance(ens, bool) or not 1 <= ens <= 64:
        raise ConfigError(f"{f}: ensemble: expected an integer 1..64, got {ens!r}")
    out = Path(output) if output is not None else p.parent / str(raw.get("output", f"results/{p.stem}"))
    return TrainConfig(path=p, data=data, fingerprint=raw.get("fingerprint"), source=raw.get("source"), model=model,
                       loss=loss, split=split, train=tr, ensemble=ens, output=out, device=device, dtype=dtype)


# ---------------------------------------------------------------- a run's surrogate: material.learn
MODEL_DEFAULT = {"kind": "potential", "hidden": [16, 16], "features": "general", "convex": False}


@dataclass(frozen=True)
class LearnOptions:
    """``material.learn`` of a hybrid run.

    Attributes:
        min_new: new fallback records (all ranks) needed for a round.
        every: at least this many load steps between rounds.
        epochs: epochs of a warm-started round (early stopping with ``patience``).
        first_epochs: epochs of the first round of a cold start (fresh members).
        members: ensemble size of the refitted checkpoints.
        lr: learning rate of the first round of a cold start.
        warm_lr: learning rate of a warm-started round (small: Adam's first steps move every weight by about the
            learning rate, which would throw a fitted network away from its optimum).
        patience, seed: optimiser settings (member k has seed ``seed + k``).
        data: log files/folders of the initial records (required with a checkpoint: its training data).
        model: the model of a cold start (with a checkpoint, the checkpoint's model is kept).
        loss: Sobolev loss weights ``{stress, tangent, relative}``.
    """

    min_new: int = 64
    every: int = 1
    epochs: int = 300
    first_epochs: int = 2000
    members: int = 2
    lr: float = 0.01
    warm_lr: float = 0.002
    patience: int = 200
    seed: int = 0
    data: tuple[Path, ...] = ()
    model: dict = field(default_factory=lambda: dict(MODEL_DEFAULT))
    loss: dict = field(default_factory=lambda: {"stress": 1.0, "tangent": 0.1, "relative": False, "floor": 0.1})


def _count(raw: dict, key: str, default: int, where: str, lo: int) -> int:
    v = raw.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"{where}.{key}: expected an integer >= {lo}, got {v!r}")
    return v


def parse_learn(raw, where: str, base: Path, *, has_checkpoint: bool) -> LearnOptions:
    """Validate ``material.learn`` (errors name ``where`` and the key).

    Args:
        raw: the mapping.
        where: ``"<file>: material.learn"``.
        base: the folder relative data paths are relative to.
        has_checkpoint: whether the run starts from a checkpoint (then ``data`` is required, ``model`` refused).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping like {{min_new: 64, every: 1, epochs: 300, members: 2}}")
    check_keys(raw, ("min_new", "every", "epochs", "first_epochs", "members", "lr", "warm_lr", "patience", "seed",
                     "data", "model", "loss"), where)
    data = raw.get("data", [])
    data = [data] if isinstance(data, str) else data
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise ConfigError(f"{where}.data: expected a log folder or a list of log files/folders, got {data!r}")
    paths = tuple(base / d for d in data)
    for d in paths:
        if not d.exists():
            raise ConfigError(f"{where}.data: {d} not found")
    if has_checkpoint and not paths:
        raise ConfigError(f"{where}.data: a run that starts from a checkpoint must name the logs it was trained on "
                          "(refitting on the run's records alone would forget them); or start cold with "
                          "checkpoint: null")
    model = dict(MODEL_DEFAULT)
    if "model" in raw:
        if has_checkpoint:
            raise ConfigError(f"{where}.model: the checkpoint's model is refitted; model applies to a cold start "
                              "(checkpoint: null) only")
        m = raw["model"]
        if not isinstance(m, dict):
            raise ConfigError(f"{where}.model: expected a mapping {{kind: potential, hidden: [16, 16]}}")
        check_keys(m, ("kind", "hidden", "features", "convex"), f"{where}.model")
        model.update(m)
        if model["kind"] not in ("potential", "plain"):
            raise ConfigError(f"{where}.model.kind: expected potential or plain, got {model['kind']!r}")
        hid = model["hidden"]
        if not isinstance(hid, list) or not hid or not all(isinstance(h, int) and h > 0 for h in hid):
            raise ConfigError(f"{where}.model.hidden: expected a list of positive layer widths, got {hid!r}")
        if model["features"] not in FEATURES or not isinstance(model["convex"], bool):
            raise ConfigError(f"{where}.model: features {'|'.join(FEATURES)}, convex true|false; got features "
                              f"{model['features']!r}, convex {model['convex']!r}")
        if model["kind"] == "plain":
            model = {"kind": "plain", "hidden": hid}
    loss = raw.get("loss", {}) or {}
    if not isinstance(loss, dict):
        raise ConfigError(f"{where}.loss: expected a mapping {{stress: 1.0, tangent: 0.1}}")
    check_keys(loss, ("stress", "tangent", "relative", "floor"), f"{where}.loss")
    rel = flag(loss.get("relative", False), f"{where}.loss.relative")
    loss = {"stress": number(loss.get("stress", 1.0), f"{where}.loss.stress"),
            "tangent": number(loss.get("tangent", 0.1), f"{where}.loss.tangent"), "relative": rel,
            "floor": _loss_floor(loss, rel, f"{where}.loss")}
    if loss["stress"] < 0 or loss["tangent"] < 0 or loss["stress"] + loss["tangent"] == 0:
        raise ConfigError(f"{where}.loss: weights must be >= 0 and not both 0")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}.seed: expected an integer, got {seed!r}")
    return LearnOptions(min_new=_count(raw, "min_new", 64, where, 1), every=_count(raw, "every", 1, where, 1),
                        epochs=_count(raw, "epochs", 300, where, 1),
                        first_epochs=_count(raw, "first_epochs", 2000, where, 1),
                        members=_count(raw, "members", 2, where, 1),
                        lr=number(raw.get("lr", 0.01), f"{where}.lr", positive=True),
                        warm_lr=number(raw.get("warm_lr", 0.002), f"{where}.warm_lr", positive=True),
                        patience=_count(raw, "patience", 200, where, 1), seed=seed, data=paths, model=model,
                        loss=loss)


# ---------------------------------------------------------------- a run's surrogate: material (surrogate, hybrid)
@dataclass(frozen=True)
class SurrogateOptions:
    """``material`` of a run of kind ``surrogate`` or ``hybrid``, validated.

    Attributes:
        checkpoint: the checkpoint (resolved; None: a hybrid's cold start, which needs ``learn``).
        thresholds: the hybrid's gate.
        audit: the run-time audit, or None.
        device: where the surrogate evaluates (``auto``, ``cpu``, ``cuda``, ``cuda:K``).
        log: the hybrid's fallback log folder, or None.
        learn: in-run learning, or None.
        tangent_precision: ``single`` (the CPU closed form's tangent products in float32; the stress is float64) or
            ``double``.
    """

    checkpoint: Path | None
    thresholds: Thresholds = field(default_factory=Thresholds)
    audit: AuditOptions | None = None
    device: str = "cpu"
    log: Path | None = None
    learn: LearnOptions | None = None
    tangent_precision: str = "single"


def _checkpoint_path(mat: dict, kind: str, f: str, base: Path) -> Path | None:
    ck = mat.get("checkpoint", "")
    if ck is None and kind == "hybrid":
        if "learn" not in mat:
            raise ConfigError(f"{f}: material.checkpoint: null (a cold start) needs material.learn, which trains "
                              "the first model during the run")
        return None
    if not isinstance(ck, str) or not ck:
        raise ConfigError(f"{f}: material.checkpoint: expected the path of a checkpoint.pt"
                          + (" (or null with learn: a cold start)" if kind == "hybrid" else ""))
    path = base / ck
    if not path.is_file():
        raise ConfigError(f"{f}: material.checkpoint: {path} not found")
    return path


def _audit(audit, thresholds: Thresholds, mat: dict, aw: str) -> AuditOptions:
    if not isinstance(audit, dict):
        raise ConfigError(f"{aw}: expected a mapping {{fraction: 0.02, seed: 0, target: 0.01}}")
    check_keys(audit, ("fraction", "seed", "target"), aw)
    frac = number(audit.get("fraction", 0.02), f"{aw}.fraction")
    if not 0 < frac <= 1:
        raise ConfigError(f"{aw}.fraction: expected a number in (0, 1], got {frac!r}")
    seed = audit.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{aw}.seed: expected an integer, got {seed!r}")
    target = number(audit.get("target", thresholds.error if thresholds.error is not None else 0.01),
                    f"{aw}.target", positive=True)
    if "rve" not in mat:
        raise ConfigError(f"{aw}: needs material.rve (the audit solves the true RVE)")
    return AuditOptions(fraction=frac, seed=seed, target=target)


def parse_surrogate_options(mat: dict, kind: str, f: str, base: Path) -> SurrogateOptions:
    """Validate the surrogate part of ``material`` (kinds surrogate and hybrid; errors name ``f`` and the key).

    Args:
        mat: the ``material`` mapping (its keys already checked against the kind's).
        kind: ``surrogate`` or ``hybrid``.
        f: the config file, for messages.
        base: the folder relative paths are relative to.
    """
    checkpoint = _checkpoint_path(mat, kind, f, base)
    th = mat.get("threshold", {}) or {}
    if not isinstance(th, dict):
        raise ConfigError(f"{f}: material.threshold: expected a mapping like {{error: 0.01, distance: 0.0, "
                          "density: 2.0}")
    check_keys(th, ("spread", "error", "distance", "density", "level"), f"{f}: material.threshold")
    thresholds = Thresholds(**{k: number(th[k], f"{f}: material.threshold.{k}")
                               for k in ("spread", "error", "distance", "density", "level") if k in th})
    if thresholds.level not in LEVELS:
        raise ConfigError(f"{f}: material.threshold.level: expected 0.9 or 0.95 (the calibrated levels), got "
                          f"{thresholds.level!r}")
    audit = mat.get("audit")
    if audit is not None:
        audit = _audit(audit, thresholds, mat, f"{f}: material.audit")
    device = mat.get("device", "cpu")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or (
            device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{f}: material.device: expected auto, cpu, cuda or cuda:K, got {device!r}")
    tangent_precision = mat.get("tangent_precision", "single")
    if tangent_precision not in TANGENT_PRECISIONS:
        raise ConfigError(f"{f}: material.tangent_precision: expected {' or '.join(TANGENT_PRECISIONS)}, got "
                          f"{tangent_precision!r}")
    learn = None
    if "learn" in mat:
        learn = parse_learn(mat["learn"], f"{f}: material.learn", base, has_checkpoint=checkpoint is not None)
        for key in ("spread", "error"):
            if getattr(thresholds, key) is not None and learn.members < 2:
                raise ConfigError(f"{f}: material.threshold.{key}: needs 2 or more members; material.learn.members "
                                  f"is {learn.members}")
    if kind == "hybrid" and "rve" not in mat:
        raise ConfigError(f"{f}: material.rve: hybrid needs the RVE for its fallback solves")
    return SurrogateOptions(checkpoint=checkpoint, thresholds=thresholds, audit=audit, device=device,
                            log=(base / str(mat["log"])) if mat.get("log") else None, learn=learn,
                            tangent_precision=tangent_precision)
