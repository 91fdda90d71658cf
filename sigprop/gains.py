"""How hard AGC holds back scalar gains that start at 0 (the authors' SkipInit gains).

AGC: paper B, Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition
Without Normalization", ICML 2021, arXiv 2102.06171.

AGC treats a scalar parameter g as one unit and clips its gradient G when
|G| / max(|g|, eps) > lambda (facts file, section 5). A gain initialised to 0 therefore moves at
most lr * lambda * eps per step (1.6 * 0.01 * 1e-3 = 1.6e-5 at lr 1.6), then grows
geometrically by (1 + lr * lambda): harmless over 1e5 ImageNet steps, but in a run of a few
hundred steps the residual branches stay switched off (facts section 8).

:class:`ZeroGainCheck` measures this instead of assuming it: over the first
``GAIN_CHECK_STEPS`` steps it records, for every clipped 0-d parameter that starts below eps,
the ratio of its raw gradient to the largest gradient AGC lets through,
|G| / (lambda * max(|g|, eps)). A ratio above 1 means AGC clipped that gain on that step. When
it clipped most of them, the run carries a warning that says so, with the numbers.
"""

from __future__ import annotations

import torch

from sigprop.clipping import GradClipper

GAIN_CHECK_STEPS = 10
WARN_FRACTION = 0.5  # warn when AGC clipped at least this share of (gain, step) pairs


class ZeroGainCheck:
    """Watches the zero-initialised scalar gains AGC clips; inert for other clipping modes."""

    def __init__(self, clipper: GradClipper, steps: int = GAIN_CHECK_STEPS):
        config = clipper.config
        self.steps = steps
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        if config.mode == "agc":
            for name, param in clipper.clipped:
                if param.ndim == 0 and abs(float(param.detach())) < config.eps:
                    self.names.append(name)
                    self.params.append(param)
        self.threshold = float(config.threshold or 0.0)
        self.eps = float(config.eps)
        self.ratios: list[torch.Tensor] = []  # one (gains,) tensor per observed step

    def observe(self, step: int) -> None:
        """Call after backward, before clipping, with the step's index."""
        if not self.params or step >= self.steps or len(self.ratios) >= self.steps:
            return
        with torch.no_grad():
            grads = torch.stack([
                p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p)
                for p in self.params
            ]).float()
            weights = torch.stack([p.detach().abs() for p in self.params]).float()
            self.ratios.append(grads / (self.threshold * weights.clamp_min(self.eps)))

    def summary(self) -> dict | None:
        """{"gains", "steps", "median_ratio", "clipped_fraction"}; None when nothing was seen."""
        if not self.ratios:
            return None
        ratios = torch.stack(self.ratios).cpu()
        return {
            "gains": len(self.params),
            "steps": int(ratios.shape[0]),
            "median_ratio": float(ratios.median()),
            "clipped_fraction": float((ratios > 1).float().mean()),
        }

    def warning(self, peak_lr: float) -> str | None:
        """One line when AGC clipped most zero-initialised gains' gradients, else None."""
        stats = self.summary()
        if stats is None or stats["clipped_fraction"] < WARN_FRACTION:
            return None
        names = sorted({name.rsplit(".", 1)[-1] for name in self.names})
        return (
            f"AGC (lambda={self.threshold:g}) bounds {stats['gains']} scalar gain(s) that start "
            f"at 0 ({', '.join(names)}): over the first {stats['steps']} steps their raw "
            f"gradient was a median {stats['median_ratio']:.3g}x lambda*max(|g|, eps), clipped "
            f"on {stats['clipped_fraction']:.0%} of gain-steps, so each gain moves at most "
            f"lr*lambda*eps = {peak_lr * self.threshold * self.eps:.2g} per step at the peak lr "
            "and the residual branches stay nearly off in a short run; start the gains at 1 "
            "(model.skipinit_gain = 1) or leave them out of clipping "
            "(clip.exclude = [\"*skip_gain\"])"
        )

    def state(self) -> list[list[float]]:
        return [r.cpu().tolist() for r in self.ratios]

    def load(self, state: list[list[float]] | None) -> None:
        self.ratios = [torch.tensor(r, dtype=torch.float32) for r in state or []]
