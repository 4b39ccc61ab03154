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

import math
import sys
import time

import torch

from . import data as data_mod
from .errors import VaedrawError
from .objectives import iwae_bound
from .progress import Progress
from .sample import check_sampler

EVAL_SEED = 12345  # the fixed seed of the test binarization and of evaluation noise
RECOGNIZED = 0.9  # a digit is recognizable when the evaluator gives its top class at least this probability
REFERENCE_IMAGES = 10_000  # real images on each side of a Frechet distance
MAX_DECODES = 8192  # images decoded per batched call in the IWAE estimate (bounds memory)
MAX_IWAE_K = 100_000  # importance samples per image: beyond this one evaluation runs for days
MAX_SAMPLES = 1_000_000  # generated images for the quality figures: beyond this they do not fit in memory


def binarize_fixed(images: torch.Tensor, seed: int = EVAL_SEED) -> torch.Tensor:
    """One fixed Bernoulli draw per pixel: uint8 [N, H, W] -> float {0, 1} [N, C, H, W] (CPU generator,
    so the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    x = data_mod.to_float(images.cpu())
    return torch.bernoulli(x, generator=g).to(images.device)


def eval_inputs(images: torch.Tensor, binarize: bool) -> torch.Tensor:
    """The evaluation targets for a model: fixed binarization for Bernoulli models, else grayscale."""
    return binarize_fixed(images) if binarize else data_mod.to_float(images)


def check_eval_sizes(iwae_k: int, n_samples: int) -> None:
    """Refuse, before any work, an importance-sample count or a sample count out of range (VaedrawError)."""
    if not 1 <= iwae_k <= MAX_IWAE_K:
        raise VaedrawError(f"--iwae-k must be between 1 and {MAX_IWAE_K:,}, got {iwae_k:,}")
    if not 1 <= n_samples <= MAX_SAMPLES:
        raise VaedrawError(f"--n-samples must be between 1 and {MAX_SAMPLES:,}, got {n_samples:,}")


def _eval_noise(generator: torch.Generator):
    """noise(t) -> N(0, 1) like t, drawn from `generator` (independent of the training RNG)."""
    return lambda t: torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)


@torch.no_grad()
def heldout_loss(model, x: torch.Tensor, y: torch.Tensor | None, batch_size: int = 1000,
                 seed: int = EVAL_SEED) -> dict[str, float]:
    """The training objective on held-out data, dropout off: mean over images of recon + KL.

    Estimator: the model's own terms (`VAE.elbo_terms`), one z ~ q(z|x) per image with noise from a
    generator seeded with `seed`. x: [N, C, H, W] targets (see `eval_inputs`). Returns loss, recon, kl.
    """
    was_training = model.training
    model.eval()
    device = x.device
    noise = _eval_noise(torch.Generator(device=device).manual_seed(seed))
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        yb = None if y is None or not model.n_classes else y[i:i + batch_size]
        recon, kl, _ = model.elbo_terms(xb, yb, noise)
        sums += torch.stack([(recon + kl).sum(), recon.sum(), kl.sum()]).double()
    model.train(was_training)
    loss, recon, kl = (sums / len(x)).tolist()
    return {"loss": loss, "recon": recon, "kl": kl}


# ----------------------------------------------------------------------------- likelihood
@torch.no_grad()
def iwae(model, x: torch.Tensor, y: torch.Tensor | None, k: int, seed: int = EVAL_SEED,
         max_decodes: int = MAX_DECODES, progress: Progress | None = None) -> torch.Tensor:
    """The importance-weighted bound L_k per image (Burda et al. 2015, eq. 8), dropout off. x: [N, C, H, W] -> [N].

    Estimator: L_k = log (1/k) sum_j p(x, z_j) / q(z_j | x), z_j ~ q(z|x) (the model's `log_weights`), a
    lower bound on log p(x) that does not decrease with k. Images go in batches of B = max(1, max_decodes // k)
    and the k samples in chunks, so each batched decode holds at most about `max_decodes` images; the
    log-sum-exp over the k log weights is taken in float64. Noise from a generator seeded with `seed` on
    x's device. `progress` advances by the images of each batch.
    """
    was_training = model.training
    model.eval()
    g = torch.Generator(device=x.device).manual_seed(seed)
    b = max(1, max_decodes // k)
    chunk = max(1, min(k, max_decodes // b))
    out = []
    for i in range(0, len(x), b):
        xb = x[i:i + b]
        yb = None if y is None or not model.n_classes else y[i:i + b]
        log_w = model.log_weights(xb, yb, k, generator=g, chunk=chunk)
        out.append(iwae_bound(log_w.double()))
        if progress is not None:
            progress.update(len(xb))
    model.train(was_training)
    return torch.cat(out)


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


def label_stats(proba: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """Classifier verdicts on a set of images. proba: [N, K] over K classes -> dict of floats.

    recognizable: share with max probability >= RECOGNIZED; coverage_bits: entropy (bits) of the
    histogram of predicted labels (uniform over K classes = log2 K); class_shares [K], min/max_class_share.
    With requested labels y: [N], label_accuracy {digit: share predicted as that digit} and its mean.
    """
    conf, pred = proba.max(1)
    shares = torch.bincount(pred, minlength=proba.shape[1]).double() / max(1, len(pred))
    nz = shares[shares > 0]
    out = {
        "n": len(proba),
        "recognizable": (conf >= RECOGNIZED).double().mean().item(),
        "coverage_bits": -(nz * nz.log2()).sum().item(),
        "min_class_share": shares.min().item(),
        "max_class_share": shares.max().item(),
        "class_shares": [round(v, 5) for v in shares.tolist()],
    }
    if y is not None:
        hit = (pred == y).double()
        out["label_accuracy"] = {str(d): hit[y == d].mean().item() for d in range(proba.shape[1]) if (y == d).any()}
        out["label_accuracy_mean"] = hit.mean().item()
    return out


def quality(evaluator, x: torch.Tensor, ref_features: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """FD of images x: [N, C, H, W] (pixel means) to reference features [M, F], plus `label_stats`."""
    features, proba = evaluator.features_and_proba(x)
    return {"fd": frechet_distance(features, ref_features), **label_stats(proba, y)}


def _fixed_choice(n_total: int, n: int, seed: int = EVAL_SEED) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


# ----------------------------------------------------------------------------- the whole report
def _comparability(run, split: str, part, likelihood: str) -> tuple[bool, str | None]:
    """(comparable, reason when not): whether elbo/iwae are held-out Bernoulli figures on binarized images."""
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
    if likelihood != "bernoulli":
        return False, ("Gaussian log-density of grayscale pixels (sigma^2 = 1/2): not comparable with Bernoulli "
                       "figures on binarized images")
    return True, None


def evaluate_run(run, *, split: str = "test", iwae_k: int = 1000, n_samples: int = 10000, sampler: str | None = None,
                 data_dir=None, seed: int = 0, n_images: int | None = None, progress: bool = True) -> dict:
    """Evaluate a loaded run (vaedraw.run.Run): likelihood on a split and sample quality. Returns a JSON-able dict.

    Data protocol: the first `n_images` images of `split` (default all: 10,000 for the MNIST test split)
    of the data the run recorded (same data set, source and files, `data.load_recorded`); Bernoulli models
    see them binarized once with the fixed seed EVAL_SEED, Gaussian ones the grayscale pixels. Images that
    may overlap the run's training data make the result `comparable: false` (with `comparable_reason`) and
    print a warning. `progress`: what the IWAE pass and the quality figures are doing, on stderr.
    Keys (see docs/EVALUATION.md):

    run_dir, preset, dataset, step, device, split, n_images, likelihood ("bernoulli" | "gaussian"), protocol
    elbo, recon, kl     ELBO = -(recon + KL), analytic KL, one z ~ q(z|x) per image (nats per image)
    iwae, iwae_k        L_k (Burda et al. 2015, eq. 8), k samples per image (nats per image)
    objective           gaussian only: the article's loss, sum of squared errors + KL (not a likelihood)
    comparable          whether elbo/iwae are held-out figures comparable with Bernoulli ones on binarized MNIST
    comparable_reason   why not (null when comparable)
    trained_on_subset   the run was trained on the bundled subset (null: not recorded)
    data                {"train": provenance the run recorded or null, "eval": the evaluation split's}
    quality_available, quality_note, evaluator_accuracy
    fd_floor            FD of 10,000 fixed real training images to the test images
    samples             {sampler, n, fd, recognizable, coverage_bits, min_class_share, max_class_share,
                         class_shares, and for conditional runs label_accuracy {digit: share}, label_accuracy_mean}
    reconstructions     the same for decode(mu(x)) of the split's images (label_accuracy against their labels)
    seconds             {elbo, iwae, quality}
    """
    if split not in data_mod.SPLITS:
        raise VaedrawError(f"unknown split {split!r}; choose one of: {', '.join(data_mod.SPLITS)}")
    check_eval_sizes(iwae_k, n_samples)
    check_sampler(sampler or run.default_sampler, run.gmm)  # before the slow likelihood work
    cfg, dev = run.config, run.device
    dataset, lik = cfg.data.dataset, cfg.model.likelihood
    part = run.load_split(split, data_dir, progress=False)  # the data the run recorded
    n = len(part) if n_images is None else min(n_images, len(part))
    images, labels = part.images[:n], part.labels[:n]
    binarized = lik == "bernoulli"
    protocol = (f"{part.name}, first {n:,} images, "
                + (f"binarized once x ~ Bernoulli(pixel) with fixed seed {EVAL_SEED}" if binarized
                   else "grayscale pixels in [0, 1]"))
    comparable, reason = _comparability(run, split, part, lik)
    train_source = None if run.data_source is None else run.data_source.get("train")
    res: dict = {"run_dir": str(run.run_dir), "preset": cfg.preset, "dataset": dataset, "step": run.step,
                 "device": str(dev), "split": split, "n_images": n, "likelihood": lik, "protocol": protocol,
                 "comparable": comparable, "comparable_reason": reason,
                 "trained_on_subset": None if train_source is None else bool(train_source.get("subset")),
                 "data": {"train": train_source, "eval": part.provenance}, "seconds": {}}
    if reason is not None and binarized:
        print(f"vaedraw eval: warning: these figures are not comparable: {reason}", file=sys.stderr)

    res.update(_likelihoods(run, images, labels, iwae_k, seed, progress, res["seconds"]))

    q = quality_figures(run, n_samples=n_samples, sampler=sampler, data_dir=data_dir, seed=seed,
                        images=images, labels=labels, progress=progress)
    res["seconds"].update(q.pop("seconds", {}))
    res.update(q)
    return res


def _likelihoods(run, images: torch.Tensor, labels: torch.Tensor, iwae_k: int, seed: int, progress: bool,
                 seconds: dict) -> dict:
    """ELBO terms and the IWAE bound of `images` (uint8) under the run's model, in nats per image; the
    time each took goes into `seconds`."""
    model, dev, lik = run.model, run.device, run.config.model.likelihood
    x = eval_inputs(images, lik == "bernoulli").to(dev)
    y = labels.to(dev) if run.conditional else None
    t0 = time.perf_counter()
    ev = heldout_loss(model, x, y, seed=EVAL_SEED + seed)
    seconds["elbo"] = time.perf_counter() - t0
    if lik == "gaussian":
        # log_px includes the Gaussian's normalizer; the article's loss is its squared error alone.
        const = 0.5 * math.log(math.pi) * x[0].numel()
        res = dict(objective=ev["loss"], elbo=-(ev["loss"] + const), recon=ev["recon"] + const, kl=ev["kl"])
    else:
        res = dict(elbo=-ev["loss"], recon=ev["recon"], kl=ev["kl"], objective=None)
    t0 = time.perf_counter()
    # A GPU holds far more decodes per call than the CPU's caches like.
    max_decodes = MAX_DECODES * (4 if dev.type == "cuda" else 1)
    bar = Progress(len(x), f"IWAE bound, k={iwae_k:,}", "images", enabled=progress, label="vaedraw eval")
    try:
        res["iwae"] = iwae(model, x, y, iwae_k, seed=EVAL_SEED + seed, max_decodes=max_decodes,
                           progress=bar).mean().item()
    finally:
        bar.close()
    res["iwae_k"] = iwae_k
    seconds["iwae"] = time.perf_counter() - t0
    return res


def quality_figures(run, *, n_samples: int = 10000, sampler: str | None = None, data_dir=None, seed: int = 0,
                    images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                    progress: bool = True) -> dict:
    """The sample-quality part of `evaluate_run`: keys quality_available, quality_note, evaluator_accuracy,
    fd_floor, samples, reconstructions, seconds.quality (see there).

    Generated digits: `n_samples` codes from `sampler` (default the preset's) with a CPU generator seeded
    with `seed`, decoded to pixel means; conditional runs request labels 0, 1, ... in turn. Reconstructions:
    decode(mu(x)) of `images` (uint8, default the test split) in grayscale. Reference: the evaluator's
    features of up to 10,000 test images; the floor compares 10,000 fixed training images.
    """
    from .evaluator import load_evaluator

    check_eval_sizes(1, n_samples)
    t0 = time.perf_counter()
    dataset = run.config.data.dataset
    sampler = sampler or run.default_sampler
    try:
        evaluator = load_evaluator(dataset, device=run.device)
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
        ref = evaluator.features(data_mod.to_float(test.images[_fixed_choice(len(test), m)]))
        real = data_mod.to_float(train.images[_fixed_choice(len(train), m)])
        res = {"quality_available": True, "evaluator_accuracy": evaluator.test_accuracy,
               "quality_note": (f"evaluator: our CNN for {dataset} (test accuracy {evaluator.test_accuracy:.4f}); "
                                f"features of pixel means vs {m:,} {test.name} images"),
               "fd_floor": frechet_distance(evaluator.features(real), ref)}
        bar.update(1, f"sample quality: drawing {n_samples:,} samples ({sampler})")
        y_gen = torch.arange(n_samples) % run.model.n_classes if run.conditional else None
        x_gen = run.sample(n_samples, sampler=sampler, seed=seed, y=y_gen)
        bar.update(1, f"sample quality: FD of {n_samples:,} samples")
        res["samples"] = {"sampler": sampler, **quality(evaluator, x_gen, ref, y_gen)}
        bar.update(1, f"sample quality: {len(images):,} reconstructions")
        x_rec = run.reconstruct(data_mod.to_float(images), labels if run.conditional else None)
        res["reconstructions"] = quality(evaluator, x_rec, ref, labels)
        bar.update(1, "sample quality: done")
    finally:
        bar.close()
    res["seconds"] = {"quality": time.perf_counter() - t0}
    return res


def format_report(result: dict) -> str:
    """A readable table of an `evaluate_run` result, stating estimators and the data protocol."""
    r = result
    lines = [f"vaedraw eval: {r['run_dir']} (preset {r['preset']}, {r['dataset']}, step {r['step']:,}, {r['device']})",
             f"likelihood ({r['likelihood']}) on {r['protocol']}; nats per image, higher is better:"]
    if r.get("trained_on_subset"):
        lines.insert(1, "  trained on the bundled subset of the data set, not the full one: figures are not "
                        "those of a full run")
    if r["objective"] is not None:
        lines.append(f"  {'article objective (sq. error + KL, lower is better)':<44}{r['objective']:>10.2f}")
    lines += [
        f"  {'ELBO (analytic KL, 1 sample)':<44}{r['elbo']:>10.2f}   recon {r['recon']:.2f}, KL {r['kl']:.2f}",
        f"  {'IWAE bound L_k, k=%d (Burda et al. eq. 8)' % r['iwae_k']:<44}{r['iwae']:>10.2f}"
        f"   ({r['seconds']['iwae']:.1f} s)",
    ]
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
    if "label_accuracy" in s:
        lines.append("  label accuracy per requested digit: "
                     + " ".join(f"{d}:{v:.2f}" for d, v in s["label_accuracy"].items()))
    return "\n".join(lines)
