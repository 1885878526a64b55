"""Shared fp32 statistics of calibration activations, gathered through forward hooks (never output_hidden_states).

- `InputStatistics`: per Linear layer, over every calibration token of its input x (tokens, in): the count, sum,
  sum of squares and Hessian X^T X, or per-window averages accumulated as the DSnoT authors' code does. Layers
  that read the very same tensor (q/k/v of one attention) share one accumulator, so it is computed and held once.
- `SubLayerProbes`: for each block, the hidden states entering it, after its attention residual, and leaving it.
- `mean_cosine`: per-token cosine similarity averaged over all calibration tokens, the one utility behind LIM
  importance, layer dropping and block influence.

Everything accumulates in fp32 whatever dtype the model computes in.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterable, Iterator

import torch
from torch import nn

from .sequential import BlockStep, hidden_states_of

STATISTICS = ("sum", "sq_sum", "hessian", "window_averages")


class InputStatistics:
    """Context manager collecting input statistics of `layers` ({name: Linear}) while the block runs.

    Args:
        layers: the layers to observe, by name.
        want: which of `sum`, `sq_sum`, `hessian`, `window_averages` to accumulate (the token count is always
            kept).

    After the `with` block: `tokens(name)`, `windows(name)` (calibration sequences), `sum(name)` (in,),
    `sq_sum(name)` (in,), `mean(name)`, `variance(name)`, `hessian(name)` (in, in), and from `window_averages`:
    `window_sum(name)`, `window_sq_sum(name)`, `window_variance(name)` (in,).
    """

    def __init__(self, layers: dict[str, nn.Module], want: Iterable[str] = ("sq_sum",)) -> None:
        self.want = tuple(want)
        unknown = set(self.want) - set(STATISTICS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; valid: {STATISTICS}")
        self.layers = layers
        self.owner: dict[str, str] = {}              # layer -> the layer whose accumulator it shares
        self.values: dict[str, dict[str, torch.Tensor]] = {}
        self.count: dict[str, int] = {}
        self.window_count: dict[str, int] = {}       # calibration windows (sequences) seen
        self._first_inputs: dict[str, torch.Tensor] = {}  # held during the first batch only, to find shared inputs
        self._handles: list = []

    def __enter__(self) -> "InputStatistics":
        self._handles = [layer.register_forward_hook(lambda m, args, out, n=name: self._observe(n, args[0]))
                         for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._first_inputs.clear()

    def _observe(self, name: str, x: torch.Tensor) -> None:
        if name not in self.owner:
            shared = next((other for other, seen in self._first_inputs.items() if seen is x), None)
            self.owner[name] = self.owner.get(shared, shared) if shared else name
            self._first_inputs[name] = x
        elif self._first_inputs:  # a layer seen again: the second batch has started, the grouping is known
            self._first_inputs.clear()
        owner = self.owner[name]
        if owner != name:
            return
        self.window_count[name] = self.window_count.get(name, 0) + (x.shape[0] if x.dim() == 3 else 1)
        acc = self.values.setdefault(name, {})
        bf16_values = x.dtype == torch.bfloat16      # the block computed in bf16: every value is a bf16 number
        if "window_averages" in self.want:           # x: (windows, tokens, in) or (tokens, in)
            for window in x.reshape(-1, x.shape[-2], x.shape[-1]):
                add_window_averages(acc, window.t().float())
        x = x.reshape(-1, x.shape[-1]).float()       # (tokens, in)
        self.count[name] = self.count.get(name, 0) + x.shape[0]
        if "sum" in self.want:
            acc["sum"] = acc.get("sum", 0) + x.sum(dim=0)
        if "sq_sum" in self.want:
            acc["sq_sum"] = acc.get("sq_sum", 0) + x.pow(2).sum(dim=0)
        if "hessian" in self.want:
            acc.setdefault("gram", GramAccumulator()).add(x, bf16_values=bf16_values)

    def _get(self, name: str, what: str) -> torch.Tensor:
        if what not in self.want:
            raise ValueError(f"`{what}` was not collected; pass want=(..., {what!r})")
        return self.values[self.owner[name]][what]

    def tokens(self, name: str) -> int:
        return self.count[self.owner[name]]

    def windows(self, name: str) -> int:
        return self.window_count[self.owner[name]]

    def sum(self, name: str) -> torch.Tensor:
        return self._get(name, "sum")

    def sq_sum(self, name: str) -> torch.Tensor:
        return self._get(name, "sq_sum")

    def hessian(self, name: str) -> torch.Tensor:
        if "hessian" not in self.want:
            return self._get(name, "hessian")
        acc = self.values[self.owner[name]]
        if "hessian" not in acc:  # completed once, on first use
            acc["hessian"] = acc.pop("gram").result()
        return acc["hessian"]

    def window_sum(self, name: str) -> torch.Tensor:
        """Each input channel's sum over a calibration window's tokens, averaged over the windows (in,)."""
        return self._get(name, "window_averages")["sum"]

    def window_sq_sum(self, name: str) -> torch.Tensor:
        """Each input channel's sum of squares over a window's tokens, averaged over the windows (in,)."""
        return self._get(name, "window_averages")["sq_sum"]

    def window_variance(self, name: str) -> torch.Tensor:
        """Variance per input channel within each calibration window, averaged over the windows (in,)."""
        return self._get(name, "window_averages")["variance"]

    def mean(self, name: str) -> torch.Tensor:
        return self.sum(name) / self.tokens(name)

    def variance(self, name: str) -> torch.Tensor:
        """Population variance per input channel, clamped at 0 against rounding."""
        mean = self.mean(name)
        return (self.sq_sum(name) / self.tokens(name) - mean.pow(2)).clamp_min(0)


def add_window_averages(acc: dict, window: torch.Tensor) -> None:
    """Fold one calibration window, `window` (in, tokens) fp32, into `acc["window_averages"]`: running averages
    over windows of each channel's token sum, sum of squares (a squared norm) and variance, computed in the order of
    the DSnoT authors' released code (each average rescaled by n / (n + 1) before the new window's share is added).
    The values equal sums divided by the window count up to rounding; the order makes DSnoT `faithful` choose their
    masks bit for bit, where fp32 rounding otherwise tips near-ties and, through the later blocks, 6 % of the mask."""
    averages = acc.setdefault("window_averages", {"windows": 0, "tokens": 0})
    seen, before, tokens = averages["windows"], averages["tokens"], window.shape[1]
    variance = torch.var(window, dim=1, unbiased=False)       # weighted by tokens: windows may differ in length
    averages["variance"] = variance if seen == 0 else (
        (averages["variance"] * before + variance * tokens) / (before + tokens))
    share = seen / (seen + 1)                                 # the earlier windows' weight in the new average
    for key, value in (("sq_sum", torch.norm(window, p=2, dim=1) ** 2), ("sum", window.sum(dim=1))):
        averages[key] = averages.get(key, 0) * share + value / (seen + 1)
    averages["windows"], averages["tokens"] = seen + 1, before + tokens


class GramAccumulator:
    """X^T X (in, in) in fp32 of token chunks x (tokens, in) added one by one, multiplied in batches of about
    `batch_tokens` rows: one calibration window (512 tokens) makes a product too thin to run at full speed (on 2 CPU
    cores, 576- and 1536-wide grams of 4096-token batches take about 15 % less time than of 512-token ones)."""

    def __init__(self, batch_tokens: int = 4096, max_bytes: int = 64 << 20) -> None:
        self.batch_tokens, self.max_bytes = batch_tokens, max_bytes
        self.upper: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None     # (batch, in) buffer, its first `filled` rows waiting
        self.filled = 0
        self.bf16_values = True                      # every value buffered is a bf16 number

    def add(self, x: torch.Tensor, *, bf16_values: bool = False) -> None:
        """Add x (tokens, in) fp32; it is copied, never held."""
        if self.pending is None:
            rows = max(1, min(self.batch_tokens, self.max_bytes // (x.element_size() * x.shape[1])))
            self.pending = x.new_empty(rows, x.shape[1])
        if self.filled + x.shape[0] > self.pending.shape[0]:
            self.flush()
        if x.shape[0] > self.pending.shape[0]:        # wider than the buffer: multiplied at once
            self.upper = add_gram_upper(self.upper, x, bf16_values=bf16_values)
            return
        self.pending[self.filled:self.filled + x.shape[0]].copy_(x)
        self.filled += x.shape[0]
        self.bf16_values = self.bf16_values and bf16_values

    def flush(self) -> None:
        if self.filled:
            self.upper = add_gram_upper(self.upper, self.pending[:self.filled], bf16_values=self.bf16_values)
        self.filled, self.bf16_values = 0, True

    def result(self) -> torch.Tensor:
        """The symmetric X^T X (in, in) of everything added; the buffer is released."""
        self.flush()
        width = self.pending.shape[1]
        upper = self.upper if self.upper is not None else self.pending.new_zeros(width, width)  # only empty chunks
        self.pending = None
        return torch.triu(upper) + torch.triu(upper, 1).t()


def add_gram_upper(gram: torch.Tensor | None, x: torch.Tensor, block: int = 256, *,
                   bf16_values: bool = False) -> torch.Tensor:
    """gram (in, in) += x^T x for x (tokens, in) fp32, computing only the blocks on and above the diagonal (about 40 %
    fewer flops for wide layers); the lower triangle is left stale, so read it through `torch.triu`.

    `bf16_values`: every value of x is a bfloat16 number (the block computed in bf16). On a CPU with native bf16 the
    products then run as bf16 with fp32 accumulation (oneDNN's bf16 math mode, on AMX where present), 2.5x faster:
    the product of two bf16 numbers is exact in fp32, so the result is the same fp32 sum up to summation order."""
    if gram is None:
        gram = x.new_zeros(x.shape[1], x.shape[1])
    with bf16_products(bf16_values and x.device.type == "cpu" and cpu_has_bf16()):
        for start in range(0, x.shape[1], block):
            gram[start:start + block, start:].addmm_(x[:, start:start + block].t(), x[:, start:])
    return gram


@functools.cache
def cpu_has_bf16() -> bool:
    from .loading import native_bf16

    return native_bf16(torch.device("cpu")) and hasattr(torch.backends.mkldnn, "matmul")


@contextlib.contextmanager
def bf16_products(enabled: bool) -> Iterator[None]:
    """CPU float32 matmuls inside take bf16 inputs with fp32 accumulation (exact only for bf16-valued inputs)."""
    if not enabled:
        yield
        return
    settings = torch.backends.mkldnn.matmul
    before, settings.fp32_precision = settings.fp32_precision, "bf16"
    try:
        yield
    finally:
        settings.fp32_precision = before


class CosineMeter:
    """Accumulates per-token cosine similarity between pairs of hidden states (batch, seq, hidden), in fp32."""

    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        cos = nn.functional.cosine_similarity(a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1]),
                                              dim=-1)  # (tokens,)
        self.total += cos.sum().item()
        self.tokens += cos.numel()

    @property
    def value(self) -> float:
        return self.total / max(1, self.tokens)


def mean_cosine(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Per-token cosine similarity of each (a, b) pair, averaged over all tokens of all pairs."""
    meter = CosineMeter()
    for a, b in pairs:
        meter.add(a, b)
    return meter.value


def input_output_cosine(step: BlockStep) -> float:
    """Run the block of `step` on its calibration inputs; the per-token cosine between the hidden states it
    receives and those it returns, averaged over every token (LIM importance, block drop, block influence)."""
    outputs = step.run()
    return mean_cosine(zip((hidden_states_of(args, kwargs) for args, kwargs in step.inputs), outputs, strict=True))


class SubLayerProbes:
    """While active, records for one pre-norm block the hidden states it receives (`block_input`), those after the
    attention residual (`after_attention` = block input + attention output) and its output (`block_output`), one
    (batch, seq, hidden) tensor per calibration batch, through hooks on the block and its attention module."""

    def __init__(self, block: nn.Module, attention: nn.Module) -> None:
        self.block, self.attention = block, attention
        self.block_input: list[torch.Tensor] = []
        self.after_attention: list[torch.Tensor] = []
        self.block_output: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "SubLayerProbes":
        def block_pre(module, args, kwargs):
            self.block_input.append((args[0] if args else kwargs["hidden_states"]).detach())

        def attention_out(module, args, output):
            attended = output[0] if isinstance(output, (tuple, list)) else output
            self.after_attention.append(self.block_input[-1] + attended.detach())

        def block_out(module, args, output):
            self.block_output.append((output[0] if isinstance(output, (tuple, list)) else output).detach())

        self._handles = [self.block.register_forward_pre_hook(block_pre, with_kwargs=True),
                         self.attention.register_forward_hook(attention_out),
                         self.block.register_forward_hook(block_out)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
