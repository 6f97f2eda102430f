"""TrainConfig: the one frozen config a training run is built from.

A run is described by a preset name (`tiny`, `small`, `llama3-1b`, `llama3-8b`) or a
YAML/JSON file, plus `key=value` overrides, all parsed by `tandem.config.load_config`:

    tandem train tiny run_dir=runs/t steps=200 model.d_model=64 mesh.fsdp=4

Checks that need nothing but the config live in `__post_init__` (they raise ValueError
naming the field); checks that need the devices (mesh divides the device count, batch
divides the data-parallel size) live in `train.mesh.validate_against_devices`, which runs
at start-up before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from tandem.config import check_choices, load_config, require
from tandem.model.config import ModelConfig

# Training defaults per preset: what suits a model of that size. Everything else comes
# from the dataclass defaults below.
_PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=128, batch_size=16, learning_rate=1e-3, warmup_steps=20, steps=300),
    "small": dict(seq_len=256, batch_size=16, learning_rate=6e-4, warmup_steps=50, steps=1000),
    "llama3-1b": dict(
        seq_len=2048, batch_size=32, learning_rate=3e-4, warmup_steps=200, steps=10_000
    ),
    "llama3-8b": dict(
        seq_len=4096, batch_size=64, learning_rate=3e-4, warmup_steps=500, steps=20_000
    ),
}


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; exactly one may be -1 (fill with the remaining devices).

    `dcn_data` splits the data axis over slices joined by the data-center network (DCN):
    the data axis is `dcn_data` groups, one per TPU slice of a multislice run (or per
    process elsewhere), and fsdp, tensor and the rest of data stay inside a slice, on its
    fast interconnect (MaxText's `dcn_data_parallelism`). -1 = the number of TPU slices
    the run spans (1 unless multislice)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = -1

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, v in sizes.items():
            require(v >= 1 or v == -1, name, v, "a positive axis size or -1 (fill)")
        require(
            self.dcn_data >= 1 or self.dcn_data == -1,
            "dcn_data",
            self.dcn_data,
            "a positive number of slices or -1 (the TPU slices found)",
        )
        fills = [n for n, v in sizes.items() if v == -1]
        if len(fills) > 1:
            require(False, fills[0], -1, f"on one axis only ({', '.join(fills)} are all -1)")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; passed whole, never unpacked into arguments."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny"))
    mesh: MeshConfig = field(default_factory=MeshConfig)

    # --- run ---
    run_dir: str = "runs/default"
    # Pretrained weights to start from when run_dir holds no checkpoint: a HF model dir,
    # a bundle or another run's checkpoint dir (tandem/train/init_from.py); "" = random init.
    init_from: str = ""
    steps: int = 300  # total optimizer steps
    seed: int = 0

    # --- batch ---
    batch_size: int = 16  # global sequences per optimizer step (all processes, all microbatches)
    seq_len: int = 128
    grad_accum: int = 1  # microbatches per step; batch_size must divide by it

    # --- optimizer: AdamW, linear warmup then cosine decay to min_lr_ratio * learning_rate ---
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    lr_decay_steps: int = 0  # cosine horizon; 0 = steps (set it to stop early on the same schedule)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables

    # --- data ---
    data: str = "embedded"  # "embedded" (stdlib sources) or comma-separated files/dirs
    eval_data: str | None = None  # None/"" = held-out split of `data` (1 in eval_holdout documents)
    eval_holdout: int = 20
    text_key: str = "text"  # field/column holding the text in .jsonl / .parquet
    # "auto": the init_from model's own tokenizer, else "bpe" (trained on the train split,
    # cached in run_dir); or "byte", or a tokenizer directory / tokenizer.json path
    tokenizer: str = "auto"
    prefetch: int = 2  # batches prepared ahead on a host thread

    # --- eval / logging ---
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 4
    log_every: int = 1
    progress: bool = True  # rich progress bar on the console
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = table (GPU/TPU) or measured (CPU)

    # --- checkpoints ---
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    # persistent XLA compilation cache, so a resumed/relaunched run skips recompiling
    # (`compile_cache_dir=` / null / "" = off)
    compile_cache_dir: str | None = "~/.cache/tandem/xla"

    # --- multi-host (also via TANDEM_COORDINATOR_ADDRESS / TANDEM_NUM_PROCESSES / TANDEM_PROCESS_ID) ---
    # auto: initialize when a coordinator is given or a cluster is detected
    distributed: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str = ""
    num_processes: int = 0  # 0 = from env / auto-detect
    process_id: int = -1  # -1 = from env / auto-detect

    def __post_init__(self) -> None:
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "grad_accum": self.grad_accum,
            "eval_batches": self.eval_batches,
            "log_every": self.log_every,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "eval_holdout": self.eval_holdout,
        }
        for name, v in positive.items():
            require(v >= 1, name, v, ">= 1")
        for name in ("warmup_steps", "lr_decay_steps", "eval_every", "prefetch"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        require(
            self.batch_size % self.grad_accum == 0,
            "batch_size",
            self.batch_size,
            f"a multiple of grad_accum={self.grad_accum}",
        )
        require(
            self.seq_len <= self.model.max_seq_len,
            "seq_len",
            self.seq_len,
            f"<= model.max_seq_len={self.model.max_seq_len}",
        )
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0 disables)")
        check_choices(self)
        require(bool(self.run_dir), "run_dir", self.run_dir, "the directory for checkpoints")
        require(bool(self.data), "data", self.data, "'embedded' or comma-separated files")
        require(
            not self.init_from or self.tokenizer == "auto",
            "tokenizer",
            self.tokenizer,
            "'auto' with init_from (the pretrained model's own tokenizer)",
        )

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        """A preset model with the training defaults that suit it (see _PRESET_DEFAULTS)."""
        model = ModelConfig.preset(name)
        return cls(model=model, **_PRESET_DEFAULTS.get(name, {}))

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return load_config(cls, d)
