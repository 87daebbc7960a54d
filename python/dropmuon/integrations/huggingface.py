"""DropMuon with Hugging Face ``transformers.Trainer``: a callback that keeps truncation working
under activation checkpointing, feeds ``epoch_shift`` its progress, and logs the cutoff.

    from dropmuon.integrations import DropMuonCallback

    optimizer = dropmuon.DropMuon(model, lr=0.02, fallback="adamw", sampling="epoch_shift")
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=(optimizer, None), callbacks=[DropMuonCallback()])
    trainer.train()                       # resume_from_checkpoint=... resumes the cutoff sequence

What it does at the start of training (before any forward):

- **Activation checkpointing** (``TrainingArguments(activation_checkpointing=True)`` or
  ``model.activation_checkpointing_enable()``): transformers then calls
  ``enable_input_require_grads()`` for models that take ``input_ids``, which makes the
  embeddings' output require grad. The backward would then run through every frozen layer and
  truncation would save nothing (DropMuon's ``TruncationDefeatedWarning``). That hook is needed
  only by reentrant checkpointing with frozen inputs; the callback makes checkpointing
  non-reentrant (transformers' default) and removes the hook.
- **epoch_shift** without ``total_steps``: the progress is ``global_step / max_steps`` at every
  step.
- **Logging**: each log line gains ``dropmuon/cutoff`` (the coming step's) and, with
  ``log_update_counts``, ``dropmuon/updates/<layer>`` per layer, in the Trainer's
  ``state.log_history`` and for the callbacks after this one. The Trainer runs its reporting
  callbacks (TensorBoard, W&B, ...) before the ones passed to it; to have them report these
  values too, put the callback first: ``DropMuonCallback().attach(trainer)`` instead of
  ``callbacks=[...]``.

The tied GPT-2 ``lm_head`` shares its weight with the token embedding ``wte``: DropMuon's
partition gives a tied parameter to the first module that registers it, the embedding, so the
head's weight is updated only at steps whose cutoff reaches the embedding (the input side). It
has to be so: updating it at every step would mean computing the embedding's gradient at every
step, that is, backpropagating through the whole network, which is what truncation avoids.
"""

from __future__ import annotations

from transformers import TrainerCallback

from ..layers.sampling import LayerSampler
from ..optimizer import DropMuon


def find_dropmuon(optimizer) -> DropMuon | None:
    """The DropMuon inside ``optimizer`` (itself, or wrapped by accelerate's
    ``AcceleratedOptimizer`` and the like, through ``.optimizer``)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, DropMuon):
            return optimizer
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


def keep_truncation(model) -> bool:
    """Makes the model's activation checkpointing non-reentrant and removes transformers'
    input-requires-grad hook; True when something was changed."""
    changed = False
    reentrant = any(
        getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", {}).get(
            "use_reentrant", False
        )
        for module in model.modules()
    )
    if reentrant and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
        changed = True
    hooks = getattr(model, "_require_grads_hooks", None) or getattr(
        model, "_require_grads_hook", None
    )
    if hooks and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
        changed = True
    return changed


class DropMuonCallback(TrainerCallback):
    """See the module docstring. ``log_update_counts`` adds each layer's update count to the
    logs; ``cutoffs`` records the cutoff of every optimizer step this callback saw (for
    inspection and tests)."""

    def __init__(self, log_update_counts: bool = True) -> None:
        self.log_update_counts = log_update_counts
        self.optimizer: DropMuon | None = None
        self.cutoffs: list[int] = []

    def attach(self, trainer) -> DropMuonCallback:
        """Adds this callback to ``trainer`` ahead of all others (its logging reporters too)."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer = find_dropmuon(optimizer)
        if self.optimizer is None:
            raise TypeError(
                "DropMuonCallback needs the Trainer's optimizer to be a dropmuon.DropMuon: pass "
                "optimizers=(dropmuon.DropMuon(model, ...), scheduler) to Trainer"
            )
        if model is not None:
            keep_truncation(model)

    def on_step_begin(self, args, state, control, **kwargs):
        opt = self.optimizer
        if opt is None:
            return
        sampler = opt.sampler
        if (
            isinstance(sampler, LayerSampler)
            and sampler.kind == "epoch_shift"
            and sampler.total_steps is None
            and state.max_steps
        ):
            opt.set_progress(min(1.0, state.global_step / state.max_steps))
        self.cutoffs.append(opt.cutoff)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.optimizer is None or logs is None:
            return
        values = {"dropmuon/cutoff": self.optimizer.cutoff}
        if self.log_update_counts:
            for name, count in zip(self.optimizer.layer_names(), self.optimizer.update_counts):
                values[f"dropmuon/updates/{name}"] = count
        logs.update(values)
        if state.log_history:  # the Trainer recorded this line before calling back
            state.log_history[-1].update(values)
