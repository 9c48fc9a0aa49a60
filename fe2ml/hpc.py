"""Cluster workflow: ``fe2ml check`` (validate any config up front) and ``fe2ml submit`` (job scripts).

Job scripts come from ``fe2ml/templates/{slurm,pbs}.sh`` (or ``--template FILE``): they activate the
environment this fe2ml runs in (the venv, or the conda environment), set one thread per rank, and
launch ``srun``/``mpiexec fe2ml run|sample|train|identify``. Sampling campaigns can be split into a job array
(``--array K``): task i evaluates the design points with index ≡ i (mod K); all tasks write to the same
log folder (one part per task and rank) and the campaign stays resumable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from fe2ml.config import load_yaml
from fe2ml.data.config import load_sample_config
from fe2ml.errors import ConfigError
from fe2ml.identify import load_identify_config
from fe2ml.macro.config import load_run_config
from fe2ml.micro.config import load_homogenize_config, load_rve_mesh
from fe2ml.micro.mesh import read_meshio
from fe2ml.surrogate.config import load_train_config

__all__ = ["check_config", "config_kind", "write_job_script"]

TEMPLATES = Path(__file__).parent / "templates"


def config_kind(path) -> str:
    """``run``, ``sample``, ``train``, ``identify`` or ``homogenize`` from the keys of a YAML config."""
    raw = load_yaml(path)
    if "unknowns" in raw:
        return "identify"
    if "material" in raw:
        return "run"
    if "design" in raw:
        return "sample"
    if "data" in raw and "model" in raw:
        return "train"
    if "phases" in raw:
        return "homogenize"
    raise ConfigError(f"{path}: cannot tell the kind of config (run: material; sample: design; train: data + model; "
                      "identify: unknowns; homogenize: phases)")


def check_config(path, comm=None) -> str:
    """Validate a config completely (keys, types, files, meshes and tags, checkpoints); returns its kind."""
    kind = config_kind(path)
    if kind == "run":
        cfg = load_run_config(path)
        if cfg.mesh.kind == "file":  # expressions at the corners of the mesh file's bounding box
            X = np.asarray(read_meshio(cfg.mesh.file).points, dtype=float)[:, : cfg.dim]
            cfg.check_expressions(X.min(axis=0), X.max(axis=0))
        if cfg.rve is not None:
            load_rve_mesh(cfg.rve, comm=comm)
    elif kind == "sample":
        load_rve_mesh(load_sample_config(path).rve, comm=comm)
    elif kind == "train":
        cfg = load_train_config(path)
        # deferred: torch and h5py only for the check of a train config
        from fe2ml.data.reader import read_logs
        from fe2ml.surrogate.checkpoint import resolve_device

        resolve_device(cfg.device, f"{path}: device")

        read_logs(cfg.data, fingerprint=cfg.fingerprint, source=cfg.source, fields=["F"])
    elif kind == "identify":
        # its runs, checkpoint, unknowns and data columns; the base RVE's mesh where FE² runs will need it
        icfg = load_identify_config(path)
        if icfg.check or icfg.correct:
            for e in icfg.experiments:
                load_rve_mesh(e.run.rve, comm=comm)
    else:
        load_rve_mesh(load_homogenize_config(path), comm=comm)
    return kind


def _env_setup() -> str:
    conda = os.environ.get("CONDA_PREFIX")
    if conda and Path(sys.prefix).resolve() == Path(conda).resolve():
        return f'eval "$(conda shell.bash hook)"\nconda activate {conda}'
    return f"source {Path(sys.prefix).resolve()}/bin/activate"


def write_job_script(config, *, scheduler: str, nodes: int, ntasks_per_node: int, time: str, account=None,
                     array: int | None = None, out: Path | None = None, template=None, extra: str = "") -> Path:
    """Validate ``config`` and write its job script; returns the script path.

    Raises:
        ConfigError: bad scheduler, counts or time, a config that does not validate, an array for
            anything but a sampling campaign.
    """
    if scheduler not in ("slurm", "pbs"):
        raise ConfigError(f"--scheduler: expected slurm or pbs, got {scheduler!r}")
    if nodes < 1 or ntasks_per_node < 1:
        raise ConfigError("--nodes and --ntasks-per-node must be >= 1")
    if not re.fullmatch(r"\d{1,3}:\d{2}:\d{2}", time):
        raise ConfigError(f"--time: expected HH:MM:SS, got {time!r}")
    config = Path(config).resolve()
    kind = check_config(config)
    if kind == "homogenize":
        raise ConfigError(f"{config}: homogenize runs are interactive; submit run, sample or train configs")
    if array is not None and (kind != "sample" or array < 2):
        raise ConfigError("--array: job arrays (K >= 2) split sampling campaigns only")
    tpl = Path(template) if template else TEMPLATES / f"{scheduler}.sh"
    if not tpl.is_file():
        raise ConfigError(f"--template: {tpl} not found")
    out = Path(out) if out else config.with_suffix(f".{scheduler}.sh")
    if scheduler == "slurm":
        acc = f"#SBATCH --account={account}\n" if account else ""
        arr = f"#SBATCH --array=0-{array - 1}\n" if array else ""
        aenv = "PART=$SLURM_ARRAY_TASK_ID\n" if array else ""
    else:
        acc = f"#PBS -A {account}\n" if account else ""
        arr = f"#PBS -J 0-{array - 1}\n" if array else ""
        aenv = "PART=$PBS_ARRAY_INDEX\n" if array else ""
    extra_args = extra + (f" --part $PART --parts {array}" if array else "")
    fe2ml = shutil.which("fe2ml") or f"{sys.executable} -m fe2ml.cli"
    text = tpl.read_text().format(job_name=f"fe2ml-{kind}-{config.stem}", nodes=nodes,
                                  ntasks_per_node=ntasks_per_node, ntasks=nodes * ntasks_per_node, time=time,
                                  log_dir=config.parent, account_line=acc, array_line=arr, env_setup=_env_setup(),
                                  workdir=config.parent, array_env=aenv, fe2ml=fe2ml, command=kind, config=config,
                                  extra=extra_args.strip())
    out.write_text(text)
    out.chmod(0o755)
    return out


def submit(script: Path, scheduler: str) -> str:
    """Submit with sbatch/qsub; returns the scheduler's answer."""
    cmd = "sbatch" if scheduler == "slurm" else "qsub"
    if shutil.which(cmd) is None:
        raise ConfigError(f"{cmd} not found on this machine; the job script is {script} (use --dry-run to only write "
                          "it)")
    r = subprocess.run([cmd, str(script)], capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"{cmd} refused {script}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()
