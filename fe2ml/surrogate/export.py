"""TorchScript export of a potential surrogate: ``fe2ml export CKPT OUT.pt``.

The exported module maps F (n, d, d) float64 to (P (n, d, d), A (n, d, d, d, d)) with the closed-form
derivatives of the network (no autograd at run time), and carries the checkpoint's dimension,
kinematics and RVE fingerprint as attributes. Load it anywhere with ``torch.jit.load(OUT.pt)``.
"""

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as Fn

from fe2ml.errors import ConfigError
from fe2ml.surrogate.checkpoint import load_checkpoint
from fe2ml.surrogate.closed_form import strain_basis
from fe2ml.surrogate.models import MLP, build_model

__all__ = ["ExportedEnsemble", "ExportedPotential", "export_checkpoint"]


class ExportedPotential(nn.Module):
    """Scriptable closed-form P and A of one :class:`~fe2ml.surrogate.models.PotentialModel` (strain features)."""

    dim: int
    small: bool
    fingerprint: str

    def __init__(self, model, fingerprint: str):
        super().__init__()
        d = model.dim
        self.dim = d
        self.small = model.kinematics == "small"
        self.fingerprint = fingerprint
        self.weights: list[torch.Tensor] = [lay.weight.detach().clone() for lay in model.net.layers]
        self.biases: list[torch.Tensor] = [lay.bias.detach().clone() for lay in model.net.layers]
        self.register_buffer("w", model.net.out.weight.detach()[0].clone())
        with torch.enable_grad():
            self.register_buffer("g0", model._reference()[1].detach()[0].clone())
        B = torch.as_tensor(strain_basis(d, model.idx)) / model.x_scale.detach().cpu()[:, None, None]  # ∂x_a/∂E
        self.register_buffer("Bf", B.reshape(-1, d * d).clone())
        self.register_buffer("x_scale", model.x_scale.detach().clone())
        self.register_buffer("p_scale", model.p_scale.detach().clone())
        self.register_buffer("xc", torch.tensor([1.0 if i == j else 2.0**0.5 for i, j in model.idx],
                                                dtype=torch.float64))
        self.rows: list[int] = [i for i, _ in model.idx]
        self.cols: list[int] = [j for _, j in model.idx]

    def forward(self, F: torch.Tensor):
        """F (n,d,d) -> P (n,d,d), A (n,d,d,d,d)."""
        d = self.dim
        n = F.shape[0]
        eye = torch.eye(d, dtype=F.dtype)
        if self.small:
            H = F - eye
            E = 0.5 * (H + H.transpose(1, 2))
        else:
            E = 0.5 * (torch.matmul(F.transpose(1, 2), F) - eye)
        x = E[:, self.rows, self.cols] * self.xc / self.x_scale
        m = x.shape[1]
        z = x
        dz = torch.zeros(0)
        d2z = torch.zeros(0)
        first = True
        for k in range(len(self.weights)):
            W = self.weights[k]
            a = torch.matmul(z, W.t()) + self.biases[k]
            sg = torch.sigmoid(a)
            if first:
                Wd = W.t().expand(n, m, W.shape[0])
            else:
                Wd = torch.matmul(dz, W.t())
            d2 = ((sg * (1 - sg))[:, None, None, :] * Wd[:, :, None, :] * Wd[:, None, :, :]).reshape(n, m * m, -1)
            if not first:
                d2 = d2 + sg[:, None, :] * torch.matmul(d2z, W.t())
            z = Fn.softplus(a)
            dz = sg[:, None, :] * Wd
            d2z = d2
            first = False
        g = torch.matmul(dz, self.w)
        Hn = torch.matmul(d2z, self.w).reshape(n, m, m)
        S = self.p_scale * torch.matmul(g - self.g0, self.Bf).reshape(n, d, d)
        Cc = self.p_scale * torch.matmul(torch.matmul(self.Bf.t(), Hn), self.Bf)
        C5 = Cc.reshape(n, d, d, d, d)
        if self.small:
            return S, C5
        T = torch.einsum("nim,nmjpl->nijpl", F, C5)
        T = torch.einsum("nijpl,nkp->nijkl", T, F)
        return torch.matmul(F, S), T + eye.reshape(1, d, 1, d, 1) * S.reshape(n, 1, d, 1, d)


class ExportedEnsemble(nn.Module):
    """The mean of K scripted members: what :class:`~fe2ml.laws.surrogate.SurrogateLaw` evaluates."""

    dim: int
    fingerprint: str

    def __init__(self, members: list[ExportedPotential], fingerprint: str):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.dim = members[0].dim
        self.fingerprint = fingerprint

    def forward(self, F: torch.Tensor):
        """F (n,d,d) -> mean P (n,d,d), mean A (n,d,d,d,d) over the members."""
        P = torch.zeros(0)
        A = torch.zeros(0)
        k = 0
        for m in self.members:
            Pm, Am = m(F)
            if k == 0:
                P, A = Pm, Am
            else:
                P, A = P + Pm, A + Am
            k += 1
        return P / k, A / k


def export_checkpoint(checkpoint, out):
    """Script a checkpoint (every ensemble member; the module returns their mean, like the surrogate law) and save it.

    Raises:
        ConfigError: the checkpoint cannot be exported (plain or invariant models, missing file).
    """
    ck = load_checkpoint(checkpoint)
    margs = {k: v for k, v in ck["model"].items() if k != "kind"}
    members = []
    for state in ck["members"]:
        model = build_model(ck["model"]["kind"], ck["dim"], ck["kinematics"], **margs)
        model.load_state_dict(state)
        if ck["model"]["kind"] != "potential" or model.features != "general" or not isinstance(model.net, MLP):
            raise ConfigError(f"{checkpoint}: only potential models with general (strain) features and a plain MLP "
                              "can be exported")
        members.append(ExportedPotential(model, ck["rve_fingerprint"]))
    mod = members[0] if len(members) == 1 else ExportedEnsemble(members, ck["rve_fingerprint"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notice
        scripted = torch.jit.script(mod)
        out = Path(out)
        scripted.save(str(out))
    return out
