"""Closed-form stress and tangent of the surrogate networks (no automatic differentiation), in numpy or torch.

Every model the surrogate offers is a layered softplus network N(x) of scaled features x = D y, where y are the
unscaled features of F (strain components, isotropic invariants or F − I) and D is the scaling (with the two J
inputs of the isotropic networks folded into one column). Each layer is

    a_k = W_k z_{k−1} + V_k y + b_k,   z_k = softplus(a_k)

(the MLP has V_0 only and W_k for k ≥ 1; the input-convex network has both, with the non-negative W_k⁺ and the
monotone input weights already applied). Its derivatives in y come in one forward and one backward sweep:

- forward: the input Jacobians J_k = ∂a_k/∂y = W_k diag(σ(a_{k−1})) J_{k−1} + V_k, with J_0 = V_0 the same for
  every point (so J_1 = σ(a_0) K_1 is one matrix product with K_1 = (W_1 ⊗ V_0) prepared once);
- backward: the adjoints δ_k = ∂N/∂z_k; then ∂N/∂y = Σ_k (σ(a_k) ∘ δ_k) V_k and, since every pre-activation is
  affine in what feeds it,

      ∂²N/∂y² = Σ_k J_kᵀ diag(σ'(a_k) ∘ δ_k) J_k        (σ = softplus′, σ' = σ(1 − σ)).

The cost per point is one r·h² product per hidden layer after the first (r = number of features: 6 for 3D strain,
3 for isotropic invariants), instead of r² backward passes. The chain rule to P̄ and Ā:

- strain features: S = ∂W/∂E, ℂ = ∂²W/∂E², P = F S, A_iJkL = δ_ik S_JL + F_iM ℂ_MJNL F_kN (small strain: P = S,
  A = ℂ);
- isotropic invariants of the 3D F (F33 = 1 in plane strain): y = (I1 − 3, I2 − 3, J − 1),
  P = Σ_a W_a ∂y_a/∂F and A = Σ_ab W_ab ∂y_a/∂F ⊗ ∂y_b/∂F + Σ_a W_a ∂²y_a/∂F², with ∂²I1 = 2 𝟙,
  ∂²I2_iJkL = 2 (2 F_iJ F_kL + I1 δ_ik δ_JL − δ_ik C_JL − F_iL F_kJ − b_ik δ_JL), ∂²J_iJkL = ε_ikm ε_JLN F_mN,
  restricted to the in-plane block for d = 2;
- F − I -> P networks: P = N(x), A = ∂N/∂y (forward Jacobian of every output).

The same code runs on numpy arrays (the CPU path of a rank: no torch per-call overhead) and on torch tensors (an
accelerator); :func:`evaluator` prepares it once per model. On the CPU the invariant networks' features and chain
rule (many products of 3 x 3 arrays per point) run compiled, point by point (:mod:`fe2ml.surrogate.kernels`), where
the kernel can be built; the numpy code answers otherwise, with the same numbers to round-off. This module imports
torch only for the torch backend: a run that deploys a surrogate on the CPU needs numpy alone
(:mod:`fe2ml.surrogate.deploy`).
"""

from __future__ import annotations

import numpy as np

from .kernels import invariant_kernel

__all__ = ["CPU_CHUNK", "TANGENT_PRECISIONS", "ClosedForm", "chunked", "cofactor3", "evaluator", "reference_shift",
           "softplus", "strain_basis"]

CPU_CHUNK = 256
"""Points per chunk of a CPU evaluation: the layer Jacobians of a chunk of a (64, 64) 3D network (0.8 MB) stay in a
core's L2 cache with room to spare (a 3D stress + tangent pass of a (64, 64) ensemble: 256 points 5 % faster than 512,
measured)."""


