"""Training configs: dataclasses with TRL-style names, validated when built (bad values fail before any work)."""
import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Union

from fastalign.losses import DPO_LOSS_TYPES

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
REPORT_TO = ("none", "jsonl", "tensorboard")
PREFERENCE_LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo")


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


@dataclass
class TrainConfig:
    output_dir: str = "runs/fastalign"
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    max_prompt_length: int = 256
    max_steps: int = -1
    num_train_epochs: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    padding_free: bool = False
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: Optional[int] = None
    eval_steps: int = 0
    seed: int = 42
    report_to: Union[str, List[str]] = "jsonl"
    resume_from_checkpoint: Optional[str] = None
    backend: str = "auto"
    deterministic: bool = False
    fsdp: bool = False
    disable_tqdm: bool = False
    check_model: bool = field(default=True, metadata={"help": "before training, check on a few probe rows that the "
                              "fused path reproduces the model's own log-probs, and refuse the model if not"})

    def __post_init__(self):
        self.validate()

    def validate(self):
        _int("per_device_train_batch_size", self.per_device_train_batch_size, 1)
        _int("per_device_eval_batch_size", self.per_device_eval_batch_size, 1)
        _int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _int("max_length", self.max_length, 2)
        _int("max_prompt_length", self.max_prompt_length, 1)
        if self.max_prompt_length >= self.max_length:
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
        if self.backend not in ("auto", "triton", "cpp", "torch"):
            raise ConfigError(f"unknown backend {self.backend!r}; valid: auto, triton, cpp, torch")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError(f"output_dir must be a non-empty path, got {self.output_dir!r}")

    @property
    def reports(self):
        return [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)

    @classmethod
    def from_dict(cls, d):
        """Build from a dict (YAML/CLI); unknown keys are an error that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(names))}")
        return cls(**d)

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclass
class DPOConfig(TrainConfig):
    """DPO and its family. loss_type: sigmoid, robust, hinge, ipo (with a reference), simpo, orpo
    (reference-free). For orpo, beta is ORPO's lambda (as in TRL); for simpo, simpo_gamma is the margin."""
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = None
    simpo_gamma: float = 0.5
    precompute_ref_log_probs: bool = False
    ref_cache_dir: Optional[str] = None

    def validate(self):
        super().validate()
        _num("beta", self.beta, 0, low_open=True)
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

    @property
    def uses_reference(self):
        return self.loss_type in DPO_LOSS_TYPES


@dataclass
class RewardConfig(TrainConfig):
    """Bradley-Terry reward model; rows may carry a per-pair `weight` (the weighted MLE)."""
    learning_rate: float = 1e-5


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations: mean token NLL (forward KL to the data)."""
    learning_rate: float = 2e-5


CONFIGS = {"dpo": DPOConfig, "rm": RewardConfig, "sft": SFTConfig}


def config_fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


__all__ = ["TrainConfig", "DPOConfig", "RewardConfig", "SFTConfig", "ConfigError", "CONFIGS", "config_fields",
           "field"]
