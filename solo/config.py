"""Typed configuration: frozen dataclasses, loaded from YAML with `key=value` overrides.

One dataclass per concern (model shape, parallel layout, optimizer, data blend, training run).
PyYAML parses the files; everything else is plain dataclasses so a config can be read, printed and
compared. An unknown key anywhere is an error, never ignored.

    cfg = load_config("configs/stage1.yaml", ["optimizer.lr=1e-4", "train_steps=10"])
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from solo.templates import TEMPLATES
from solo.tokenizer import VOCAB_SIZE


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
    vocab_size: int = VOCAB_SIZE  # Mistral sentencepiece + SOLO special tokens, before padding
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
    # A shard folder whose manifest.json says `complete: false` (solo-preprocess stopped before its
    # last shard) is refused unless this is true; then its complete shards are used.
    allow_incomplete: bool = False
    # The template the stage's supervised (sft) shards are laid out in (solo.templates); every sft
    # shard must say the same in its manifest. "plain": the stage has no supervised data.
    template: str = "plain"
    # Processes that read, decode and collate the next steps (solo.data.loader); 0: the read-ahead
    # thread does it. null: the rank's share of the node's cores less one, at most 8.
    loader_workers: int | None = None
    # Validation data (held out of training: solo-preprocess --holdout-fraction writes
    # <output>/heldout; any shard folder will do), blended by the fractions as `sources` are.
    # Evaluated every `eval_interval_steps` on the first `eval_samples` samples of its blend.
    eval_sources: tuple[DataSource, ...] = ()


@dataclass(frozen=True)
class ProbeConfig:
    """Greedy generation on held-out labelled images during training (`solo.probe`): does the model see?"""

    # A folder of `solo-preprocess imagenet` shards (documents `<s> IMAGE name</s>`) kept out of
    # training; "": no probe.
    path: str = ""
    interval_steps: int = 0  # probe every this many steps, and after the last; 0: never
    images: int = 64  # the first this many image documents of the folder (bounds the probe's cost)
    max_new_tokens: int = 8  # generated tokens per image at most (bounds it too)
    # exact: the generated text is the label (stage 1, class names); contains: the text names the
    # label as a word, any case (a caption that names the labelled object, stages 2-3).
    match: str = "exact"
    template: str = "plain"  # the prompt layout (solo.templates); plain: the image alone, as in pretraining
    prompt: str = ""  # text after the image (plain) or the user turn (solo-inst, chatml)


@dataclass(frozen=True)
class TrainConfig:
    """One training stage."""

    stage: str = "stage1"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train_steps: int = 0  # 0: one epoch over the blend, derived from the shard manifests
    global_batch_size: int = 128
    micro_batch_size: int = 1
    precision: str = "bf16"  # bf16 on GPU; CPU runs always use fp32
    # Activation recomputation, megatron-core's TransformerConfig names. full: every recomputed layer
    # keeps only its input; uniform: chunks of recompute_num_layers layers, each chunk's input kept,
    # all layers recomputed; block: the first recompute_num_layers layers of each pipeline stage.
    # selective: only core attention is recomputed (recompute_num_layers stays 0).
    recompute_granularity: str = "none"  # none | full | selective
    recompute_method: str = "uniform"  # uniform | block (full only)
    recompute_num_layers: int = 0
    init_from: str = ""  # previous stage's checkpoint dir, or a SOLO checkpoint from solo-convert
    save_dir: str = "runs/stage1"
    save_interval_steps: int = 50
    keep_checkpoints: int = 2
    log_interval_steps: int = 1
    # Validation loss (overall, vision-language, text) on data.eval_sources every this many steps
    # and at the last step; 0: none. The same `eval_samples` samples every time (solo.evaluate).
    eval_interval_steps: int = 0
    eval_samples: int = 64
    nonfinite_loss: str = "stop"  # "stop" or "skip" the batch
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "solo-megatron"
    seed: int = 1234

    def validate(self) -> TrainConfig:
        """Every field against its rule in FIELD_RULES, then the rules that join fields; the first
        problem is a ConfigError naming the key. Called by load_config, before any compute."""
        for key, value in _leaves(self):
            rule = FREE if isinstance(value, bool) else FIELD_RULES[re.sub(r"\[\d+\]", "[]", key)]
            if not rule.holds(value):
                raise ConfigError(f"{key}={value!r} {rule.says}")
        p, m, o, tp = self.parallel, self.model, self.optimizer, self.parallel.tensor_parallel

        def divisible(a: str, b: str) -> tuple[bool, str]:
            x, y = _get(self, a), _get(self, b)
            return x % y == 0, f"{a}={x} is not divisible by {b}={y}"

        checks = [
            (o.min_lr <= o.lr, f"need optimizer.min_lr <= optimizer.lr, got min_lr={o.min_lr} and lr={o.lr}"),
            divisible("model.hidden_size", "model.num_attention_heads"),
            divisible("model.num_attention_heads", "model.num_query_groups"),
            divisible("model.num_attention_heads", "parallel.tensor_parallel"),
            divisible("model.num_query_groups", "parallel.tensor_parallel"),
            (m.padded_vocab_size % p.tensor_parallel == 0,
             f"padded vocabulary {m.padded_vocab_size} is not divisible by parallel.tensor_parallel={tp}"),
            (m.max_image_side % m.patch_size == 0, "model.max_image_side must be a multiple of model.patch_size"),
            (not p.sequence_parallel or p.tensor_parallel > 1, "parallel.sequence_parallel needs tensor_parallel > 1"),
            (bool(self.probe.path) == (self.probe.interval_steps > 0),
             f"probe.path={self.probe.path!r} and probe.interval_steps={self.probe.interval_steps} go together: "
             "set both (a folder of held-out solo-preprocess imagenet shards, and how often) or neither"),
            # solo.probe would take the next id from the last stage; that path has no test yet.
            (not self.probe.path or p.pipeline_parallel == 1,
             f"probe.path with parallel.pipeline_parallel={p.pipeline_parallel}: the probe runs at "
             "pipeline_parallel 1 only (any TP x DP); probe the checkpoints with solo-generate instead"),
        ]
        # Packed rows are not split across context-parallel ranks (no THD partitioning, no CP-aware
        # patch indexing), so CP > 1 is refused up front instead of failing at build or in RoPE.
        checks.append((p.context_parallel == 1, f"parallel.context_parallel={p.context_parallel} is not supported "
                       "(packed documents are not split across context-parallel ranks); set it to 1"))
        checks += self._recompute_checks()
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for key, sources in (("data.sources", self.data.sources), ("data.eval_sources", self.data.eval_sources)):
            _check_blend(key, sources)
        if self.eval_interval_steps and not self.data.eval_sources:
            raise ConfigError(f"eval_interval_steps={self.eval_interval_steps} needs data.eval_sources (held-out "
                              "shard folders, e.g. solo-preprocess --holdout-fraction's <output>/heldout)")
        return self

    def _recompute_checks(self) -> list[tuple[bool, str]]:
        granularity, method, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        per_stage = self.model.num_layers // max(self.parallel.pipeline_parallel, 1)
        full = granularity == "full"
        return [  # the names themselves are checked by FIELD_RULES
            (not full or 1 <= n <= per_stage, f"recompute_granularity full needs 1 <= recompute_num_layers <= "
             f"{per_stage} (layers per pipeline stage), got {n}"),
            (full or n == 0, f"recompute_num_layers={n} needs recompute_granularity: full "
             f"(it is {granularity!r})"),
            # megatron-core's uniform loop would index past the last layer of the stage.
            (not (full and method == "uniform") or per_stage % max(n, 1) == 0,
             f"recompute_method uniform needs the {per_stage} layers per pipeline stage to be a multiple of "
             f"recompute_num_layers={n}"),
        ]


def _check_blend(key: str, sources: tuple[DataSource, ...]) -> None:
    names = [s.name for s in sources]
    for i, name in enumerate(names):
        if name in names[:i]:  # overrides reach a source by name (data.sources.<name>.fraction)
            raise ConfigError(f"{key}[{i}].name {name!r} is used twice")
    fractions = [s.fraction for s in sources]
    if fractions and not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ConfigError(f"{key} fractions must be positive and sum to 1, got {fractions}")


@dataclass(frozen=True)
class Rule:
    holds: Callable[[object], bool]
    says: str


def _finite(v) -> bool:
    return math.isfinite(v)  # yaml reads .nan and .inf as floats


POSITIVE = Rule(lambda v: _finite(v) and v > 0, "must be > 0")
NON_NEGATIVE = Rule(lambda v: _finite(v) and v >= 0, "must be >= 0")
BELOW_ONE = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
NON_EMPTY = Rule(lambda v: v.strip() != "", "must not be empty")
FREE = Rule(lambda v: True, "")


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"must be one of {', '.join(choices)}")


# The rule of every non-boolean field (tests/test_config.py fails for a field missing here). Keys are
# dotted paths; `[]` stands for any entry of a list.
FIELD_RULES: dict[str, Rule] = {
    "stage": NON_EMPTY,
    "model.preset": FREE,  # checked against MODEL_PRESETS while loading
    **{f"model.{k}": POSITIVE for k in (
        "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "norm_epsilon",
        "rope_theta", "vocab_size", "make_vocab_size_divisible_by", "patch_size", "max_image_side",
        "max_position_embeddings", "init_method_std")},
    "model.attention_window_tokens": Rule(lambda v: v is None or v >= 1, "must be null (full causal) or >= 1"),
    **{f"parallel.{k}": POSITIVE for k in ("tensor_parallel", "pipeline_parallel", "context_parallel")},
    "optimizer.lr": POSITIVE,
    "optimizer.min_lr": NON_NEGATIVE,
    "optimizer.lr_warmup_steps": NON_NEGATIVE,
    # megatron-core 0.16 OptimizerParamScheduler's styles; its "WSD" needs wsd_* settings this config lacks.
    "optimizer.lr_decay_style": one_of("cosine", "linear", "constant", "inverse-square-root"),
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.adam_beta1": BELOW_ONE,
    "optimizer.adam_beta2": BELOW_ONE,
    "optimizer.adam_eps": POSITIVE,
    "optimizer.clip_grad": NON_NEGATIVE,  # 0: no clipping
    "data.sources[].name": NON_EMPTY,
    "data.sources[].path": NON_EMPTY,
    "data.sources[].fraction": POSITIVE,
    "data.eval_sources[].name": NON_EMPTY,
    "data.eval_sources[].path": NON_EMPTY,
    "data.eval_sources[].fraction": POSITIVE,
    "data.seq_length_tokens": POSITIVE,
    "data.seed": NON_NEGATIVE,  # numpy's seeded generators refuse negative seeds
    "data.template": one_of(*sorted(TEMPLATES)),
    "data.loader_workers": Rule(lambda v: v is None or v >= 0, "must be null (from the cores per rank) or >= 0"),
    "probe.path": FREE,  # "": no probe; the folder is checked when the run starts
    "probe.interval_steps": NON_NEGATIVE,  # 0: no probe
    "probe.images": POSITIVE,
    "probe.max_new_tokens": POSITIVE,
    "probe.match": one_of("exact", "contains"),
    "probe.template": one_of(*sorted(TEMPLATES)),
    "probe.prompt": FREE,
    "train_steps": NON_NEGATIVE,  # 0: one epoch
    "global_batch_size": POSITIVE,
    "micro_batch_size": POSITIVE,
    "precision": one_of("bf16", "fp32"),
    "recompute_num_layers": NON_NEGATIVE,
    "recompute_granularity": one_of("none", "full", "selective"),
    "recompute_method": one_of("uniform", "block"),
    "init_from": FREE,  # resolved (and refused if it is no checkpoint) before compute
    "save_dir": NON_EMPTY,  # empty would write checkpoints into the current folder
    "save_interval_steps": POSITIVE,
    "keep_checkpoints": NON_NEGATIVE,  # 0: keep all
    "log_interval_steps": POSITIVE,
    "eval_interval_steps": NON_NEGATIVE,  # 0: no validation
    "eval_samples": POSITIVE,  # also a multiple of data-parallel size x micro_batch_size (checked at start)
    "nonfinite_loss": one_of("stop", "skip"),
    "wandb_mode": one_of("offline", "online", "disabled"),
    "wandb_project": NON_EMPTY,
    "seed": NON_NEGATIVE,
}


def _get(node, dotted: str):
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every field that is not itself a dataclass, list entries as `key[i]`."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{key}.")
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                yield from _leaves(item, f"{key}[{i}].")
        else:
            yield key, value


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

