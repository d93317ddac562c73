"""Integrations of MGPO with training frameworks.

``mgpo_kernels.integrations.hf``: Hugging Face Trainer + PEFT (``MGPOCallback``, ``mgpo_for_peft``,
``mgpo_optimizer_cls_and_kwargs``); TRL's ``SFTTrainer`` is a Trainer.
``mgpo_kernels.integrations.lightning``: PyTorch Lightning 2.x (``MGPOCallback``; imports lightning on import).
``mgpo_kernels.integrations.common``: ``find_mgpo`` (through accelerate's, Lightning's and DeepSpeed's wrappers).  Importing this package does not import transformers; the names below are
loaded on first use.
"""
from __future__ import annotations

__all__ = [
    "MGPOCallback",
    "find_mgpo",
    "lora_param_groups",
    "mgpo_for_peft",
    "mgpo_optimizer_cls_and_kwargs",
    "MGPOForPeft",
]


def __getattr__(name):
    if name in __all__:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
