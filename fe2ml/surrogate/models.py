"""Surrogate models implementing the constitutive contract F̄ (n,d,d) -> P̄ (n,d,d), Ā (n,d,d,d,d).

- :class:`PotentialModel`: a strain energy W(C) from a network of the Green–Lagrange strain E
  (``features: general`` — any anisotropy, objective by construction), of the isotropic invariants
  (``features: isotropic``: I1, I2, J) or of the invariants of C with the RVE's fibre families a_k
  (``features: anisotropic``: I1, I2, J and per family I4 = a·C a = |F a|², K4 = a·cof(C) a = |cof F a|²
  (= I5 − I1 I4 + I2, so I5 = a·C² a is carried) and the tension-only ⟨I4 − 1⟩²), normalised so that W(I) = 0
  and P(I) = 0; P = ∂W/∂F and
  A = ∂²W/∂F² (symmetric tangent, energy consistent): in closed form for inference
  (:mod:`fe2ml.surrogate.closed_form`, numpy on the CPU, torch on an accelerator) and by automatic differentiation
  where training needs the graph.
  ``convex: true`` makes the network input-convex (non-negative hidden-to-hidden and output weights, convex
  non-decreasing activations). With isotropic invariants the energy is polyconvex: I1 = |F|² and
  I2 = |cof F|² are convex in F and cof F, so the network is also made non-decreasing in them (non-negative
  weights on those two inputs in every layer), and J enters through J − 1 and 1 − J, affine in J (Linden et
  al. 2023). With ``general`` strain features the energy is convex in E, which is not polyconvexity.
  With anisotropic invariants the same holds family by family: I4 = |F a|² and ⟨I4 − 1⟩² (a convex,
  non-decreasing function of I4) are convex in F, K4 = |cof F a|² is convex in cof F, and the network is
  non-decreasing in all three (Schröder & Neff 2003; Kalina et al. 2024).
- The stress-free reference (P(I) = 0) is kept by terms that keep polyconvexity: the network's hydrostatic stress
  at F = I is removed by −n (J − 1) (affine in J), and the fibre part 2 (N_I4 − N_K4) a⊗a by adding
  c (K4 − 1) when N_I4 > N_K4 or c (I4 − 1) otherwise, with c = |N_I4 − N_K4| ≥ 0 (both convex); see
  :func:`reference_shift`.
- :class:`PlainModel`: a network F − I -> P (the common baseline), A = ∂P/∂F (closed form or autograd alike).
- ``kinematics: small``: the features are the small strain ε = sym(F − I) (potential) and
  P = ∂W/∂F = σ.

Plane strain (d = 2) embeds F in 3D with F33 = 1 for the invariants.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as Fn

from fe2ml.materials.hyperelastic import fibre_families
from fe2ml.surrogate.closed_form import CPU_CHUNK, chunked, cofactor3, evaluator, reference_shift
from fe2ml.surrogate.config import FEATURES

__all__ = ["CPU_CHUNK", "FEATURES", "MODEL_KINDS", "PlainModel", "PotentialModel", "build_model", "chunked",
           "reference_shift", "stress_parameter_derivative", "with_parameters"]


def _mlp(n_in, hidden, n_out, convex=False, monotone=(), n_ctx=0):
    return (ICNN(n_in, hidden, n_out, monotone=monotone, n_ctx=n_ctx) if convex
            else MLP(n_in + n_ctx, hidden, n_out))


class MLP(nn.Module):
    """Softplus multilayer perceptron (a context c, when given, is appended to the inputs)."""

    def __init__(self, n_in, hidden, n_out):
        super().__init__()
        dims = [n_in, *hidden]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)])
        self.out = nn.Linear(dims[-1], n_out)

    def forward(self, x, c=None):
        if c is not None:
            x = torch.cat([x, c.expand(*x.shape[:-1], c.shape[-1])], -1)
        for lay in self.layers:
            x = Fn.softplus(lay(x))
        return self.out(x)


class ICNN(nn.Module):
    """Input-convex network: z_{k+1} = softplus(W_k⁺ z_k + V_k x + b_k), output W_out⁺ z + v·x.

    W⁺ = softplus(W) ≥ 0. The inputs listed in ``monotone`` enter every layer with non-negative weights too, so
    the network is also non-decreasing in them (needed to compose it with convex functions of F).

    ``n_ctx > 0`` makes it partially input-convex (Amos et al. 2017): a context c (the microstructure parameters)
    passes through a free branch u = softplus(L₂ softplus(L₁ c)) and enters layer k as
    W_k⁺ (z_k ⊙ h_k(u)) + V_k (x ⊙ g_k(u)) + U_k u with gates h_k = softplus(H_k u) ≥ 0 and g_k = softplus(G_k u) ≥ 0,
    and the output is scaled by exp(s(u)) > 0. Every term stays convex and, for the monotone inputs, non-decreasing in
    x for any c (non-negative combinations of convex non-decreasing functions); nothing is required of the dependence
    on c.
    """

    def __init__(self, n_in, hidden, n_out, monotone=(), n_ctx=0):
        super().__init__()
        self.monotone = tuple(monotone)
        self.Vs = nn.ModuleList([nn.Linear(n_in, h) for h in hidden])
        self.Ws = nn.ParameterList([nn.Parameter(torch.randn(b, a) * 0.1) for a, b in zip(hidden[:-1], hidden[1:],
                                                                                           strict=True)])
        self.W_out = nn.Parameter(torch.randn(n_out, hidden[-1]) * 0.1)
        self.V_out = nn.Linear(n_in, n_out)
        self.n_ctx = n_ctx
        if n_ctx:
            hc = max(16, hidden[0])
            self.ctx = nn.ModuleList([nn.Linear(n_ctx, hc), nn.Linear(hc, hc)])
            self.Us = nn.ModuleList([nn.Linear(hc, h) for h in [*hidden, n_out]])
            self.Gs = nn.ModuleList([nn.Linear(hc, n_in) for _ in range(len(hidden) + 1)])
            self.Hs = nn.ModuleList([nn.Linear(hc, h) for h in hidden])  # gates of the hidden state
            self.S = nn.Linear(hc, n_out)
            with torch.no_grad():  # start as the plain ICNN: gates 1, no scaling
                for G in [*self.Gs, *self.Hs]:
                    G.weight.mul_(0.1)
                    G.bias.fill_(float(np.log(np.expm1(1.0))))
                self.S.weight.mul_(0.1)
                self.S.bias.zero_()

    @torch.no_grad()
    def start_small(self):
        """After a generic initialisation: shift the raw non-negative weights so that softplus(W) ≈ 1/fan-in.

        Xavier-initialised raw weights give softplus(W) ≈ 0.7 everywhere, so the output of an L-layer network of
        width h grows like (0.7 h)^L and its first fits spend thousands of epochs pushing every weight down.
        """
        for W in [*self.Ws, self.W_out]:
            W.add_(float(np.log(np.expm1(1.0 / W.shape[1]))))
        if self.monotone:
            m = list(self.monotone)
            for V in [*self.Vs, self.V_out]:
                V.weight[:, m] += float(np.log(np.expm1(1.0 / V.weight.shape[1])))

    def _input(self, V: nn.Linear, x):
        """V x + b with non-negative weights on the monotone inputs."""
        if not self.monotone:
            return V(x)
        mask = torch.zeros(V.weight.shape[1], dtype=torch.bool, device=V.weight.device)
        mask[list(self.monotone)] = True
        weight = torch.where(mask, Fn.softplus(V.weight), V.weight)
        return x @ weight.T + V.bias

    def forward(self, x, c=None):
        if not self.n_ctx:
            z = Fn.softplus(self._input(self.Vs[0], x))
            for W, V in zip(self.Ws, self.Vs[1:], strict=True):
                z = Fn.softplus(z @ Fn.softplus(W).T + self._input(V, x))
            return z @ Fn.softplus(self.W_out).T + self._input(self.V_out, x)
        u = Fn.softplus(self.ctx[1](Fn.softplus(self.ctx[0](c))))

        def term(k, V):
            return self._input(V, x * Fn.softplus(self.Gs[k](u))) + self.Us[k](u)

        z = Fn.softplus(term(0, self.Vs[0]))
        for k, (W, V) in enumerate(zip(self.Ws, self.Vs[1:], strict=True)):
            z = Fn.softplus((z * Fn.softplus(self.Hs[k](u))) @ Fn.softplus(W).T + term(k + 1, V))
        out = (z * Fn.softplus(self.Hs[-1](u))) @ Fn.softplus(self.W_out).T + term(len(self.Vs), self.V_out)
        return out * torch.exp(self.S(u))


def _det3(F):
    """Determinant of (..., 3, 3) by cofactors (smooth second derivatives)."""
    return (F[..., 0, 0] * (F[..., 1, 1] * F[..., 2, 2] - F[..., 1, 2] * F[..., 2, 1])
            - F[..., 0, 1] * (F[..., 1, 0] * F[..., 2, 2] - F[..., 1, 2] * F[..., 2, 0])
            + F[..., 0, 2] * (F[..., 1, 0] * F[..., 2, 1] - F[..., 1, 1] * F[..., 2, 0]))


def _embed3(F):
    """(..., d, d) -> (..., 3, 3) with F33 = 1 for d = 2."""
    d = F.shape[-1]
    if d == 3:
        return F
    F3 = Fn.pad(F, (0, 1, 0, 1))  # out of place (vmap-safe)
    e33 = torch.zeros(3, 3, dtype=F.dtype, device=F.device)
    e33[2, 2] = 1.0
    return F3 + e33


class _Base(nn.Module):
    """Common: buffers for normalisation, batched P and A by autograd."""

    def __init__(self, dim: int, kinematics: str):
        super().__init__()
        self.dim = dim
        self.kinematics = kinematics
        self.register_buffer("p_scale", torch.tensor(1.0, dtype=torch.float64))

    def stress_tangent(self, F: torch.Tensor, *, create_graph: bool = False):
        """P (n,d,d) and A (n,d,d,d,d) for F (n,d,d)."""
        raise NotImplementedError

    def numpy_evaluator(self, tangent: str = "double"):
        """The closed form in numpy, F (n,d,d) ndarray -> (P, A) ndarrays (:mod:`fe2ml.surrogate.closed_form`).

        The weights are copied: build it again after the model changes. ``tangent``: the precision of the tangent's
        products (``double`` or ``single``, :func:`~fe2ml.surrogate.closed_form.evaluator`).
        """
        return evaluator(self, "numpy", tangent=tangent)

    def evaluate(self, F, *, batch: int | None = None):
        """Numpy in/out contract evaluation by the closed form, on the model's device; float64 numpy out.

        ``batch``: points per chunk (default :data:`CPU_CHUNK` on the CPU, where small chunks stay in cache, and
        65536 on an accelerator, where large chunks fill it; the chunk bounds the memory of the tangent either way).
        """
        ref = self.p_scale
        d = self.dim
        F = np.asarray(F, dtype=np.float64)
        if len(F) == 0:  # a rank without points
            return np.zeros((0, d, d)), np.zeros((0, d, d, d, d))
        if ref.device.type == "cpu":
            return chunked(self.numpy_evaluator(), F, batch or CPU_CHUNK)
        f = evaluator(self, "torch")

        def on_device(G):
            P, A = f(torch.as_tensor(G, device=ref.device))
            return P.cpu().numpy(), A.cpu().numpy()

        return chunked(on_device, F, batch or 65536)


class PotentialModel(_Base):
    """Hyperelastic potential network, W(I) = 0 and P(I) = 0 by construction.

    Args:
        dim: 2 or 3.
        kinematics: ``finite`` or ``small``.
        hidden: hidden layer widths.
        features: ``general`` (components of E or ε), ``isotropic`` (I1, I2, J) or ``anisotropic`` (I1, I2, J and
            I4, K4, ⟨I4 − 1⟩² per fibre family); the invariants need finite kinematics.
        convex: input-convex network (polyconvex with invariant features: non-decreasing in every convex
            invariant too).
        fibres: the fibre families a_k in the RVE frame (``anisotropic`` only): 2- or 3-vectors, normalised here
            (2-vectors lie in the plane of a plane-strain RVE).
        parameters: names of microstructure parameters p (a parametric surrogate W(F; p)). The model then takes
            F with the parameter vector appended to its first row, (n, d, d + k) (:func:`with_parameters`); p passes
            through the free branch of a partially input-convex network, W(I; p) = 0 and P(I; p) = 0 for every p,
            and the tangent is ∂²W/∂F² at fixed p (automatic differentiation; :meth:`bound` folds constant p into a
            plain network with the closed form).
        levels: {name: [values]} of categorical parameters (the realizations ``mesh.seed``): they enter one-hot, so
            that each trained realization has its own context (there is nothing to interpolate between seeds).
    """

    def __init__(self, dim: int, kinematics: str = "finite", hidden=(16, 16), features: str = "general",
                 convex: bool = False, fibres=None, parameters=None, levels=None):
        super().__init__(dim, kinematics)
        self.parameters_ = [str(q) for q in (parameters or [])]
        self.levels = {str(k): [float(v) for v in vs] for k, vs in (levels or {}).items()}
        if any(k not in self.parameters_ for k in self.levels):
            raise ValueError(f"levels of {sorted(self.levels)}: not among the parameters {self.parameters_}")
        if features not in FEATURES:
            raise ValueError(f"features: expected {', '.join(FEATURES)}, got {features!r}")
        if features != "general" and kinematics == "small":
            raise ValueError(f"{features} invariant features need finite kinematics")
        fib = fibre_families([{"fibres": fibres}]) if features == "anisotropic" else []
        if features == "anisotropic" and not fib:
            raise ValueError("features anisotropic needs the fibre families of the RVE (none given)")
        if features != "anisotropic" and fibres:
            raise ValueError(f"fibres apply to features anisotropic only (features is {features})")
        self.features = features
        self.convex = convex
        self.fibres = fib
        d = dim
        self.idx = [(i, j) for i in range(d) for j in range(i, d)]
        n_in = len(self.idx) if features == "general" else 4 + 3 * len(fib)
        # polyconvexity: non-decreasing in I1 − 3, I2 − 3 (inputs 0, 1) and every fibre invariant (inputs 4...),
        # free in J − 1 and 1 − J (inputs 2, 3)
        monotone = () if features == "general" else (0, 1, *range(4, n_in))
        self.n_in = n_in
        k = len(self.parameters_)
        # categorical parameters (realizations: mesh.seed) enter one-hot, one context input per trained level
        self._cat = [(self.parameters_.index(q), torch.tensor(vs, dtype=torch.float64))
                     for q, vs in self.levels.items()]
        self._cont = [j for j, q in enumerate(self.parameters_) if q not in self.levels]
        n_ctx = len(self._cont) + sum(len(vs) for vs in self.levels.values())
        self.net = _mlp(n_in, list(hidden), 1, convex, monotone=monotone, n_ctx=n_ctx)
        self.register_buffer("x_scale", torch.ones(n_in + k, dtype=torch.float64))
        if k:  # the parameters' mean (their scale is the tail of x_scale)
            self.register_buffer("p_mean", torch.zeros(k, dtype=torch.float64))
        if fib:  # a buffer (it moves with the model); general/isotropic state dicts stay as they were
            self.register_buffer("a", torch.tensor(fib, dtype=torch.float64))
        self.double()

    def features_of(self, F):
        """Unscaled network inputs (n, n_in), then the parameters (used for the training-data bounds and gates)."""
        F, p = self._split(F)
        y = self._feat(F)
        return y if p is None else torch.cat([y, p], -1)

    def _split(self, F):
        """(F (n, d, d), p (n, k) or None) of a possibly parameter-augmented F."""
        if not self.parameters_:
            return F, None
        d = self.dim
        if F.shape[-1] != d + len(self.parameters_):
            raise ValueError(f"a parametric model takes F with its {len(self.parameters_)} parameter(s) appended "
                             f"(shape (n, {d}, {d + len(self.parameters_)})), got {tuple(F.shape)}")
        return F[..., :d], F[..., 0, d:]

    def _context(self, p):
        """Scaled parameters (n, k) or None."""
        if p is None:
            return None
        c = (p - self.p_mean) / self.x_scale[self.n_in:]
        if not self._cat:
            return c
        cols = [c[..., self._cont]]
        for j, vs in self._cat:
            cols.append((torch.abs(p[..., j:j + 1] - vs.to(p.device)) < 0.5).to(p.dtype))
        return torch.cat(cols, -1)

    def numpy_evaluator(self, tangent: str = "double"):
        """The numpy closed form; None for a parametric model (see :meth:`bound` for one at fixed parameters)."""
        return None if self.parameters_ else super().numpy_evaluator(tangent)

    @torch.no_grad()
    def bound(self, p) -> PotentialModel:
        """This parametric model at fixed parameters p (k,): a non-parametric model with the same W(F; p).

        At fixed p every gate, additive term and the output scale of the context branch are constants, so they fold
        into the weights of a plain network of the same architecture (non-negative weights stay non-negative, so it
        is convex where this one is); the closed form (:meth:`numpy_evaluator`) then applies.
        """
        if not self.parameters_:
            raise ValueError("bound: the model is not parametric")
        pv = torch.as_tensor(np.asarray(p, dtype=np.float64).reshape(1, -1), dtype=self.x_scale.dtype,
                             device=self.x_scale.device)
        c = self._context(pv)
        net = self.net
        hidden = [V.out_features for V in net.Vs] if isinstance(net, ICNN) else [lay.out_features
                                                                                  for lay in net.layers]
        m = PotentialModel(self.dim, self.kinematics, hidden=tuple(hidden), features=self.features,
                           convex=self.convex, fibres=self.fibres or None).to(self.x_scale.device)
        m.x_scale.copy_(self.x_scale[:self.n_in])
        m.p_scale.copy_(self.p_scale)
        if not isinstance(net, ICNN):  # the context is appended to the inputs: it moves into the first bias
            first, f0 = m.net.layers[0], net.layers[0]
            first.weight.copy_(f0.weight[:, :self.n_in])
            first.bias.copy_(f0.bias + f0.weight[:, self.n_in:] @ c[0])
            for a, b in zip(m.net.layers[1:], net.layers[1:], strict=True):
                a.load_state_dict(b.state_dict())
            m.net.out.load_state_dict(net.out.state_dict())
            return m

        def raw(v):  # the raw weight whose softplus is v > 0 (torch's softplus is the identity above 20)
            return torch.where(v > 20.0, v, torch.log(torch.expm1(torch.clamp(v, min=1e-300))))

        u = Fn.softplus(net.ctx[1](Fn.softplus(net.ctx[0](c))))[0]
        scale = torch.exp(net.S(u))  # (1,)
        mono = torch.zeros(self.n_in, dtype=torch.bool, device=u.device)
        mono[list(net.monotone)] = True
        Vs_all = [*net.Vs, net.V_out]
        Vm_all = [*m.net.Vs, m.net.V_out]
        for k, (V, Vm) in enumerate(zip(Vs_all, Vm_all, strict=True)):
            g = Fn.softplus(net.Gs[k](u))
            s = scale[0] if k == len(net.Vs) else 1.0
            eff = torch.where(mono, Fn.softplus(V.weight), V.weight) * g * s  # V' diag(g), the monotone part ≥ 0
            Vm.weight.copy_(torch.where(mono, raw(eff), eff))
            Vm.bias.copy_((V.bias + net.Us[k](u)) * s)
        for k, (W, Wm) in enumerate(zip(net.Ws, m.net.Ws, strict=True)):
            Wm.copy_(raw(Fn.softplus(W) * Fn.softplus(net.Hs[k](u))))
        m.net.W_out.copy_(raw(Fn.softplus(net.W_out) * Fn.softplus(net.Hs[-1](u)) * scale[:, None]))
        return m

    def evaluate(self, F, *, batch: int | None = None):
        """Numpy in/out evaluation; a parametric model's F carries its parameters (:func:`with_parameters`)."""
        if not self.parameters_:
            return super().evaluate(F, batch=batch)
        dev = self.p_scale.device
        d = self.dim
        F = np.asarray(F, dtype=np.float64)
        if len(F) == 0:
            return np.zeros((0, d, d)), np.zeros((0, d, d, d, d))

        def f(G):
            P, A = self._autograd(torch.as_tensor(G, device=dev), False)
            return P.cpu().numpy(), A.cpu().numpy()

        return chunked(f, F, batch or (CPU_CHUNK if dev.type == "cpu" else 65536))

    def _feat(self, F):
        d = self.dim
        if self.features == "general":
            if self.kinematics == "small":
                H = F - torch.eye(d, dtype=F.dtype, device=F.device)
                E = 0.5 * (H + H.transpose(-1, -2))
            else:
                E = 0.5 * (F.transpose(-1, -2) @ F - torch.eye(d, dtype=F.dtype, device=F.device))
            x = torch.stack([E[..., i, j] * (1.0 if i == j else 2.0 ** 0.5) for i, j in self.idx], -1)
            return x
        F3 = _embed3(F)
        C = F3.transpose(-1, -2) @ F3
        I1 = C.diagonal(dim1=-2, dim2=-1).sum(-1)
        I2 = 0.5 * (I1**2 - (C @ C).diagonal(dim1=-2, dim2=-1).sum(-1))
        J = _det3(F3)
        cols = [I1 - 3.0, I2 - 3.0, J - 1.0, 1.0 - J]
        if self.features == "anisotropic":
            a = self.a.to(F.dtype)
            Fa = F3 @ a.T                                   # (..., 3, K)
            Ga = cofactor3(F3) @ a.T
            for k in range(a.shape[0]):
                I4 = (Fa[..., k] ** 2).sum(-1)
                cols += [I4 - 1.0, (Ga[..., k] ** 2).sum(-1) - 1.0, torch.relu(I4 - 1.0) ** 2]
        return torch.stack(cols, -1)

    def _y_gradient(self, g0):
        """Gradient in the unscaled features y (J once) from the gradient in the scaled inputs x (m, n_in)."""
        gx = g0 / self.x_scale[:self.n_in]
        if not self.parameters_:
            gx = gx[0]
            return [gx[0], gx[1], gx[2] - gx[3], *gx[4:]]
        return [gx[:, 0], gx[:, 1], gx[:, 2] - gx[:, 3], *gx[:, 4:].T]

    def _reference(self, c=None):
        """Network value and gradient at the reference state (x = 0), differentiable in the weights.

        With a context c (n, k): per point, (n,) and (n, n_in); without: a scalar and (1, n_in).
        """
        m = 1 if c is None else len(c)
        x0 = torch.zeros(m, self.n_in, dtype=self.x_scale.dtype, device=self.x_scale.device, requires_grad=True)
        out = self.net(x0, c).squeeze(-1) if c is not None else self.net(x0)
        n0 = out.sum() if c is None else out
        g0 = torch.autograd.grad(out.sum(), x0, create_graph=True)[0]
        return n0, g0

    def energy(self, F, ref=None):
        """W(F) (n,) including the normalisation terms (W(I) = 0, P(I) = 0; for every p when parametric)."""
        F, p = self._split(F)
        return self._energy(F, p, ref)

    def _energy(self, F, p, ref=None):
        y = self._feat(F)
        x = y / self.x_scale[:self.n_in]
        c = self._context(p)
        n0, g0 = self._reference(c) if ref is None else ref
        # stress-free reference: remove the linear part of the network at the reference state
        if self.features == "general":
            lin = (x * g0).sum(-1)
        else:
            # P(I) = 0 by polyconvexity-preserving terms (Linden et al. 2023 for the isotropic part): −s·y with the
            # J column of y taken once (x3 = J − 1, x4 = 1 − J enter with opposite signs)
            shift = torch.stack(reference_shift(self._y_gradient(g0), len(self.fibres)), -1)
            yr = torch.cat([y[..., :3], y[..., 4:]], -1)
            lin = (yr * shift).sum(-1)
        out = self.net(x).squeeze(-1) if c is None else self.net(x, c).squeeze(-1)
        return self.p_scale * (out - n0 - lin)

    def stress_tangent(self, F, *, create_graph=False):
        """P = ∂W/∂F and A = ∂²W/∂F² (closed form without a graph, batched autograd with one)."""
        if not create_graph and not self.parameters_:
            return evaluator(self, "torch")(F)
        return self._autograd(F, create_graph)

    def _autograd(self, F, create_graph):
        """P and A by batched autograd (one backward pass per tangent column), at fixed parameters."""
        F, p = self._split(F)
        with torch.enable_grad():
            F = F.detach().requires_grad_(True)
            W = self._energy(F, p).sum()
            P = torch.autograd.grad(W, F, create_graph=True)[0]
            A = _columns(P, F, self.dim, create_graph)
        return (P, A) if create_graph else (P.detach(), A.detach())


