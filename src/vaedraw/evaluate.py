"""Evaluation without gradients. Each function states its estimator and its data protocol.

Data protocol for Bernoulli models: the grayscale test images are binarized once, x ~ Bernoulli(pixel),
with a fixed seed (`binarize_fixed`), the usual protocol for dynamically binarized MNIST. Models with
the article's Gaussian (squared-error) likelihood see the grayscale pixels.

`evaluate_run` (behind `vaedraw eval`) reports, for a trained run:

- likelihood, nats per image on a split: the ELBO (analytic KL, one z per image) and the
  importance-weighted bound L_k (Burda et al. 2015, eq. 8);
- sample quality judged by our own classifier (evaluator.py): the Frechet distance between its
  penultimate features of generated digits and of the test images, the share of digits it recognizes
  with probability >= 0.9, and the entropy of its predicted labels; the same for reconstructions,
  and the Frechet distance of real training images to the test images as the floor.

The JSON keys are listed in `evaluate_run` and in docs/EVALUATION.md.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from pathlib import Path

import torch

from . import data as data_mod
from .errors import VaedrawError
from .fastpath import inference_autocast, keep_freed_memory, use_fixed_shape_kernels
from .objectives import iwae_bound
from .progress import Progress
from .sample import check_sampler

EVAL_SEED = 12345  # the fixed seed of the test binarization and of evaluation noise
RECOGNIZED = 0.9  # a digit is recognizable when the evaluator gives its top class at least this probability
REFERENCE_IMAGES = 10_000  # real images on each side of a Frechet distance
MAX_DECODES = 8192  # images decoded per batched call in the IWAE estimate on a CPU (bounds memory)
# On CUDA the batch is sized to the GPU's free memory (`decode_batch`), up to this: the noise is drawn one
# call per importance sample, so images per batch, not samples, set how many kernel launches the pass takes
MAX_CUDA_DECODES = 1 << 20
MAX_IWAE_K = 100_000  # importance samples per image: beyond this one evaluation runs for days
MAX_SAMPLES = 1_000_000  # generated images for the quality figures: beyond this they do not fit in memory
FD_BOOTSTRAP = 20  # bootstrap resamples of the generated features behind the FD interval (0: no interval)
MAX_BOOTSTRAP = 10_000  # each resample costs a covariance and an F x F eigen-decomposition
FD_LEVEL = 0.95  # coverage of the FD's percentile interval


def binarize_fixed(images: torch.Tensor, seed: int = EVAL_SEED) -> torch.Tensor:
    """One fixed Bernoulli draw per pixel: uint8 [N, H, W] -> float {0, 1} [N, C, H, W] (CPU generator,
    so the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    x = data_mod.to_float(images.cpu())
    return torch.bernoulli(x, generator=g).to(images.device)


def eval_inputs(images: torch.Tensor, binarize: bool) -> torch.Tensor:
    """The evaluation targets for a model: fixed binarization for Bernoulli models (binarize = likelihood is
    bernoulli), else the pixels as stored, k/255 (grey for gaussian, the 8-bit grey or colour pixels that
    logistic_mixture models). uint8 [N, H, W(, C)] -> float [N, C, H, W]."""
    return binarize_fixed(images) if binarize else data_mod.to_float(images)


def check_eval_sizes(iwae_k: int, n_samples: int, fd_bootstrap: int = 0) -> None:
    """Refuse, before any work, an importance-sample, sample or bootstrap count out of range (VaedrawError)."""
    if not 0 <= fd_bootstrap <= MAX_BOOTSTRAP:
        raise VaedrawError(f"--fd-bootstrap must be between 0 and {MAX_BOOTSTRAP:,}, got {fd_bootstrap:,}")
    if not 1 <= iwae_k <= MAX_IWAE_K:
        raise VaedrawError(f"--iwae-k must be between 1 and {MAX_IWAE_K:,}, got {iwae_k:,}")
    if not 1 <= n_samples <= MAX_SAMPLES:
        raise VaedrawError(f"--n-samples must be between 1 and {MAX_SAMPLES:,}, got {n_samples:,}")


def _eval_noise(generator: torch.Generator):
    """noise(t) -> N(0, 1) like t, drawn from `generator` (independent of the training RNG)."""
    return lambda t: torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)


