"""`ModelConfig`: the one description of the transformer.

Training, export, serving and HF import all pass it whole; it loads like every tandem
config (`tandem.config.load_config`: preset name or YAML/JSON file plus `key=value`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from tandem.config import check_choices, fingerprint, load_config, require
from tandem.kernels import AttentionImpl
from tandem.model.quant import Quantization

Dtype = Literal["float32", "bfloat16"]
Remat = Literal["none", "full", "dots"]  # what the backward pass recomputes
# The Hugging Face `model_type` a model is written back as (`--format hf`).
Family = Literal["llama", "mistral", "qwen2", "qwen3"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (transformers' `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        require(self.factor >= 1.0, "rope_scaling.factor", self.factor, ">= 1")
        require(
            0 < self.low_freq_factor < self.high_freq_factor,
            "rope_scaling.low_freq_factor",
            self.low_freq_factor,
            "0 < low_freq_factor < high_freq_factor",
        )
        require(
            self.original_max_position_embeddings > 0,
            "rope_scaling.original_max_position_embeddings",
            self.original_max_position_embeddings,
            "> 0",
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

    The other families are switches on the same decoder, never another class (MaxText's
    `use_qk_norm` / bias flags): Qwen2 adds q/k/v projection biases (`attention_bias`),
    Qwen3 an RMSNorm over each head's q and k before RoPE (`qk_norm`), Mistral v0.3 is
    Llama under another name. `family` only records which HF config to write back; the
    transformer reads the switches, so a combination no HF family has (e.g. both on) still
    trains and serves, and only `--format hf` refuses it (tandem/model/hf.py)."""

    vocab_size: int = 2048
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    d_ff: int = 768
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: Dtype = "float32"  # compute / activation dtype
    param_dtype: Dtype = "float32"
    remat: Remat = "none"
    attention_impl: AttentionImpl = "auto"
    init_std: float = 0.02
    # Serving-only weight format: "int8" stores matrices as int8 + per-channel scales.
    quantization: Quantization = "none"
    family: Family = "llama"
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm over head_dim on q and k, before RoPE (Qwen3)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "d_ff",
            "max_seq_len",
        ):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, name, value, "a positive integer")
        require(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"a divisor of n_heads={self.n_heads}",
        )
        require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "an even number (RoPE)")
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "> 0")
        require(0 < self.norm_eps < 1, "norm_eps", self.norm_eps, "in (0, 1)")
        require(self.init_std > 0, "init_std", self.init_std, "> 0")
        check_choices(self)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """Named shapes: `tiny` (~3.7 M params; tests and the CPU demo), `small` (~100 M),
        and Llama-3.2-1B / Llama-3-8B shaped configs for accelerators."""
        llama3_scaling = RopeScaling(
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
        presets = {
            "tiny": cls(),
            "small": cls(
                vocab_size=32000,
                d_model=768,
                n_layers=12,
                n_heads=12,
                n_kv_heads=4,
                head_dim=64,
                d_ff=2048,
                max_seq_len=1024,
            ),
            "llama3-1b": cls(
                vocab_size=128256,
                d_model=2048,
                n_layers=16,
                n_heads=32,
                n_kv_heads=8,
                head_dim=64,
                d_ff=8192,
                max_seq_len=8192,
                rope_theta=500000.0,
                rope_scaling=llama3_scaling,
                tie_embeddings=True,
                dtype="bfloat16",
            ),
            "llama3-8b": cls(
                vocab_size=128256,
                d_model=4096,
                n_layers=32,
                n_heads=32,
                n_kv_heads=8,
                head_dim=128,
                d_ff=14336,
                max_seq_len=8192,
                rope_theta=500000.0,
                rope_scaling=dataclasses.replace(llama3_scaling, factor=8.0),
                tie_embeddings=False,
                dtype="bfloat16",
            ),
        }
        if name not in presets:
            raise ValueError(f"preset={name!r} is unknown: allowed {sorted(presets)}")
        return presets[name]

    @property
    def num_params(self) -> int:
        per_layer = (
            self.d_model * self.head_dim * (self.n_heads + 2 * self.n_kv_heads)  # q, k, v
            + self.n_heads * self.head_dim * self.d_model  # o
            + 3 * self.d_model * self.d_ff  # gate, up, down
        )
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return embed + self.n_layers * per_layer + self._vector_params

    @property
    def _vector_params(self) -> int:
        """Norm weights and biases: params that no matmul multiplies."""
        per_layer = 2 * self.d_model  # attn_norm, mlp_norm
        if self.attention_bias:
            per_layer += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        return self.n_layers * per_layer + self.d_model  # + final_norm

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, PaLM appendix B convention:
        6 x matmul params, plus causal-halved attention score/value matmuls."""
        # The input lookup is not a matmul; the output projection is (tied or not).
        lookup = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        matmul_params = self.num_params - self._vector_params - lookup
        attention = 6 * self.n_layers * seq_len * self.n_heads * self.head_dim
        return 6.0 * matmul_params + attention

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return load_config(cls, dict(data))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form: identifies 'the same architecture'. Fields
        added after bundles were first written count only when set away from their
        default, so a model that does not use them keeps the fingerprint an older tandem
        recorded (a bundle manifest's `config_sha256`)."""
        data = self.to_dict()
        for f in dataclasses.fields(self):
            if f.name in _ADDED_FIELDS and data[f.name] == f.default:
                del data[f.name]
        return fingerprint(data)


# ModelConfig fields newer than bundle format 1 (see `ModelConfig.fingerprint`).
_ADDED_FIELDS = ("family", "attention_bias", "qk_norm")
