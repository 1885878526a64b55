"""ECoFLaP: coarse-to-fine layer-wise pruning (Sung et al., ICLR 2024, arXiv 2310.02998).

Stage 1 (coarse) scores every targeted weight tensor by how much the model's own loss depends on it (next-token loss
for causal LMs; for encoders a sentence-embedding objective, see `sentence_embedding_loss`; CLIP's contrastive loss
over a batch of image-caption pairs; the captioning loss of other vision-language models), sums the scores
per group (a block by default, or each tensor) and turns them into per-group sparsity: every group first keeps
1 - `max_sparsity` of its weights, the rest of the keep budget (1 - `sparsity` of all targeted weights) is shared in
proportion to the group scores, capped at each group's size, until it is spent exactly. Stage 2 (fine) prunes each
layer at its group's ratio with Wanda (or SparseGPT), block by block as usual.

Stage-1 scores (`order`):
- `first` (default): |dL/dW| from one backward pass per window, summed per tensor (the authors' first-order variant).
  The backward pass is streamed too (`streamed.streamed_gradient_sums`): each block is recomputed and
  backpropagated on the compute device alone, in reverse order, for one more forward pass.
- `zeroth` (forward passes only, the paper's MeZO variant): along a random direction z ~ N(0, I) from
  this step's own generator (`noise_seed`), the loss difference d = (L(W + eps z) - L(W - eps z)) / (2 eps) is the
  directional derivative z . grad L, computed in fp32 over each stage-1 calibration window. `perturb: tensor` is the
  authors' code: each tensor perturbed alone, its score the sum of |d| (two passes per tensor, window and noise
  sample). `perturb: block` perturbs all tensors of a block at once (two passes per block): one score per block,
  |z_b . grad_b L|, which estimates the block's gradient norm the way the per-tensor scores estimate each tensor's;
  it only serves `grouping: block`. `perturb: all` (simultaneous perturbation of every targeted weight, SPSA) costs
  two passes per window and noise sample whatever the model's size and gives every weight the estimate d z; a
  tensor's score is the sum of |the estimates averaged over windows and samples|. That estimate's noise has the
  size of the WHOLE gradient in every coordinate, so unless the samples outnumber the weights the per-tensor sums
  measure the tensors' sizes, not their gradients, and the allocation comes out close to uniform (see the README).
Why `first` is the default: on SmolLM2-135M at 60 % it gives 0.83x uniform Wanda's perplexity, while `zeroth` with
every weight perturbed at once is no better than uniform, and per-tensor perturbation takes hours on a CPU.

The zeroth-order passes stream the model: each block moves to the compute device only while it runs, so a model
larger than the device is scored as it is pruned (`streamed.StreamedLoss`). Weights are perturbed in place and
restored from a copy exactly.
Departures from the paper: a causal LM's (or captioning model's) loss is taken per window or pair rather than per
batch (more directions for the same passes; a contrastive loss needs the batch: all stage-1 samples at once); the
stage-1 samples are the first `score_windows` calibration windows or image-caption pairs.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import CalibrationData
from ..configs.ecoflap import ECoFLaPConfig
from ..context import Context
from ..errors import InvalidOptionError
from ..evaluate import mean_final_hidden
from ..loading import model_family
from ..registry import Report
from ..sequential import (
    Batch,
    model_inputs,
    named_blocks,
    weight_matrix,
)
from ..sparsity import prune_blocks, pruning_targets
from ..streamed import StreamedLoss, streamed_gradient_sums
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_mask


def allocate(sizes: list[int], scores: list[float], sparsity: float, max_sparsity: float) -> list[float]:
    """Per-group sparsity: each group keeps at least (1 - max_sparsity) of its `sizes`, the rest of the budget
    (1 - sparsity) * sum(sizes) goes to the groups in proportion to `scores`, capped at their size, until it is
    spent. The weights kept, sum((1 - s_g) * size_g), equal the budget exactly (as real numbers)."""
    size = torch.tensor(sizes, dtype=torch.float64)
    score = torch.tensor(scores, dtype=torch.float64).clamp_min(0)
    keep = size * (1 - max_sparsity)
    left = (1 - sparsity) * size.sum() - keep.sum()
    while left > 1e-9 * size.sum():
        open_ = keep < size
        weight = torch.where(open_, score, 0.0)
        if weight.sum() == 0:                      # only zero scores can still grow: share by room left
            weight = torch.where(open_, size - keep, 0.0)
        add = torch.minimum(left * weight / weight.sum(), size - keep)
        keep, left = keep + add, left - add.sum()
    return (1 - keep / size).clamp(0, 1).tolist()


def nearest_count_ratio(sparsity: float, columns: int) -> float:
    """The ratio a layer is pruned at so that each row drops round(sparsity * columns) weights (the pruning loop
    drops int(columns * ratio)): rounding to the nearest count keeps the total at the budget, where always rounding
    down would leave the model up to one weight per row short of its target."""
    return (min(round(sparsity * columns), columns) + 0.5) / columns


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of a causal LM over the windows of `batch` (B, seq), one at a time."""
    losses = []
    for window in batch.split(1):
        logits = model(**model_inputs(model, window)).logits[0, :-1].float()  # (seq - 1, vocab)
        losses.append(F.cross_entropy(logits, window[0, 1:].to(logits.device)))
    return torch.stack(losses).mean()


