"""Layer-by-layer engine: compress a model one transformer block at a time.

The model stays where it was loaded (CPU memory). We capture what the blocks of a stack receive - the first block's
hidden states plus every block's keyword arguments (attention mask, position ids, rotary embeddings, ...; they may
differ by layer type) - in one forward pass that computes no block, then for each block: move it to the compute
device, let the method observe and compress it, run it again to produce the hidden states of the next block, and
move it back. The embeddings and other parts outside the blocks visit the device only
while the first block's inputs are captured. Peak device memory is one block plus the calibration activations, so a
model larger than the GPU can be compressed on one GPU. Reusing the captured keyword arguments keeps the engine free
of any architecture's forward signature.
"""

from __future__ import annotations

import fnmatch
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import UnsupportedModelError

try:  # GPT-2 style models store Linear layers as Conv1D with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

Inputs = list[tuple[tuple, dict]]  # per calibration batch: (positional args, keyword args) of a block's forward
Batch = torch.Tensor | dict[str, torch.Tensor]  # token ids (batch, seq), or an image-text batch (processor outputs)


def find_block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's transformer block stacks, in definition order: ModuleLists of same-class modules that contain
    Linear layers and are not nested inside another such stack (so MoE expert lists are not mistaken for stacks).
    A block whose sub-layers were all dropped still counts, as long as another block of the stack has layers."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1 or not any(find_linears(child) for child in module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in stacks):
            continue
        stacks.append((name, module))
    return stacks


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """`find_block_stacks`, or an UnsupportedModelError when the model has none."""
    stacks = find_block_stacks(model)
    if not stacks:
        raise UnsupportedModelError(f"{type(model).__name__} has no stack of transformer blocks with Linear layers")
    return stacks


def named_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every transformer block of the model with its full name, e.g. `("model.layers.3", block)`."""
    for stack_name, stack in find_block_stacks(model):
        for index, block in enumerate(stack):
            yield f"{stack_name}.{index}", block


def find_linears(module: nn.Module, targets: tuple[str, ...] = (), prefix: str = "") -> dict[str, nn.Module]:
    """Linear (and GPT-2 Conv1D) layers under `module`, by full name, filtered by the glob patterns in `targets`."""
    found = {}
    for name, child in module.named_modules(prefix=prefix):
        if isinstance(child, (nn.Linear, Conv1D)):
            if not targets or any(fnmatch.fnmatchcase(name, pattern) for pattern in targets):
                found[name] = child
    return found


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out_features, in_features) view that can be edited in place."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def device_of(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """Where the module's parameters are (a block whose sub-layers were all dropped may have none)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else (default or torch.device("cpu"))


def move(value: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to `device` (floating ones cast to `dtype` when given).
    Detached first: a captured input must never be a model Parameter itself (DeBERTa passes `rel_embeddings.weight`
    to every block), or moving the model's parameters home would move the captured input with them."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to(device)
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device, dtype) for k, v in value.items()}
    return value


