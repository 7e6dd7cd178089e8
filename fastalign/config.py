"""Training configs: dataclasses with TRL-style names, validated when built (bad values fail before any work)."""
import dataclasses
import json
import importlib.util
import numbers
import os
from dataclasses import dataclass, field
from typing import List, Optional, Union

from fastalign.losses import DPO_LOSS_TYPES

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REPORT_TO = ("none", "jsonl", "tensorboard", "wandb", "mlflow")
EVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch")
TRUNCATION_MODES = ("keep_start", "keep_end")
BACKENDS = ("auto", "triton", "cpp", "torch")
PREFERENCE_LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo")


def _f(default, help, choices=None):
    """A config field whose metadata documents it: help text and, for a closed set of values, the choices."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A training option has a bad value; the message names the option, the value and what is expected."""


def _int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")


def _num(name, v, low=None, high=None, low_open=False, high_open=False):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
        raise ConfigError(f"{name} must be a number, got {v!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ConfigError(f"{name} must be {'>' if low_open else '>='} {low}, got {v!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ConfigError(f"{name} must be {'<' if high_open else '<='} {high}, got {v!r}")


def _float_fields(cls):
    return {f.name for f in dataclasses.fields(cls) if f.type in (float, Optional[float])}


def _number_from_text(v):
    """A number written as text in a YAML file: PyYAML reads 1e-3 (no dot) as the string '1e-3'."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v  # the field's check says what was expected
    return v


def _validate_clone_robust(cfg):
    if not isinstance(cfg.clone_robust, bool):
        raise ConfigError(f"clone_robust must be true or false, got {cfg.clone_robust!r}")
    if cfg.clone_robust_group_by not in ("prompt", "none"):
        raise ConfigError(f"clone_robust_group_by must be 'prompt' or 'none', got {cfg.clone_robust_group_by!r}")
    if cfg.clone_robust_dim is not None:
        _int("clone_robust_dim", cfg.clone_robust_dim, 1)
    _int("clone_robust_num_samples", cfg.clone_robust_num_samples, 1)
    enc = cfg.clone_robust_encoder
    if not (enc is None or enc in ("model", "ngram") or callable(enc) or (isinstance(enc, str) and os.path.isdir(enc))):
        raise ConfigError(f"clone_robust_encoder must be 'model' (default), 'ngram', a local sentence-transformers "
                          f"folder or a callable, got {enc!r} (not a directory)")


@dataclass
class TrainConfig:
    """Options every trainer shares. Names, meanings and defaults follow transformers' TrainingArguments and TRL's
    configs where they have the option; each field's ``metadata["help"]`` (and ``"choices"``) is its documentation
    and the CLI's ``--help``."""
    output_dir: str = _f("runs/fastalign", "folder for checkpoints, metrics and the final model")
    learning_rate: float = _f(1e-6, "peak learning rate of AdamW")
    lr_scheduler_type: str = _f("linear", "learning-rate schedule after warmup", SCHEDULERS)
    warmup_ratio: float = _f(0.0, "fraction of the total steps spent warming the learning rate up from 0, in [0, 1)")
    warmup_steps: int = _f(0, "warmup steps; when > 0 it overrides warmup_ratio (as in transformers)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: Optional[float] = _f(1.0, "clip the gradient norm to this value (None: no clipping)")
    per_device_train_batch_size: int = _f(8, "training pairs (or demonstrations) per process per micro-step")
    per_device_eval_batch_size: int = _f(8, "evaluation rows per process per batch")
    gradient_accumulation_steps: int = _f(1, "micro-steps accumulated into one optimizer step")
    max_length: int = _f(512, "maximum tokens of prompt + answer")
    max_prompt_length: Optional[int] = _f(None, "maximum prompt tokens (the prompt is truncated first, see "
                                          "truncation_mode); None: half of max_length")
    max_completion_length: Optional[int] = _f(None, "maximum answer tokens (None: whatever max_length leaves)")
    truncation_mode: str = _f("keep_start", "what survives when prompt + answer exceed max_length (after the prompt "
                              "is cut to its last max_prompt_length tokens): keep_start keeps the sequence's start "
                              "(answers lose their ends; TRL's default), keep_end its end (the prompt loses its "
                              "start first)", TRUNCATION_MODES)
    max_steps: int = _f(-1, "optimizer steps to train (-1: use num_train_epochs)")
    num_train_epochs: float = _f(1.0, "epochs to train when max_steps is -1 (may be fractional)")
    bf16: bool = _f(False, "bfloat16 autocast for forward and backward (weights stay fp32)")
    fp16: bool = _f(False, "float16 autocast with a gradient scaler (CUDA only: CPU refuses it)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    padding_free: bool = _f(False, "pack sequences into rows without padding (position ids restart per sequence)")
    disable_dropout: bool = _f(True, "set every dropout probability of the policy and reference to 0 (as TRL)")
    logging_steps: int = _f(10, "log the mean of the metrics over this many optimizer steps")
    save_steps: int = _f(0, "save a checkpoint every this many steps (0: only at the last step)")
    save_total_limit: Optional[int] = _f(None, "keep at most this many checkpoints, deleting the oldest")
    eval_strategy: Optional[str] = _f(None, "when to evaluate on eval_dataset: no, every eval_steps (steps), at the "
                                      "end of each epoch (epoch); None: steps when eval_steps > 0, else no",
                                      EVAL_STRATEGIES)
    eval_steps: int = _f(0, "evaluate every this many steps (with eval_strategy='steps'; 0: logging_steps)")
    metric_for_best_model: Optional[str] = _f(None, "evaluation metric that early stopping watches, with or "
                                              "without the eval_ prefix (default: eval_loss)")
    greater_is_better: Optional[bool] = _f(None, "whether a larger metric_for_best_model is better (default: False "
                                           "for names ending in loss, else True)")
    seed: int = _f(42, "seed of the model's randomness and of the data order")
    run_name: Optional[str] = _f(None, "a name for the run in the trackers (default: the output_dir's name)")
    report_to: Union[str, List[str]] = _f("jsonl", "where metrics go: the metrics file in output_dir (jsonl; "
                                          "written unless none is given), plus tensorboard, wandb, mlflow (when "
                                          "installed); None: jsonl only", REPORT_TO)
    resume_from_checkpoint: Optional[str] = _f(None, "checkpoint folder to resume from, or 'latest'")
    backend: str = _f("auto", "backend of the fused log-prob op (auto: triton on CUDA, cpp on CPU)", BACKENDS)
    deterministic: bool = _f(False, "bitwise reproducible gradients (never the atomic triton backward)")
    fsdp: bool = _f(False, "shard the model with FSDP2 under torchrun (else DDP)")
    disable_tqdm: bool = _f(False, "no progress bars")
    # output folder and resume (transformers' names): see README "Output folders, checkpoints and resume"
    overwrite_output_dir: bool = _f(False, "start over in an output_dir that holds another run (deletes its "
                                    "checkpoints, metrics and final model)")
    allow_config_change: bool = _f(False, "resume even though options that change the trajectory differ from the "
                                   "checkpoint's (the differences are logged)")
    save_strategy: str = _f("steps", "when to save checkpoints: never (no), every save_steps steps (steps), at each "
                            "epoch's end (epoch); steps and epoch also save at the last step", SAVE_STRATEGIES)
    check_model: bool = _f(True, "before training, check on a few probe rows that the fused path reproduces the "
                           "model's own log-probs, and refuse the model if not")
    grad_in_forward: str = _f("auto", "compute the loss's gradient in its forward pass (3 GEMMs for the lm_head "
                              "instead of 4; fastalign.fused_grad): on, off, or auto (on for CPU training)",
                              ("auto", "on", "off"))
    loss_chunk_rows: Optional[int] = _f(None, "rows per chunk of the gradient-in-forward loss (None: 16M logits per "
                                        "chunk, 512 rows at V=32000); fewer rows use less memory and more time "
                                        "(fp32 on an AVX-512 CPU: <= 128 rows take the fused thin-chunk pass; "
                                        "AVX2: <= 64)")

    def __post_init__(self):
        if self.report_to is None:  # transformers' None: no trackers; the metrics file stays (read_metrics needs it)
            self.report_to = "jsonl"
        self.validate()

    def validate(self):
        _int("per_device_train_batch_size", self.per_device_train_batch_size, 1)
        _int("per_device_eval_batch_size", self.per_device_eval_batch_size, 1)
        _int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _int("max_length", self.max_length, 2)
        if self.max_prompt_length is not None:
            _int("max_prompt_length", self.max_prompt_length, 1)
        if self.resolved_max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length "
                              f"({self.max_length}) so that every answer keeps at least one token")
        _num("learning_rate", self.learning_rate, 0, low_open=True)
        _num("warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        _num("weight_decay", self.weight_decay, 0)
        if self.max_grad_norm is not None:
            _num("max_grad_norm", self.max_grad_norm, 0, low_open=True)
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ConfigError(f"unknown lr_scheduler_type {self.lr_scheduler_type!r}; valid: {', '.join(SCHEDULERS)}")
        _int("max_steps", self.max_steps, -1)
        if self.max_steps == 0:
            raise ConfigError("max_steps must be a positive number of steps, or -1 to use num_train_epochs")
        _num("num_train_epochs", self.num_train_epochs, 0, low_open=True)
        _int("logging_steps", self.logging_steps, 1)
        _int("save_steps", self.save_steps, 0)
        _int("eval_steps", self.eval_steps, 0)
        if self.save_total_limit is not None:
            _int("save_total_limit", self.save_total_limit, 1)
        _int("seed", self.seed, 0)
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        bad = [r for r in reports if r not in REPORT_TO]
        if bad:
            raise ConfigError(f"unknown report_to {bad}; valid: {', '.join(REPORT_TO)}")
        for tracker in ("wandb", "mlflow"):
            if tracker in reports and importlib.util.find_spec(tracker) is None:
                raise ConfigError(f"report_to includes {tracker!r} but {tracker} is not installed "
                                  f"(pip install {tracker}), or drop it from report_to")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.grad_in_forward not in ("auto", "on", "off"):
            raise ConfigError(f"unknown grad_in_forward {self.grad_in_forward!r}; valid: auto, on, off")
        _int("warmup_steps", self.warmup_steps, 0)
        if self.loss_chunk_rows is not None:
            _int("loss_chunk_rows", self.loss_chunk_rows, 1)
        if self.max_completion_length is not None:
            _int("max_completion_length", self.max_completion_length, 1)
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(f"unknown truncation_mode {self.truncation_mode!r}; valid: {', '.join(TRUNCATION_MODES)}")
        if self.eval_strategy is not None and self.eval_strategy not in EVAL_STRATEGIES:
            raise ConfigError(f"unknown eval_strategy {self.eval_strategy!r}; valid: {', '.join(EVAL_STRATEGIES)}")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both true: choose one mixed-precision dtype")
        if self.run_name is not None and not isinstance(self.run_name, str):
            raise ConfigError(f"run_name must be a string, got {self.run_name!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        if self.save_strategy not in SAVE_STRATEGIES:
            raise ConfigError(f"unknown save_strategy {self.save_strategy!r}; valid: {', '.join(SAVE_STRATEGIES)}")
        for name in ("overwrite_output_dir", "allow_config_change"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def reports(self):
        return [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)

    @property
    def resolved_eval_strategy(self):
        """eval_strategy with None resolved: 'steps' when eval_steps > 0, else 'no'."""
        if self.eval_strategy is None:
            return "steps" if self.eval_steps else "no"
        return self.eval_strategy

    @property
    def resolved_max_prompt_length(self):
        """max_prompt_length, or half of max_length when None (TRL 1.x has no such field; half is TRL 0.x's
        default ratio, 512 of 1024)."""
        return self.max_length // 2 if self.max_prompt_length is None else self.max_prompt_length

    @property
    def resolved_eval_steps(self):
        """Steps between evaluations under eval_strategy='steps' (eval_steps, or logging_steps when 0)."""
        return self.eval_steps or self.logging_steps

    def warmup_steps_for(self, total_steps):
        """warmup_steps when > 0, else warmup_ratio of the total (transformers' rule)."""
        return self.warmup_steps if self.warmup_steps > 0 else int(self.warmup_ratio * total_steps)

    @classmethod
    def from_dict(cls, d):
        """Build from a dict (YAML/CLI); unknown keys are an error that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(names))}")
        floats = _float_fields(cls)
        return cls(**{k: _number_from_text(v) if k in floats else v for k, v in d.items()})

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json_dict(self):
        """to_dict() with values JSON cannot hold (a callable encoder) named by their qualified name, stable run to run."""
        def name(o):
            return f"<{getattr(o, '__module__', '?')}.{getattr(o, '__qualname__', type(o).__name__)}>"
        return json.loads(json.dumps(self.to_dict(), default=name))


@dataclass
class CloneRobustOptions:
    """Clone-robust weights (Clone-Robust AI Alignment): each training pair weighs w(chosen) * w(rejected), the
    Voronoi weights of its answers among their prompt's answers; see fastalign/clone_robust_train.py."""
    clone_robust: bool = _f(False, "weight each pair by w(chosen) * w(rejected), the answers' Voronoi weights "
                            "(Clone-Robust AI Alignment), computed before training")
    clone_robust_encoder: Optional[str] = _f(None, "answer embeddings for the weights: None/'model' (the model's own "
                                             "final hidden state), 'ngram', a local sentence-transformers folder, "
                                             "or a callable")
    clone_robust_group_by: str = _f("prompt", "weights computed among each prompt's answers (prompt) or over the "
                                    "whole dataset (none)", ("prompt", "none"))
    clone_robust_dim: Optional[int] = _f(8, "project embeddings onto this many principal components first (None: "
                                         "raw embeddings)")
    clone_robust_num_samples: int = _f(100_000, "uniform samples per group for the Voronoi cell estimate")
    clone_robust_cache_dir: Optional[str] = _f(None, "folder of the weights cache (default: "
                                               "output_dir/clone_robust_cache)")


@dataclass
class DPOConfig(CloneRobustOptions, TrainConfig):
    """DPO and its family. loss_type: sigmoid, robust, hinge, ipo (with a reference), simpo, orpo
    (reference-free). For orpo, beta is ORPO's lambda (as in TRL); for simpo, simpo_gamma is the margin."""
    beta: float = _f(0.1, "strength of the KL regularization (for orpo: ORPO's lambda, as in TRL)")
    loss_type: str = _f("sigmoid", "preference loss", PREFERENCE_LOSS_TYPES)
    label_smoothing: float = _f(0.0, "assumed label noise in [0, 0.5): cDPO / robust DPO (sigmoid, robust, simpo)")
    rpo_alpha: Optional[float] = _f(None, "weight of RPO's NLL term on the chosen answers (None: off)")
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin gamma")
    precompute_ref_log_probs: bool = _f(False, "compute the reference log-probs once before training and cache "
                                        "them on disk (no reference model held while training)")
    ref_cache_dir: Optional[str] = _f(None, "folder of the reference log-prob cache (default: output_dir/ref_cache)")
    group_column: Optional[str] = _f("behaviour", "the data column naming each pair's group (behaviour): per-group "
                                     "metrics groups/<g>/... and eval_groups/<g>/... (None: off)")

    def validate(self):
        super().validate()
        _num("beta", self.beta, 0, low_open=True)
        if isinstance(self.loss_type, (list, tuple)):  # TRL 1.x spells one loss as a list of one
            if [str(x) for x in self.loss_type] == ["sigmoid", "sft"]:
                raise ConfigError("loss_type ['sigmoid', 'sft'] with loss_weights [1, a] is RPO: here "
                                  "loss_type='sigmoid', rpo_alpha=a")
            if len(self.loss_type) != 1:
                raise ConfigError(f"loss_type {list(self.loss_type)!r}: fastalign trains one preference loss at a time "
                                  "(TRL's weighted mixture of several, with loss_weights, is not supported); give one "
                                  f"of {', '.join(PREFERENCE_LOSS_TYPES)}")
            self.loss_type = self.loss_type[0]
        if self.loss_type not in PREFERENCE_LOSS_TYPES:
            raise ConfigError(f"unknown loss_type {self.loss_type!r}; valid: {', '.join(PREFERENCE_LOSS_TYPES)}")
        _num("label_smoothing", self.label_smoothing, 0, 0.5, high_open=True)
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust", "simpo"):
            raise ConfigError(f"label_smoothing has no meaning for loss_type={self.loss_type!r}")
        if self.rpo_alpha is not None:
            _num("rpo_alpha", self.rpo_alpha, 0, low_open=True)
            if self.loss_type in ("simpo", "orpo"):
                raise ConfigError(f"rpo_alpha adds an NLL term to the DPO losses, not to {self.loss_type!r}")
        _num("simpo_gamma", self.simpo_gamma)
        if self.precompute_ref_log_probs and self.loss_type in ("simpo", "orpo"):
            raise ConfigError(f"loss_type={self.loss_type!r} uses no reference model: "
                              "precompute_ref_log_probs does not apply")
        _validate_clone_robust(self)
        if self.group_column is not None and (not isinstance(self.group_column, str) or not self.group_column):
            raise ConfigError(f"group_column must be a column name or None, got {self.group_column!r}")

    @property
    def uses_reference(self):
        return self.loss_type in DPO_LOSS_TYPES


@dataclass
class RewardConfig(CloneRobustOptions, TrainConfig):
    """Bradley-Terry reward model; rows may carry a per-pair `weight` (the weighted MLE)."""
    learning_rate: float = _f(1e-5, "peak learning rate of AdamW")

    def validate(self):
        super().validate()
        _validate_clone_robust(self)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations: mean token NLL (forward KL to the data)."""
    learning_rate: float = _f(2e-5, "peak learning rate of AdamW")


CONFIGS = {"dpo": DPOConfig, "rm": RewardConfig, "sft": SFTConfig}


def config_fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


__all__ = ["TrainConfig", "DPOConfig", "RewardConfig", "SFTConfig", "ConfigError", "CONFIGS", "config_fields",
           "field"]
