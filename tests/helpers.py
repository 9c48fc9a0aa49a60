"""Small mesh builders for tests (independent of the gmsh generators)."""

from pathlib import Path

import numpy as np


def box_mesh(dim, n, *, cell_type=None, perturb=0.0, seed=0, lengths=None, phase_fn=None):
    """Structured box mesh [0,L]^d with optional random perturbation of interior nodes.

    Boundary nodes are moved only tangentially in a periodic-consistent way (not at all here),
    so the mesh stays periodic.

    Returns:
        points (N, d), cells (M, k) in meshio order, cell type, phases (M,)
    """
    L = np.ones(dim) if lengths is None else np.asarray(lengths, float)
    g = [np.linspace(0, L[i], n + 1) for i in range(dim)]
    X = np.stack(np.meshgrid(*g, indexing="ij"), axis=-1).reshape(-1, dim)
    rng = np.random.default_rng(seed)
    interior = np.all((X > 1e-12) & (X < L - 1e-12), axis=1)
    h = L.min() / n
    X[interior] += perturb * h * rng.uniform(-1, 1, (interior.sum(), dim))
    idx = np.arange((n + 1) ** dim).reshape([n + 1] * dim)
    if dim == 2:
        a = idx[:-1, :-1].ravel()
        b = idx[1:, :-1].ravel()
        c = idx[1:, 1:].ravel()
        dd = idx[:-1, 1:].ravel()
        quads = np.stack([a, b, c, dd], axis=1)  # counter-clockwise (meshio order)
        if cell_type in (None, "triangle"):
            cells = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
            ct = "triangle"
        else:
            cells, ct = quads, "quad"
    else:
        v = [idx[i:n + i, j:n + j, k:n + k].ravel() for k in (0, 1) for j in (0, 1) for i in (0, 1)]
        # v order: (0,0,0),(1,0,0),(0,1,0),(1,1,0),(0,0,1),(1,0,1),(0,1,1),(1,1,1)
        hexes = np.stack([v[0], v[1], v[3], v[2], v[4], v[5], v[7], v[6]], axis=1)  # VTK order
        if cell_type in (None, "tetra"):
            tets = [(0, 1, 2, 6), (0, 2, 3, 6), (0, 1, 5, 6), (0, 5, 4, 6), (0, 3, 7, 6), (0, 7, 4, 6)]
            cells = np.concatenate([hexes[:, list(t)] for t in tets])
            ct = "tetra"
        else:
            cells, ct = hexes, "hexahedron"
    centroids = X[cells].mean(axis=1)
    phases = np.ones(len(cells), dtype=np.int64) if phase_fn is None else phase_fn(centroids).astype(np.int64)
    return X, cells, ct, phases


def write_meshio(path, points, cells, ct, phases, key="gmsh:physical"):
    import meshio

    if key == "gmsh:physical":
        m = meshio.Mesh(points, [(ct, cells)], cell_data={"gmsh:physical": [phases],
                                                            "gmsh:geometrical": [phases]})
        meshio.write(path, m, file_format="gmsh22", binary=False)
    else:
        m = meshio.Mesh(points, [(ct, cells)], cell_data={key: [phases]})
        meshio.write(path, m)
    return path


def laminate_exact(C_list, fractions, n, d):
    """Exact effective stiffness of a laminate with normal n (independent closed-form solve).

    In layer p the strain is ε̄ + sym(a_p ⊗ n); unknown jumps a_p and common traction t satisfy
    C_p:(ε̄ + sym(a_p⊗n))·n = t and Σ f_p a_p = 0. Returns C̄ (d,d,d,d) with minor symmetries.
    """
    P = len(C_list)
    nvec = np.zeros(d)
    nvec[n] = 1.0
    Cbar = np.zeros((d, d, d, d))
    for k in range(d):
        for l in range(d):
            E = np.zeros((d, d))
            E[k, l] += 0.5
            E[l, k] += 0.5
            # unknowns: a_1..a_P (d each), t (d)
            N = P * d + d
            A = np.zeros((N, N))
            b = np.zeros(N)
            for p, C in enumerate(C_list):
                # traction: C:(E + sym(a⊗n))·n - t = 0
                for i in range(d):
                    row = p * d + i
                    b[row] = -np.einsum("jkl,kl,j->", C[i], E, nvec)
                    for m in range(d):
                        # d/d a_m of C_ijkl sym(a⊗n)_kl n_j = 0.5 (C_ijml n_l + C_ijkm n_k) n_j
                        A[row, p * d + m] = 0.5 * (np.einsum("jl,l,j->", C[i, :, m, :], nvec, nvec)
                                                   + np.einsum("jk,k,j->", C[i, :, :, m], nvec, nvec))
                    A[row, P * d + i] = -1.0
            for i in range(d):
                for p in range(P):
                    A[P * d + i, p * d + i] = fractions[p]
            x = np.linalg.solve(A, b)
            sig = np.zeros((d, d))
            for p, C in enumerate(C_list):
                a = x[p * d:(p + 1) * d]
                eps = E + 0.5 * (np.outer(a, nvec) + np.outer(nvec, a))
                sig += fractions[p] * np.einsum("ijkl,kl->ij", C, eps)
            Cbar[:, :, k, l] = sig
    return Cbar


def tissue_rve_yaml(indent=0, *, dim=None, n_cells=2, volume_fraction=0.25, seed=3, h=0.12, soft=(0.2, 1.0)):
    """The small tissue RVE of the tests as homogenize keys (YAML text): stiff matrix, soft cells.

    Args:
        indent: spaces in front of every line (to nest it under ``rve:``).
        dim: write a ``dim`` key when given.
        n_cells, volume_fraction, seed, h: the ``cells_2d`` generator's arguments.
        soft: (mu, K) of the cells (phase 2); the matrix (phase 1) has mu = 1, K = 3.
    """
    import textwrap

    text = (f"dim: {dim}\n" if dim is not None else "") + (
        f"mesh: {{generate: cells_2d, n_cells: {n_cells}, volume_fraction: {volume_fraction}, seed: {seed}, h: {h}}}\n"
        "phases:\n"
        "  1: {material: neo_hookean, mu: 1.0, K: 3.0}\n"
        f"  2: {{material: neo_hookean, mu: {soft[0]}, K: {soft[1]}}}\n")
    return textwrap.indent(text, " " * indent)


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted checkpoint does to whoever loads it unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def crafted_checkpoints(folder, marker):
    """Two hostile files: a torch checkpoint whose dict holds a code-running object, and a bare pickle of one.

    Returns:
        Their paths. Loading either unsafely writes ``marker``.
    """
    import pickle

    import torch

    folder = Path(folder)
    zipped, bare = folder / "crafted.pt", folder / "bare.pkl"
    torch.save({"format_version": 3, "model": {"kind": "potential"}, "members": [], "evil": _Payload(marker)},
               zipped)
    bare.write_bytes(pickle.dumps(_Payload(marker)))
    return zipped, bare


def assert_check_and_run_refuse(config, msg, cwd, output="run_out"):
    """``fe2ml check`` and ``fe2ml run`` of ``config`` both stop with one ``fe2ml: error:`` line holding ``msg``,
    exit status 2, and write no ``output`` folder."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "fe2ml"
    for cmd in ("check", "run"):
        r = subprocess.run([str(exe), cmd, str(config)], capture_output=True, text=True, cwd=cwd)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and err[0].startswith("fe2ml: error:") and msg in err[0], \
            (config, cmd, r.stderr)
    assert not (Path(cwd) / output).exists()