@contextmanager
def computing_in(module: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """While active, `module` computes in `dtype`: each floating parameter holds a cast copy, and gets its own
    tensor back afterwards, untouched (so weights a method does not change are saved exactly as they were, and the
    weights it edits are edited at full precision). Buffers keep their dtype (rotary frequencies stay exact)."""
    if dtype is None:
        yield
        return
    originals = {}
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            originals[param] = param.data
            param.data = param.data.to(dtype)
    try:
        yield
    finally:
        for param, data in originals.items():
            param.data = data


def model_inputs(model: nn.Module, batch: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, Any]:
    """Forward kwargs for a calibration batch: token ids (batch, seq), or an image-text batch's processor outputs
    that the forward names (a BERT tokenizer's `token_type_ids` would break CLIP), images in the model's dtype. No
    KV cache, so replayed blocks never append to one."""
    named = inspect.signature(model.forward).parameters
    if isinstance(batch, torch.Tensor):
        kwargs: dict[str, Any] = {"input_ids": batch}
    else:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        kwargs = {k: move(v, v.device, dtype) for k, v in batch.items() if k in named}
    if "use_cache" in named:
        kwargs["use_cache"] = False
    return kwargs


class _StopForward(Exception):
    pass


@contextmanager
def onloaded_blocks(blocks: list[nn.Module], device: torch.device) -> Iterator[None]:
    """While active, each block moves to `device` just before it runs and back to where it was right after."""
    homes = {id(b): device_of(b) for b in blocks}

    def arrive(module: nn.Module, args: tuple) -> None:   # a hook's return value would replace the inputs
        module.to(device)

    def leave(module: nn.Module, args: tuple, output: Any) -> None:   # ... or the output
        module.to(homes[id(module)])

    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(arrive))
        handles.append(block.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_inputs(model: nn.Module, block: nn.Module, batches: list[Batch], device: torch.device) -> Inputs:
    """Run the model on each batch until `block` is reached; return what `block` received (on `device`)."""
    return capture_stack_inputs(model, [block], batches, device)[0]


@torch.no_grad()
def capture_stack_inputs(model: nn.Module, blocks: list[nn.Module], batches: list[Batch],
                         device: torch.device, dtype: torch.dtype | None = None) -> list[Inputs]:
    """What each of `blocks` (consecutive blocks of one stack) receives per batch, on `device`, in one forward pass
    per batch that computes none of them: every block records its inputs and hands its hidden states on unchanged,
    and the last one stops the forward. The first block's inputs are complete; for the others the hidden states
    are left out (None: the engine fills in the previous block's outputs) and the keyword arguments are kept, since
    they may differ by layer type (sliding-window vs full-attention masks, local vs global rotary tables). Floating
    inputs are cast to `dtype` when given (the blocks' compute dtype)."""
    captured: list[Inputs] = [[] for _ in blocks]
    first_output: list[Any] = []                    # block 0's real output on batch 0: the form to hand on

    def recorder(index: int, real: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = move(args, device, dtype), move(kwargs, device, dtype)
            batch = len(captured[index])
            earlier = [captured[index][0][1]] if batch else []         # the same block, first batch
            earlier += [captured[i][batch][1] for i in {index - 1, 0} if 0 <= i < index]
            kwargs = shared_with(kwargs, *earlier)
            hidden = hidden_states_of(args, kwargs)
            captured[index].append((args, kwargs) if index == 0 else with_hidden_states(args, kwargs, None))
            if index == len(blocks) - 1:
                raise _StopForward
            if not first_output:
                with computing_in(blocks[index], dtype):
                    first_output.append(real(*args, **kwargs))
            return with_hidden_output(first_output[0], hidden)

        return forward

    all_blocks = [b for _, stack in find_block_stacks(model) for b in stack]
    for index, block in enumerate(blocks):
        block.forward = recorder(index, block.forward)  # an instance attribute shadows the class's forward
    try:
        with onloaded_blocks(all_blocks, device):
            for batch in batches:
                try:
                    model(**model_inputs(model, move(batch, device)))
                except _StopForward:
                    pass
    finally:
        for block in blocks:
            del block.forward
    if any(len(inputs) != len(batches) for inputs in captured):
        raise UnsupportedModelError(f"{type(model).__name__}: the forward pass never reached its transformer blocks")
    return captured


def shared_with(value: Any, *earlier: Any) -> Any:
    """`value` with every tensor that equals its counterpart in one of the `earlier` structures replaced by that
    tensor. Masks and rotary tables are the same for every calibration window of one length, and for every block of
    one layer type; sharing them keeps one copy on the device instead of one per window and block (an eager 4-D
    mask at 2048 tokens is 16 MiB, 2 GiB over 128 windows)."""
    if isinstance(value, torch.Tensor):
        return next((e for e in earlier if isinstance(e, torch.Tensor) and e.shape == value.shape
                     and e.dtype == value.dtype and e.device == value.device and torch.equal(e, value)), value)
    if isinstance(value, (tuple, list)):
        same = [e for e in earlier if isinstance(e, (tuple, list)) and len(e) == len(value)]
        return type(value)(shared_with(v, *(e[i] for e in same)) for i, v in enumerate(value))
    if isinstance(value, dict):
        same = [e for e in earlier if isinstance(e, dict)]
        return {k: shared_with(v, *(e.get(k) for e in same)) for k, v in value.items()}
    return value


def hidden_output(output: Any) -> torch.Tensor:
    """The hidden states a block (or sub-layer) returned: the output itself or its first element."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden_output(output: Any, hidden: torch.Tensor | None) -> Any:
    """`output` in the same form (a tensor, or a tuple whose first element it is) with `hidden` in its place."""
    return (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden


def with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def move_outer(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer outside the transformer blocks (embeddings, final norm, head) to `device`."""
    in_blocks = {id(t) for _, stack in find_block_stacks(model) for t in [*stack.parameters(), *stack.buffers()]}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) not in in_blocks:
                param.data = param.data.to(device)  # a tied parameter is one object: moved once for all its users
        for name, buffer in module.named_buffers(recurse=False):
            if id(buffer) not in in_blocks:
                module._buffers[name] = buffer.to(device)


@dataclass
class BlockStep:
    """What a method's per-block callback gets.

    Args:
        name: the block's full name, e.g. `model.layers.3`.
        block: the block, on the compute device.
        inputs: per calibration batch, the (args, kwargs) the block is called with; the hidden states (batch,
            seq, hidden) are `args[0]` or `kwargs["hidden_states"]` (see `hidden_states_of`).
        run: runs the block on all inputs and returns its outputs, one (batch, seq, hidden) tensor per batch.
    """

    name: str
    block: nn.Module
    inputs: Inputs
    run: Callable[[], list[torch.Tensor]]


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block was called with."""
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    batches: list[Batch],
    device: torch.device | str,
    process_block: Callable[[BlockStep], None],
    *,
    sequential: bool = True,
    desc: str = "blocks",
    on_block: Callable[[int, int, str], None] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Call `process_block(BlockStep)` for every transformer block, one block on `device` at a time.

    `step.run()` runs the block on all calibration inputs and returns its outputs; the method attaches its hooks
    around it to collect statistics, then compresses the block. With `sequential=True` the block runs again after
    compression so that later blocks see the compressed earlier ones (the Wanda/SparseGPT lineage); with
    `sequential=False` later blocks see dense activations, which equals processing the whole model at once (for a
    model with several block stacks, a later stack's inputs come from the already-compressed earlier stacks).
    `on_block(done, total, name)` is called before each block (progress, and a cancel that raises between blocks).
    With `compute_dtype`, the blocks and their inputs compute in that dtype during the passes (see `computing_in`).
    """
    device = torch.device(device)
    stacks = block_stacks(model)
    home = device_of(model)
    homes = {id(b): device_of(b, home) for _, stack in stacks for b in stack}
    total, done = sum(len(stack) for _, stack in stacks), 0
    for stack_name, stack in stacks:
        move_outer(model, device)  # embeddings etc. are needed only to compute the first block's inputs
        try:
            captured = capture_stack_inputs(model, list(stack), batches, device, compute_dtype)
        finally:
            move_outer(model, home)
        outputs: list[torch.Tensor] = []
        for index, block in enumerate(tqdm(stack, desc=f"{desc} ({stack_name})", leave=False)):
            if on_block is not None:
                on_block(done, total, f"{stack_name}.{index}")
            inputs = captured[index] if index == 0 else [with_hidden_states(args, kwargs, hidden) for
                                                         (args, kwargs), hidden in zip(captured[index], outputs,
                                                                                       strict=True)]
            captured[index] = []
            block.to(device)
            try:
                outputs = _process_block(f"{stack_name}.{index}", block, inputs, process_block, sequential,
                                         compute_dtype)
            finally:  # an error or Ctrl-C must not leave a block on the GPU
                block.to(homes[id(block)])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            done += 1


def _process_block(name: str, block: nn.Module, inputs: Inputs, process_block, sequential: bool,
                   compute_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Let the method observe and compress `block`; return its outputs (the next block's hidden states)."""
    dense_outputs: list[torch.Tensor] = []

    def run() -> list[torch.Tensor]:
        with computing_in(block, compute_dtype):
            outputs = [hidden_output(block(*args, **kwargs)) for args, kwargs in inputs]
        if not sequential and not dense_outputs:  # one-shot mode feeds the dense outputs forward
            dense_outputs.extend(outputs)
        return outputs

    process_block(BlockStep(name, block, inputs, run))
    return run() if sequential or not dense_outputs else dense_outputs
