"""DSnoT: training-free refinement of a sparse mask by prune-and-grow (Zhang et al., 2023, arXiv 2310.08915).

Start from a mask given by `init` (Wanda, magnitude, or SparseGPT run for real, its updated weights kept). Then,
for each Linear layer, every row repeatedly swaps one pruned weight back in (at its dense value) for one kept
weight, all rows at once, so per-row sparsity never changes; with an N:M pattern the weight pruned lies in the grown
weight's group of M, so every group keeps its pattern. At most `cycles` swaps per row.

Two variants choose the swaps differently:
- `faithful: true` follows the paper and the authors' released code. With mu and v the mean and variance of each
  input channel over the calibration tokens, row i's error is e_i = sum_j (W_ij - What_ij) mu_j; the weight grown
  is the pruned one with the largest W_ij mu_j / v_j^power if e_i > 0 (the smallest otherwise), the weight pruned
  (unstructured) the kept one with the lowest Wanda score among those whose removal moves e_i toward 0, or (N:M)
  the lowest-scoring kept weight of the grown one's group, both in orders computed once; a row stops when
  |e_i| <= `threshold`. A row that has used up the kept weights moving e_i toward 0 goes on, as the released code
  does, to those moving it away, the highest-scoring first (the paper's rule has no candidate left there); a row
  whose next grow candidate is no longer pruned, or prune candidate no longer kept, stops (the released code would
  change its sparsity). As released: e is summed over the tokens of a calibration window (so the threshold 0.1
  means less as windows grow longer), the variance has no epsilon, and a swap is taken whenever |e| is above the
  threshold; unstructured runs have no same-sign stop (the released script's `--without_same_sign` is a
  `type=bool` flag that is always true), N:M runs stop a row whose error would change sign. The variance is theirs
  too: each channel's variance within a calibration window, averaged over the windows (not pooled over all tokens).
  Its statistics are accumulated in the released code's order of fp32 operations (running averages over windows):
  summed otherwise they differ by about 1e-6, which tips a near-tie within a few blocks and, through the later
  blocks' inputs, about 6 % of the mask; in their order, a CPU fp32 run chooses the authors' masks bit for bit.
- the default picks, in every row and cycle, the pruned weight to grow and the kept weight to prune that lower the
  layer's reconstruction error ||(W - What) X||^2 over the calibration tokens the most, and takes the pair only if
  together they lower it; a row stops when no pair does. With N:M the pair lies in one group of M: the group whose
  best grow plus best prune gains most (their cross term left out for the choice), then the exact best pair in it.
  `estimate: hessian` computes that error exactly from H = X^T X; `estimate: diagonal` from H ~ T (diag(v) +
  mu mu^T), channels uncorrelated apart from their means (no Hessian to collect, weaker). Why: on SmolLM2-135M
  the paper's swap rule cancels the mean error e while the full reconstruction error rises in most layers (a swap
  that cancels means can add variance), and the refined mask is worse than Wanda's; choosing swaps by the error
  they target makes every swap an improvement. `threshold`, `same_sign` and `power` belong to the faithful rule
  and are not used here.
Both refine every Linear of the blocks by default; the authors refine attention only and leave the MLP on its
initial mask (`refine: ["*attn*"]`). With `init: sparsegpt` the error starts from SparseGPT's updated weights (the
authors' code only scores SparseGPT's saliency and never updates weights).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from ..configs.dsnot import DSnoTConfig, dsnot_statistics
from ..context import Context
from ..registry import Report
from ..sparsity import keep_mask, prune_blocks
from ..statistics import InputStatistics
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_score


def prune_order(score: torch.Tensor, keep: torch.Tensor, removal: torch.Tensor) -> torch.Tensor:
    """Column order (rows, in) of the prune candidates, as the authors' code lays it out: the kept weights whose
    removal < 0 by ascending score, those with removal == 0, those with removal > 0 by descending score, then the
    pruned weights (never candidates). A row whose error is positive walks it from the front, one whose error is
    negative from its last kept weight backwards; a walk that runs out of weights moving the error toward 0 goes on
    into the others, the highest-scoring first, as theirs does. (Theirs fills the removal == 0 places with the
    row's lowest-scoring kept weight, repeated; those need a channel mean or weight of exactly 0.)"""
    cols = score.shape[1]
    rank = torch.where(keep, score, torch.inf).argsort(dim=1, stable=True).argsort(dim=1).float()
    key = torch.where(keep, 2.0 * cols + rank, 8.0 * cols)
    key = torch.where(keep & (removal < 0), rank, key)
    key = torch.where(keep & (removal > 0), 6.0 * cols - rank, key)
    return key.argsort(dim=1, stable=True)


def faithful_refine(dense: torch.Tensor, current: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor,
                    variance: torch.Tensor, score: torch.Tensor, *, nm: tuple[int, int] | None = None,
                    cycles: int = 50, power: float = 1.0, threshold: float = 0.1,
                    same_sign: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' prune-and-grow loop of one layer, every row at once: candidates in orders computed once.

    Args:
        dense: the dense weight W (out, in), fp32; a grown weight takes its value from here.
        current: the pruned weight What (out, in) (zeros where pruned; SparseGPT's updates where kept).
        keep: the initial keep mask (out, in).
        mean, variance: per input channel (in,), in the units the error and threshold use.
        score: prune order within the kept weights (out, in), lower goes first (a Wanda score).

    Returns the refined keep mask and the number of swaps of each row (out,).
    """
    rows, cols = dense.shape
    row_index = torch.arange(rows, device=dense.device)
    keep = keep.clone()
    swappable = keep.clone()                                  # kept from the start and not pruned since
    growable = ~keep                                          # pruned from the start and not grown since
    error = ((dense - current) * mean).sum(dim=1)             # (out,) signed mean error
    start_sign = error.sign()
    grow_order = torch.where(keep, 0.0, dense * mean / variance.pow(power)).argsort(dim=1, stable=True)
    grow_low, grow_high = torch.zeros_like(row_index), torch.full_like(row_index, cols - 1)
    if nm is None:
        order = prune_order(score, keep, current * mean)
        prune_low, prune_high = torch.zeros_like(row_index), keep.sum(dim=1) - 1
    active = torch.ones(rows, dtype=torch.bool, device=dense.device)
    swaps = torch.zeros(rows, dtype=torch.long, device=dense.device)
    for _ in range(cycles):
        positive = error > 0
        grow = grow_order[row_index, torch.where(positive, grow_high, grow_low)]
        grow_high, grow_low = grow_high - positive.long(), grow_low + (~positive).long()
        if nm is None:
            negative = error < 0
            prune = order[row_index, torch.where(negative, prune_high, prune_low)]
            prune_high, prune_low = prune_high - negative.long(), prune_low + (~negative).long()
        else:  # the lowest-scoring swappable weight in the grown weight's group of M
            group = (grow - grow % nm[1]).unsqueeze(1) + torch.arange(nm[1], device=dense.device)  # (out, M)
            in_group = torch.where(swappable.gather(1, group), score.gather(1, group), torch.inf)
            prune = group.gather(1, in_group.argmin(dim=1, keepdim=True)).squeeze(1)
        grown_value, pruned_value = dense[row_index, grow], current[row_index, prune]
        after = error + pruned_value * mean[prune] - grown_value * mean[grow]    # their order of additions
        ok = active & growable[row_index, grow] & swappable[row_index, prune] & (error.abs() > threshold)
        if same_sign:
            ok &= after.sign() == start_sign
        active &= ok
        if not active.any():
            break
        rows_ok, grow_ok, prune_ok = row_index[ok], grow[ok], prune[ok]
        keep[rows_ok, grow_ok], keep[rows_ok, prune_ok] = True, False
        growable[rows_ok, grow_ok], swappable[rows_ok, prune_ok] = False, False
        error = torch.where(ok, after, error)
        swaps += ok.long()
    return keep, swaps


def refine_mask(dense: torch.Tensor, current: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, *,
                nm: tuple[int, int] | None = None, cycles: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """hfcompress's prune-and-grow loop of one layer, every row at once: each cycle, every row grows the pruned
    weight and prunes the kept weight (in the grown weight's group of M, with `nm`) that lower its reconstruction
    error ||(W - What) X||^2 the most, and takes the pair only if together they lower it; a row stops when no
    pair helps.

    Args:
        dense: the dense weight W (out, in), fp32; a grown weight takes its value from here.
        current: the pruned weight What (out, in) (zeros where pruned; SparseGPT's updates where kept).
        keep: the initial keep mask (out, in).
        hessian: X^T X (in, in) of the calibration inputs, or an estimate of it; symmetric.

    Returns the refined keep mask and the number of swaps of each row (out,).
    """
    rows, cols = dense.shape
    hessian = hessian.contiguous()                            # rows gathered and entries taken through a flat view
    if nm is not None:  # columns reordered so that column m * G + g is entry m of group g: (rows, M, G) views
        dense, current, keep = (entry_major(t, nm[1]) for t in (dense, current, keep))
        hessian = entry_major(entry_major(hessian, nm[1]).t(), nm[1]).contiguous()  # H[P][:, P], H symmetric
    pairs = None if nm is None else group_blocks(hessian, nm[1])  # (G, M, M): 2 H within each group
    # Growing column g moves W - What by a = -W_g, pruning column p by b = What_p; a column is either pruned (a grow
    # candidate) or kept (a prune candidate), so one (rows, 1, in) `moved` holds both: What where kept, -W where
    # pruned. With r = (W - What) H, either alone changes the error by m (m H_jj + 2 r_j), the pair by their sum
    # + 2 a b H_gp. `gains` (rows, 2, in: grow, prune) keeps the single changes up to date rather than recomputing
    # r: a swap adds delta = a H[g] + b H[p] to r, so 2 moved * delta to every gain. Columns that are not
    # candidates (kept for growing, pruned for pruning, or already swapped) carry +inf, which no update changes.
    moved = torch.where(keep, current, -dense).unsqueeze(1)
    residual = ((dense - current) @ hessian).unsqueeze(1).mul_(2)                # (rows, 1, in): 2 r
    single = torch.addcmul(residual, moved, hessian.diagonal()).mul_(moved)     # (rows, 1, in)
    del residual
    # not a candidate: + inf, by arithmetic (0 or 1, times max, times 2): on a CPU a select with a scattered boolean
    # mask is 5-10x slower, and so is converting bool to float other than through uint8
    barred = torch.stack([keep, ~keep], dim=1).view(torch.uint8).to(single.dtype)
    gains = barred.mul_(torch.finfo(single.dtype).max).mul_(2).add_(single)
    del barred, single
    ids = torch.arange(rows, device=dense.device)             # the rows still searching: the working set below
    searching = torch.ones(rows, dtype=torch.bool, device=dense.device)
    taken = []                                                # per cycle: (working rows, (grow, prune), accepted)
    for _ in range(cycles):
        change, chosen, amounts = best_pair(gains, moved, hessian, pairs)
        searching = searching & (change < 0)                  # no candidate left: inf
        active = int(searching.sum())
        if not active:
            break
        # delta_i = a_i H[g_i] + b_i H[p_i]: embedding_bag gathers and sums the two rows of H in one pass
        delta = nn.functional.embedding_bag(chosen, hessian, mode="sum",
                                            per_sample_weights=amounts * searching.unsqueeze(1))
        gains.addcmul_(moved, delta.unsqueeze(1), value=2.0)
        gains.scatter_(2, chosen.unsqueeze(2), torch.inf)     # a swapped weight is not swapped back
        taken.append((ids, chosen, searching))
        if active < 0.875 * len(ids):                         # drop the rows that stopped from the working set
            local = searching.nonzero().squeeze(1)
            ids, gains, moved, searching = (t.index_select(0, local) for t in (ids, gains, moved, searching))
    keep, swaps = keep.clone(), torch.zeros(rows, dtype=torch.long, device=dense.device)
    if taken:
        accepted = torch.cat([ok for _, _, ok in taken])
        at = torch.cat([i for i, _, _ in taken])[accepted]
        grow, prune = torch.cat([c for _, c, _ in taken])[accepted].unbind(1)
        keep[at, grow], keep[at, prune] = True, False         # each column moves at most once
        swaps = torch.bincount(at, minlength=rows)
    if nm is not None:                                        # back to the columns' own order: the inverse regrouping
        keep = entry_major(keep, cols // nm[1])
    return keep, swaps


def entry_major(columns: torch.Tensor, m: int) -> torch.Tensor:
    """(rows, in) with its columns reordered so that column j * G + g holds entry j of group g of M (G = in / M):
    each group's entries lie G apart, so (rows, M, G) views reduce over a group along a middle dimension."""
    return columns.unflatten(1, (-1, m)).transpose(1, 2).flatten(1)


def group_blocks(hessian: torch.Tensor, m: int) -> torch.Tensor:
    """2 H among the columns of each group of M, (G, M, M), from an (in, in) H in the entry-major order of
    `entry_major` (entry i of group g at i * G + g): block g, entry (i, j) is 2 H[i * G + g, j * G + g]."""
    groups = hessian.shape[0] // m
    return torch.diagonal(hessian.view(m, groups, m, groups), dim1=1, dim2=3).permute(2, 0, 1).mul(2).contiguous()


def best_pair(gains: torch.Tensor, moved: torch.Tensor, hessian: torch.Tensor,
              pairs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of the (rows, 2, in) `gains` and (rows, 1, in) `moved` of `refine_mask`: the change of the pair to try
    (rows,), its (grow, prune) columns (rows, 2) and their (a, b) (rows, 2). Unstructured (`pairs` None): the best
    column to grow and the best to prune. N:M (`pairs`: `group_blocks` of H, columns in the (rows, M, G) order of
    `refine_mask`): the group whose best grow plus best prune gains most, then the exact best pair within it, cross
    term included."""
    rows, _, cols = gains.shape
    if pairs is None:
        single, columns = row_min(gains.view(2 * rows, cols))
        chosen = columns.view(rows, 2)
        amounts = moved.squeeze(1).gather(1, chosen)
        cross = 2 * amounts.prod(dim=1) * hessian.view(-1)[chosen[:, 0] * cols + chosen[:, 1]]
        return single.view(rows, 2).sum(dim=1) + cross, chosen, amounts
    # amin over a non-inner dimension is vectorized; a min that also returns indices over dims this small is not
    groups, m = pairs.shape[0], pairs.shape[1]
    by_group = gains.view(rows, 2, m, groups)
    best_each = by_group.amin(dim=2)                                                      # (rows, 2, G)
    group = row_min(best_each[:, 0] + best_each[:, 1])[1]     # (rows,); .sum(dim=1) takes about 4x longer
    single = by_group.gather(3, group.view(rows, 1, 1, 1).expand(rows, 2, m, 1)).view(rows, 2, m)
    amount = moved.view(rows, m, groups).gather(2, group.view(rows, 1, 1).expand(rows, m, 1)).view(rows, m)
    pair = (single[:, 0].unsqueeze(2) + single[:, 1].unsqueeze(1)                         # (rows, M grow, M prune)
            + amount.unsqueeze(2) * amount.unsqueeze(1) * pairs.index_select(0, group))
    change, best = pair.view(rows, -1).min(dim=1)
    within = torch.stack([best // m, best % m], dim=1)                                     # (rows, 2) in 0..M-1
    return change, group.unsqueeze(1) + groups * within, amount.gather(1, within)


def row_min(values: torch.Tensor, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`values.min(dim=1)` of a (rows, cols) tensor, the first index on ties, about 3x faster on a CPU: torch's
    index-returning min is not vectorized there and `amin` is, so `amin` finds the best chunk of columns of each row
    and the index-returning min then searches that chunk alone. Chunks are `width` columns at most: the widest
    that divides `cols` from `width / 2 + 1` up, else `width` with the row padded. Rows shorter than three chunks
    (the group scores of an N:M search of a 576-wide layer: 144) take `min` itself, which is faster there."""
    rows, cols = values.shape
    if cols < 3 * width:
        return values.min(dim=1)
    width = next((w for w in range(width, width // 2, -1) if cols % w == 0), width)  # no padding copy if it can
    padded = nn.functional.pad(values, (0, -cols % width), value=torch.inf) if cols % width else values
    chunks = padded.view(rows, -1, width)                                         # (rows, chunks, width)
    best = chunks.amin(dim=2).min(dim=1).indices                                  # the first chunk holding the min
    at = best + chunks.shape[1] * torch.arange(rows, device=values.device)        # its index among rows x chunks
    value, offset = chunks.view(-1, width).index_select(0, at).min(dim=1)
    return value, best * width + offset


def diagonal_hessian(mean: torch.Tensor, variance: torch.Tensor, tokens: int) -> torch.Tensor:
    """X^T X (in, in) of channels that are uncorrelated apart from their means: T (diag(v) + mu mu^T)."""
    return tokens * (torch.diag(variance) + torch.outer(mean, mean))


def refine_layer(weight: torch.Tensor, stats: InputStatistics, name: str, ratio: float, nm: tuple[int, int] | None,
                 config: DSnoTConfig, refined: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Initial mask of one layer, then the refinement when `refined`; (keep, new weight or None, swaps per row).
    `faithful` reads the statistics accumulated in the authors' order (`InputStatistics.window_sum`, ...): their
    Wanda scores, error and variance, bit for bit on a CPU in fp32."""
    sq_sum = stats.window_sq_sum(name) if config.faithful else stats.sq_sum(name)   # a window's: ranks the same
    if config.init == "sparsegpt":
        keep, current = sparsegpt_prune(weight, 2 * stats.hessian(name), ratio, nm)
    else:
        initial = wanda_score(weight, sq_sum) if config.init == "wanda" else weight.abs()
        keep, current = keep_mask(initial, ratio, nm), None
    if not refined:
        return keep, current, torch.zeros(weight.shape[0], dtype=torch.long)
    initial_keep = keep
    pruned = weight * keep if current is None else current
    if config.faithful:
        same_sign = config.same_sign if config.same_sign is not None else nm is not None
        mean, variance = stats.window_sum(name), stats.window_variance(name)   # their error sums a window's tokens
        keep, swaps = faithful_refine(weight, pruned, keep, mean, variance, wanda_score(pruned, sq_sum), nm=nm,
                                      cycles=config.cycles, power=config.power, threshold=config.threshold,
                                      same_sign=same_sign)
    else:
        hessian = (stats.hessian(name) if config.estimate == "hessian"
                   else diagonal_hessian(stats.mean(name), stats.variance(name), stats.tokens(name)))
        keep, swaps = refine_mask(weight, pruned, keep, hessian, nm=nm, cycles=config.cycles)
    new_weight = None if current is None else torch.where(keep & ~initial_keep, weight, pruned * keep)
    return keep, new_weight, swaps


def dsnot(model: nn.Module, config: DSnoTConfig, context: Context) -> Report:
    """DSnoT: refine a Wanda, magnitude or SparseGPT mask by prune-and-grow swaps within each row, no training."""
    swaps: dict[str, torch.Tensor] = {}

    def mask(weight: torch.Tensor, stats: InputStatistics, name: str, ratio: float, nm: tuple[int, int] | None):
        refined = not config.refine or any(fnmatch.fnmatchcase(name, glob) for glob in config.refine)
        keep, new_weight, swaps[name] = refine_layer(weight, stats, name, ratio, nm, config, refined)
        return keep if new_weight is None else (keep, new_weight)

    report = prune_blocks(model, config, context, mask, statistics=dsnot_statistics(config),
                          sequential=config.sequential)
    per_row = torch.cat([s.float() for s in swaps.values()]) if swaps else torch.zeros(1)
    report.stats.update({"init": config.init, "variant": "faithful" if config.faithful else "default",
                         "cycles_used": int(per_row.max()), "mean_swaps_per_row": round(per_row.mean().item(), 3),
                         "refined_layers": sum(1 for s in swaps.values() if s.any())})
    return report
