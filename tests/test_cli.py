"""The fe2ml command: homogenize end to end, bad inputs, serial vs 2 ranks."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fe2ml.cli import main
from fe2ml.materials import LinearElastic

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
    dim: 2
    mesh: {generate: laminate, fractions: [0.4, 0.6], h: 0.1}
    phases:
      1: {material: linear_elastic, E: 1.0e3, nu: 0.3}
      2: {material: linear_elastic, E: 5.0e3, nu: 0.2}
    bc: periodic
    strains:
      - [[0.01, 0.0], [0.0, 0.0]]
"""


@pytest.mark.serial
def test_homogenize_cli_json_and_plot(tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", GOOD)
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    assert main(["homogenize", str(cfg), "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "Voigt matrix, order 11, 22, 12" in printed
    r = json.loads(out.read_text())
    for key in ("C", "voigt", "voigt_order", "volume", "ndofs", "time_s"):
        assert key in r
    C = np.array(r["C"])
    assert C.shape == (2, 2, 2, 2) and r["voigt_order"] == ["11", "22", "12"]
    assert np.isclose(r["volume"], 1.0)
    # the reported stress is C:ε
    assert np.allclose(r["stresses"][0], np.einsum("ijkl,kl->ij", C, np.array(r["strains"][0])))
    # laminate with layers normal to x: σ11/ε11 under uniaxial strain is the harmonic mean of the M moduli
    M = [LinearElastic(1e3, 0.3).stiffness(2)[0, 0, 0, 0], LinearElastic(5e3, 0.2).stiffness(2)[0, 0, 0, 0]]
    assert np.isclose(C[0, 0, 0, 0], 1 / (0.4 / M[0] + 0.6 / M[1]), rtol=1e-8)
    assert png.stat().st_size > 1000
    # generated mesh goes next to the config (relative paths are relative to the YAML file)
    assert list((tmp_path / "meshes" / "generated").glob("laminate-*.msh"))


BAD = {
    "malformed": ("dim: 2\nmesh: {generate: laminate\n", "malformed YAML"),
    "not_mapping": ("- 1\n- 2\n", "expected a mapping"),
    "unknown_key": (GOOD + "    colour: red\n", "unknown key(s) colour"),
    "missing_mesh": ("dim: 2\nphases: {1: {material: linear_elastic, E: 1, nu: 0.3}}\n", "missing required key 'mesh'"),
    "bad_dim": (GOOD.replace("dim: 2", "dim: 4"), "dim: expected 2 or 3"),
    "mesh_file_missing": (GOOD.replace("{generate: laminate, fractions: [0.4, 0.6], h: 0.1}", "{file: nope.msh}"),
                          "nope.msh not found"),
    "unknown_generator": (GOOD.replace("generate: laminate", "generate: lasagna"), "unknown generator 'lasagna'"),
    "bad_generator_param": (GOOD.replace("h: 0.1", "hh: 0.1"), "unknown parameter(s) ['hh']"),
    "nu_too_large": (GOOD.replace("nu: 0.2", "nu: 0.5"), "phases.2: nu must satisfy -1 < nu < 0.5"),
    "negative_E": (GOOD.replace("E: 1.0e3", "E: -1.0e3"), "phases.1: E must be > 0"),
    "E_wrong_type": (GOOD.replace("E: 1.0e3", "E: soft"), "phases.1.E: expected a number"),
    "unknown_material": (GOOD.replace("material: linear_elastic, E: 5.0e3, nu: 0.2", "material: jelly"),
                         "unknown material 'jelly'"),
    "tag_without_material": (GOOD.replace("      2: {material: linear_elastic, E: 5.0e3, nu: 0.2}\n", ""),
                             "phase tag(s) [2] without a material"),
    "material_without_tag": (GOOD.replace("    bc: periodic", "      7: {material: linear_elastic, E: 5.0, nu: 0.2}\n"
                                          "    bc: periodic"), "tag(s) [7] do not occur"),
    "bad_bc": (GOOD.replace("bc: periodic", "bc: sticky"), "bc: expected one of periodic, affine, traction"),
    "bad_degree": (GOOD + "    degree: 3\n", "degree: expected auto, 1 or 2"),
    "bad_strain": (GOOD.replace("[[0.01, 0.0], [0.0, 0.0]]", "[0.01, 0.0]"), "strains[0]: expected a 2x2"),
    "aniso_not_pd": (GOOD.replace("material: linear_elastic, E: 5.0e3, nu: 0.2",
                                  "material: anisotropic, C: [[1,0,0,0,0,0],[0,1,0,0,0,0],[0,0,-1,0,0,0],"
                                  "[0,0,0,1,0,0],[0,0,0,0,1,0],[0,0,0,0,0,1]]"), "not positive definite"),
    "aniso_shape": (GOOD.replace("material: linear_elastic, E: 5.0e3, nu: 0.2", "material: anisotropic, C: [[1, 2]]"),
                    "expected a 6x6 Voigt matrix"),
    "dim_mismatch_generator": (GOOD.replace("generate: laminate, fractions: [0.4, 0.6], h: 0.1",
                                            "generate: cells_3d"), "makes 3D meshes but dim is 2"),
}


@pytest.mark.serial
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_one_line_nonzero_no_traceback(tmp_path, name):
    text, expected = BAD[name]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(textwrap.dedent(text) if text.startswith("    ") else text)
    out = tmp_path / "keep.json"
    out.write_text("{}")  # existing data must survive a failed run
    r = subprocess.run([str(BIN / "fe2ml"), "homogenize", str(cfg), "--json", str(out)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fe2ml: error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert expected in lines[0], lines[0]
    assert out.read_text() == "{}"


@pytest.mark.serial
def test_non_periodic_mesh_with_periodic_bc_cli(tmp_path):
    import meshio
    from helpers import box_mesh

    X, cells, ct, ph = box_mesh(2, 4)
    X[(np.abs(X[:, 0] - 1) < 1e-12) & (np.abs(X[:, 1] - 0.5) < 1e-12), 1] = 0.55
    meshio.write(tmp_path / "m.vtu", meshio.Mesh(X, [(ct, cells)], cell_data={"phase": [ph]}))
    cfg = _write(tmp_path / "c.yaml", """\
        dim: 2
        mesh: {file: m.vtu}
        phases: {1: {material: linear_elastic, E: 1.0, nu: 0.3}}
    """)
    r = subprocess.run([str(BIN / "fe2ml"), "homogenize", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "mesh is not periodic: 2 of 10 nodes on faces x=0/x=1" in r.stderr
    # the same mesh is fine with affine BCs
    cfg.write_text(cfg.read_text() + "bc: affine\n")
    r = subprocess.run([str(BIN / "fe2ml"), "homogenize", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.serial
def test_serial_and_two_ranks_identical(tmp_path):
    cfg = _write(tmp_path / "c.yaml", """\
        dim: 2
        mesh: {generate: cells_2d, n_cells: 4, volume_fraction: 0.25, seed: 7, h: 0.05}
        phases:
          1: {material: linear_elastic, E: 1.0, nu: 0.45}
          2: {material: linear_elastic, E: 0.1, nu: 0.3}
        strains:
          - [[0.01, 0.0], [0.0, 0.0]]
          - [[0.0, 0.01], [0.01, 0.0]]
          - [[0.0, 0.0], [0.0, 0.02]]
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r1 = subprocess.run([str(BIN / "fe2ml"), "homogenize", str(cfg), "--json", str(tmp_path / "s.json")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "homogenize", str(cfg), "--json",
                         str(tmp_path / "p.json")], capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 0, r2.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["ranks"] == 2 and s["ranks"] == 1
    assert s["C"] == p["C"] and s["stresses"] == p["stresses"]


FINITE = """\
    dim: 2
    mesh: {generate: cells_2d, n_cells: 3, volume_fraction: 0.25, seed: 2, h: 0.07}
    phases:
      1: {material: neo_hookean, mu: 1.0, K: 3.0}
      2: {material: energy, W: "mu/2*(I1b - 3) + K/2*(J - 1)**2", params: {mu: 0.2, K: 1.0}}
    load_path: {type: uniaxial, max: 0.2, steps: 4}
    fields: {points: [3]}
"""


@pytest.mark.serial
def test_homogenize_finite_cli_serial_vs_two_ranks(tmp_path):
    cfg = _write(tmp_path / "f.yaml", FINITE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (tmp_path / "s").mkdir()
    (tmp_path / "p").mkdir()
    r1 = subprocess.run([str(BIN / "fe2ml"), "homogenize", str(cfg), "--json", str(tmp_path / "s" / "r.json")],
                        capture_output=True, text=True, env=env, timeout=300)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "homogenize", str(cfg), "--json",
                         str(tmp_path / "p" / "r.json")], capture_output=True, text=True, env=env, timeout=300)
    assert r2.returncode == 0, r2.stderr
    s = json.loads((tmp_path / "s" / "r.json").read_text())
    p = json.loads((tmp_path / "p" / "r.json").read_text())
    P1, P2 = np.array(s["P"]), np.array(p["P"])
    assert P1.shape == (4, 2, 2) and np.array(s["A"]).shape == (4, 2, 2, 2, 2)
    # rank 1 starts its points from F = I instead of the previous point: equal to solver tolerance
    assert np.abs(P1 - P2).max() < 1e-8 * np.abs(P1).max()
    assert np.abs(np.array(s["A"]) - np.array(p["A"])).max() < 1e-7 * np.abs(np.array(s["A"])).max()
    # monotone uniaxial response, soft cells stretch more than the macro 20 %
    assert np.all(np.diff(P1[:, 0, 0]) > 0)
    cells = s["cells"][3]["cell"]
    assert len(cells["stretch"]) == 3 and min(c[0] for c in cells["stretch"]) > 1.2
    assert (tmp_path / "s" / "r_stress.png").stat().st_size > 1000
    assert (tmp_path / "s" / "fields_point3.xdmf").exists() and (tmp_path / "p" / "fields_point3.xdmf").exists()


FINITE_BAD = {
    "detF_negative": (FINITE.replace("load_path: {type: uniaxial, max: 0.2, steps: 4}",
                                     "F: [[[1.0, 0.0], [0.0, -1.0]]]").replace("fields: {points: [3]}", ""),
                      "F[0]: det F = -1 <= 0"),
    "F_shape": (FINITE.replace("load_path: {type: uniaxial, max: 0.2, steps: 4}", "F: [[1.0, 0.0]]"),
                "F[0]: expected a 2x2"),
    "bad_energy_name": (FINITE.replace("(J - 1)**2", "(Q - 1)**2"), "unknown name 'Q'"),
    "energy_not_zero": (FINITE.replace("mu/2*(I1b - 3)", "mu/2*I1b"), "must vanish at F = I"),
    "nh_bad_keys": (FINITE.replace("mu: 1.0, K: 3.0", "mu: 1.0, nu: 0.3"),
                    "neo_hookean needs either (mu, K) or (E, nu)"),
    "mixed_kinematics": (FINITE.replace("1: {material: neo_hookean, mu: 1.0, K: 3.0}",
                                        "1: {material: linear_elastic, E: 1.0, nu: 0.3}"),
                         "kinematics finite needs hyperelastic materials"),
    "bad_load_path": (FINITE.replace("type: uniaxial", "type: twist"),
                      "load_path.type: expected one of uniaxial, biaxial, shear, pure_shear, got 'twist'"),
    "fields_out_of_range": (FINITE.replace("points: [3]", "points: [9]"), "fields.points"),
    "diverges": (FINITE.replace("max: 0.2, steps: 4", "max: 3.0, steps: 1").replace("fields: {points: [3]}",
                                                                                   "newton: {max_it: 2, max_cuts: 1}"),
                 "point 0: RVE Newton did not converge"),
}


@pytest.mark.serial
@pytest.mark.parametrize("name", sorted(FINITE_BAD))
def test_finite_bad_input(tmp_path, name):
    text, expected = FINITE_BAD[name]
    cfg = _write(tmp_path / "bad.yaml", text)
    r = subprocess.run([str(BIN / "fe2ml"), "homogenize", str(cfg)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.serial
def test_failure_on_one_rank_does_not_hang(tmp_path):
    """Points are split over ranks; a point that fails only on rank 1 ends both ranks with the message."""
    text = FINITE.replace("load_path: {type: uniaxial, max: 0.2, steps: 4}",
                          "F: [[[1.1, 0.0], [0.0, 1.0]], [[3.5, 0.0], [0.0, 0.4]]]\n"
                          "    newton: {max_it: 3, max_cuts: 1}")
    text = text.replace("fields: {points: [3]}", "")
    cfg = _write(tmp_path / "c.yaml", text)
    r = subprocess.run([str(BIN / "mpiexec"), "-n", "2", str(BIN / "fe2ml"), "homogenize", str(cfg)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "did not converge" in r.stderr and "Traceback" not in r.stderr
