"""MGPO with PyTorch Lightning 2.x (``lightning`` or ``pytorch_lightning``).

MGPO leaves the parameters at theta + eps between steps.  What Lightning does by itself (2.6, read in its sources):

* validation (the sanity check included), test and predict run on whatever the parameters hold: theta + eps;
* ``ModelCheckpoint`` / ``trainer.save_checkpoint`` build the checkpoint with ``lightning_module.state_dict()``
  (``_CheckpointConnector.dump_checkpoint``): theta + eps, with or without ``save_weights_only`` (callbacks'
  ``on_save_checkpoint`` is not even called for weights-only checkpoints);
* ``fit`` leaves the model at theta + eps;
* ``fit(ckpt_path=...)`` loads the model weights, builds the optimizer, then loads its state.

``MGPOCallback`` puts theta wherever the model is evaluated or saved: ``eval()`` at the start of each
validation/test/predict loop and the previous mode back at its end; ``eval()`` in a ``state_dict`` pre-hook of the
LightningModule, so every checkpoint (and any other ``state_dict()`` during a trainer call) holds theta, the
perturbation being re-applied at the next training batch; ``eval()`` at the end of ``fit`` (also when ``fit``
stops on an exception).  A checkpoint is then "model at theta, optimizer state": loading it continues the run.

Usage::

    from mgpo_kernels.integrations.lightning import MGPOCallback
    trainer = Trainer(..., callbacks=[MGPOCallback()])   # configure_optimizers returns an MGPO

The class subclasses the ``Callback`` of every Lightning package installed (``lightning.pytorch`` and
``pytorch_lightning`` are distinct packages with distinct base classes), so one class serves either ``Trainer``.
"""
from __future__ import annotations

import importlib
import warnings
import weakref
from typing import Dict, List, Tuple

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


#: strategies MGPO cannot be exact under: DeepSpeed hands the optimizer flat fp32 partitions of the master weights
#: (per-rank norms, eval()/train() not reaching the model's weights); Lightning's FSDPStrategy is FSDP1, whose
#: ``use_orig_params`` parameters are plain tensors holding per-rank slices (per-rank norms, undetectable by MGPO).
_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": "DeepSpeed hands the optimizer flat partitions of its fp32 master weights",
    "FSDPStrategy": "FSDP1 hands the optimizer per-rank slices of the parameters as plain tensors",
}


class MGPOCallback(*_callback_bases()):
    """Evaluation, checkpoints and the weights after ``fit`` at theta; resume continues the run (see module doc).

    ``on_fit_start`` also refuses settings MGPO cannot be right with (gradient clipping by Lightning under a
    GradScaler, DeepSpeed, FSDP1) and warns when the MGPOs hold none or only part of the trainable parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self._known: "weakref.WeakSet[MGPO]" = weakref.WeakSet()  # the last fit's MGPOs, for a later validate()
        self._modes: Dict[str, List[Tuple[MGPO, bool]]] = {}
        self._hook = None

    # ------------------------------------------------------------------ finding the optimizers
    def _mgpos(self, trainer) -> List[MGPO]:
        """The trainer's MGPOs; in a trainer call without optimizers (``validate`` etc. on a new Trainer), those of
        this callback's last ``fit`` that hold parameters of the module."""
        found = [m for m in (find_mgpo(o) for o in trainer.optimizers) if m is not None]
        if found or not self._known:
            return found
        module = trainer.lightning_module
        ids = {id(p) for p in module.parameters()} if module is not None else set()
        return [m for m in self._known if any(id(p) in ids for g in m.param_groups for p in g["params"])]

    # ------------------------------------------------------------------ state_dict: theta in every checkpoint
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.teardown(trainer, pl_module, stage)
        self._hook = pl_module.register_state_dict_pre_hook(lambda *_: self._unperturb(trainer))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _unperturb(self, trainer) -> None:
        for m in self._mgpos(trainer):
            m.eval()

    # ------------------------------------------------------------------ fit
    def on_fit_start(self, trainer, pl_module) -> None:
        mgpos = self._mgpos(trainer)
        self._known = weakref.WeakSet(mgpos)
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

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # every micro-batch's forward/backward at theta + eps, also after a checkpoint or validation left theta
        for m in self._mgpos(trainer):
            m.train()

    def on_train_end(self, trainer, pl_module) -> None:
        self._unperturb(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        # also when the fit loop is skipped (resumed at max_steps): the optimizer's load re-applied eps
        self._unperturb(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._unperturb(trainer)

    # ------------------------------------------------------------------ evaluation loops
    def _enter(self, trainer, stage: str) -> None:
        mgpos = self._mgpos(trainer)
        self._modes[stage] = [(m, m.training) for m in mgpos]
        for m in mgpos:
            m.eval()

    def _leave(self, stage: str) -> None:
        for m, was_training in self._modes.pop(stage, []):
            m.train(was_training)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._enter(trainer, "validate")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._leave("validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._enter(trainer, "test")

    def on_test_end(self, trainer, pl_module) -> None:
        self._leave("test")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._enter(trainer, "predict")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._leave("predict")
