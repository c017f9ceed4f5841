"""Compatibility layers for users of other delta-tuning systems.

* :mod:`deltatune.compat.pet_config`: MindFormers' ``pet_config`` YAML section, mapped to our configs
  (used by :func:`deltatune.load_config`, recipes' ``delta:`` section and the CLI).
* :mod:`deltatune.compat.mindpet`: MindPet's API (``LoRADense``, ``freeze_delta``, ``RDropLoss``...);
  its argument rules live in :mod:`~deltatune.compat.mindpet_checks`, its ``mindpet.graph`` part
  (``freeze_delta``, ``TrainableParamsCheckPoint``) in :mod:`~deltatune.compat.mindpet_graph`.
* :mod:`deltatune.compat.loralib`: loralib's API (``lora.Linear``, ``mark_only_lora_as_trainable``...).

The submodules are imported on demand (``import deltatune.compat.loralib as lora``).
"""

from __future__ import annotations

__all__ = ["loralib", "mindpet", "mindpet_checks", "mindpet_graph", "pet_config"]
