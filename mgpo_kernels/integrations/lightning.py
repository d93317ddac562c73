"""MGPO with PyTorch Lightning 2.x (``lightning`` or ``pytorch_lightning``).

Theta at rest (mgpo_kernels/_at_rest.py) makes Lightning right without help: between steps the model holds theta,
so validation (the sanity check included), test, predict, ``ModelCheckpoint`` and ``save_checkpoint`` (with or
without ``save_weights_only``), weight averaging (``StochasticWeightAveraging``, ``EMAWeightAveraging``) and the
model after ``fit`` see theta, and ``fit(ckpt_path=...)`` continues the run.  The training forward applies eps
just in time.

``MGPOCallback`` is optional: at ``on_fit_start`` it refuses settings MGPO cannot be right with (gradient clipping
by Lightning under a GradScaler, DeepSpeed, FSDP1) and warns when the MGPOs hold none or only part of the trainable
parameters.

Usage::

    from mgpo_kernels.integrations.lightning import MGPOCallback
    trainer = Trainer(..., callbacks=[MGPOCallback()])   # configure_optimizers returns an MGPO

The class subclasses the ``Callback`` of every Lightning package installed (``lightning.pytorch`` and
``pytorch_lightning`` are distinct packages with distinct base classes), so one class serves either ``Trainer``.
"""
from __future__ import annotations

import importlib
import warnings
from typing import List, Tuple

from ..optimizer import MGPO
from .common import describe_missing, find_mgpo, missing_trainable_parameters


def _callback_bases() -> Tuple[type, ...]:
    bases = []
    for mod in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(mod).Callback)
        except ImportError:
            pass
    if not bases:
        raise ImportError("mgpo_kernels.integrations.lightning needs `lightning` or `pytorch_lightning` (2.x)")
    return tuple(bases)


#: strategies MGPO is not tested or cannot be exact under: Lightning's DeepSpeedStrategy (MGPO supports DeepSpeed
#: ZeRO through deepspeed.initialize, accelerate and the HF Trainer, see _deepspeed.py; Lightning's strategy drives
#: its own checkpointing and precision plugins, not tested with MGPO); Lightning's FSDPStrategy is FSDP1, whose
#: ``use_orig_params`` parameters are plain tensors holding per-rank slices (per-rank norms, undetectable by MGPO).
_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": "Lightning's DeepSpeedStrategy is not tested with MGPO (MGPO supports DeepSpeed ZeRO "
                         "through deepspeed.initialize, accelerate's DeepSpeed plugin and the Hugging Face Trainer)",
    "FSDPStrategy": "FSDP1 hands the optimizer per-rank slices of the parameters as plain tensors",
}


class MGPOCallback(*_callback_bases()):
    """Checks an MGPO setup under Lightning at ``on_fit_start`` (see module doc); evaluation and checkpoints need
    no callback."""

    @staticmethod
    def _mgpos(trainer) -> List[MGPO]:
        return [m for m in (find_mgpo(o) for o in trainer.optimizers) if m is not None]

    def on_fit_start(self, trainer, pl_module) -> None:
        mgpos = self._mgpos(trainer)
        if not mgpos:
            return
        for cls in type(trainer.strategy).__mro__:
            if cls.__name__ in _REFUSED_STRATEGIES:
                raise NotImplementedError(
                    f"MGPO cannot run under Lightning's {cls.__name__}: {_REFUSED_STRATEGIES[cls.__name__]}, so its "
                    "global norms would be per rank. Use strategy='ddp'; see docs/integrations.md for the layouts MGPO "
                    "supports."
                )
        clip = trainer.gradient_clip_val
        mixed = any(c.__name__ == "MixedPrecision" for c in type(trainer.precision_plugin).__mro__)
        if clip and mixed:
            raise ValueError(
                f"Trainer(gradient_clip_val={clip}) cannot work with MGPO under precision={trainer.precision!r}: "
                "MGPO unscales the GradScaler's gradients inside its step (it skips steps with inf/nan gradients "
                "without a host sync), so Lightning's mixed-precision plugin refuses to clip for it (under "
                "'16-mixed' it would clip the still-scaled gradients). Remove gradient_clip_val and let MGPO clip: "
                f"MGPO(..., max_grad_norm={clip}), the same global-norm clipping (torch's clip_grad_norm_ formula) on "
                "the unscaled gradients; there is no per-element ('value') equivalent."
            )
        self._warn_missing(trainer, pl_module, mgpos)

    @staticmethod
    def _warn_missing(trainer, pl_module, mgpos: List[MGPO]) -> None:
        trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        others = {id(p) for o in trainer.optimizers if find_mgpo(o) is None
                  for g in o.param_groups for p in g["params"]}
        params = dict(pl_module.named_parameters())
        missing = set(trainable)
        for m in mgpos:
            missing &= set(missing_trainable_parameters(pl_module, m))
        names = [n for n in trainable if n in missing and id(params[n]) not in others]
        if names:
            warnings.warn(describe_missing(names, len(trainable)), UserWarning, stacklevel=2)