def sentence_embedding_loss(model: nn.Module, batch: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """A self-supervised sentence-embedding objective for encoders: the first and second half of each window
    (B, seq) are encoded apart, mean-pooled and normalized; each first half must pick its own second half among the
    batch's (symmetric InfoNCE on cosine / `temperature`, fp32). Needs B >= 2."""
    half = batch.shape[1] // 2
    spans = torch.cat([batch[:, :half], batch[:, half:2 * half]])              # (2B, seq / 2)
    first, second = F.normalize(mean_final_hidden(model, spans), dim=-1).chunk(2)  # (B, hidden) each
    logits = first @ second.t() / temperature                                  # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def contrastive_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """CLIP's own loss on a batch of B image-caption pairs: each caption must pick its image among the batch's and
    each image its caption (symmetric cross-entropy on the scaled cosine logits (B, B), fp32). Needs B >= 2."""
    logits = model(**model_inputs(model, batch)).logits_per_text.float()        # (B captions, B images)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def captioning_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A vision-language model's next-token loss on its caption (fp32): the image placeholder tokens and padding
    are inputs only, never targets."""
    logits = model(**model_inputs(model, batch)).logits[:, :-1].float()         # (B, seq - 1, vocab)
    targets = batch["input_ids"][:, 1:].to(logits.device)                          # (B, seq - 1)
    image_token = getattr(model.config, "image_token_id", None)
    ignored = (batch["attention_mask"][:, 1:].to(logits.device) == 0) | (targets == image_token)
    return F.cross_entropy(logits.flatten(0, 1), targets.masked_fill(ignored, -100).flatten(), ignore_index=-100)


def is_dual_encoder(model: nn.Module) -> bool:
    """CLIP-style image-text models: two towers compared by a learned-temperature cosine."""
    return hasattr(model, "logit_scale")


def model_loss(model: nn.Module) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """The model's own loss: next-token for causal LMs, the sentence-embedding objective for encoders, the
    contrastive loss for CLIP-style models, the captioning loss for other vision-language models."""
    family = model_family(model.config)
    if family == "vision-language":
        return contrastive_loss if is_dual_encoder(model) else captioning_loss
    return causal_lm_loss if family == "causal-lm" else sentence_embedding_loss


def stage1_batches(model: nn.Module, calibration: CalibrationData, count: int) -> list[Batch]:
    """The first `count` calibration samples as the loss wants them: one window or pair per batch for a
    next-token loss (more directions for the same passes), all of them in one batch for a contrastive loss."""
    count = min(count or len(calibration.input_ids), len(calibration.input_ids))
    family = model_family(model.config)
    if family == "causal-lm" or (family == "vision-language" and not is_dual_encoder(model)):
        return calibration.batches()[:count]
    if count < 2:
        raise InvalidOptionError(f"ecoflap on a {family} model needs at least 2 stage-1 samples (a contrastive "
                                 "loss); raise score_windows or n_samples")
    return [calibration.batch(range(count)) if calibration.extra else calibration.input_ids[:count]]


def seed_of(*parts: int) -> int:
    """A generator seed from (noise_seed, unit, window, sample): distinct draws, the same on every run."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**62)
    return seed


def directions(weights: dict[str, torch.Tensor], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """z ~ N(0, I) shaped like each weight, in order, from a generator of its own: the same seed, the same z."""
    generator = torch.Generator().manual_seed(seed)
    for name, weight in weights.items():
        yield name, torch.randn(weight.shape, generator=generator).to(weight.device, weight.dtype)


def directional_derivative(weights: dict[str, torch.Tensor], seed: int, eps: float,
                           loss: Callable[[], float]) -> float:
    """(L(W + eps z) - L(W - eps z)) / (2 eps); `weights` are edited in place and restored exactly."""
    originals = {name: weight.clone() for name, weight in weights.items()}
    losses = []
    try:
        for sign in (1.0, -1.0):
            for name, z in directions(weights, seed):
                weights[name].copy_(originals[name]).add_(z, alpha=sign * eps)
            losses.append(loss())
    finally:
        for name, weight in weights.items():
            weight.copy_(originals[name])
    return (losses[0] - losses[1]) / (2 * eps)


def zeroth_order_scores(weights: dict[str, torch.Tensor], units: dict[str, list[str]], starts: dict[str, nn.Module],
                        loss: StreamedLoss, config: ECoFLaPConfig) -> dict[str, float]:
    """Score per unit (`perturb: block|tensor`: sum of |d| over windows and samples; `starts`: the unit's
    block) or per tensor (`perturb: all`: sum of |mean d z|)."""
    draws = [(w, s) for w in range(len(loss.batches)) for s in range(config.noise_samples)]
    if config.perturb != "all":
        loss.record()
        scores = dict.fromkeys(units, 0.0)
        for index, (unit, names) in enumerate(units.items()):
            for w, s in draws:
                seed = seed_of(config.noise_seed, index, w, s)
                scores[unit] += abs(directional_derivative({n: weights[n] for n in names}, seed, config.eps,
                                                           partial(loss, w, starts[unit])))
        return scores
    estimate = {name: torch.zeros(weight.shape) for name, weight in weights.items()}   # running sum of d z
    for w, s in draws:
        seed = seed_of(config.noise_seed, len(units), w, s)
        d = directional_derivative(weights, seed, config.eps, partial(loss, w))
        for name, z in directions(weights, seed):
            estimate[name].add_(z.float().cpu(), alpha=d)
    return {name: (e / len(draws)).abs().sum().item() for name, e in estimate.items()}


def group_sparsity(config: ECoFLaPConfig, layer_groups: dict[str, str], sizes: dict[str, int],
                   scores: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(score, sparsity) per group from per-tensor or per-block scores."""
    groups = list(dict.fromkeys(layer_groups.values()))
    total = {g: 0.0 for g in groups}
    numel = {g: 0 for g in groups}
    for name, group in layer_groups.items():
        numel[group] += sizes[name]
        total[group] += scores[name] if name in scores else 0.0
    for group in groups:
        total[group] += scores.get(group, 0.0)             # block-level scores (perturb: block)
        if config.aggregate == "mean":
            total[group] /= numel[group]
    ratios = allocate([numel[g] for g in groups], [total[g] for g in groups], config.ratio, config.bound)
    return total, dict(zip(groups, ratios, strict=True))


def ecoflap(model: nn.Module, config: ECoFLaPConfig, context: Context) -> Report:
    """ECoFLaP: per-block sparsity from a global (zeroth- or first-order) loss score, then Wanda inside each layer."""
    targets = pruning_targets(model, config)
    layers = {name: layer for block in targets.values() for name, layer in block.items()}
    weights = {name: layer.weight.data for name, layer in layers.items()}
    block_of = {name: block for block, found in targets.items() for name in found}
    layer_groups = block_of if config.grouping == "block" else {name: name for name in layers}
    batches = stage1_batches(model, context.calibration, config.score_windows)
    samples = sum(len(b["input_ids"] if isinstance(b, dict) else b) for b in batches)
    start = time.perf_counter()
    context.report(0.0, f"ecoflap stage 1: {config.order}-order scores on {samples} samples")
    if config.order == "first":
        params = {name: layer.weight for name, layer in layers.items()}
        scores = streamed_gradient_sums(model, batches, context.device, model_loss(model), params)
        passes = 2 * len(batches)   # the recording pass and the blocks' recomputation (the backward besides)
    else:
        units = ({block: list(found) for block, found in targets.items() if found} if config.perturb == "block"
                 else {name: [name] for name in layers})
        blocks = dict(named_blocks(model))
        starts = {unit: blocks[unit if unit in blocks else block_of[unit]] for unit in units}
        streamed = StreamedLoss(model, batches, context.device, model_loss(model))
        scores = zeroth_order_scores(weights, units, starts, streamed, config)
        passes = 2 * len(batches) * config.noise_samples * (1 if config.perturb == "all" else len(units))
    stage1 = time.perf_counter() - start
    totals, sparsities = group_sparsity(config, layer_groups, {n: w.numel() for n, w in weights.items()}, scores)
    ratio = {name: nearest_count_ratio(sparsities[group], weight_matrix(layers[name]).shape[1])
             for name, group in layer_groups.items()}

    def mask(weight, stats, name, layer_ratio, nm):
        if config.local == "sparsegpt":
            return sparsegpt_prune(weight, 2 * stats.hessian(name), layer_ratio, nm)
        return wanda_mask(weight, stats, name, layer_ratio, nm)

    start = time.perf_counter()
    report = prune_blocks(model, config, context, mask, ratio_of=ratio.__getitem__, sequential=config.sequential,
                          statistics=("hessian",) if config.local == "sparsegpt" else ("sq_sum",))
    report.stats.update({"order": config.order, "perturb": config.perturb if config.order == "zeroth" else None,
                         "grouping": config.grouping, "aggregate": config.aggregate, "max_sparsity": config.bound,
                         "local": config.local, "score_windows": samples, "stage1_forward_passes": passes,
                         "stage1_seconds": round(stage1, 2), "stage2_seconds": round(time.perf_counter() - start, 2),
                         "group_scores": {g: float(f"{v:.4g}") for g, v in totals.items()},
                         "group_sparsity": sparsities})
    return report
