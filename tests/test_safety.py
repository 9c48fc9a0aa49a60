"""Untrusted inputs: crafted checkpoints run no code in any command, hostile expressions end in one error line,
the run folder is not overwritten by accident, a restart finds a relative mesh file, configs import light.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import crafted_checkpoints

from fe2ml.errors import ConfigError
from fe2ml.surrogate.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from fe2ml.surrogate.models import PotentialModel

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

RUN = """\
dim: 2
mesh: {generate: rectangle, size: [1.0, 1.0], n: [2, 2]}
material: {kind: surrogate, checkpoint: CKPT}
bcs:
  - {boundary: left, components: [0, 1], value: 0.0}
  - {boundary: right, components: [0], value: "0.05*t"}
steps: 1
output: out
"""

ANALYTIC = """\
dim: 2
mesh: MESH
material:
  kind: analytic
  material: {material: neo_hookean, mu: 1.0, K: 4.0}
bcs:
  - {boundary: left, components: [0, 1], value: 0.0}
  - {boundary: right, components: [0], value: "VALUE"}
tractions:
  - {boundary: top, value: [0.0, "TRACTION"]}
steps: 2
output: OUT
"""


def _fe2ml(*args, cwd):
    r = subprocess.run([str(BIN / "fe2ml"), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return r, lines


def _one_error_line(r, lines, expected: str):
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("fe2ml: error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert expected in lines[0], lines[0]


def _safe_checkpoint(path):
    m = PotentialModel(2, "finite", hidden=(4,)).double()
    x = np.random.default_rng(0).random((5, len(m.idx)))
    ck = {"format_version": FORMAT_VERSION, "model": {"kind": "potential", "hidden": (4,)},
          "members": [m.state_dict()], "dim": 2, "kinematics": "finite", "rve_fingerprint": "abc",
          "bounds": {"feature_min": x.min(0).tolist(), "feature_max": x.max(0).tolist()}, "stress_floor": 0.05,
          "density": {"points": x, "x_scale": np.ones(x.shape[1]), "scale": 1.0}, "calibration": None,
          "metrics": {"validation": {"stress_rel_l2": np.float64(0.01)}}}
    save_checkpoint(ck, path)
    return ck


def test_checkpoints_store_numpy_as_tensors_and_load_them_back_without_unpickling(tmp_path):
    ck = _safe_checkpoint(tmp_path / "ck.pt")
    raw = torch.load(tmp_path / "ck.pt", weights_only=True)  # the safe loader reads every entry
    assert isinstance(raw["density"]["points"], torch.Tensor)
    back = load_checkpoint(tmp_path / "ck.pt")
    assert isinstance(back["density"]["points"], np.ndarray)
    assert np.array_equal(back["density"]["points"], ck["density"]["points"])
    assert back["model"]["hidden"] == (4,) and back["metrics"]["validation"]["stress_rel_l2"] == 0.01
    for k, v in ck["members"][0].items():
        assert isinstance(back["members"][0][k], torch.Tensor) and torch.equal(back["members"][0][k], v)
    with pytest.raises(TypeError, match="checkpoint entry checkpoint.obj: object cannot be stored safely"):
        save_checkpoint({**ck, "obj": object()}, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists() and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.serial
def test_a_trusted_old_checkpoint_is_refused_with_the_fix_and_resaved(tmp_path):
    ck = _safe_checkpoint(tmp_path / "new.pt")
    torch.save({**ck, "format_version": 2}, tmp_path / "old.pt")  # format 2: numpy arrays pickled inside
    with pytest.raises(ConfigError, match="re-save it with `fe2ml export --resave"):
        load_checkpoint(tmp_path / "old.pt")
    r, lines = _fe2ml("export", "old.pt", "resaved.pt", "--resave", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = load_checkpoint(tmp_path / "resaved.pt")
    assert back["format_version"] == FORMAT_VERSION
    assert np.array_equal(back["density"]["points"], ck["density"]["points"])


@pytest.mark.serial
def test_a_checkpoint_whose_weights_do_not_fit_this_fe2mls_network_is_one_error_line(tmp_path):
    # e.g. written by an fe2ml whose networks had other layers: a missing and an unexpected weight
    ck = _safe_checkpoint(tmp_path / "new.pt")
    st = dict(ck["members"][0])
    k = next(iter(st))
    st["old_layer.weight"] = st.pop(k)
    save_checkpoint({**ck, "members": [st]}, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match="weights do not fit the potential model"):
        load_checkpoint(tmp_path / "old.pt")
    (tmp_path / "run.yaml").write_text(RUN.replace("CKPT", "old.pt"))
    r, lines = _fe2ml("run", "run.yaml", cwd=tmp_path)
    _one_error_line(r, lines, "old.pt: the checkpoint's weights do not fit")
    assert not (tmp_path / "out").exists()


@pytest.mark.serial
def test_a_crafted_checkpoint_runs_no_code_and_writes_nothing_in_any_command(tmp_path):
    marker = tmp_path / "MARKER"
    zipped, bare = crafted_checkpoints(tmp_path, marker)
    (tmp_path / "log").mkdir()
    (tmp_path / "t.yaml").write_text("data: [log]\nmodel: {kind: potential, hidden: [8]}\noutput: trained\n")
    n = 0
    for ck in (zipped, bare):
        (tmp_path / "run.yaml").write_text(RUN.replace("CKPT", ck.name))
        rve = ("rve: {dim: 2, mesh: {generate: laminate, fractions: [0.5, 0.5], h: 0.5}, phases: {1: {material: "
               "neo_hookean, mu: 1.0, K: 4.0}, 2: {material: neo_hookean, mu: 2.0, K: 8.0}}}, checkpoint: ")
        (tmp_path / "hyb.yaml").write_text(RUN.replace("kind: surrogate", "kind: hybrid").replace("CKPT", ck.name)
                                           .replace("checkpoint: ", rve))
        for args in (("check", "run.yaml"), ("run", "run.yaml"), ("run", "hyb.yaml"), ("export", ck.name, "m.pt"),
                     ("train", "t.yaml", "--resume", ck.name)):
            r, lines = _fe2ml(*args, cwd=tmp_path)
            _one_error_line(r, lines, "was not loaded (loading it would run code from the file)")
            assert not marker.exists(), args
            n += 1
        assert not (tmp_path / "out").exists() and not (tmp_path / "m.pt").exists()
        assert not (tmp_path / "trained").exists()
    print(f"\n{n} commands given a crafted checkpoint: 0 ran its code")


HOSTILE = {
    "10**10**10": "exponent 1e+10 out of bounds",
    "1" * 4000: "4000 characters",
    "-" * 100000 + "1": "100001 characters",
    "+".join(["t"] * 200000): "399999 characters",
    "exp": "exp is a function, used as a value",
    "t*exp": "exp is a function, used as a value",
    "nan": "unknown name 'nan'",
    "1e308*10": "not finite",
    "log(t - 0.5)": "fails at",
    "1/(t - 1)": "fails at t = 1",
}


@pytest.mark.serial
@pytest.mark.parametrize("where", ["bcs[1].value", "tractions[0].value[1]"])
@pytest.mark.parametrize("command", ["check", "run"])
def test_hostile_expressions_end_in_one_error_line_in_check_and_run(tmp_path, command, where):
    for k, text in enumerate(HOSTILE):
        value, traction = (text, "0.0") if where.startswith("bcs") else ("0.01*t", text)
        cfg = tmp_path / f"c{k}.yaml"
        cfg.write_text(ANALYTIC.replace("MESH", "{generate: rectangle, size: [1.0, 1.0], n: [2, 2]}")
                       .replace("VALUE", value).replace("TRACTION", traction).replace("OUT", f"out{k}"))
        r, lines = _fe2ml(command, cfg.name, cwd=tmp_path)
        key = where.replace("value[1]", "value")
        _one_error_line(r, lines, f"c{k}.yaml: {key}: ")
        assert HOSTILE[text] in lines[0], lines[0]
        assert not (tmp_path / f"out{k}").exists()


@pytest.mark.serial
def test_hostile_orientation_and_energy_are_refused(tmp_path):
    base = ANALYTIC.replace("MESH", "{generate: rectangle, size: [1.0, 1.0], n: [2, 2]}").replace(
        "VALUE", "0.01*t").replace("TRACTION", "0.0").replace("OUT", "out")
    energy = base.replace("material: {material: neo_hookean, mu: 1.0, K: 4.0}",
                          "material: {material: energy, W: \"mu*(I1-3) + ENERGY\", params: {mu: 1.0}}")
    for text, expected in (("log(J - 1)", "energy cannot be evaluated at F = I"),
                           ("sqrt(1 - I1)", "energy cannot be evaluated"), ("exp(1000*(I1-3))", "energy"),
                           ("exp", "exp is a function")):
        (tmp_path / "e.yaml").write_text(energy.replace("ENERGY", text))
        r, lines = _fe2ml("check", "e.yaml", cwd=tmp_path)
        _one_error_line(r, lines, expected)
    orient = ANALYTIC.replace("MESH", "{generate: rectangle, size: [1.0, 1.0], n: [2, 2]}").replace(
        "VALUE", "0.01*t").replace("TRACTION", "0.0").replace("OUT", "out").replace(
        "  material: {material: neo_hookean, mu: 1.0, K: 4.0}\n",
        "  rve: {dim: 2, mesh: {generate: laminate, fractions: [0.5, 0.5], h: 0.25}, phases: {1: {material: "
        "neo_hookean, mu: 1.0, K: 4.0}, 2: {material: neo_hookean, mu: 2.0, K: 8.0}}}\n"
        "  orientation: \"ORIENT\"\n").replace("kind: analytic", "kind: rve")
    for text, expected in (("10**10**10", "out of bounds"), ("pi*exp", "exp is a function"),
                           ("30/(x - 0.5)", "fails at")):
        (tmp_path / "o.yaml").write_text(orient.replace("ORIENT", text))
        r, lines = _fe2ml("check", "o.yaml", cwd=tmp_path)
        _one_error_line(r, lines, "o.yaml: material.orientation: ")
        assert expected in lines[0], lines[0]


@pytest.mark.serial
def test_an_existing_run_folder_is_refused_unless_overwrite_or_restart(tmp_path):
    (tmp_path / "a.yaml").write_text(ANALYTIC.replace("MESH", "{generate: rectangle, size: [1.0, 1.0], n: [2, 2]}")
                                     .replace("VALUE", "0.01*t").replace("TRACTION", "0.0").replace("OUT", "out"))
    r, _ = _fe2ml("run", "a.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = (tmp_path / "out" / "summary.json").read_text()
    r, lines = _fe2ml("run", "a.yaml", cwd=tmp_path)
    _one_error_line(r, lines, "holds an earlier run; continue it with `fe2ml run --restart")
    assert (tmp_path / "out" / "summary.json").read_text() == summary  # untouched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r, lines = _fe2ml("run", "a.yaml", "--output", "other", "--overwrite", cwd=tmp_path)
    _one_error_line(r, lines, "is not empty and holds no fe2ml run")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    r, _ = _fe2ml("run", "a.yaml", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r, _ = _fe2ml("run", "a.yaml", "--output", str(tmp_path.parent / f"{tmp_path.name}-outside"), cwd=tmp_path)
    assert r.returncode == 0 and "lies outside the config's folder" in r.stdout, r.stdout


@pytest.mark.serial
def test_restart_of_a_run_whose_mesh_is_a_relative_file(tmp_path):
    import meshio

    cfgdir = tmp_path / "cases"
    (cfgdir / "meshes").mkdir(parents=True)
    X, Y = np.meshgrid(np.linspace(0, 1, 3), np.linspace(0, 1, 3))
    pts = np.c_[X.ravel(), Y.ravel()]
    tri = []
    for i in range(2):
        for j in range(2):
            a = 3 * j + i
            tri += [[a, a + 1, a + 4], [a, a + 4, a + 3]]
    meshio.write(cfgdir / "meshes" / "square.msh", meshio.Mesh(pts, [("triangle", np.array(tri))]),
                 file_format="gmsh22", binary=False)
    (cfgdir / "r.yaml").write_text(ANALYTIC.replace("MESH", "{file: meshes/square.msh}").replace("VALUE", "0.02*t")
                                   .replace("TRACTION", "0.0").replace("OUT", "../runs/r").replace("steps: 2",
                                                                                                 "steps: 3"))
    r, _ = _fe2ml("run", "cases/r.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the run folder is elsewhere: the mesh path must still be read against the config's folder
    r, _ = _fe2ml("run", "--restart", "runs/r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "restarting after step 3" in r.stdout, r.stdout


@pytest.mark.serial  # a child python under mpiexec cannot start MPI
def test_stage_configs_import_without_dolfinx_petsc4py_or_torch():
    code = textwrap.dedent("""
        import sys
        import fe2ml.config, fe2ml.expr, fe2ml.files, fe2ml.macro.config, fe2ml.micro.config, fe2ml.data.config
        import fe2ml.surrogate.config, fe2ml.hpc
        heavy = sorted(m for m in ("dolfinx", "petsc4py", "torch", "ufl", "basix", "gmsh") if m in sys.modules)
        print(",".join(heavy))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"a config module imports {r.stdout.strip()}"
