"""Model configuration and the generic config loader every tandem component uses.

`ModelConfig` is the one description of the transformer: training, export, serving and
HF import all pass it whole. `load_config` turns a preset name, a YAML/JSON file or a dict,
plus command-line `key=value` overrides, into any frozen dataclass (`ModelConfig`,
`TrainConfig`, `ServeConfig`), so there is exactly one parser and one error style.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from kernels import ATTENTION_IMPLS
from model.quant import QUANTIZATIONS

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")
PRESETS = ("tiny", "small", "llama3-1b", "llama3-8b")

T = TypeVar("T")


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r} is invalid: allowed {allowed}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (transformers' `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _require(self.factor >= 1.0, "rope_scaling.factor", self.factor, ">= 1")
        _require(
            0 < self.low_freq_factor < self.high_freq_factor,
            "rope_scaling.low_freq_factor",
            self.low_freq_factor,
            "0 < low_freq_factor < high_freq_factor",
        )
        _require(
            self.original_max_position_embeddings > 0,
            "rope_scaling.original_max_position_embeddings",
            self.original_max_position_embeddings,
            "> 0",
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

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
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute / activation dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    attention_impl: Literal["auto", "reference", "pallas", "pallas_interpret"] = "auto"
    init_std: float = 0.02
    # Serving-only weight format: "int8" stores matrices as int8 + per-channel scales.
    quantization: Literal["none", "int8"] = "none"

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
            _require(isinstance(value, int) and value > 0, name, value, "a positive integer")
        _require(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"a divisor of n_heads={self.n_heads}",
        )
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "an even number (RoPE)")
        _require(self.rope_theta > 0, "rope_theta", self.rope_theta, "> 0")
        _require(0 < self.norm_eps < 1, "norm_eps", self.norm_eps, "in (0, 1)")
        _require(self.init_std > 0, "init_std", self.init_std, "> 0")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        _require(self.param_dtype in DTYPES, "param_dtype", self.param_dtype, f"one of {DTYPES}")
        _require(self.remat in REMAT_POLICIES, "remat", self.remat, f"one of {REMAT_POLICIES}")
        _require(
            self.quantization in QUANTIZATIONS,
            "quantization",
            self.quantization,
            f"one of {QUANTIZATIONS}",
        )
        _require(
            self.attention_impl in ATTENTION_IMPLS,
            "attention_impl",
            self.attention_impl,
            f"one of {ATTENTION_IMPLS}",
        )

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
            2 * self.d_model  # norms
            + self.d_model * self.head_dim * (self.n_heads + 2 * self.n_kv_heads)  # q, k, v
            + self.n_heads * self.head_dim * self.d_model  # o
            + 3 * self.d_model * self.d_ff  # gate, up, down
        )
        embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return embed + self.n_layers * per_layer + self.d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, PaLM appendix B convention:
        6 x matmul params, plus causal-halved attention score/value matmuls."""
        norms = 2 * self.n_layers * self.d_model + self.d_model
        # The input lookup is not a matmul; the output projection is (tied or not).
        lookup = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        matmul_params = self.num_params - norms - lookup
        attention = 6 * self.n_layers * seq_len * self.n_heads * self.head_dim
        return 6.0 * matmul_params + attention

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return load_config(cls, dict(data))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form: identifies 'the same architecture'."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------
# Generic loading: presets, files, dicts and key=value overrides for any frozen dataclass.


def load_config(
    cls: type[T], source: str | Path | Mapping | None = None, overrides: Sequence[str] = ()
) -> T:
    """Builds `cls` from a preset name, a YAML/JSON file or a mapping, then applies
    `key=value` overrides (dotted keys reach nested dataclasses: `model.d_model=512`).

    Values are parsed as YAML scalars (`true`, `1e-3`, `null`) and checked against the
    field's type; an unknown key raises ValueError listing the allowed keys.
    """
    if source is None:
        data: dict[str, Any] = {}
        base = None
    elif isinstance(source, Mapping):
        data, base = dict(source), None
    elif Path(source).suffix in (".yaml", ".yml", ".json"):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, Mapping):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at top level")
        data, base = dict(loaded), None
    else:
        preset = getattr(cls, "preset", None)
        if preset is None:
            raise ValueError(f"{cls.__name__} has no presets; give a .yaml/.json file")
        data, base = {}, preset(str(source))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        _set_dotted(data, key.strip().split("."), yaml.safe_load(raw))
    if base is not None:
        return _build(cls, _merge(_to_plain(base), data), prefix="")
    return _build(cls, data, prefix="")


def _to_plain(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _merge(base: dict, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _set_dotted(data: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        nested = data.setdefault(key, {})
        if not isinstance(nested, dict):
            nested = data[key] = {}
        data = nested
    data[keys[-1]] = value


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r} for {cls.__name__}: "
            f"allowed keys are {sorted(fields)}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ names the field; say where it is nested
        raise ValueError(f"{prefix}{err}") from None


def _coerce(tp: Any, value: Any, field: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, field)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{field}={value!r} is invalid")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ValueError(f"{field}={value!r} is invalid: allowed one of {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{field} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{field}.")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ValueError(f"{field}={value!r} is invalid: expected a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        return tuple(_coerce(item_tp, v, f"{field}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{field}={value!r} is invalid: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{field}={value!r} is invalid: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e5" as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{field}={value!r} is invalid: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{field}={value!r} is invalid: expected a string")
        return value
    return value
