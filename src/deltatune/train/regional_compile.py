"""Regional compilation: ``torch.compile`` each transformer block of a model in place.

Compiling the blocks one by one (instead of the whole model) keeps compile time to about that of one
block: the blocks share their code, and with ``torch._dynamo.config.inline_inbuilt_nn_modules`` (the
default) their parameters are graph inputs, so one compiled graph serves every block. Inside a block
inductor fuses the elementwise work of the base model (norms, rotary embeddings, activations, residual
adds) and of the delta layers (LoRA dropout, scaling, adds) into few kernels, which at small and
medium sizes is most of a step's GPU time. Gradients flow through compiled blocks as through eager
ones; adapters can still be switched, merged or disabled (the change triggers a recompilation).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import DeltaConfigError
from .fsdp import find_block_modules

__all__ = ["compile_blocks"]


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """``torch.compile`` every transformer block of ``model`` in place; returns the blocks' names.

    Blocks are found as for FSDP (:func:`~deltatune.train.find_block_modules`: the classes named in
    ``_no_split_modules``, e.g. ``LlamaDecoderLayer``). ``compile_kwargs`` go to ``nn.Module.compile``
    (default ``dynamic=False``: one graph per input shape).

    Raises:
        DeltaConfigError: ``model`` has no recognisable transformer blocks.
    """
    blocks = find_block_modules(model)
    if not blocks:
        raise DeltaConfigError(
            f"compile_blocks found no transformer blocks in {type(model).__name__} (expected modules named in "
            "_no_split_modules, or ModuleList children whose class ends in Layer/Block)"
        )
    compile_kwargs.setdefault("dynamic", False)
    for _, block in blocks:
        block.compile(**compile_kwargs)
    return [name for name, _ in blocks]
