"""The run folder of ``fe2ml run``: one owner of its layout.

The CLI, the run, its checkpoints, in-run learning and localization read and write through it.

Layout::

    config.yaml           the run's copy of its config
    identity.json         what the run started from (config and its hash, RVE fingerprint, surrogate checkpoint)
    summary.json          the last written summary (statistics, timings, the config's path)
    run.log               steps, restarts, failures (appended across restarts)
    reactions.csv         reaction forces per step
    quadrature.h5         quadrature-point fields per step (what localization reads)
    checkpoint/           the problem's restart state (step-K/ folders and the ``latest`` pointer)
    log_parts.json        the HDF5 log parts the run wrote into (kept records per part)
    surrogate/round-K/    the models of in-run learning rounds
    localization_stepK[_learned]/   cell-level quantities of ``fe2ml localize``
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fe2ml.errors import ConfigError

__all__ = ["RunFolder"]

MARKERS = ("identity.json", "summary.json", "checkpoint", "config.yaml")


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder (paths only; nothing is created by building one).

    Args:
        path: the folder.
    """

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------ layout
    @property
    def config_copy(self) -> Path:
        """The run's copy of its config."""
        return self.path / "config.yaml"

    @property
    def identity(self) -> Path:
        """What the run started from (``identity.json``)."""
        return self.path / "identity.json"

    @property
    def summary(self) -> Path:
        """The run's summary (``summary.json``)."""
        return self.path / "summary.json"

    @property
    def run_log(self) -> Path:
        """The run's record (``run.log``)."""
        return self.path / "run.log"

    @property
    def reactions(self) -> Path:
        """Reaction forces per step (``reactions.csv``)."""
        return self.path / "reactions.csv"

    @property
    def quadrature(self) -> Path:
        """Quadrature-point fields per step (``quadrature.h5``)."""
        return self.path / "quadrature.h5"

    @property
    def checkpoint(self) -> Path:
        """The problem's restart state."""
        return self.path / "checkpoint"

    @property
    def log_parts(self) -> Path:
        """The HDF5 log parts of the run (``log_parts.json``)."""
        return self.path / "log_parts.json"

    @property
    def surrogate_rounds(self) -> Path:
        """The folder of the in-run learning rounds (``round-K/`` inside)."""
        return self.path / "surrogate"

    def localization(self, step: int, *, learned: bool = False) -> Path:
        """The output folder of ``fe2ml localize`` at a step (``_learned``: through a localization model)."""
        return self.path / (f"localization_step{step}" + ("_learned" if learned else ""))

    # ------------------------------------------------------------------ state
    def is_run(self) -> bool:
        """Whether the folder holds a run (any of its marker files)."""
        return any((self.path / m).exists() for m in MARKERS)

    def read_summary(self) -> dict:
        """``summary.json`` (empty where there is none yet)."""
        return json.loads(self.summary.read_text()) if self.summary.is_file() else {}

    def original_config(self) -> Path | None:
        """The config the run was started with, as recorded in identity.json (or summary.json); None if neither."""
        for p in (self.identity, self.summary):
            if p.is_file():
                c = json.loads(p.read_text()).get("config")
                if c:
                    return Path(c)
        return None

    def config_to_load(self, *, prefer_original: bool = False) -> tuple[Path, Path]:
        """Which config file continues or describes the run, and the folder its relative paths are relative to.

        The run's own copy (``config.yaml``) is read with the original's folder as the base of relative paths
        (mesh files, RVE configs, checkpoints), wherever the run folder lies. With ``prefer_original`` (a restart
        with ``--allow-changed``, localization) the original file is read where it still exists.

        Raises:
            ConfigError: neither the copy nor the original is there.
        """
        orig = self.original_config()
        if prefer_original and orig is not None and orig.is_file():
            return orig, orig.parent
        if self.config_copy.is_file():
            return self.config_copy, (orig.parent if orig is not None else self.path)
        if orig is not None and orig.is_file():
            return orig, orig.parent
        raise ConfigError(f"{self.path}: cannot find the run's config (config.yaml)")

    def claim(self, config_path: Path, *, overwrite: bool) -> str | None:
        """Check that a new run may write here (call on one rank); returns an error message or None.

        An existing run is refused unless ``overwrite``, which removes it first; a non-empty folder that holds no
        run is always refused (nothing that is not a run is ever deleted).
        """
        where = f"{config_path}: output"
        if self.path.exists() and not self.path.is_dir():
            return f"{where}: {self.path} exists and is not a folder"
        if self.path.is_dir() and any(self.path.iterdir()):
            if not self.is_run():
                return f"{where}: {self.path} exists, is not empty and holds no fe2ml run; give an empty or new folder"
            if not overwrite:
                return (f"{where}: {self.path} holds an earlier run; continue it with `fe2ml run --restart "
                        f"{self.path}`, replace it with --overwrite, or give another output")
            shutil.rmtree(self.path)
        return None

    def outside(self, config_path: Path) -> bool:
        """Whether the folder lies outside the folder of the config (where the run then says it writes)."""
        return not self.path.resolve().is_relative_to(Path(config_path).resolve().parent)
