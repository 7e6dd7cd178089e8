"""Callbacks shaped like transformers' ``TrainerCallback``: each event is called as
``callback.on_<event>(args, state, control, **kwargs)`` with the trainer's config as ``args``, a ``TrainerState``
and a ``TrainerControl`` the callback may set (``should_training_stop``, ``should_save``, ``should_evaluate``).

Events: on_train_begin, on_step_end, on_log (kwargs ``logs``), on_evaluate (kwargs ``metrics``), on_save,
on_train_end. A callback implements only the events it cares about; a transformers ``TrainerCallback`` that uses
only these events and fields works unchanged.
"""
from dataclasses import dataclass, field
from typing import List, Optional

EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")


@dataclass
class TrainerState:
    """What the loop knows about the run (transformers' field names)."""
    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    num_train_epochs: float = 0.0
    log_history: List[dict] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_model_checkpoint: Optional[str] = None
    is_world_process_zero: bool = True
    is_local_process_zero: bool = True


@dataclass
class TrainerControl:
    """Flags a callback sets to steer the loop; the loop acts on them and resets the per-step ones."""
    should_training_stop: bool = False
    should_evaluate: bool = False
    should_save: bool = False
    should_log: bool = False

    def _new_step(self):
        self.should_evaluate = self.should_save = self.should_log = False


class TrainerCallback:
    """Base class: every event does nothing. Subclass it and override the events you need."""

    def on_train_begin(self, args, state, control, **kwargs):
        pass

    def on_step_end(self, args, state, control, **kwargs):
        pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        pass

    def on_save(self, args, state, control, **kwargs):
        pass

    def on_train_end(self, args, state, control, **kwargs):
        pass


class CallbackHandler:
    """Calls every callback's event in order. Callbacks may be instances or classes (instantiated with no
    arguments, as transformers does); objects without a given event are skipped for it."""

    def __init__(self, callbacks=None):
        self.callbacks = []
        for cb in callbacks or []:
            self.add_callback(cb)

    def add_callback(self, callback):
        cb = callback() if isinstance(callback, type) else callback
        if not any(callable(getattr(cb, e, None)) for e in EVENTS):
            raise TypeError(f"callback {type(cb).__name__} has none of the events {', '.join(EVENTS)}")
        self.callbacks.append(cb)

    def call(self, event, args, state, control, **kwargs):
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                result = fn(args, state, control, **kwargs)
                if isinstance(result, TrainerControl):  # transformers lets an event return the control
                    control = result
        return control


def metric_value(metrics, name):
    """The metric called ``name`` in an evaluation's results, with or without the ``eval_`` prefix."""
    for key in (name, name if name.startswith("eval_") else f"eval_{name}"):
        if key in metrics:
            return metrics[key]
    return None


class EarlyStoppingCallback(TrainerCallback):
    """Stop training when the evaluation metric has not improved for ``early_stopping_patience`` evaluations
    in a row (transformers' semantics). Improvement means better than the best so far by more than
    ``early_stopping_threshold``. The metric is ``metric_for_best_model`` (here or in the config; default
    ``eval_loss``), with or without the ``eval_`` prefix; ``greater_is_better`` defaults to False for names
    ending in ``loss`` and True otherwise."""

    def __init__(self, early_stopping_patience=1, early_stopping_threshold=0.0, metric_for_best_model=None,
                 greater_is_better=None):
        if isinstance(early_stopping_patience, bool) or not isinstance(early_stopping_patience, int) \
                or early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be an integer >= 1, got {early_stopping_patience!r}")
        if not early_stopping_threshold >= 0:
            raise ValueError(f"early_stopping_threshold must be >= 0, got {early_stopping_threshold!r}")
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        self.metric_for_best_model = metric_for_best_model
        self.greater_is_better = greater_is_better
        self.patience_counter = 0

    def _metric_and_direction(self, args):
        name = self.metric_for_best_model or getattr(args, "metric_for_best_model", None) or "eval_loss"
        greater = self.greater_is_better
        if greater is None:
            greater = getattr(args, "greater_is_better", None)
        if greater is None:
            greater = not name.endswith("loss")
        return name, greater

    def on_train_begin(self, args, state, control, **kwargs):
        self.patience_counter = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name, greater = self._metric_and_direction(args)
        value = metric_value(metrics or {}, name)
        if value is None:
            raise KeyError(f"EarlyStoppingCallback: metric_for_best_model {name!r} is not among the evaluation "
                           f"metrics: {', '.join(sorted(metrics or {}))}")
        best = state.best_metric
        improved = best is None or (value - best > self.early_stopping_threshold if greater
                                    else best - value > self.early_stopping_threshold)
        if improved:
            state.best_metric = value
            self.patience_counter = 0
        else:
            self.patience_counter += 1
        if self.patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True


__all__ = ["TrainerState", "TrainerControl", "TrainerCallback", "CallbackHandler", "EarlyStoppingCallback", "EVENTS"]
