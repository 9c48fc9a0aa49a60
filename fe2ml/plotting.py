"""PNG figures (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "plot_calibration",
    "plot_cell_map",
    "plot_lines",
    "plot_parity",
    "plot_reactions",
    "plot_rve",
    "plot_strain_space",
    "plot_stress_strain",
]


def _plt():
    # deferred: matplotlib (Agg backend first) only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    # deferred: matplotlib (Agg backend first) only when a figure is drawn
    import matplotlib.pyplot as plt

    return plt


def plot_rve(mesh, path: str | os.PathLike, *, title: str = "") -> None:
    """Draw an RVE: matrix in grey, each biological cell in its own colour, with its id.

    2D meshes are drawn element by element; 3D meshes as the element centroids of the cells
    (matrix omitted) in a 3D scatter.

    Args:
        mesh: :class:`fe2ml.micro.mesh.RVEMesh`.
        path: PNG file to write.
        title: figure title.
    """
    plt = _plt()
    # deferred: matplotlib (Agg backend first) only when a figure is drawn
    from matplotlib.collections import PolyCollection

    ids = mesh.cell_ids
    n = max(mesh.n_cells, 1)
    cmap = plt.get_cmap("tab20", max(n, 2))
    fig = plt.figure(figsize=(5.5, 5))
    x = mesh.points[mesh.cells]
    if mesh.dim == 2:
        ax = fig.add_subplot(111)
        colors = np.array([(0.85, 0.85, 0.85, 1.0)] * len(mesh.cells))
        tags = mesh.tags
        for k, t in enumerate(tags[1:], start=1):  # non-cell phases other than the matrix in shades
            colors[(mesh.phases == t) & (ids < 0)] = (0.55 - 0.1 * k, 0.55 - 0.1 * k, 0.7, 1.0)
        colors[ids >= 0] = cmap(ids[ids >= 0] % 20)
        ax.add_collection(PolyCollection(x, facecolors=colors, edgecolors=(0, 0, 0, 0.15), linewidths=0.2))
        cen = x.mean(axis=1)
        for c in range(mesh.n_cells):
            sel = ids == c
            # label at the element closest to the cell's (non-periodic) centroid
            p = cen[sel][np.argmin(np.linalg.norm(cen[sel] - np.median(cen[sel], axis=0), axis=1))]
            ax.text(p[0], p[1], str(c), ha="center", va="center", fontsize=8)
        lo, hi = mesh.box
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_xlabel("y1")
        ax.set_ylabel("y2")
    else:
        ax = fig.add_subplot(111, projection="3d")
        cen = x.mean(axis=1)
        sel = ids >= 0
        ax.scatter(*cen[sel].T, c=cmap(ids[sel] % 20), s=2)
        ax.set_xlabel("y1")
        ax.set_ylabel("y2")
        ax.set_zlabel("y3")
    ax.set_title(title or f"RVE: {len(mesh.cells)} {mesh.cell_type} elements, {mesh.n_cells} cells")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_stress_strain(F: np.ndarray, P: np.ndarray, path: str | os.PathLike, *, title: str = "") -> None:
    """Homogenized first Piola stress components against the macro deformation.

    The abscissa is the component of F̄ − I that varies most over the points (e.g. F11 − 1 for a
    uniaxial path, F12 for shear); every component of P̄ is drawn.

    Args:
        F: macro deformation gradients (n, d, d).
        P: homogenized stresses (n, d, d).
        path: PNG file.
        title: figure title.
    """
    plt = _plt()
    n, d, _ = F.shape
    H = F - np.eye(d)
    i, j = np.unravel_index(np.argmax(np.ptp(np.concatenate([np.zeros((1, d, d)), H]), axis=0)), (d, d))
    x = np.concatenate([[0.0], H[:, i, j]])
    order = np.argsort(x)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for a in range(d):
        for b in range(d):
            y = np.concatenate([[0.0], P[:, a, b]])
            if np.abs(y).max() > 1e-12 * max(np.abs(P).max(), 1e-300):
                ax.plot(x[order], y[order], marker="o", ms=3, label=f"P̄{a + 1}{b + 1}")
    ax.set_xlabel(f"F̄{i + 1}{j + 1}" + (" − 1" if i == j else ""))
    ax.set_ylabel("homogenized first Piola stress P̄")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_reactions(header: list, rows: np.ndarray, path, *, title: str = "") -> None:
    """Load–displacement curves of a macro run.

    The abscissa is the mean displacement component that moves most (e.g. the pulled edge's u1);
    every boundary reaction component that is not negligible is drawn against it (against t when
    nothing moves).

    Args:
        header: CSV column names (``t``, ``NAME_R1``, ..., ``NAME_u1_mean``, ...).
        rows: values (n_steps, n_columns).
        path: PNG file.
        title: figure title.
    """
    plt = _plt()
    rows = np.vstack([np.zeros((1, rows.shape[1])), rows])
    ucols = [i for i, h in enumerate(header) if h.endswith("_mean")]
    rcols = [i for i, h in enumerate(header) if "_R" in h]
    if ucols and np.abs(rows[:, ucols]).max() > 0:
        ux = ucols[int(np.argmax(np.abs(rows[:, ucols]).max(axis=0)))]
        x, xlabel = rows[:, ux], f"mean displacement {header[ux].removesuffix('_mean')}"
    else:
        x, xlabel = rows[:, 0], "load parameter t"
    fig, ax = plt.subplots(figsize=(6, 4.2))
    big = np.abs(rows[:, rcols]).max() if rcols else 0.0
    for i in rcols:
        if np.abs(rows[:, i]).max() > 1e-2 * big:
            ax.plot(x, rows[:, i], marker="o", ms=3, label=header[i].replace("_R", ": reaction R"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reaction force")
    ax.axhline(0, color="k", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "reaction curve")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_lines(curves: dict, path, *, xlabel: str, ylabel: str, title: str = "", logx=False, logy=False,
               markers=True) -> None:
    """Generic line plot: ``curves`` maps a label to (x, y)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o" if markers else None, ms=4, label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_strain_space(lam: np.ndarray, source: np.ndarray, path, *, title: str = "") -> None:
    """Scatter of the principal stretches of logged records (largest against smallest), by source.

    Args:
        lam: principal stretches (n, d), ascending.
        source: (n,) source labels.
        path: PNG file.
        title: figure title.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for s in np.unique(source):
        sel = source == s
        ax.scatter(lam[sel, -1], lam[sel, 0], s=6, alpha=0.7, label=str(s))
    lo = min(lam.min(), 1.0)
    hi = max(lam.max(), 1.0)
    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
    ax.axhline(1, color="k", lw=0.5)
    ax.axvline(1, color="k", lw=0.5)
    ax.set_xlabel("largest principal stretch")
    ax.set_ylabel("smallest principal stretch")
    ax.grid(alpha=0.3)
    ax.legend(title="source", fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_parity(true: np.ndarray, pred: np.ndarray, path, *, title: str = "", symbol: str = "P") -> None:
    """Parity plot per component: prediction against reference.

    Args:
        true: reference values (n, ...).
        pred: predictions, same shape.
        path: PNG file.
        title: figure title.
        symbol: label prefix of the components.
    """
    plt = _plt()
    t = true.reshape(len(true), -1)
    p = pred.reshape(len(pred), -1)
    k = t.shape[1]
    ncol = min(k, 4)
    nrow = int(np.ceil(k / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.5 * nrow), squeeze=False)
    for c in range(nrow * ncol):
        ax = axes[c // ncol][c % ncol]
        if c >= k:
            ax.axis("off")
            continue
        lo, hi = min(t[:, c].min(), p[:, c].min()), max(t[:, c].max(), p[:, c].max())
        ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
        ax.scatter(t[:, c], p[:, c], s=4, alpha=0.7)
        ax.set_title(f"{symbol}[{c}]", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cell_map(x: np.ndarray, value: np.ndarray, all_values: np.ndarray, out, *, label: str,
                  title: str = "") -> None:
    """Map of a cell quantity over the macro domain and its distribution over all cells.

    Writes ``map_stretch.png`` and ``hist_stretch.png`` in folder ``out``.

    Args:
        x: quadrature point coordinates (n, d) (the first two are drawn).
        value: one value per point (e.g. the largest cell stretch), (n,).
        all_values: every cell's value, for the histogram.
        out: output folder.
        label: quantity name.
        title: figure title.
    """
    plt = _plt()

    out = Path(out)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if len(x) >= 3:
        try:
            # deferred: matplotlib (Agg backend first) only when a figure is drawn
            from matplotlib.tri import Triangulation

            tri = Triangulation(x[:, 0], x[:, 1])
            # drop triangles that bridge holes or notches (much longer edges than the point spacing)
            p = np.stack([x[tri.triangles[:, k], :2] for k in range(3)], 1)
            edge = np.max(np.linalg.norm(p - np.roll(p, 1, axis=1), axis=2), axis=1)
            tri.set_mask(edge > 2.5 * np.median(edge))
            tc = ax.tricontourf(tri, value, levels=20, cmap="viridis")
        except (ValueError, RuntimeError):  # degenerate point sets
            tc = ax.scatter(x[:, 0], x[:, 1], c=value, s=12, cmap="viridis")
    else:
        tc = ax.scatter(x[:, 0], x[:, 1], c=value, s=12, cmap="viridis")
    ax.plot(x[:, 0], x[:, 1], "k.", ms=1)
    fig.colorbar(tc, ax=ax, label=label)
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "map_stretch.png", dpi=130)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.hist(all_values, bins=40)
    ax.set_xlabel(label)
    ax.set_ylabel("number of cells (all points)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "hist_stretch.png", dpi=130)
    plt.close(fig)


def plot_calibration(predicted: np.ndarray, true: np.ndarray, path, *, title: str = "") -> None:
    """Predicted (calibrated uncertainty) against true per-point error, log-log, with the lines y = x and y = 2x.

    Args:
        predicted: predicted errors (n,).
        true: true errors (n,).
        path: PNG file.
        title: figure title.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    p = np.maximum(np.asarray(predicted), 1e-12)
    t = np.maximum(np.asarray(true), 1e-12)
    lo, hi = min(p.min(), t.min()), max(p.max(), t.max())
    ax.loglog([lo, hi], [lo, hi], "k:", lw=0.8, label="true = predicted")
    ax.loglog([lo, hi], [2 * lo, 2 * hi], "k--", lw=0.8, label="true = 2 x predicted")
    ax.scatter(p, t, s=5, alpha=0.7)
    ax.set_xlabel("predicted error (calibrated uncertainty)")
    ax.set_ylabel("true relative error")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

