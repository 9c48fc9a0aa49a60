"""The README's main job, tiny: bash scripts/demo.sh --quick (fe2ml demo on 2 ranks), asserting on its outputs."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.serial
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    # the README's main command, as written (it runs fe2ml demo on 2 ranks), tiny and into a scratch folder
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--quick", "--output", str(out)],
                       capture_output=True, text=True, timeout=1200, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    for k, v in s["outputs"].items():
        for p in (v if isinstance(v, list) else [v]):
            assert Path(p).exists(), (k, p)
    # quick: coarse RVE, 85 records, short training (measured 0.25 % and 1.4 %); the full demo: 0.25 % and 0.8 %
    assert s["surrogate_test_stress_error"] < 0.02
    assert s["reaction_deviation_vs_fe2"] < 0.05
    assert s["constitutive_speedup"] > 10
    assert 1.0 < s["max_cell_stretch"] < 1.6 and np.isfinite(s["mean_cell_stretch"])
    assert "most stretched cell" in r.stdout and "ParaView" in r.stdout
