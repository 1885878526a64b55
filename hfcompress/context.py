"""What a transform receives besides the model and its config: calibration data, devices, dtypes, and the engine.

    @register(MyConfig, paper=..., needs_calibration=True)
    def my_method(model, config, context: Context) -> Report:
        def process(step: BlockStep) -> None:      # step.name, step.block, step.inputs, step.run()
            ...
        context.run_blocks(model, process)

`Context.run_blocks` is the block-by-block engine of `sequential.py` with the run's progress and cancel hooks wired
in, so every method reports progress per block and stops cleanly between blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import HfCompressError
from .sequential import BlockStep, run_blocks

Progress = Callable[..., Any]  # progress(fraction in [0, 1], desc=...) - the signature of gradio's gr.Progress


class Cancelled(HfCompressError):
    """The run was cancelled (between two blocks); nothing was written."""


@dataclass
class Context:
    """Everything a transform needs from the run.

    Args:
        calibration: the calibration batches (None for data-free methods).
        device: where blocks are computed.
        storage_dtype: the floating dtype the weights are saved in; a quantizer rounds its scales to it so that
            the model in memory equals the model as it will load.
        compute_dtype: the dtype blocks compute in during the engine's passes (None: the model's own). Only the
            passes use it: each block runs on a cast copy of its weights, the weights a method reads and edits stay
            in the model's dtype, and statistics accumulate in fp32.
        progress: `progress(fraction, desc=...)` receives this step's progress (0..1 within the step).
        cancel: returns True when the user asked to stop; checked between blocks.
    """

    calibration: Any = None
    device: torch.device = torch.device("cpu")
    storage_dtype: torch.dtype | None = None
    compute_dtype: torch.dtype | None = None
    progress: Progress | None = None
    cancel: Callable[[], bool] | None = None

    def check_cancelled(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled; nothing was written")

    def report(self, fraction: float, desc: str) -> None:
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, fraction)), desc=desc)

    def run_blocks(self, model: nn.Module, process: Callable[[BlockStep], None], *, sequential: bool = True,
                   desc: str = "blocks") -> None:
        """Run `process` on every transformer block, one block on `self.device` at a time (see `run_blocks`)."""
        def on_block(done: int, total: int, name: str) -> None:
            self.check_cancelled()
            self.report(done / total, f"{desc}: {name} ({done + 1}/{total})")

        if self.calibration is None:
            raise TypeError(f"{desc}: the block engine needs calibration data; register the method with "
                            "needs_calibration=True")
        run_blocks(model, self.calibration.batches(), self.device, process, sequential=sequential, desc=desc,
                   on_block=on_block, compute_dtype=self.compute_dtype)
        self.report(1.0, f"{desc}: done")
