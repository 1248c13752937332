"""Every default of Duckling II lives here, and only here.

Notebooks, the CLI and tests override fields (``dataclasses.replace`` or keyword
arguments); they never repeat a default. Values follow ``../shared/docs/mission.md``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# The compact vocabulary: ids 0..N_LIVE-1 are live, N_LIVE..VOCAB_SIZE-1 are dead.
N_LIVE = 6144
N_DEAD = 2048
VOCAB_SIZE = N_LIVE + N_DEAD  # 8192
EOT_ID = 0  # compact id of <|endoftext|>
UNK_ID = 1  # compact id of every GPT-2 token outside the live set
BASE_ENCODING = "gpt2"  # tiktoken encoding the compact ids are drawn from
HUB_DATASET = "roneneldan/TinyStories"


@dataclass
class ModelConfig:
    """The Duckling: a 2-layer GPT-2 with a compact, tied vocabulary (~1.5M parameters)."""

    vocab_size: int = VOCAB_SIZE  # rows of W (live + dead)
    n_positions: int = 512  # context length
    n_embd: int = 128  # hidden size d; W is (vocab_size, n_embd)
    n_layer: int = 2
    n_head: int = 2
    n_inner: int = 512  # FFN width
    dropout: float = 0.1  # GPT-2's default for residual, embedding and attention dropout
    initializer_range: float = 0.02  # GPT-2 init std: ||w_0|| ~ 0.02 * sqrt(128) ~ 0.23
    tie_word_embeddings: bool = True  # False = the control experiment (dead input rows get no gradient)

    def to_gpt2_config(self):
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=self.vocab_size,
            n_positions=self.n_positions,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_inner=self.n_inner,
            resid_pdrop=self.dropout,
            embd_pdrop=self.dropout,
            attn_pdrop=self.dropout,
            initializer_range=self.initializer_range,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=EOT_ID,
            eos_token_id=EOT_ID,
            pad_token_id=EOT_ID,
        )


@dataclass
class DataConfig:
    """Where text comes from and how it is packed."""

    source: str | None = None  # None = $DUCKLING_DATA, else the hub's roneneldan/TinyStories
    split: str = "train"  # hub split (ignored for local files)
    seq_len: int = 512  # tokens per packed row (= ModelConfig.n_positions)
    mapping_path: str = "token_mapping.json"
    dataset_dir: str = "tokenized_dataset"


@dataclass
class TrainConfig:
    """Optimisation defaults of the mission (AdamW, linear decay, bf16 mixed precision)."""

    batch_size: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    max_steps: int = 10_000
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 mixed where the device supports it
    device: str = "auto"  # auto = cuda, then mps, then cpu
    allow_bf16_params: bool = False  # opt in to the known failure mode (notebook 03 only)
    save_steps: int = 1000  # Trainer checkpoint interval (resume points)
    save_total_limit: int = 2
    eval_steps: int = 0  # 0 = no evaluation during training
    logging_steps: int = 50  # loss is logged every this many steps (never per step)
    compile: bool | Literal["auto"] = "auto"  # torch.compile; auto = on CUDA only (benchmarks/train_speed.py)
    dataloader_num_workers: int = 0


@dataclass
class RecordConfig:
    """The W recorder: which snapshots, at what precision, within what budget."""

    enabled: bool = True
    every: int = 1  # snapshot stride: record steps 0, k, 2k, ... (per-row scalars are kept every step)
    precision: Literal["bf16", "float32", "mixed"] = "bf16"  # mixed = dead rows float32, live rows bf16
    budget_gb: float = 24.0  # refuse a run whose recording needs more than this (GB = 1e9 bytes)
    chunk_steps: int = 256  # snapshots per chunk file
    queue_size: int = 8  # GPU: pinned buffers in flight before training waits for the writer
    probe_every: int = 100  # steps between dead-token output-mass probes (0 = off)


@dataclass
class DucklingConfig:
    """One run: model, data, training and recording."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    record: RecordConfig = field(default_factory=RecordConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DucklingConfig":
        return cls(
            model=ModelConfig(**d.get("model", {})),
            data=DataConfig(**d.get("data", {})),
            train=TrainConfig(**d.get("train", {})),
            record=RecordConfig(**d.get("record", {})),
        )