@torch.no_grad()
def heldout_loss(model, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 1000,
                 seed: int = EVAL_SEED, per_image: bool = False) -> dict:
    """The training objective on held-out data, dropout off: mean over images of recon + KL.

    Estimator: the model's own terms (`VAE.elbo_terms`), one z ~ q(z|x) per image with noise from a
    generator seeded with `seed`. x: [N, C, H, W] targets (see `eval_inputs`). Returns loss, recon, kl:
    floats (the means), or with per_image=True float64 tensors [N] on the CPU (the same noise, so their
    means are those floats), from which `standard_error` gives the uncertainty of the means.
    """
    was_training = model.training
    model.eval()
    device = x.device
    noise = _eval_noise(torch.Generator(device=device).manual_seed(seed))
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    rows = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        yb = None if y is None or not model.n_classes else y[i:i + batch_size]
        recon, kl, _ = model.elbo_terms(xb, yb, noise)
        if per_image:
            rows.append(torch.stack([recon + kl, recon, kl], 1).double().cpu())
        else:
            sums += torch.stack([(recon + kl).sum(), recon.sum(), kl.sum()]).double()
    model.train(was_training)
    if per_image:
        loss, recon, kl = torch.cat(rows).unbind(1)
        return {"loss": loss, "recon": recon, "kl": kl}
    loss, recon, kl = (sums / len(x)).tolist()
    return {"loss": loss, "recon": recon, "kl": kl}


def standard_error(values: torch.Tensor) -> float | None:
    """Standard error of the mean of per-image values [N]: their standard deviation (N - 1 in the
    denominator) / sqrt(N); None for fewer than two values, whose spread is unknown."""
    values = values.double()
    if len(values) < 2:
        return None
    return (values.std() / math.sqrt(len(values))).item()


# ----------------------------------------------------------------------------- likelihood
IWAE_PRECISIONS: tuple[str, ...] = ("auto", "fp32")  # `vaedraw eval --precision`


def _iwae_network(model, device: torch.device, precision: str):
    """The network the IWAE pass decodes with: the model itself in float32, or where `precision` auto
    picks bfloat16 on a CPU, a channels-last copy of it (same weights; oneDNN's bf16 transposed convs
    run about twice as fast on NHWC, docs/SPEED.md). The model itself is never changed."""
    from .fastpath import device_class

    if precision != "auto" or device.type != "cpu" or device_class(device) == "cpu":
        return model
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


