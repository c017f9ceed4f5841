"""Switching off the progress bars of the libraries that load models, for ``progress=False``.

transformers draws its own bars while loading: ``Loading weights`` (through
``transformers.utils.logging.tqdm``, switched by ``disable_progress_bar``) and, for a GGUF file,
``Converting and de-quantizing GGUF tensors...`` (a plain ``tqdm.auto.tqdm`` in
``transformers.modeling_gguf_pytorch_utils``, which no switch reaches: it is replaced by a disabled
tqdm for the duration). :func:`library_progress` turns both off inside a ``with`` block and restores
the previous state afterwards, also on error. deltatune's own bars take ``disable=not progress``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

__all__ = ["library_progress"]

#: The transformers module whose GGUF dequantising loop calls ``tqdm`` directly.
_GGUF_LOADER_MODULE = "transformers.modeling_gguf_pytorch_utils"


@contextmanager
def library_progress(enabled: bool) -> Iterator[None]:
    """Inside the block, transformers' (and huggingface_hub's) progress bars are shown only if ``enabled``.

    With ``enabled`` True nothing is changed (bars follow the user's own transformers settings).
    """
    if enabled:
        yield
        return
    import huggingface_hub.utils as hub_utils  # transformers' dependency; imported with it (heavy)
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    try:
        gguf_loader = importlib.import_module(_GGUF_LOADER_MODULE)
    except ImportError:  # a transformers without GGUF support: no such bar to switch off
        gguf_loader = None
    saved_tqdm = getattr(gguf_loader, "tqdm", None)
    hf_logging.disable_progress_bar()
    if saved_tqdm is not None:
        gguf_loader.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if saved_tqdm is not None:
            gguf_loader.tqdm = saved_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()
        if hub_was_disabled:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()