def chunked(f, F: np.ndarray, chunk: int = CPU_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """P (n,d,d), A (n,d,d,d,d) of ``f`` evaluated chunk by chunk into preallocated arrays (bounded temporaries).

    ``F`` may carry parameter columns (n, d, d + k) (a parametric potential model).
    """
    n, d = len(F), F.shape[1]
    P, A = np.empty((n, d, d)), np.empty((n, d, d, d, d))
    for i in range(0, n, chunk):
        if isinstance(f, ClosedForm):  # the tangent written in place
            P[i:i + chunk] = f(F[i:i + chunk], out=A[i:i + chunk])[0]
        else:
            P[i:i + chunk], A[i:i + chunk] = f(F[i:i + chunk])
    return P, A


def softplus(x):
    """log(1 + eˣ) of a numpy array as torch computes it (the identity above 20)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def _numpy(a) -> np.ndarray:
    """A float64 numpy copy of an array or a (detached, CPU) torch tensor."""
    if hasattr(a, "detach"):
        a = a.detach().to("cpu").double().numpy()
    return np.array(a, dtype=np.float64)

_EPS = np.zeros((3, 3, 3))
for _i, _j, _k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
    _EPS[_i, _j, _k], _EPS[_i, _k, _j] = 1.0, -1.0
# ∂²J/∂F_iJ∂F_kL = Σ_mN ε_ikm ε_JLN F_mN, as a (81, 9) matrix acting on F (row-major iJkL, mN)
_D2J = np.einsum("ikm,jln->ijklmn", _EPS, _EPS).reshape(81, 9)


class _Numpy:
    """The array operations the closed form needs, on numpy."""

    def __init__(self):
        self.einsum = np.einsum

    @staticmethod
    def const(a):
        return np.ascontiguousarray(_numpy(a))

    @staticmethod
    def activation(a, value=True):
        """σ(a) and softplus(a) (None unless ``value``) from one exponential (a capped at 30, where σ = 1 − 1e-13).

        Two arrays are allocated and every pass writes in place: a chunk's arrays are a few hundred kB, where each
        fresh allocation costs its page faults.
        """
        e = np.minimum(a, 30.0)
        np.exp(e, out=e)
        q = e + 1.0
        s = np.divide(e, q, out=e)
        if not value:
            return s, None
        sp = np.log(q, out=q)  # log(1 + e): to 1e-16 absolute where e is tiny
        big = a > 30.0
        if big.any():
            sp[big] += a[big] - 30.0
        return s, sp

    @staticmethod
    def with_ones(s):
        """[s, 1] (n, h + 1)."""
        out = np.ones((s.shape[0], s.shape[1] + 1))
        out[:, :-1] = s
        return out

    @staticmethod
    def stack(xs, axis):
        return np.stack(xs, axis)

    @staticmethod
    def concat(xs, axis):
        return np.concatenate(xs, axis)

    @staticmethod
    def zeros(shape):
        return np.zeros(shape)

    @staticmethod
    def permute(x, axes):
        return x.transpose(axes)

    @staticmethod
    def asarray(F):
        return np.asarray(F, dtype=np.float64)

    @staticmethod
    def index(i):
        return np.asarray(i, dtype=np.intp)

    @staticmethod
    def embed3(F):
        """(n, 2, 2) -> (n, 3, 3) with F33 = 1."""
        F3 = np.pad(F, ((0, 0), (0, 1), (0, 1)))
        F3[:, 2, 2] = 1.0
        return F3


class _Torch:
    """The same operations on torch tensors of one device and dtype (the model's)."""

    def __init__(self, device, dtype):
        import torch
        from torch.nn import functional

        self.torch, self.Fn = torch, functional
        self.device, self.dtype = device, dtype
        self.einsum = torch.einsum

    def const(self, a):
        t = a.detach() if isinstance(a, self.torch.Tensor) else self.torch.as_tensor(np.asarray(a, dtype=np.float64))
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def activation(self, a, value=True):
        """σ(a) and softplus(a) (None unless ``value``)."""
        return self.torch.sigmoid(a), (self.Fn.softplus(a) if value else None)

    def with_ones(self, s):
        """[s, 1] (n, h + 1)."""
        return self.Fn.pad(s, (0, 1), value=1.0)

    def stack(self, xs, axis):
        return self.torch.stack(xs, axis)

    def concat(self, xs, axis):
        return self.torch.cat(xs, axis)

    def zeros(self, shape):
        return self.torch.zeros(shape, device=self.device, dtype=self.dtype)

    @staticmethod
    def permute(x, axes):
        return x.permute(axes)

    def asarray(self, F):
        return F.to(device=self.device, dtype=self.dtype) if isinstance(F, self.torch.Tensor) else self.const(F)

    def index(self, i):
        return self.torch.tensor(i, dtype=self.torch.long, device=self.device)

    def embed3(self, F):
        """(n, 2, 2) -> (n, 3, 3) with F33 = 1."""
        F3 = self.Fn.pad(F, (0, 1, 0, 1))
        F3[:, 2, 2] = 1.0
        return F3


def net_weights(net) -> tuple[dict, tuple]:
    """A network's weights as float64 numpy arrays by state-dict name, and its monotone inputs.

    ``net``: an MLP or ICNN module of :mod:`fe2ml.surrogate.models`, or such a pair already (a checkpoint's member read
    without torch: :mod:`fe2ml.surrogate.deploy`).
    """
    if isinstance(net, tuple):
        return net
    return {k: _numpy(v) for k, v in net.state_dict().items()}, tuple(getattr(net, "monotone", ()))


def _layers(net):
    """(W, V, b) per hidden layer and (w, v, c) of the output, in terms of the scaled inputs x (numpy float64).

    ``net``: see :func:`net_weights`; the MLP and the ICNN are recognised by their weights' names. W is None for the
    first layer; V is None for the MLP's layers after the first; v is None for the MLP.
    """
    st, monotone = net_weights(net)
    if "out.weight" in st:  # MLP
        n = sum(1 for k in st if k.startswith("layers.") and k.endswith(".weight"))
        hidden = [(None if k == 0 else st[f"layers.{k}.weight"], st[f"layers.{k}.weight"] if k == 0 else None,
                   st[f"layers.{k}.bias"]) for k in range(n)]
        return hidden, (st["out.weight"], None, st["out.bias"])
    if "W_out" in st:  # ICNN
        def inp(name):
            V = st[f"{name}.weight"].copy()
            m = list(monotone)
            V[:, m] = softplus(V[:, m])
            return V

        n = sum(1 for k in st if k.startswith("Vs.") and k.endswith(".weight"))
        Ws = [None, *(softplus(st[f"Ws.{k}"]) for k in range(n - 1))]
        hidden = [(Ws[k], inp(f"Vs.{k}"), st[f"Vs.{k}.bias"]) for k in range(n)]
        return hidden, (softplus(st["W_out"]), inp("V_out"), st["V_out.bias"])
    raise TypeError(f"no closed form for a network with weights {sorted(st)[:4]}")


class _Network:
    """A layered softplus network as a function of the unscaled features y = x D⁻¹ (see the module docstring)."""

    def __init__(self, net, D, ops, hess_dtype=np.float64):
        hidden, (w, v, c) = _layers(net)
        self._buffers: dict = {}
        # the dtype of the layer Jacobians and the Hessian's products (numpy): float32 halves the tangent's matrix
        # products; the features, activations, gradient and stress stay float64
        self.hd = np.dtype(hess_dtype) if isinstance(ops, _Numpy) else None
        single = self.hd is not None and self.hd != np.float64
        Vs = [None if V is None else V @ D for _, V, _ in hidden]
        V0 = Vs[0]
        h0, r = V0.shape
        self.ops, self.r = ops, r
        self.layers = [(None if W is None else ops.const(W), None if V is None else ops.const(V), ops.const(b))
                       for (W, _, b), V in zip(hidden, Vs, strict=True)]
        self.w, self.c = ops.const(w), ops.const(c)
        self.v = None if v is None else ops.const(v @ D)
        # first layer: J_0 = V_0 for every point; its Hessian term Σ_i c_i V0_ia V0_ib = c Q_0
        self.Q0 = ops.const((V0[:, :, None] * V0[:, None, :]).reshape(h0, r * r))
        # second layer: J_1 = σ(a_0) K_1 with K_1[i, (a, j)] = V0_ia W1_ji, or [σ(a_0), 1] K_1 with the last row
        # V1_ja where the input enters the second layer too
        if len(hidden) > 1:
            W1, V1 = hidden[1][0], Vs[1]
            K1 = (V0[:, :, None] * W1.T[:, None, :]).reshape(h0, r * W1.shape[0])
            self.K1 = ops.const(K1 if V1 is None else np.concatenate([K1, V1.T.reshape(1, -1)]))
        # the layers' W and V of the Jacobians' recursion, in the Jacobians' dtype
        self.jac_layers = ([(None if W is None else W.astype(self.hd), None if V is None else V.astype(self.hd))
                            for W, V, _ in self.layers] if single else [(W, V) for W, V, _ in self.layers])
        if single and len(hidden) > 1:
            self.K1 = self.K1.astype(self.hd)
        self.w_jac = self.w.astype(self.hd) if single else self.w

    def _matmul(self, a, b, name):
        """The product a @ b (numpy: a cast to b's dtype) into this network's scratch array ``name``.

        The array is valid until the next call and reused from chunk to chunk: a chunk's layer Jacobians take 1.5 MB,
        where a fresh array costs its page faults every time.
        """
        if self.hd is None:
            return a @ b
        return np.matmul(a.astype(b.dtype, copy=False), b, out=self._scratch(name, (a.shape[0], b.shape[1]), b.dtype))

    def _scaled(self, J, c):
        """J * c (numpy: c cast to J's dtype) into a scratch array (see :meth:`_matmul`)."""
        if self.hd is None:
            return J * c
        return np.multiply(J, c.astype(J.dtype, copy=False),
                           out=self._scratch("Jc", np.broadcast_shapes(J.shape, c.shape), J.dtype))

    def _scratch(self, name, shape, dtype=np.float64):
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(shape, dtype=dtype)
        return buf

    def forward(self, y, value=False, jac=True):
        """Per layer: σ(a_k) and J_k (None for the first layer, and every layer unless ``jac``).

        The last layer's output z too when ``value``.
        """
        ops, n, L = self.ops, y.shape[0], len(self.layers)
        acts = []
        z = None
        J = None
        for k, ((W, V, b), (Wj, Vj)) in enumerate(zip(self.layers, self.jac_layers, strict=True)):
            a = y @ V.T if W is None else z @ W.T
            if W is not None and V is not None:
                a += y @ V.T
            a += b
            if jac and k == 1:
                s0 = acts[0][0]
                J = self._matmul((s0 if V is None else ops.with_ones(s0)), self.K1, "J").reshape(n, self.r, -1)
            elif jac and k > 1:
                s_prev = acts[-1][0]
                J = (self._scaled(J, s_prev[:, None, :]).reshape(n * self.r, -1) @ Wj.T).reshape(n, self.r, -1)
                if Vj is not None:
                    J = J + Vj.T[None]
            s, z = ops.activation(a, value=value or k < L - 1)
            acts.append((s, J))
        return acts, z

    def grad_hess(self, y, hess=True):
        """∂N/∂y (n, r) and ∂²N/∂y² (n, r, r) of the single-output network (None unless ``hess``)."""
        acts, _ = self.forward(y, jac=hess)
        n, r = y.shape[0], self.r
        dz = self.w[0]
        g = 0.0 if self.v is None else self.v[0]
        H = 0.0 if hess else None
        for (W, V, _), (s, J) in zip(reversed(self.layers), reversed(acts), strict=True):
            da = s * dz
            if hess:  # J is None for the first layer only
                c = s * (1.0 - s)
                c *= dz
                H = H + ((c @ self.Q0).reshape(n, r, r) if J is None
                         else self._scaled(J, c[:, None, :]) @ J.swapaxes(1, 2))
            if V is not None:
                g = g + da @ V
            if W is not None:
                dz = da @ W
        if hess and self.hd is not None and H.dtype != np.float64:
            H = H.astype(np.float64)
        return g, H

    def jacobian(self, y, jac=True):
        """N(x) (n, n_out) and ∂N/∂y (n, n_out, r) of a multi-output network (MLP; None unless ``jac``)."""
        acts, z = self.forward(y, value=True, jac=jac)
        out = z @ self.w.T + self.c
        if not jac:
            return out, None
        s, J = acts[-1]
        if J is None:  # one hidden layer
            J = self.jac_layers[0][1].T[None]
        Jo = (self._scaled(J, s[:, None, :]) @ self.w_jac.T).swapaxes(1, 2)
        return out, (Jo if self.hd is None else Jo.astype(np.float64))


def reference_shift(gy, families: int):
    """Constant gradient s (r,) such that N(y) − s·y has zero stress at F = I and stays polyconvex.

    ``gy``: the network's gradient in the unscaled features y = (I1 − 3, I2 − 3, J − 1, then per fibre family
    I4 − 1, K4 − 1, ⟨I4 − 1⟩²) at y = 0 (numpy or torch, 1D). At F = I, ∂I1/∂F = 2 𝟙, ∂I2/∂F = 4 𝟙, ∂J/∂F = 𝟙,
    ∂I4/∂F = 2 a⊗a, ∂K4/∂F = 2 (𝟙 − a⊗a) and ∂⟨I4 − 1⟩²/∂F = 0. Per family the a⊗a part cancels when the I4 and K4
    slopes are raised to their maximum m = max(N_I4, N_K4) (adding c (I4 − 1) or c (K4 − 1), c ≥ 0: convex terms);
    the remaining hydrostatic part 2 N_I1 + 4 N_I2 + N_J + 2 Σ m is taken off J − 1 (affine). Works on numpy and
    torch alike (arithmetic and ``abs`` only, differentiable almost everywhere for training).
    """
    n_hyd = 2.0 * gy[0] + 4.0 * gy[1] + gy[2]
    fibres = []
    for k in range(families):
        g4, g5 = gy[3 + 3 * k], gy[4 + 3 * k]
        m = 0.5 * (g4 + g5 + abs(g4 - g5))  # max(g4, g5)
        n_hyd = n_hyd + 2.0 * m
        fibres += [g4 - m, g5 - m, 0.0 * g4]
    return [0.0 * gy[0], 0.0 * gy[0], n_hyd, *fibres]


def cofactor3(F, stack=None):
    """The cofactor det(F) F⁻ᵀ of (..., 3, 3) by its 2 x 2 minors, defined at det F = 0 too (numpy: np.stack).

    ``stack``: the array library's stack (default: torch.stack).
    """
    if stack is None:
        import torch

        stack = torch.stack
    return stack([stack([F[..., (i + 1) % 3, (j + 1) % 3] * F[..., (i + 2) % 3, (j + 2) % 3]
                         - F[..., (i + 1) % 3, (j + 2) % 3] * F[..., (i + 2) % 3, (j + 1) % 3]
                         for j in range(3)], -1) for i in range(3)], -2)


def strain_basis(d, idx):
    """B (m, d, d): ∂y_a/∂E of y_a = E_ij (i = j) or √2 E_ij (i < j), as symmetric tensors."""
    B = np.zeros((len(idx), d, d))
    for a, (i, j) in enumerate(idx):
        if i == j:
            B[a, i, i] = 1.0
        else:
            B[a, i, j] = B[a, j, i] = 0.5 * 2.0**0.5
    return B


def _delta_S(d: int) -> np.ndarray:
    """The map (d², d⁴) of S_JL onto δ_ik S_JL at (i, J, k, L)."""
    e = np.eye(d)
    return np.einsum("ik,jm,ln->jlimkn", e, e, e).reshape(d * d, d**4)


def _finite_tangent(F, S, H, Bt, dS, d, out=None):
    """P = F S and A_iJkL = δ_ik S_JL + M_iJa H_ab M_kLb with M_iJa = F_iM B_aMJ (= F_iM ℂ_MJNL F_kN).

    S (n, d, d), H = ∂²W/∂y² (n, m, m), Bt = B as (d, d·m) with Bt[M, (J, a)] = B_aMJ, dS = :func:`_delta_S`;
    ``out``: a numpy array (n, d, d, d, d) that receives A.
    """
    n, m = F.shape[0], H.shape[1]
    M = (F.reshape(n * d, d) @ Bt).reshape(n, d * d, m)
    if out is not None and not out.flags.c_contiguous:  # no view of it as (n, d², d²): the caller copies
        out = None
    if out is None:
        A = M @ H @ M.swapaxes(1, 2)
    else:
        A = np.matmul(M @ H, M.swapaxes(1, 2), out=out.reshape(n, d * d, d * d))
    A += (S.reshape(n, d * d) @ dS).reshape(n, d * d, d * d)
    return F @ S, (A.reshape(n, d, d, d, d) if out is None else out)


class ClosedForm:
    """The closed form of one member, split at the feature space: F -> features -> (g, H) -> (P, A).

    A member's stress and tangent are linear in its feature-space derivatives g = ∂W/∂y and H = ∂²W/∂y² (for the
    F − I networks: the output and its Jacobian), with coefficients that depend on F and the feature definition
    only. Members of one ensemble share that definition (:attr:`key`), so an ensemble's mean P and A follow from the
    members' mean g and H by one chain rule (:meth:`tangent_of`) instead of one per member, and a stress-only pass
    (:meth:`derivatives` with ``tangent=False``) skips every Hessian product.

    Calling it, ``f(F, tangent=True, out=None)``, gives the member's own (P (n, d, d), A (n, d, d, d, d) or None),
    A written into ``out`` where given (numpy).
    """

    def __init__(self, key, prepare, derivatives, stress, tangent_of):
        self.key = key
        self.prepare, self.derivatives, self.stress, self._tangent_of = prepare, derivatives, stress, tangent_of

    def __call__(self, F, tangent=True, out=None):
        """(P, A) of this member at F (A is None unless ``tangent``; written into ``out`` where given)."""
        ctx = self.prepare(F)
        g, H = self.derivatives(ctx, tangent)
        if not tangent:
            return self.stress(ctx, g), None
        return self.tangent_of(ctx, g, H, out)

    def tangent_of(self, ctx, g, H, out=None):
        """(P, A) from the feature-space derivatives g and H at the prepared ``ctx``; A into ``out`` where given."""
        P, A = self._tangent_of(ctx, g, H, out)
        if out is not None and A is not out:
            out[...] = A
            A = out
        return P, A


TANGENT_PRECISIONS = ("single", "double")


def evaluator(model, backend: str = "numpy", device=None, tangent: str = "double") -> ClosedForm:
    """The closed form of ``model`` (a :class:`~fe2ml.surrogate.models.PotentialModel` or ``PlainModel``).

    Args:
        model: the trained member (its weights are copied: later changes to the model are not seen).
        backend: ``numpy`` (CPU arrays in, float64 numpy out) or ``torch`` (tensors on the model's device and in its
            dtype in and out).
        device: the torch backend's device (default: the model's). The constants are prepared in numpy from the
            model's weights on the CPU and moved there once.
        tangent: ``double``, or ``single`` (numpy backend): the layer Jacobians and the Hessian's products in float32,
            about twice as fast as float64 for the tangent's largest products. The features, activations, gradient
            and stress stay float64 (the same bits as ``double``); the tangent carries float32 rounding, about 1e-7
            of its largest entry, which only steers a Newton iteration (README: tangent precision).

    Returns:
        A :class:`ClosedForm`: called on F (n, d, d), it gives (P (n, d, d), A (n, d, d, d, d)).
    """
    if tangent not in TANGENT_PRECISIONS:
        raise ValueError(f"tangent precision: expected one of {', '.join(TANGENT_PRECISIONS)}, got {tangent!r}")
    ref = _numpy(model.x_scale)
    ops = _Numpy() if backend == "numpy" else _Torch(device or model.x_scale.device, model.x_scale.dtype)
    hd = np.float32 if tangent == "single" else np.float64
    d = model.dim
    ps = ops.const(model.p_scale)
    eye = ops.const(np.eye(d))
    if not hasattr(model, "features"):  # PlainModel: F − I -> P
        net = _Network(model.net, np.diag(1.0 / ref), ops, hd)

        def plain_derivatives(F, tangent):
            n = F.shape[0]
            out, Jac = net.jacobian((F - eye).reshape(n, d * d), jac=tangent)
            return ps * out, (None if Jac is None else ps * Jac)

        return ClosedForm(("plain", d), ops.asarray, plain_derivatives,
                          lambda F, g: g.reshape(F.shape[0], d, d),
                          lambda F, g, H, out: (g.reshape(F.shape[0], d, d), H.reshape(F.shape[0], d, d, d, d)))
    if model.features == "general":
        idx = model.idx
        m = len(idx)
        net = _Network(model.net, np.diag(1.0 / ref), ops, hd)
        g0 = net.grad_hess(ops.const(np.zeros((1, m))))[0][0]
        B = strain_basis(d, idx)
        Bf = ops.const(B.reshape(m, d * d))
        Bt = ops.const(B.transpose(1, 2, 0).reshape(d, d * m))
        dS = ops.const(_delta_S(d))
        ii = ops.index([i for i, _ in idx])
        jj = ops.index([j for _, j in idx])
        wts = ops.const([1.0 if i == j else 2.0**0.5 for i, j in idx])
        small = model.kinematics == "small"

        def prepare(F):
            F = ops.asarray(F)
            H_ = F - eye
            E = 0.5 * (H_ + H_.swapaxes(1, 2)) if small else 0.5 * (F.swapaxes(1, 2) @ F - eye)
            return F, E[:, ii, jj] * wts

        def general_derivatives(ctx, tangent):
            g, H = net.grad_hess(ctx[1], hess=tangent)
            return ps * (g - g0), (None if H is None else ps * H)

        def general_stress(ctx, g):
            F = ctx[0]
            S = (g @ Bf).reshape(F.shape[0], d, d)
            return S if small else F @ S

        def general_tangent(ctx, g, H, out):
            F = ctx[0]
            n = F.shape[0]
            S = (g @ Bf).reshape(n, d, d)
            if small:
                return S, (Bf.T @ H @ Bf).reshape(n, d, d, d, d)
            return _finite_tangent(F, S, H, Bt, dS, d, out)

        return ClosedForm(("general", d, tuple(map(tuple, idx)), small), prepare, general_derivatives,
                          general_stress, general_tangent)
    return _invariant_form(model, ref, ops, ps, hd)


def _invariant_form(model, ref, ops, ps, hd=np.float64) -> ClosedForm:
    """Closed form of the isotropic and anisotropic invariant networks (features of the 3D F, F33 = 1 in 2D).

    y = (I1 − 3, I2 − 3, J − 1, then per fibre family a: I4 − 1, K4 − 1, M = ⟨I4 − 1⟩²) with I4 = |F a|²,
    K4 = |g|², g = cof F a. Besides the isotropic terms (module docstring): ∂I4 = 2 F a ⊗ a, ∂²I4 = 2 δ_ik a_J a_L;
    ∂g_i/∂F_pQ = ε_ipl (F Bᵀ)_lQ with B_MN = ε_JMN a_J, so ∂K4 = 2 E_g F Bᵀ (E_g,pl = ε_ipl g_i) and
    ∂²K4 = 2 ∂gᵀ∂g + 2 E_g,pr B_QS; ∂M = 2 ⟨I4 − 1⟩ ∂I4 and ∂²M = 2 H(I4 − 1) ∂I4 ⊗ ∂I4 + 2 ⟨I4 − 1⟩ ∂²I4.
    """
    d = model.dim
    fib = np.asarray(model.fibres, dtype=np.float64).reshape(-1, 3)
    K = len(fib)
    n_in = 4 + 3 * K
    r = n_in - 1
    # x = D y: x3 = −y2 / s3 (the 1 − J input), the fibre inputs follow
    D = np.zeros((n_in, r))
    for i in range(3):
        D[i, i] = 1.0 / ref[i]
    D[3, 2] = -1.0 / ref[3]
    for j in range(3 * K):
        D[4 + j, 3 + j] = 1.0 / ref[4 + j]
    net = _Network(model.net, D, ops, hd)
    g0 = net.grad_hess(ops.const(np.zeros((1, r))))[0][0]
    # P(I) = 0 by polyconvexity-preserving terms (reference_shift)
    shift = ops.stack(reference_shift([g0[i] for i in range(r)], K), 0)
    a_ = [ops.const(a) for a in fib]
    B_ = [ops.const(np.einsum("j,jmn->mn", a, _EPS)) for a in fib]
    eps9 = ops.const(_EPS.reshape(3, 9))                # g_i -> Σ_i ε_ipl g_i as (p, l)
    eps93 = ops.const(_EPS.reshape(9, 3))              # T_lQ -> Σ_l ε_ipl T_lQ as ((i, p), Q)
    # the tangent's terms that are linear in a per-point array, as one product of their coefficients (n, q) with
    # constant maps (q, 81) onto A_iJkL: ε_ikm ε_JLN F_mN (J's Hessian), δ_ik C_JL, b_ik δ_JL, δ_ik δ_JL and per fibre
    # family E_g,pl B_QS (at p Q l S) and δ_ik a_J a_L
    eye3 = np.eye(3)
    maps = [_D2J.T, np.einsum("ik,jm,ln->jlimkn", eye3, eye3, eye3).reshape(9, 81),
            np.einsum("ai,bk,jl->abijkl", eye3, eye3, eye3).reshape(9, 81),
            np.einsum("ik,jl->ijkl", eye3, eye3).reshape(1, 81)]
    for a in fib:
        Bk = np.einsum("j,jmn->mn", a, _EPS)
        maps += [np.einsum("ap,bl,qs->abpqls", eye3, eye3, Bk).reshape(9, 81),
                 np.einsum("ik,j,l->ijkl", eye3, a, a).reshape(1, 81)]
    lin = ops.const(np.concatenate(maps))

    def prepare(F):
        F = ops.asarray(F)
        n = F.shape[0]
        F3 = F if d == 3 else ops.embed3(F)
        C = F3.swapaxes(1, 2) @ F3
        I1 = C[:, 0, 0] + C[:, 1, 1] + C[:, 2, 2]
        FC = F3 @ C
        I2 = 0.5 * (I1 * I1 - ops.einsum("nij,nij->n", C, C))
        cof = cofactor3(F3, ops.stack)
        J = (F3[:, 0] * cof[:, 0]).sum(-1)
        ys = [I1 - 3.0, I2 - 3.0, J - 1.0]
        dys = [2.0 * F3, 2.0 * (I1[:, None, None] * F3 - FC), cof]
        fibre = []
        for a, B in zip(a_, B_, strict=True):
            Fa = F3 @ a
            I4 = (Fa * Fa).sum(-1)
            x = I4 - 1.0
            pos = x > 0
            mac = x * pos                                                       # ⟨I4 − 1⟩
            g = cof @ a
            Eg = (g @ eps9).reshape(n, 3, 3)                                    # E_g,pl = ε_ipl g_i
            T = F3 @ B.T
            dg = eps93 @ T                                                      # ∂g_i/∂F_pQ as (n, (i, p), Q)
            dI4 = 2.0 * Fa[:, :, None] * a[None, None, :]
            ys += [x, (g * g).sum(-1) - 1.0, mac * mac]
            dys += [dI4, 2.0 * Eg @ T, 2.0 * mac[:, None, None] * dI4]
            fibre.append((pos, mac, Eg, dg.reshape(n, 3, 9)))  # rows i, columns (p, Q)
        return dict(F3=F3, C=C, I1=I1, y=ops.stack(ys, -1), dy=ops.stack(dys, 1).reshape(n, r, 9), fibre=fibre)

    def invariant_derivatives(ctx, tangent):
        g, H = net.grad_hess(ctx["y"], hess=tangent)
        return ps * (g - shift), (None if H is None else ps * H)

    def invariant_stress(ctx, Wy):
        n = Wy.shape[0]
        P3 = (Wy[:, None, :] @ ctx["dy"]).reshape(n, 3, 3)
        return P3[:, :2, :2] if d == 2 else P3

    def invariant_tangent(ctx, Wy, H, out):
        F3, C, I1, dy, fibre = ctx["F3"], ctx["C"], ctx["I1"], ctx["dy"], ctx["fibre"]
        n = Wy.shape[0]
        # A = ∂yᵀ H ∂y + ∂gᵀ (2 W_K4) ∂g per family, as one product: the Hessian bordered by the 3 rows of ∂g per
        # family; 4 W_I2 F_iJ F_kL of ∂²I2 is W_I2 (∂I1 ⊗ ∂I1) (the (I1, I1) entry) and 2 H(I4 − 1) W_M ∂I4 ⊗ ∂I4
        # of ∂²M the (I4, I4) entry
        R = r + 3 * K
        Hy = ops.zeros((n, R, R))
        Hy[:, :r, :r] = H
        Hy[:, 0, 0] += Wy[:, 1]
        rows, coef = [dy], [Wy[:, 2, None] * F3.reshape(n, 9)]
        beta = 2.0 * Wy[:, 1, None, None]
        coef += [(-beta * C).reshape(n, 9), (-beta * (F3 @ F3.swapaxes(1, 2))).reshape(n, 9),
                 (2.0 * Wy[:, 0] + 2.0 * Wy[:, 1] * I1)[:, None]]
        for k, (pos, mac, Eg, dg) in enumerate(fibre):
            Hy[:, 3 + 3 * k, 3 + 3 * k] += 2.0 * Wy[:, 5 + 3 * k] * pos
            W5 = Wy[:, 4 + 3 * k]
            for i in range(3):
                Hy[:, r + 3 * k + i, r + 3 * k + i] = 2.0 * W5
            rows.append(dg.reshape(n, 3, 9))
            # ∂²I4 and the ⟨I4 − 1⟩ ∂²I4 of ∂²M
            coef += [(2.0 * W5[:, None, None] * Eg).reshape(n, 9),
                     (2.0 * (Wy[:, 3 + 3 * k] + 2.0 * mac * Wy[:, 5 + 3 * k]))[:, None]]
        dyA = ops.concat(rows, 1) if K else dy
        P3 = (Wy[:, None, :] @ dy).reshape(n, 3, 3)
        A3 = dyA.swapaxes(1, 2) @ (Hy @ dyA) + (ops.concat(coef, 1) @ lin).reshape(n, 9, 9)
        A3 = A3.reshape(n, 3, 3, 3, 3)
        # F_iL F_kJ of ∂²I2: the outer product of F with itself, (i, L, k, J) read as (i, J, k, L)
        FF = ((beta * F3).reshape(n, 9, 1) * F3.reshape(n, 1, 9)).reshape(n, 3, 3, 3, 3)
        A3 -= ops.permute(FF, (0, 1, 4, 3, 2))
        if d == 2:
            return P3[:, :2, :2], A3[:, :2, :2, :2, :2]
        return P3, A3

    key = ("invariant", d, tuple(map(tuple, fib.tolist())))
    kernel = invariant_kernel(fib) if isinstance(ops, _Numpy) else None
    if kernel is not None:  # the same features and chain rule compiled (fe2ml/surrogate/invariants.c)

        def compiled_prepare(F):
            F, y, dy = kernel.features(F)
            return dict(F=F, y=y, dy=dy)

        def compiled_tangent(ctx, Wy, H, out):
            return kernel.tangent(ctx["F"], Wy, H, out)

        return ClosedForm(key, compiled_prepare, invariant_derivatives, invariant_stress, compiled_tangent)
    return ClosedForm(key, prepare, invariant_derivatives, invariant_stress, invariant_tangent)