def stress_parameter_derivative(model: PotentialModel, F: torch.Tensor) -> torch.Tensor:
    """∂P/∂p (n, d, d, k) of a parametric potential model at parameter-augmented F (n, d, d + k).

    The sensitivity of the homogenized stress to the microstructure parameters at fixed F̄, by automatic
    differentiation (d² backward passes): what the forward sensitivities of a macro problem need.
    """
    Fd, p = model._split(F)
    d = model.dim
    with torch.enable_grad():
        Fd = Fd.detach().requires_grad_(True)
        p = p.detach().requires_grad_(True)
        W = model._energy(Fd, p).sum()
        P = torch.autograd.grad(W, Fd, create_graph=True)[0]
        rows = [torch.autograd.grad(P[:, i, j].sum(), p, retain_graph=True)[0] for i in range(d) for j in range(d)]
    return torch.stack(rows, 1).reshape(len(F), d, d, p.shape[-1]).detach()


def _columns(P, F, d, create_graph):
    """A[n, i, j, k, l] = ∂P_ij/∂F_kl by d² batched backward passes."""
    rows = []
    for i in range(d):
        for j in range(d):
            g = torch.autograd.grad(P[:, i, j].sum(), F, create_graph=create_graph, retain_graph=True)[0]
            rows.append(g)
    return torch.stack(rows, 1).reshape(len(F), d, d, d, d)


