"""sigprop's nfnet_f0 (padding same / symmetric) against timm's dm_nfnet_f0 (TF SAME).

The same weights in both (timm's random init, raw conv weights scaled by 100 so timm's eps
1e-5 inside the standardization is negligible against the authors' 1e-4 floor on var * fan_in,
biases and gains perturbed, skip gains 1), GELU exact in both (timm's choice; the authors use
the tanh approximation), eval mode. Needs a python with timm:

    PYTHONPATH=$PWD $(bash /work/shared/tools/timm_venv.sh) docs/check_padding_vs_timm.py
"""
import re

import timm
import torch
import torch.nn.functional as F

import sigprop.layers as layers

layers.ACTIVATIONS["gelu"] = F.gelu  # timm's dm_nfnet uses exact (erf) GELU; the authors tanh
from sigprop.models import create_model  # noqa: E402

torch.manual_seed(0)
ref = timm.create_model("dm_nfnet_f0", pretrained=False).eval()
with torch.no_grad():
    for name, p in ref.named_parameters():
        if name.endswith("skipinit_gain"):
            p.fill_(1.0)
        elif name.endswith(".weight") and p.dim() == 4 and ".attn_last." not in name:
            p.mul_(100.0)  # standardization is scale free; makes timm's eps=1e-5 negligible
        elif name.endswith(".bias") or name.endswith(".gain"):
            p.add_(0.1 * torch.randn_like(p))


def our_key(k: str) -> str:
    k = re.sub(r"^stem\.conv(\d)", lambda m: f"stem.conv{int(m.group(1)) - 1}", k)
    for a, b in ((".skipinit_gain", ".skip_gain"), (".downsample.conv.", ".conv_shortcut."),
                 (".conv2b.", ".conv1b."), (".attn_last.fc1.", ".se.fc0."),
                 (".attn_last.fc2.", ".se.fc1."), ("head.fc.", "fc.")):
        k = k.replace(a, b)
    k = re.sub(r"\.conv([123])\.", lambda m: f".conv{int(m.group(1)) - 1}.", k) \
        if k.startswith("stages") else k
    return k


results = {}
for padding in ("same", "symmetric"):
    ours = create_model("nfnet_f0", padding=padding, skipinit_gain=1.0).eval()
    target = ours.state_dict()
    new = {}
    for k, v in ref.state_dict().items():
        kk = our_key(k)
        new[kk] = v.reshape(target[kk].shape)
    ours.load_state_dict(new)
    for px in (128, 129, 130, 192):
        x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(px))
        with torch.no_grad():
            a, b = ref(x), ours(x)
            fa, fb = ref.forward_features(x), ours.forward_features(x)
        rel = lambda p, q: float((p - q).norm() / q.norm())  # noqa: E731
        print(f"{padding:9s} {px} px  features rel diff {rel(fb, fa):.2e}  logits rel diff "
              f"{rel(b, a):.2e}", flush=True)
