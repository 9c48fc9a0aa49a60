"""``fe2ml train`` configuration: validated up front, errors name the file and the key.

Keys::

    data: [PATH, ...]                 log files or folders (relative to the YAML)
    fingerprint: HEX                  RVE fingerprint (needed when the logs hold several)
    source: ID                        only records of this source id / kind (optional)
    model: {kind: potential | plain | localization, hidden: [16, 16], features: general | isotropic, convex: false}
    loss: {stress: 1.0, tangent: 0.1, relative: false}   Sobolev loss weights (tangent > 0 needs tangents)
    split: {validation: 0.15, test: 0.15, seed: 0}
    train: {epochs: 3000, lr: 0.01, patience: 300, seed: 0, batch_size: null, stream: false, workers: 0}
                                      batch_size: records per optimiser step (null: full batch, for small data)
                                      stream: read the mini-batches' tangents from the logs (F̄, P̄ in memory)
                                      workers: processes reading them (a torch DataLoader), stream only
    ensemble: 1                       K members (seeds seed..seed+K-1), spread over the MPI ranks
    output: PATH                      folder for checkpoint.pt, metrics.json, loss.png, parity plots
    device: auto | cpu | cuda | cuda:K   where the members are fitted (auto: CUDA when available)
    dtype: float64 | float32          of the fit only; the checkpoint is float64 and loads on any machine
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fe2ml.config import check_keys, load_yaml, number
from fe2ml.errors import ConfigError

__all__ = ["TrainConfig", "load_train_config"]


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
        if model["features"] not in ("general", "isotropic"):
            raise ConfigError(f"{f}: model.features: expected general or isotropic, got {model['features']!r}")
        if not isinstance(model["convex"], bool):
            raise ConfigError(f"{f}: model.convex: expected true or false")
    elif "features" in model or "convex" in model:
        raise ConfigError(f"{f}: model: features/convex apply to kind potential only")
    if model["kind"] == "localization" and (device not in ("auto", "cpu") or dtype != "float64"):
        raise ConfigError(f"{f}: device/dtype: the localization model trains on the CPU in float64 "
                          f"(got device {device!r}, dtype {dtype!r})")
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
    check_keys(tr, ("epochs", "lr", "patience", "seed", "batch_size", "stream", "workers"), f"{f}: train")
    bs = tr.get("batch_size")
    if bs is not None and (not isinstance(bs, int) or isinstance(bs, bool) or bs < 1):
        raise ConfigError(f"{f}: train.batch_size: expected a positive integer or null (full batch), got {bs!r}")
    stream, workers = tr.get("stream", False), tr.get("workers", 0)
    if not isinstance(stream, bool):
        raise ConfigError(f"{f}: train.stream: expected true or false, got {stream!r}")
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
    tr = {"epochs": tr.get("epochs", 3000), "lr": number(tr.get("lr", 0.01), f"{f}: train.lr", positive=True),
          "patience": tr.get("patience", 300), "seed": tr.get("seed", 0), "batch_size": bs, "stream": stream,
          "workers": workers}
    for k in ("epochs", "patience", "seed"):
        if not isinstance(tr[k], int) or isinstance(tr[k], bool) or tr[k] < 0:
            raise ConfigError(f"{f}: train.{k}: expected a non-negative integer, got {tr[k]!r}")
    ens = raw.get("ensemble", 1)
    if not isinstance(ens, int) or isinstance(ens, bool) or not 1 <= ens <= 64:
        raise ConfigError(f"{f}: ensemble: expected an integer 1..64, got {ens!r}")
    out = Path(output) if output is not None else p.parent / str(raw.get("output", f"results/{p.stem}"))
    return TrainConfig(path=p, data=data, fingerprint=raw.get("fingerprint"), source=raw.get("source"), model=model,
                       loss=loss, split=split, train=tr, ensemble=ens, output=out, device=device, dtype=dtype)