class PlainModel(_Base):
    """Baseline network F − I -> P (no physics constraints); A by autograd (not symmetric in general)."""

    def __init__(self, dim: int, kinematics: str = "finite", hidden=(16, 16)):
        super().__init__(dim, kinematics)
        self.net = MLP(dim * dim, list(hidden), dim * dim)
        self.register_buffer("x_scale", torch.ones(dim * dim, dtype=torch.float64))
        self.double()

    def features_of(self, F):
        """Unscaled network inputs (n, d²)."""
        return (F - torch.eye(self.dim, dtype=F.dtype, device=F.device)).reshape(-1, self.dim * self.dim)

    def stress(self, F):
        """P (n,d,d)."""
        d = self.dim
        x = (F - torch.eye(d, dtype=F.dtype, device=F.device)).reshape(-1, d * d) / self.x_scale
        return self.p_scale * self.net(x).reshape(-1, d, d)

    def stress_tangent(self, F, *, create_graph=False):
        """P and A = ∂P/∂F (closed form without a graph, autograd with one)."""
        if not create_graph:
            return evaluator(self, "torch")(F)
        with torch.enable_grad():
            F = F.detach().requires_grad_(True)
            P = self.stress(F)
            A = _columns(P, F, self.dim, create_graph)
        return (P, A) if create_graph else (P.detach(), A.detach())


MODEL_KINDS = ("potential", "plain")


def with_parameters(F: np.ndarray, p) -> np.ndarray:
    """F (n, d, d) with the parameter vector(s) p ((k,) for all points or (n, k)) appended to the first row.

    Returns (n, d, d + k): the input of a parametric :class:`PotentialModel` (the other rows' extra columns are 0).
    """
    F = np.asarray(F, dtype=np.float64)
    n, d = len(F), F.shape[1]
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), (n, np.shape(p)[-1]))
    out = np.zeros((n, d, d + p.shape[1]))
    out[:, :, :d] = F
    out[:, 0, d:] = p
    return out


def build_model(kind: str, dim: int, kinematics: str, **kw) -> _Base:
    """Construct a model from its kind and arguments (as stored in checkpoints)."""
    if kind == "potential":
        return PotentialModel(dim, kinematics, **kw)
    if kind == "plain":
        return PlainModel(dim, kinematics, **{k: v for k, v in kw.items() if k == "hidden"})
    raise ValueError(f"unknown model kind {kind!r}; allowed: {', '.join(MODEL_KINDS)}")
