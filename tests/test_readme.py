"""README examples: every fe2ml subcommand it shows exists, every YAML block it shows uses only real keys,
and every shipped example config validates with fe2ml check."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def test_every_subcommand_shown_exists():
    from fe2ml.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    code = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
    code += "\n" + "\n".join(re.findall(r"`([^`\n]*fe2ml [^`\n]*)`", README))
    used = set(re.findall(r"(?:\.venv/bin/)?\bfe2ml ([a-z]+)", code))
    assert used <= set(sub.choices), used - set(sub.choices)  # only real subcommands
    assert set(sub.choices) <= used  # and every subcommand is shown


def _blocks():
    return re.findall(r"```yaml\n(.*?)```", README, flags=re.S)


def test_yaml_blocks_use_real_keys():
    from fe2ml.data.config import SampleConfig  # noqa: F401
    from fe2ml.macro.config import RUN_KEYS

    homogenize = {"dim", "mesh", "phases", "bc", "degree", "strains", "tol", "kinematics", "formulation", "F",
                  "load_path", "newton", "fields"}
    sample = {"rve", "design", "output", "flush_every", "cells", "parameters", "parameter_sets", "parameter_points"}
    identify = {"run", "unknowns", "data", "experiments", "noise", "check", "correct", "max_iterations", "mcmc",
                "output"}
    train = {"data", "fingerprint", "source", "model", "loss", "split", "train", "ensemble", "output", "device",
             "dtype"}
    blocks = _blocks()
    assert len(blocks) >= 4
    for text in blocks:
        keys = set(yaml.safe_load(text))
        ok = [keys <= set(RUN_KEYS), keys <= homogenize, keys <= sample, keys <= train, keys <= identify]
        assert any(ok), f"README YAML block with unknown keys: {sorted(keys)}"


@pytest.mark.serial
@pytest.mark.parametrize("cfg", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_example_configs_validate(cfg):
    if cfg in ("strip_surrogate.yaml", "strip_hybrid.yaml", "train_tissue.yaml", "train_localization.yaml"):
        # they need the campaign log / checkpoint that fe2ml sample / train make first
        if not (ROOT / "rve_data" / "sample_tissue").exists() or not (ROOT / "results" / "surrogate_tissue").exists():
            pytest.skip("needs fe2ml sample examples/sample_tissue.yaml and fe2ml train first")
    if cfg in ("block3d_train.yaml", "block3d_hybrid.yaml"):  # scripts/example_block3d.py --quick runs them in CI
        if not (ROOT / "rve_data" / "block3d").exists() or not (ROOT / "results" / "surrogate_block3d").exists():
            pytest.skip("needs fe2ml sample examples/block3d_sample.yaml and fe2ml train first")
    r = subprocess.run([str(BIN / "fe2ml"), "check", str(ROOT / "examples" / cfg)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
