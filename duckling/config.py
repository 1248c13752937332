"""Every default of Duckling II lives here, and only here, with the rule that makes a value valid.

One override syntax everywhere: dotted field names.

    cfg = DucklingConfig().override({"train.weight_decay": 0.1, "model.n_layer": 4})
    duckling train ... --set train.weight_decay=0.1 --set model.n_layer=4

Every field is checked when a config is built or overridden (``__post_init__``); a bad value raises
``DucklingError`` naming the field, the value and the allowed range. The CLI, the notebooks and the
sweep engine all go through this module, so they share the checks and the messages.
The defaults are the project's starting targets; docs/results.md compares them with what was measured.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from duckling.errors import DucklingError

# The compact vocabulary: ids 0..N_LIVE-1 are live, N_LIVE..VOCAB_SIZE-1 are dead.
N_LIVE = 6144
N_DEAD = 2048
VOCAB_SIZE = N_LIVE + N_DEAD  # 8192
RECORD_DTYPES = ("bf16", "float32", "mixed")  # how snapshots are stored (RecordConfig.dtype, docs/recording.md)
EOT_ID = 0  # compact id of <|endoftext|>
UNK_ID = 1  # compact id of every GPT-2 token outside the live set
BASE_ENCODING = "gpt2"  # tiktoken encoding the compact ids are drawn from
HUB_DATASET = "roneneldan/TinyStories"
LR_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                "polynomial", "inverse_sqrt")
OPTIMIZERS = ("adamw", "sgd", "coupled_adam")  # duckling/training/optim.py
# train.learning_rate's default follows the optimizer (sgd's from the sweep in sweeps/sgd_lr.toml: docs/results/sgd_lr/)
LR_DEFAULTS = {"adamw": 1e-4, "coupled_adam": 1e-4, "sgd": 0.1}


def spec(default, help: str, *, lo=None, hi=None, lo_open=False, hi_open=False, choices=None,
         kind=None, optional=False, flag: str | None = None):
    """A config field: its default, one line of help, and its validity rule.

    kind: int | float | bool | str (default: the default's type); lo/hi: inclusive bounds unless
    lo_open/hi_open; choices: the allowed values; optional: None is allowed; flag: the CLI shorthand
    (``--flag``) that `duckling train` generates for this field.
    """
    kind = kind or type(default)
    return dataclasses.field(default=default, metadata=dict(
        help=help, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices, kind=kind,
        optional=optional, flag=flag))


def _range(m) -> str:
    if m["choices"] is not None:
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    kind = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[m["kind"]]
    lo = "" if m["lo"] is None else f" {'>' if m['lo_open'] else '>='} {m['lo']}"
    hi = "" if m["hi"] is None else f"{' and' if lo else ''} {'<' if m['hi_open'] else '<='} {m['hi']}"
    return kind + lo + hi + (" (or None)" if m["optional"] else "")


def check_value(name: str, value, m):
    """The value, coerced (an int for a float field), or DucklingError naming field, value and range."""
    bad = DucklingError(f"{name} = {value!r} is not valid: it must be {_range(m)}.")
    if value is None:
        if m["optional"]:
            return None
        raise bad
    kind = m["kind"]
    if m["choices"] is not None:
        if isinstance(value, bool) != any(isinstance(c, bool) for c in m["choices"] if c == value) \
                or value not in m["choices"]:
            raise bad
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is str:
        if not isinstance(value, str) or not value:
            raise bad
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise bad
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise bad
    if m["lo"] is not None and (value < m["lo"] or (m["lo_open"] and value == m["lo"])):
        raise bad
    if m["hi"] is not None and (value > m["hi"] or (m["hi_open"] and value == m["hi"])):
        raise bad
    return value


class _Checked:
    """Mixin: validate (and coerce) every field after construction."""

    def __post_init__(self):
        prefix = getattr(self, "_prefix", "")
        for f in dataclasses.fields(self):
            if f.metadata:
                object.__setattr__(self, f.name, check_value(f"{prefix}{f.name}", getattr(self, f.name), f.metadata))
        self._cross_check()

    def _cross_check(self) -> None:
        pass


@dataclass
class ModelConfig(_Checked):
    """The Duckling: a 2-layer GPT-2 with a compact, tied vocabulary (~1.5M parameters)."""

    _prefix = "model."
    vocab_size: int = spec(VOCAB_SIZE, "rows of W (live + dead ids)", lo=2)
    n_positions: int = spec(512, "context length; also the tokens per packed dataset row", lo=1)
    n_embd: int = spec(128, "hidden size d; W is (vocab_size, n_embd)", lo=1)
    n_layer: int = spec(2, "transformer blocks", lo=1, flag="n-layer")
    n_head: int = spec(2, "attention heads (must divide n_embd)", lo=1)
    n_inner: int = spec(512, "FFN width", lo=1)
    dropout: float = spec(0.1, "residual, embedding and attention dropout (GPT-2's default)", lo=0.0, hi=1.0, hi_open=True)
    initializer_range: float = spec(0.02, "init std: ||w_0|| ~ 0.02 * sqrt(128) ~ 0.23", lo=0.0, lo_open=True)
    tie_word_embeddings: bool = spec(True, "tie input and output embeddings (False = the control experiment)")

    def _cross_check(self) -> None:
        if self.n_embd % self.n_head:
            raise DucklingError(f"model.n_head = {self.n_head} must divide model.n_embd = {self.n_embd}.")

    def to_gpt2_config(self):
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=self.vocab_size, n_positions=self.n_positions, n_embd=self.n_embd,
            n_layer=self.n_layer, n_head=self.n_head, n_inner=self.n_inner,
            resid_pdrop=self.dropout, embd_pdrop=self.dropout, attn_pdrop=self.dropout,
            initializer_range=self.initializer_range, tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID,
        )


@dataclass
class DataConfig(_Checked):
    """Where text comes from and where its artifacts live (rows are model.n_positions tokens)."""

    _prefix = "data."
    source: str | None = spec(None, "text file/folder, 'sample' (bundled), None = $DUCKLING_DATA, else the hub",
                              kind=str, optional=True)
    split: str = spec("train", "hub split (ignored for local files)")
    mapping_path: str = spec("token_mapping.json", "the token mapping (compact vocabulary)", flag="mapping")
    dataset_dir: str = spec("tokenized_dataset", "the packed dataset folder", flag="dataset")


@dataclass
class TrainConfig(_Checked):
    """Optimisation defaults of the mission (AdamW, linear decay, bf16 mixed precision)."""

    _prefix = "train."
    optimizer: str = spec("adamw", "adamw | sgd (momentum, decoupled weight decay) | coupled_adam (second moment of "
                          "W averaged over the vocabulary)", choices=OPTIMIZERS, flag="optimizer")
    batch_size: int = spec(2, "sequences per step", lo=1, flag="batch-size")
    learning_rate: float = spec(LR_DEFAULTS["adamw"], "peak learning rate (its default follows train.optimizer: "
                                "adamw/coupled_adam 1e-4, sgd 0.1)", lo=0.0, lo_open=True, flag="lr")
    sgd_momentum: float = spec(0.9, "SGD's momentum (train.optimizer = sgd)", lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = spec(0.01, "decoupled weight decay", lo=0.0, flag="weight-decay")
    max_steps: int = spec(10_000, "optimizer steps", lo=1, flag="max-steps")
    warmup_steps: int = spec(0, "linear warm-up steps", lo=0)
    lr_scheduler_type: str = spec("linear", "learning-rate schedule (Hugging Face names)", choices=LR_SCHEDULES)
    adam_beta1: float = spec(0.9, "Adam beta1", lo=0.0, hi=1.0, hi_open=True)
    adam_beta2: float = spec(0.999, "Adam beta2", lo=0.0, hi=1.0, hi_open=True)
    adam_epsilon: float = spec(1e-8, "Adam epsilon", lo=0.0, lo_open=True)
    max_grad_norm: float = spec(1.0, "gradient clipping norm (0 = off)", lo=0.0)
    seed: int = spec(42, "seed of init, dropout and data order", lo=0, flag="seed")
    compute_dtype: str = spec("auto", "training arithmetic: auto = bf16 mixed precision where the device has "
                              "native bf16, else fp32", choices=("auto", "bf16", "fp32"), flag="compute-dtype")
    device: str = spec("auto", "auto = cuda, then mps, then cpu", choices=("auto", "cuda", "mps", "cpu"), flag="device")
    threads: int = spec(0, "torch CPU threads (0 = torch's default)", lo=0, flag="threads")
    allow_bf16_params: bool = spec(False, "opt in to bf16 parameters under AdamW (the known failure mode)")
    allow_eval_overlap: bool = spec(False, "opt in to an evaluation dataset that shares rows with the training "
                                    "dataset (its loss is then not held out)")
    save_steps: int = spec(1000, "steps between Trainer checkpoints (resume points)", lo=1, flag="save-steps")
    save_total_limit: int = spec(2, "checkpoints kept", lo=1)
    eval_steps: int = spec(0, "evaluate every N steps (0 = once, at the end, when an eval set is given)", lo=0,
                           flag="eval-steps")
    logging_steps: int = spec(50, "loss is logged every this many steps (never per step)", lo=1)
    compile: Any = spec("auto", "torch.compile: auto = on CUDA only", choices=("auto", True, False), kind=str,
                        flag="compile")
    dataloader_num_workers: int = spec(0, "DataLoader worker processes", lo=0)


@dataclass
class RecordConfig(_Checked):
    """The W recorder: which snapshots, stored how, within what budget."""

    _prefix = "record."
    enabled: bool = spec(True, "record W during training")
    every: int = spec(1, "snapshot stride: steps 0, k, 2k, ... (per-row scalars are kept every step)", lo=1,
                      flag="record-every")
    dtype: str = spec("bf16", "snapshot storage: bf16, float32, or mixed (dead rows float32, live rows bf16)",
                      choices=RECORD_DTYPES, flag="record-dtype")
    budget_gb: float = spec(24.0, "refuse a run whose files need more than this (GB = 1e9 bytes)",
                            lo=0.0, lo_open=True, flag="budget-gb")
    queue_size: int = spec(8, "steps in flight (slots of the shared ring) before training waits for the writer "
                           "process", lo=1)
    writer_procs: Any = spec("auto", "worker processes that encode blocks beside the writer process (auto = the "
                             "spare cores, at most 4; 0 = the writer process encodes)",
                             choices=("auto", *range(9)), kind=str)
    probe_every: int = spec(100, "steps between dead-token output-mass probes (0 = off)", lo=0)


@dataclass
class GenerateConfig(_Checked):
    """`duckling generate` / ``duckling.training.generate``."""

    _prefix = "generate."
    max_new_tokens: int = spec(60, "tokens to generate", lo=1, flag="max-new-tokens")
    sample: bool = spec(False, "sample instead of greedy decoding")
    temperature: float = spec(0.8, "sampling temperature", lo=0.0, lo_open=True, flag="temperature")
    top_k: int = spec(50, "sample among the k most likely tokens", lo=1, flag="top-k")
    seed: int = spec(0, "sampling seed", lo=0, flag="seed")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "record": RecordConfig}
# Common short names, for the "did you mean" hint only.
ABBREV = {"lr": "train.learning_rate", "wd": "train.weight_decay", "steps": "train.max_steps",
          "batch": "train.batch_size", "layers": "model.n_layer", "stride": "record.every",
          "precision": "train.compute_dtype or record.dtype"}
# Old names, accepted for one release with a deprecation message: old -> new.
RENAMED = {"train.precision": "train.compute_dtype", "record.precision": "record.dtype"}


def _deprecated(old: str) -> str:
    new = RENAMED[old]
    warnings.warn(f"{old} is deprecated: it is now {new} (training arithmetic is train.compute_dtype, "
                  f"recording storage is record.dtype). The old name stops working in the next release.",
                  FutureWarning, stacklevel=4)
    return new


def parse_value(raw: str):
    """A command-line value as a TOML scalar (1e-4, 4, true, "x"); anything else stays a string."""
    if raw.strip().lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


@dataclass
class DucklingConfig:
    """One run: model, data, training and recording."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    record: RecordConfig = dataclasses.field(default_factory=RecordConfig)

    @staticmethod
    def field_names() -> list[str]:
        """Every dotted name that ``override`` accepts."""
        return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]

    @staticmethod
    def field_meta(name: str) -> dict:
        section, _, key = name.partition(".")
        return next(f.metadata for f in dataclasses.fields(SECTIONS[section]) if f.name == key)

    def override(self, overrides: dict[str, Any] | None = None, **kw) -> "DucklingConfig":
        """A new, validated config with dotted names replaced: ``{"train.weight_decay": 0.1}``.

        String values from a command line are parsed with ``parse_value`` by the caller. Unknown
        names are refused with the closest valid ones."""
        items = {**(overrides or {}), **kw}
        parts = {s: {} for s in SECTIONS}
        names = self.field_names()
        for name, value in items.items():
            if not isinstance(name, str):
                raise DucklingError(f"config override names are dotted strings like 'train.weight_decay', not {name!r}.")
            if name in RENAMED:
                name = _deprecated(name)
            if name not in names:
                key = name.split(".")[-1]
                close = [ABBREV[key]] if key in ABBREV else \
                    [n for n in names if key and n.split(".")[-1].startswith(key)][:3] or \
                    difflib.get_close_matches(name, names, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise DucklingError(f"Unknown config field {name!r}.{hint} Valid names look like "
                                    f"'train.weight_decay'; `duckling train --help` lists them all.")
            section, _, key = name.partition(".")
            parts[section][key] = value
        new_opt = parts["train"].get("optimizer", self.train.optimizer)
        if "learning_rate" not in parts["train"] and new_opt in LR_DEFAULTS and \
                self.train.learning_rate == LR_DEFAULTS.get(self.train.optimizer):
            parts["train"]["learning_rate"] = LR_DEFAULTS[new_opt]  # the default follows the optimizer
        return DucklingConfig(**{s: dataclasses.replace(getattr(self, s), **parts[s]) if parts[s]
                                 else getattr(self, s) for s in SECTIONS})

    def get(self, name: str):
        section, _, key = name.partition(".")
        return getattr(getattr(self, section), key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{dotted name: value} of every field."""
        return {n: self.get(n) for n in self.field_names()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DucklingConfig":
        """From ``to_dict`` output (a run's config.json); older runs' renamed fields are mapped quietly."""
        if not isinstance(d, dict):
            raise DucklingError(f"a config must be a JSON object of sections, not {type(d).__name__}.")
        flat = {}
        for section, values in d.items():
            if section not in SECTIONS or not isinstance(values, dict):
                raise DucklingError(f"Unknown config section {section!r}: expected {', '.join(SECTIONS)}.")
            for k, v in values.items():
                name = RENAMED.get(f"{section}.{k}", f"{section}.{k}")
                if name in ("data.seq_len", "record.format", "record.chunk_steps"):  # older runs: rows are
                    continue  # model.n_positions tokens; one recording layout is written (docs/recording.md)
                flat[name] = v
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return cls().override(flat)