@torch.inference_mode()
def iwae(model, x: torch.Tensor, y: torch.Tensor | None, k: int, seed: int = EVAL_SEED,
         max_decodes: int = MAX_DECODES, progress: Progress | None = None, precision: str = "fp32") -> torch.Tensor:
    """The importance-weighted bound L_k per image (Burda et al. 2015, eq. 8), dropout off. x: [N, C, H, W] -> [N].

    Estimator: L_k = log (1/k) sum_j p(x, z_j) / q(z_j | x), z_j ~ q(z|x) (the model's `log_weights`), a
    lower bound on log p(x) that does not decrease with k. Images go in batches of B = max(1, max_decodes // k)
    and the k samples in chunks, so each batched decode holds at most about `max_decodes` images; the
    log-sum-exp over the k log weights is taken in float64. Noise from a generator seeded with `seed` on
    x's device, drawn exactly as at any precision. `progress` advances by the images of each batch.

    precision (`vaedraw eval --precision`, whose default is auto): fp32 computes everything in float32;
    auto runs the networks under bfloat16 autocast where the device computes it natively
    (`fastpath.inference_autocast`; on a CPU also in channels-last layout); the log densities themselves
    (log p(x|z) from the logits, log q, log p(z)) stay float32. On the default model the bound moves by
    less than 0.05 nats per image against fp32 (docs/SPEED.md).

    On a CPU glibc is told to keep freed memory in the process (`fastpath.keep_freed_memory`): every batched
    decode allocates activations of ~100 MB, which would otherwise be returned to the OS and page-faulted
    back in, and that first touch cost as much as the arithmetic (docs/SPEED.md).
    """
    if precision not in IWAE_PRECISIONS:
        raise VaedrawError(f"precision must be one of {', '.join(IWAE_PRECISIONS)}, got {precision!r}")
    if x.device.type == "cpu":
        keep_freed_memory()
    use_fixed_shape_kernels(x.device)
    was_training = model.training
    model.eval()
    net = _iwae_network(model, x.device, precision)
    g = torch.Generator(device=x.device).manual_seed(seed)
    b = max(1, max_decodes // k)
    chunk = max(1, min(k, max_decodes // b))
    out = []
    try:
        with inference_autocast(x.device, precision):
            for i in range(0, len(x), b):
                xb = x[i:i + b]
                yb = None if y is None or not model.n_classes else y[i:i + b]
                log_w = net.log_weights(xb, yb, k, generator=g, chunk=chunk)
                out.append(iwae_bound(log_w.double()))
                if progress is not None:
                    progress.update(len(xb))
    finally:
        model.train(was_training)
    return torch.cat(out)


def decode_batch(model, x: torch.Tensor, y: torch.Tensor | None, k: int, precision: str = "auto") -> int:
    """Decodes per batched call of the IWAE pass: MAX_DECODES on a CPU; on CUDA as many as 40% of the free
    memory holds (the bytes per decode measured on a probe of 1,024 samples of one image), a power of two
    between MAX_DECODES and MAX_CUDA_DECODES."""
    device = x.device
    if device.type != "cuda" or k < 2:
        return MAX_DECODES
    probe = 1024
    was_training = model.training
    model.eval()
    try:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode(), inference_autocast(device, precision):
            g = torch.Generator(device=device).manual_seed(0)
            model.log_weights(x[:1], None if y is None or not model.n_classes else y[:1], probe, generator=g,
                              chunk=probe)
        per_decode = max(1, torch.cuda.max_memory_allocated(device) - base) / probe
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:  # the probe itself did not fit, or no memory statistics: the CPU's size
        return MAX_DECODES
    finally:
        model.train(was_training)
    fits = int(0.4 * free / per_decode)
    n = MAX_DECODES
    while n * 2 <= min(fits, MAX_CUDA_DECODES):
        n *= 2
    return n


# ----------------------------------------------------------------------------- latent usage
ACTIVE_THRESHOLD = 0.01  # a unit is active when Cov_x(E_q[z_u | x]) exceeds this (Burda et al. 2015, sec. 5.2)


@torch.no_grad()
def latent_usage(model, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 1000,
                 seed: int = EVAL_SEED) -> list[dict]:
    """Per latent group (the code first): its KL and its active units, so posterior collapse is visible.

    kl: mean over images of KL(q(z_i | x, z_<i) || p(z_i | z_<i)), analytic in z_i with one posterior sample
    of the groups above (the terms the ELBO sums; noise from a generator seeded with `seed`). active_units:
    the number of units u with Var_x(E_q[z_u | x]) > ACTIVE_THRESHOLD over the images x (Burda et al.'s
    definition), measured for a group below the code from its prior mean (`model.posterior_offsets`: the
    prior of a lower group moves with the groups above, so only the offset shows what the group itself
    carries), the groups above at their posterior means. x: [N, C, H, W] targets. Returns
    [{"group", "dims", "kl", "active_units"}] in the model's `group_names` order.
    """
    was_training = model.training
    model.eval()
    noise = _eval_noise(torch.Generator(device=x.device).manual_seed(seed))
    kl_sum, s1, s2 = 0.0, None, None
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        yb = None if y is None or not model.n_classes else y[i:i + batch_size]
        kl_sum = kl_sum + model.group_kl(xb, yb, noise).double().sum(1)
        means = [m.double() for m in model.posterior_offsets(xb, yb)]
        sums, squares = [m.sum(0) for m in means], [m.pow(2).sum(0) for m in means]
        s1 = sums if s1 is None else [a + b for a, b in zip(s1, sums)]
        s2 = squares if s2 is None else [a + b for a, b in zip(s2, squares)]
    model.train(was_training)
    n = len(x)
    out = []
    for name, kl, a, b in zip(model.group_names, (kl_sum / n).tolist(), s1, s2):
        var = (b - a.pow(2) / n) / max(1, n - 1)  # unbiased variance over images of each unit's mean
        out.append({"group": name, "dims": len(a), "kl": kl, "active_units": int((var > ACTIVE_THRESHOLD).sum())})
    return out


# ----------------------------------------------------------------------------- sample quality
def gaussian_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [F] and unbiased covariance [F, F] of features f: [N, F], in float64."""
    f = f.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / max(1, len(f) - 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    w, v = torch.linalg.eigh(0.5 * (a + a.T))
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets f1: [N, F], f2: [M, F] (Heusel et al. 2017).

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64. The trace term uses
    the symmetric form, whose square root is that of a PSD matrix (eigh), so it is real and stable.
    """
    mu1, s1 = gaussian_stats(f1)
    mu2, s2 = gaussian_stats(f2)
    r1 = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross
    return max(0.0, fd.item())


class FrechetReference:
    """The reference side of a Frechet distance, fitted once to features [M, F]: mean, covariance, the
    covariance's symmetric square root and trace. Then the FD of a generated set, and of each of its bootstrap
    resamples, costs one covariance and one eigen-decomposition of an F x F matrix.

    The trace term is tr((Sr^1/2 S Sr^1/2)^1/2), equal to that of `frechet_distance`: both matrices inside
    have the eigenvalues of S Sr, so the reference's root serves every generated set.
    """

    def __init__(self, features: torch.Tensor):
        self.mu, self.cov = gaussian_stats(features)
        self.root = _sqrtm_psd(self.cov)
        self.trace = torch.trace(self.cov)

    def _distance(self, mu: torch.Tensor, cov: torch.Tensor) -> float:
        cross = torch.linalg.eigvalsh(self.root @ cov @ self.root).clamp_min(0).sqrt().sum()
        fd = (mu - self.mu).pow(2).sum() + torch.trace(cov) + self.trace - 2 * cross
        return max(0.0, fd.item())

    def distance(self, f: torch.Tensor) -> float:
        """FD of features f: [N, F] to the reference."""
        return self._distance(*gaussian_stats(f))

    def bootstrap(self, f: torch.Tensor, n: int, seed: int, level: float = FD_LEVEL) -> dict:
        """How much the FD of f: [N, F] varies over generated sets of N: n resamples of N rows of f with
        replacement (a CPU generator seeded with `seed`, so the same on every device), the reference fixed.

        FD from N images is biased upward, and a resample (with its repeated rows) more so: the resampled FDs
        sit about `shift` above the point, often with the point below all of them. So the interval is their
        percentile interval at `level` moved by that shift (the median of the resampled FDs minus the point):
        their spread, placed around the point, which it always contains. -> {"interval": [lo, hi], "shift",
        "sd" (their standard deviation), "fds" (the n resampled FDs)}.
        """
        point = self.distance(f)
        g = torch.Generator().manual_seed(seed)
        fds = []
        for _ in range(n):
            idx = torch.randint(len(f), (len(f),), generator=g).to(f.device)
            fds.append(self.distance(f[idx]))
        tail = (1 - level) / 2
        values = torch.tensor(fds, dtype=torch.float64)
        lo, mid, hi = torch.quantile(values, torch.tensor([tail, 0.5, 1 - tail], dtype=torch.float64)).tolist()
        return {"interval": [max(0.0, point - (mid - lo)), point + (hi - mid)], "shift": mid - point,
                "sd": values.std().item() if n > 1 else 0.0, "fds": fds}


def label_stats(proba: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """Classifier verdicts on a set of images. proba: [N, K] over K classes -> dict of floats.

    recognizable: share with max probability >= RECOGNIZED; coverage_bits: entropy (bits) of the
    histogram of predicted labels (uniform over K classes = log2 K); class_shares [K], min/max_class_share.
    With requested labels y: [N], label_accuracy {digit: share predicted as that digit} and its mean.
    recognizable_se, label_accuracy_mean_se: binomial standard errors of those shares, sqrt(p (1 - p) / N).
    """
    conf, pred = proba.max(1)
    shares = torch.bincount(pred, minlength=proba.shape[1]).double() / max(1, len(pred))
    nz = shares[shares > 0]
    out = {
        "n": len(proba),
        "recognizable": (conf >= RECOGNIZED).double().mean().item(),
        "recognizable_se": _binomial_se((conf >= RECOGNIZED).double().mean().item(), len(proba)),
        "coverage_bits": -(nz * nz.log2()).sum().item(),
        "min_class_share": shares.min().item(),
        "max_class_share": shares.max().item(),
        "class_shares": [round(v, 5) for v in shares.tolist()],
    }
    if y is not None:
        hit = (pred == y).double()
        out["label_accuracy"] = {str(d): hit[y == d].mean().item() for d in range(proba.shape[1]) if (y == d).any()}
        out["label_accuracy_mean"] = hit.mean().item()
        out["label_accuracy_mean_se"] = _binomial_se(out["label_accuracy_mean"], len(hit))
    return out


def _binomial_se(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / n) if n > 0 else None


def quality(evaluator, x: torch.Tensor, ref: torch.Tensor | FrechetReference, y: torch.Tensor | None = None,
            bootstrap: int = 0, seed: int = 0) -> dict:
    """FD of images x: [N, C, H, W] (pixel means) to the reference (features [M, F] or their
    `FrechetReference`), plus `label_stats`. bootstrap > 0 adds fd_ci, the FD_LEVEL interval from that many
    resamples of x's features (`FrechetReference.bootstrap`, seeded with `seed`), and fd_bootstrap {n, seed,
    level, shift, sd}; else both are None."""
    ref = ref if isinstance(ref, FrechetReference) else FrechetReference(ref)
    features, proba = evaluator.features_and_proba(x)
    out = {"fd": ref.distance(features), "fd_ci": None, "fd_bootstrap": None}
    if bootstrap > 0:
        b = ref.bootstrap(features, bootstrap, seed)
        out["fd_ci"] = b["interval"]
        out["fd_bootstrap"] = {"n": bootstrap, "seed": seed, "level": FD_LEVEL, "shift": b["shift"], "sd": b["sd"]}
    return {**out, **label_stats(proba, y)}


def _fixed_choice(n_total: int, n: int, seed: int = EVAL_SEED) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


# ----------------------------------------------------------------------------- the whole report
def _comparability(run, split: str, part, likelihood: str) -> tuple[bool, str | None]:
    """(comparable, reason when not): whether elbo/iwae are held-out figures comparable with published ones of
    the same likelihood on the same data: Bernoulli nats on binarized images, or logistic_mixture
    likelihoods (bits/dim) of 8-bit pixels. The Gaussian density of the seed preset is comparable with
    nothing published."""
    source, provenance = run.data_source, part.provenance
    if split == "train":
        return False, "evaluated on the run's own training split"
    if source is not None and provenance is not None:
        if data_mod.overlaps(source["train"], provenance):
            return False, (f"the evaluation images ({part.name}) may include images this run was trained on "
                           f"(trained on {source['train'].get('dataset')} from {source['train'].get('source')})")
    elif source is None and provenance is not None and provenance.get("subset"):
        return False, ("this run recorded no training data and the bundled subset's test images are official "
                       "training images: they may include images it was trained on")
    if provenance is not None and provenance.get("subset"):
        return False, (f"the bundled subset's test part ({len(part):,} official training images) is not the "
                       "official test set: figures on it are not comparable with published ones")
    if likelihood == "gaussian":
        return False, ("Gaussian log-density of grayscale pixels (sigma^2 = 1/2): not comparable with Bernoulli "
                       "figures on binarized images")
    return True, None  # bernoulli, or logistic_mixture: a proper probability of the 8-bit pixels


def evaluate_run(run, *, split: str = "test", iwae_k: int = 1000, n_samples: int = 10000, sampler: str | None = None,
                 data_dir=None, seed: int = 0, n_images: int | None = None, progress: bool = True,
                 fd_bootstrap: int = FD_BOOTSTRAP, precision: str = "auto",
                 temperature: float | None = None) -> dict:
    """Evaluate a loaded run (vaedraw.run.Run): likelihood on a split and sample quality. Returns a JSON-able dict.

    Data protocol: the first `n_images` images of `split` (default all: 10,000 for the MNIST test split)
    of the data the run recorded (same data set, source and files, `data.load_recorded`); Bernoulli models
    see them binarized once with the fixed seed EVAL_SEED, Gaussian ones the grayscale pixels. Images that
    may overlap the run's training data make the result `comparable: false` (with `comparable_reason`) and
    print a warning. `progress`: what the IWAE pass and the quality figures are doing, on stderr.
    Keys (see docs/EVALUATION.md):

    run_dir, preset, dataset, step, device, split, n_images, likelihood ("bernoulli" | "gaussian"), protocol
    seed, machine       the --seed; where it ran: {device, device_name, threads, torch, cuda, python, vaedraw}
    elbo, recon, kl     ELBO = -(recon + KL), analytic KL, one z ~ q(z|x) per image (nats per image)
    iwae, iwae_k        L_k (Burda et al. 2015, eq. 8), k samples per image (nats per image)
    iwae_precision      what the IWAE pass ran in: "bf16" (`precision` auto where the device has native
                        bfloat16: the networks under autocast, the log densities in float32) or "fp32"
    elbo_se, iwae_se    standard errors of those means over the n_images images (`standard_error`);
    elbo_bpd_se, iwae_bpd_se  the same in bits per dimension
    latent_groups       per latent group (code first): {group, dims, kl, active_units} (`latent_usage`)
    active_units        the active units of all groups together
    objective           gaussian only: the article's loss, sum of squared errors + KL (not a likelihood)
    comparable          whether elbo/iwae are held-out figures comparable with Bernoulli ones on binarized MNIST
    comparable_reason   why not (null when comparable)
    trained_on_subset   the run was trained on the bundled subset (null: not recorded)
    data                {"train": provenance the run recorded or null, "eval": the evaluation split's}
    quality_available, quality_note, evaluator_accuracy
    fd_floor            FD of 10,000 fixed real training images to the test images
    samples             {sampler, n, fd, fd_ci [lo, hi], fd_bootstrap {n, seed, level}, recognizable(_se),
                         coverage_bits, min_class_share, max_class_share, class_shares, and for conditional runs
                         label_accuracy {digit: share}, label_accuracy_mean(_se)}; fd_ci: FD_LEVEL percentile
                         interval over `fd_bootstrap` resamples of the generated features (0: null)
    reconstructions     the same for decode(mu(x)) of the split's images (label_accuracy against their labels)
    seconds             {elbo, iwae, quality}
    """
    if split not in data_mod.SPLITS:
        raise VaedrawError(f"unknown split {split!r}; choose one of: {', '.join(data_mod.SPLITS)}")
    check_eval_sizes(iwae_k, n_samples, fd_bootstrap)
    check_sampler(sampler or run.default_sampler, run.gmm)  # before the slow likelihood work
    cfg, dev = run.config, run.device
    dataset, lik = cfg.data.dataset, cfg.model.likelihood
    part = run.load_split(split, data_dir, progress=False)  # the data the run recorded
    n = len(part) if n_images is None else min(n_images, len(part))
    images, labels = part.images[:n], part.labels[:n]
    binarized = lik == "bernoulli"
    protocol = (f"{part.name}, first {n:,} images, "
                + (f"binarized once x ~ Bernoulli(pixel) with fixed seed {EVAL_SEED}" if binarized
                   else "8-bit pixels as stored, k/255" if lik == "logistic_mixture"
                   else "grayscale pixels in [0, 1]"))
    comparable, reason = _comparability(run, split, part, lik)
    train_source = None if run.data_source is None else run.data_source.get("train")
    res: dict = {"run_dir": str(run.run_dir), "preset": cfg.preset, "dataset": dataset, "step": run.step,
                 "device": str(dev), "split": split, "n_images": n, "likelihood": lik, "protocol": protocol,
                 "seed": seed, "machine": machine(dev), "comparable": comparable, "comparable_reason": reason,
                 "trained_on_subset": None if train_source is None else bool(train_source.get("subset")),
                 "data": {"train": train_source, "eval": part.provenance}, "seconds": {}}
    if reason is not None and binarized:
        print(f"vaedraw eval: warning: these figures are not comparable: {reason}", file=sys.stderr)

    res.update(_likelihoods(run, images, labels, iwae_k, seed, progress, res["seconds"], precision))

    q = quality_figures(run, n_samples=n_samples, sampler=sampler, data_dir=data_dir, seed=seed,
                        images=images, labels=labels, progress=progress, fd_bootstrap=fd_bootstrap,
                        temperature=temperature)
    res["seconds"].update(q.pop("seconds", {}))
    res.update(q)
    return res


def _likelihoods(run, images: torch.Tensor, labels: torch.Tensor, iwae_k: int, seed: int, progress: bool,
                 seconds: dict, precision: str = "auto") -> dict:
    """ELBO terms and the IWAE bound of `images` (uint8) under the run's model, in nats per image, and both
    in bits per dimension, -nats / (C * H * W * ln 2) (elbo_bpd, iwae_bpd; lower is better), each with the
    standard error of its mean over the images (elbo_se, iwae_se, elbo_bpd_se, iwae_bpd_se); the time each
    took goes into `seconds`."""
    model, dev, lik = run.model, run.device, run.config.model.likelihood
    x = eval_inputs(images, lik == "bernoulli").to(dev)
    y = labels.to(dev) if run.conditional else None
    t0 = time.perf_counter()
    per_image = heldout_loss(model, x, y, seed=EVAL_SEED + seed, per_image=True)
    ev = {key: v.mean().item() for key, v in per_image.items()}
    seconds["elbo"] = time.perf_counter() - t0
    if lik == "gaussian":
        # log_px includes the Gaussian's normalizer; the article's loss is its squared error alone.
        const = 0.5 * math.log(math.pi) * x[0].numel()
        res = dict(objective=ev["loss"], elbo=-(ev["loss"] + const), recon=ev["recon"] + const, kl=ev["kl"])
    else:
        res = dict(elbo=-ev["loss"], recon=ev["recon"], kl=ev["kl"], objective=None)
    t0 = time.perf_counter()
    max_decodes = decode_batch(model, x, y, iwae_k, precision)  # a GPU holds far more than a CPU's caches like
    bar = Progress(len(x), f"IWAE bound, k={iwae_k:,}", "images", enabled=progress, label="vaedraw eval")
    try:
        lk = iwae(model, x, y, iwae_k, seed=EVAL_SEED + seed, max_decodes=max_decodes,
                  progress=bar, precision=precision)
    finally:
        bar.close()
    res["iwae"] = lk.mean().item()
    res["iwae_k"] = iwae_k
    res["iwae_precision"] = "fp32" if isinstance(inference_autocast(dev, precision), contextlib.nullcontext) \
        else "bf16"
    dims_ln2 = x[0].numel() * math.log(2)  # -nats per image / this = bits per pixel value
    res["elbo_bpd"], res["iwae_bpd"] = -res["elbo"] / dims_ln2, -res["iwae"] / dims_ln2
    # the spread over images of each per-image figure (a constant shift, as for gaussian, leaves it unchanged)
    res["elbo_se"], res["iwae_se"] = standard_error(per_image["loss"]), standard_error(lk)
    res["elbo_bpd_se"], res["iwae_bpd_se"] = (None if v is None else v / dims_ln2
                                              for v in (res["elbo_se"], res["iwae_se"]))
    seconds["iwae"] = time.perf_counter() - t0
    res["latent_groups"] = latent_usage(model, x, y, seed=EVAL_SEED + seed)
    res["active_units"] = sum(g["active_units"] for g in res["latent_groups"])
    return res


def quality_figures(run, *, n_samples: int = 10000, sampler: str | None = None, data_dir=None, seed: int = 0,
                    images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                    progress: bool = True, fd_bootstrap: int = FD_BOOTSTRAP,
                    temperature: float | None = None) -> dict:
    """The sample-quality part of `evaluate_run`: keys quality_available, quality_note, evaluator_accuracy,
    fd_floor, samples, reconstructions, seconds.quality (see there).

    Generated digits: `n_samples` codes from `sampler` (default the preset's) with a CPU generator seeded
    with `seed`, decoded to pixel means (latent groups below the code drawn at `temperature`, default the
    run's sample.temperature); conditional runs request labels 0, 1, ... in turn. Reconstructions:
    at the posterior mean of `images` (uint8, default the test split) in grayscale. Reference: the evaluator's
    features of up to 10,000 test images; the floor compares 10,000 fixed training images. The FDs of samples
    and reconstructions carry a percentile interval from `fd_bootstrap` resamples of their features (seeded
    with `seed`; 0: none), against the reference statistics computed once.
    """
    from .evaluator import load_evaluator

    check_eval_sizes(1, n_samples, fd_bootstrap)
    t0 = time.perf_counter()
    dataset = run.config.data.dataset
    sampler = sampler or run.default_sampler
    try:
        # the run's recorded training data: the user's own images are matched to an evaluator by their digest
        evaluator = load_evaluator(dataset, device=run.device,
                                   provenance=None if run.data_source is None else run.data_source.get("train"))
    except VaedrawError as e:
        return {"quality_available": False, "evaluator_accuracy": None, "fd_floor": None, "samples": None,
                "reconstructions": None, "quality_note": f"sample-quality figures unavailable: {e}"}
    bar = Progress(4, "sample quality: reference features", "stages", enabled=progress, label="vaedraw eval")
    try:
        train = run.load_split("train", data_dir, progress=False)  # the data the run recorded
        test = run.load_split("test", data_dir, progress=False)
        if images is None:
            images, labels = test.images, test.labels
        m = min(REFERENCE_IMAGES, len(test))
        ref = FrechetReference(evaluator.features(data_mod.to_float(test.images[_fixed_choice(len(test), m)])))
        real = data_mod.to_float(train.images[_fixed_choice(len(train), m)])
        res = {"quality_available": True, "evaluator_accuracy": evaluator.test_accuracy,
               "quality_note": (f"evaluator: our CNN for {dataset} (test accuracy {evaluator.test_accuracy:.4f}); "
                                f"features of pixel means vs {m:,} {test.name} images"),
               "fd_floor": ref.distance(evaluator.features(real))}
        bar.update(1, f"sample quality: drawing {n_samples:,} samples ({sampler})")
        y_gen = torch.arange(n_samples) % run.model.n_classes if run.conditional else None
        t = run.config.sample.temperature if temperature is None else temperature
        x_gen = run.sample(n_samples, sampler=sampler, seed=seed, y=y_gen, temperature=t)
        bar.update(1, f"sample quality: FD of {n_samples:,} samples")
        res["samples"] = {"sampler": sampler, "temperature": t,
                          **quality(evaluator, x_gen, ref, y_gen, fd_bootstrap, seed)}
        bar.update(1, f"sample quality: {len(images):,} reconstructions")
        x_rec = run.reconstruct(data_mod.to_float(images), labels if run.conditional else None)
        res["reconstructions"] = quality(evaluator, x_rec, ref, labels, fd_bootstrap, seed)
        bar.update(1, "sample quality: done")
    finally:
        bar.close()
    res["seconds"] = {"quality": time.perf_counter() - t0}
    return res


def _cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: what platform knows
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device: torch.device) -> dict:
    """Where an evaluation ran, for the record beside its figures: the device, its model (the GPU's name, else
    the CPU's), the CPU model, torch's threads and the library versions."""
    import platform

    from . import __version__

    cuda = device.type == "cuda"
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_model(),
            "cpu": _cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "python": platform.python_version(),
            "vaedraw": __version__, "platform": platform.platform()}


def plus_minus(value: float, se: float | None, digits: int = 2) -> str:
    """"-84.12 +- 0.23": a figure and its standard error (the figure alone when the error is unknown)."""
    return f"{value:.{digits}f}" + ("" if se is None else f" +- {se:.{digits}f}")


def format_report(result: dict) -> str:
    """A readable table of an `evaluate_run` result, stating estimators and the data protocol; +- is the
    standard error of the mean over the images, [lo, hi] the FD's bootstrap interval."""
    r = result
    lines = [f"vaedraw eval: {r['run_dir']} (preset {r['preset']}, {r['dataset']}, step {r['step']:,}, {r['device']})",
             f"likelihood ({r['likelihood']}) on {r['protocol']}; nats per image, higher is better:"]
    if r.get("trained_on_subset"):
        lines.insert(1, "  trained on the bundled subset of the data set, not the full one: figures are not "
                        "those of a full run")
    if r["objective"] is not None:
        lines.append(f"  {'article objective (sq. error + KL, lower is better)':<44}{r['objective']:>10.2f}")
    lines += [
        f"  {'ELBO (analytic KL, 1 sample)':<44}{r['elbo']:>10.2f}{_se(r.get('elbo_se'), 2)}"
        f"   recon {r['recon']:.2f}, KL {r['kl']:.2f}",
        f"  {'IWAE bound L_k, k=%d (Burda et al. eq. 8)' % r['iwae_k']:<44}{r['iwae']:>10.2f}{_se(r.get('iwae_se'), 2)}"
        f"   ({r['seconds']['iwae']:.1f} s)",
    ]
    if r.get("elbo_bpd") is not None:
        lines.append(f"  {'bits/dim, ELBO / IWAE (lower is better)':<44}{r['elbo_bpd']:>10.4f}"
                     f"{_se(r.get('elbo_bpd_se'), 4)} / {plus_minus(r['iwae_bpd'], r.get('iwae_bpd_se'), 4)}"
                     "   (-nats / (C*H*W ln 2))")
    if r.get("elbo_se") is not None:
        lines.append(f"  +- : standard error of the mean over the {r['n_images']:,} images (std / sqrt(N))")
    if r["likelihood"] == "logistic_mixture":
        lines.append("  8-bit pixels (discretized logistic mixture): bits/dim compare with published bits/dim "
                     "on the same data set, never with Bernoulli or Gaussian figures")
    groups = r.get("latent_groups") or []
    if groups:
        lines.append(f"  latent groups (KL in nats; active: Var_x(E_q[z_u]) > {ACTIVE_THRESHOLD}):")
        lines += [f"    {g['group']:<14}{g['dims']:>6} dims   KL {g['kl']:>8.2f}   active {g['active_units']:>5}"
                  for g in groups]
    if not r["comparable"]:
        reason = r.get("comparable_reason") or ("Gaussian log-density of grayscale pixels (sigma^2 = 1/2): not "
                                                "comparable with Bernoulli figures on binarized images")
        lines.append(f"  note: NOT comparable: {reason}")
    if not r["quality_available"]:
        lines.append(r["quality_note"] + "; likelihoods above are still valid")
        return "\n".join(lines)
    lines += [f"sample quality ({r['quality_note']}):",
              f"  {'':<28}{'FD':>9}{'recognizable':>14}{'coverage bits':>15}{'class share min/max':>21}"]

    def row(name: str, q: dict, extra: str = "") -> str:
        return (f"  {name:<28}{q['fd']:>9.2f}{q['recognizable']:>14.3f}{q['coverage_bits']:>15.3f}"
                f"{q['min_class_share']:>12.3f} / {q['max_class_share']:.3f}{extra}")

    s, rec = r["samples"], r["reconstructions"]
    acc = f"   label accuracy {s['label_accuracy_mean']:.3f}" if "label_accuracy_mean" in s else ""
    lines += [row(f"samples ({s['sampler']}, n={s['n']:,})", s, acc),
              row(f"reconstructions (n={rec['n']:,})", rec),
              f"  {'real train vs test (floor)':<28}{r['fd_floor']:>9.2f}",
              f"  recognizable: max class probability >= {RECOGNIZED}; coverage: entropy of predicted labels "
              f"(uniform = {math.log2(len(s['class_shares'])):.2f} bits)"]
    if s.get("fd_ci") is not None:
        b = s["fd_bootstrap"]
        lines.append(f"  FD {b['level']:.0%} interval ({b['n']} bootstrap resamples of the features, "
                     f"seed {b['seed']}): samples [{s['fd_ci'][0]:.2f}, {s['fd_ci'][1]:.2f}]"
                     + (f", reconstructions [{rec['fd_ci'][0]:.2f}, {rec['fd_ci'][1]:.2f}]"
                        if rec.get("fd_ci") is not None else ""))
    if "label_accuracy" in s:
        lines.append("  label accuracy per requested digit: "
                     + " ".join(f"{d}:{v:.2f}" for d, v in s["label_accuracy"].items())
                     + f"   (mean {plus_minus(s['label_accuracy_mean'], s.get('label_accuracy_mean_se'), 3)})")
    if "label_accuracy" in rec:
        lines.append("  label accuracy of reconstructions per true digit: "
                     + " ".join(f"{d}:{v:.2f}" for d, v in rec["label_accuracy"].items())
                     + f"   (mean {plus_minus(rec['label_accuracy_mean'], rec.get('label_accuracy_mean_se'), 3)})")
    return "\n".join(lines)


def _se(se: float | None, digits: int) -> str:
    return "" if se is None else f" +- {se:.{digits}f}"
