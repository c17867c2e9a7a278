"""Typed configuration: frozen dataclasses, loaded from YAML with `key=value` overrides.

One dataclass per concern (model shape, parallel layout, optimizer, data blend, training run).
PyYAML parses the files; everything else is plain dataclasses so a config can be read, printed and
compared. An unknown key anywhere is an error, never ignored.

    cfg = load_config("configs/stage1.yaml", ["optimizer.lr=1e-4", "train_steps=10"])
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer and of the vision input (docs/design.md "Model")."""

    preset: str = "tiny"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 172
    norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    vocab_size: int = 33031  # Mistral 32000 + SOLO special tokens, before padding
    # Unlike Megatron-LM (which pads to a multiple of this times TP) the padded vocabulary is the
    # same for every TP size, so a checkpoint reshards across TP and TP sizes give equal losses.
    make_vocab_size_divisible_by: int = 128
    patch_size: int = 32
    max_image_side: int = 1024
    max_position_embeddings: int = 32768
    init_method_std: float = 0.02
    # Sliding-window attention: a token attends to the last `attention_window_tokens` tokens of its
    # own document, itself included (HF Mistral's `sliding_window`; docs/design.md "Attention window").
    # None: full causal attention inside each document.
    attention_window_tokens: int | None = None

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return math.ceil(self.vocab_size / multiple) * multiple


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Mistral-7B-v0.1 (the paper's backbone).
    "mistral-7b": ModelConfig(
        preset="mistral-7b", num_layers=32, hidden_size=4096, num_attention_heads=32,
        num_query_groups=8, ffn_hidden_size=14336, attention_window_tokens=4096,
    ),
    # CPU tests and the demo: same structure (GQA, SwiGLU, RMSNorm, RoPE), tiny sizes.
    "tiny": ModelConfig(),
    "tiny-demo": ModelConfig(
        preset="tiny-demo", num_layers=4, hidden_size=128, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=344,
    ),
}


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 5e-5
    min_lr: float = 5e-6
    lr_warmup_steps: int = 200
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass(frozen=True)
class DataSource:
    """A folder of solo-preprocess shards and its fraction of the stage's samples."""

    name: str
    path: str
    fraction: float


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[DataSource, ...] = ()
    seq_length_tokens: int = 32768
    seed: int = 1234
    verify_checksums: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """One training stage."""

    stage: str = "stage1"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train_steps: int = 0  # 0: one epoch over the blend, derived from the shard manifests
    global_batch_size: int = 128
    micro_batch_size: int = 1
    precision: str = "bf16"  # bf16 on GPU; CPU runs always use fp32
    recompute_num_layers: int = 0  # full activation recompute of this many layers (0: off)
    init_from: str = ""  # previous stage's checkpoint dir, or a SOLO checkpoint from solo-convert
    save_dir: str = "runs/stage1"
    save_interval_steps: int = 50
    keep_checkpoints: int = 2
    log_interval_steps: int = 1
    nonfinite_loss: str = "stop"  # "stop" or "skip" the batch
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "solo-megatron"
    seed: int = 1234

    def validate(self) -> TrainConfig:
        p, m = self.parallel, self.model
        checks = [
            (self.precision in ("bf16", "fp32"), f"precision must be bf16 or fp32, got {self.precision!r}"),
            (self.nonfinite_loss in ("stop", "skip"), f"nonfinite_loss must be stop or skip, got {self.nonfinite_loss!r}"),
            (self.wandb_mode in ("offline", "online", "disabled"), f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}"),
            (self.global_batch_size > 0 and self.micro_batch_size > 0, "batch sizes must be positive"),
            (self.train_steps >= 0, f"train_steps must be >= 0, got {self.train_steps}"),
            (self.save_interval_steps > 0, f"save_interval_steps must be > 0, got {self.save_interval_steps}"),
            (self.optimizer.lr > 0 and 0 <= self.optimizer.min_lr <= self.optimizer.lr, "need 0 <= optimizer.min_lr <= optimizer.lr and lr > 0"),
            (min(p.tensor_parallel, p.pipeline_parallel, p.context_parallel) >= 1, "parallel sizes must be >= 1"),
            (m.num_attention_heads % p.tensor_parallel == 0, f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor_parallel={p.tensor_parallel}"),
            (m.num_query_groups % p.tensor_parallel == 0, f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tensor_parallel={p.tensor_parallel}"),
            (m.padded_vocab_size % p.tensor_parallel == 0, f"padded vocabulary {m.padded_vocab_size} is not divisible by parallel.tensor_parallel={p.tensor_parallel}"),
            (m.max_image_side % m.patch_size == 0, "model.max_image_side must be a multiple of model.patch_size"),
            (self.data.seq_length_tokens > 0, "data.seq_length_tokens must be positive"),
            (m.attention_window_tokens is None or m.attention_window_tokens >= 1,
             f"model.attention_window_tokens must be null (full causal) or >= 1, got {m.attention_window_tokens}"),
            (not p.sequence_parallel or p.tensor_parallel > 1, "parallel.sequence_parallel needs tensor_parallel > 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        fractions = [s.fraction for s in self.data.sources]
        if fractions and (min(fractions) <= 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)):
            raise ConfigError(f"data.sources fractions must be positive and sum to 1, got {fractions}")
        return self


def _build(cls, values: dict, where: str):
    """Instantiate dataclass `cls` from a dict, recursing into nested dataclasses."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    if typing.get_origin(hint) is types.UnionType:  # `int | None`: null, or a value of the type
        if value is None:
            return None
        [hint] = [h for h in typing.get_args(hint) if h is not type(None)]
    if dataclasses.is_dataclass(hint):
        if hint is ModelConfig:
            return _model_config(value, where)
        return _build(hint, value, where)
    if typing.get_origin(hint) is tuple:  # tuple[DataSource, ...]
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint in (int, float):
        try:
            number = hint(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (hint is int and float(value) != number):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
        return number
    if hint is str:
        return str(value)
    raise ConfigError(f"{where}: unsupported type {hint}")


def _model_config(value, where: str) -> ModelConfig:
    """`model: mistral-7b` or `model: {preset: tiny, num_layers: 4}`."""
    if isinstance(value, ModelConfig):
        return value
    if isinstance(value, str):
        value = {"preset": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a preset name or a mapping, got {value!r}")
    preset = value.get("preset", "tiny")
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"{where}.preset: unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}")
    base = dataclasses.asdict(MODEL_PRESETS[preset])
    base.update(value)
    return _build(ModelConfig, base, where)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    """`a.b.c=value`. A list of named entries is entered by name: `data.sources.slimpajama.fraction=0.2`."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            named = [e for e in node if isinstance(e, dict) and e.get("name") == key]
            if not named:
                raise ConfigError(f"override {dotted!r}: no entry named {key!r}; names: "
                                  f"{[e.get('name') for e in node if isinstance(e, dict)]}")
            node = named[0]
            continue
        if isinstance(node.get(key), str) and key == "model":
            node[key] = {"preset": node[key]}
        node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {key} is not a section")
    if isinstance(node, list):
        raise ConfigError(f"override {dotted!r}: {keys[-2]} is a list; set a field of one entry, "
                          f"e.g. {'.'.join(keys[:-1])}.<name>.{keys[-1]}=...")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw else ""))
    return parsed


def config_from_dict(tree: dict, overrides: list[str] = ()) -> TrainConfig:
    tree = dict(tree)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return _build(TrainConfig, tree, "").validate()


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return config_from_dict(tree, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
