"""Evaluation without gradients. Each function states its estimator and its data protocol.

Data protocol for Bernoulli models: the grayscale test images are binarized once, x ~ Bernoulli(pixel),
with a fixed seed (`binarize_fixed`), the usual protocol for dynamically binarized MNIST. Models with
the article's Gaussian (squared-error) likelihood see the grayscale pixels.
"""

from __future__ import annotations

import torch

from .objectives import kl_to_standard_normal, reconstruction_loss

EVAL_SEED = 12345  # the fixed seed of the test binarization and of evaluation noise


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28] in [0, 1]."""
    return images.unsqueeze(1).float().div_(255)


def binarize_fixed(images: torch.Tensor, seed: int = EVAL_SEED) -> torch.Tensor:
    """One fixed Bernoulli draw per pixel: uint8 [N, 28, 28] -> float {0, 1} [N, 1, 28, 28] (CPU generator,
    so the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    x = as_float(images.cpu())
    return torch.bernoulli(x, generator=g).to(images.device)


def eval_inputs(images: torch.Tensor, binarize: bool) -> torch.Tensor:
    """The evaluation targets for a model: fixed binarization for Bernoulli models, else grayscale."""
    return binarize_fixed(images) if binarize else as_float(images)


@torch.no_grad()
def test_loss(model, x: torch.Tensor, y: torch.Tensor | None, likelihood: str, batch_size: int = 1000,
              seed: int = EVAL_SEED) -> dict[str, float]:
    """The training objective on held-out data, dropout off: mean over images of recon + KL.

    Estimator: one z ~ q(z|x) per image (noise from a generator seeded with `seed`, independent of the
    training RNG), analytic KL. x: [N, 1, 28, 28] targets (see `eval_inputs`). Returns loss, recon, kl.
    """
    was_training = model.training
    model.eval()
    device = x.device
    g = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        yb = None if y is None or not model.n_classes else y[i:i + batch_size]
        mu, logvar = model.encode(xb, yb)
        mu, logvar = mu.float(), logvar.float()
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g, device=device)
        logits = model.decode(z, yb).float()
        recon = reconstruction_loss(xb, logits, likelihood)
        kl = kl_to_standard_normal(mu, logvar)
        sums += torch.stack([(recon + kl).sum(), recon.sum(), kl.sum()]).double()
    model.train(was_training)
    loss, recon, kl = (sums / len(x)).tolist()
    return {"loss": loss, "recon": recon, "kl": kl}
