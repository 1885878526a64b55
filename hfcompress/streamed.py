"""Whole-model losses and gradients with one transformer block on the compute device at a time.

A global score (ECoFLaP's stage 1) needs the model's own loss, or its gradient, with respect to every block's
weights. Holding the whole model on one GPU for that would undo the block-by-block design, so both are streamed:

- `StreamedLoss`: forward passes in which every block moves to the device only while it runs; after `record()`,
  the blocks that ran before a perturbed one replay their recorded outputs instead of running.
- `streamed_gradient_sums`: the gradient of the loss with respect to chosen block weights, block by block in
  reverse order (activation checkpointing at block granularity), equal to one backward pass of the whole model up
  to rounding, for one more forward pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .sequential import (
    Batch,
    device_of,
    find_block_stacks,
    hidden_output,
    hidden_states_of,
    move,
    move_outer,
    onloaded_blocks,
    with_hidden_output,
    with_hidden_states,
)

Loss = Callable[[nn.Module, Batch], torch.Tensor]


class StreamedLoss:
    """Whole-model losses of `batches`, `loss(batch index, start block)`, with the model where it is: every block
    visits the compute device only while it runs, so a model larger than the device is scored. After `record()`,
    the blocks that ran before `start` (in the forward's order: a CLIP's vision tower runs before its text tower)
    replay the outputs they gave the unperturbed model instead of running (perturbing `start` cannot change them):
    perturbing the blocks one at a time then costs half the forward passes. The recorded outputs take batches x
    blocks x seq x hidden numbers of CPU memory."""

    def __init__(self, model: nn.Module, batches: list[Batch], device: torch.device, loss: Loss) -> None:
        self.model, self.batches, self.device, self.loss = model, batches, device, loss
        self.blocks = [block for _, stack in find_block_stacks(model) for block in stack]
        self.outputs: list[dict[nn.Module, Any]] = []      # per batch: each block's unperturbed output (CPU)

    def record(self) -> None:
        seen: dict[nn.Module, Any] = {}
        hooks = [b.register_forward_hook(lambda m, a, out: seen.setdefault(m, move(out, "cpu")))
                 for b in self.blocks]
        try:
            for index in range(len(self.batches)):
                self(index)
                self.outputs.append(dict(seen))
                seen.clear()
        finally:
            for hook in hooks:
                hook.remove()
        self.blocks = list(self.outputs[0])                # the order they ran in (a block never run is left out)

    @torch.no_grad()
    def __call__(self, index: int, start: nn.Module | None = None) -> float:
        replayed = self.blocks[:self.blocks.index(start)] if start in self.blocks else []
        for block in replayed:
            block.forward = lambda *args, out=self.outputs[index][block], **kwargs: move(out, self.device)
        running = [b for b in self.blocks if b not in replayed]
        try:
            with outer_on(self.model, self.device), onloaded_blocks(running, self.device):
                return self.loss(self.model, move(self.batches[index], self.device)).item()
        finally:
            for block in replayed:
                block.__dict__.pop("forward", None)        # the class's forward again


@contextmanager
def outer_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """While active, the parameters outside the blocks (embeddings, norms, head, projector) are on `device`."""
    home = device_of(model)
    move_outer(model, device)
    try:
        yield
    finally:
        move_outer(model, home)


def streamed_gradient_sums(model: nn.Module, batches: list[Batch], device: torch.device, loss: Loss,
                           weights: dict[str, nn.Parameter]) -> dict[str, float]:
    """sum |dL/dW| of each of `weights` (block weights, by name), averaged over `batches`.

    Per batch: (1) a forward pass without gradients records every block's output (CPU); (2) a forward pass of the
    code outside the blocks only, with gradients: each block hands on its recorded hidden states as a leaf that
    takes a gradient, and keeps the inputs it was handed (carrying the graph from the leaves before it through the
    code between blocks, e.g. LLaVA's projector); (3) backward from the loss gives the leaves the gradient that
    reaches them through that code; then, in the reverse order of execution, each block is recomputed on the
    device from its inputs and backpropagated with its leaf's gradient: its weights' gradients are summed into the
    scores, its input's gradient is pushed back through (2)'s graph into the leaves of the blocks that fed it.
    Gradients flow through the blocks' hidden-state inputs (other inputs, masks and position tables, carry none).
    A block whose output the loss never reads gets no gradient (score 0). Peak device memory: one block, the code
    outside the blocks, and one batch's block outputs."""
    flags = {p: p.requires_grad for p in model.parameters()}
    owner = {id(w): name for name, w in weights.items()}
    sums = dict.fromkeys(weights, 0.0)
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in owner)
        for index in range(len(batches)):
            recorder = StreamedLoss(model, batches[index:index + 1], device, loss)
            recorder.record()
            for name, grad in _block_gradients(recorder, owner).items():
                sums[name] += grad / len(batches)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return sums


def _block_gradients(recorder: StreamedLoss, owner: dict[int, str]) -> dict[str, float]:
    model, device, order = recorder.model, recorder.device, recorder.blocks
    outputs = recorder.outputs[0]
    leaves = {b: hidden_output(outputs[b]).clone().requires_grad_(True) for b in order}   # (batch, seq, hidden)
    inputs: dict[nn.Module, tuple[tuple, dict]] = {}

    def replay(block: nn.Module) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            inputs[block] = (args, kwargs)
            return with_hidden_output(move(outputs[block], device), leaves[block].to(device))  # keeps the graph
        return forward

    for block in order:
        block.forward = replay(block)
    try:
        with torch.enable_grad(), outer_on(model, device):
            total = recorder.loss(model, move(recorder.batches[0], device))
            total.backward(retain_graph=True)             # into the leaves the code outside the blocks reads
            sums: dict[str, float] = {}
            for block in reversed(order):
                del block.forward
                if leaves[block].grad is not None:
                    sums.update(_backward_through(block, *inputs[block], leaves[block].grad, device, owner))
    finally:
        for block in order:
            block.__dict__.pop("forward", None)
    return sums


def _backward_through(block: nn.Module, args: tuple, kwargs: dict, grad_output: torch.Tensor, device: torch.device,
                      owner: dict[int, str]) -> dict[str, float]:
    """Recompute `block` from its inputs and backpropagate `grad_output` (batch, seq, hidden): the block's targeted
    weights' sum |grad|, and the input's gradient pushed on into the graph its input came from."""
    given = hidden_states_of(args, kwargs)
    hidden = given.detach().requires_grad_(given.requires_grad)
    args, kwargs = with_hidden_states(move(args, device), move(kwargs, device), hidden)  # the rest detached
    home = device_of(block)
    block.to(device)
    try:
        out = hidden_output(block(*args, **kwargs))
        if out.requires_grad:                   # else: no targeted weight and no gradient to hand on
            torch.autograd.backward(out, grad_output.to(out.device, out.dtype))
        sums = {}
        for param in block.parameters():
            if id(param) in owner and param.grad is not None:
                sums[owner[id(param)]] = param.grad.float().abs().sum().item()
                param.grad = None
    finally:
        block.to(home)
    if hidden.grad is not None:
        torch.autograd.backward(given, hidden.grad, retain_graph=True)
    return sums
