"""Hugging Face <-> tandem: config and weight mapping per model family, and `tandem import-hf`.

One table per HF `model_type` (`FAMILIES`: llama, mistral, qwen2, qwen3) says what its
config.json holds beyond the keys all four share and which extra per-layer tensors it has;
the same tables serve import and `--format hf` export. Anything a table does not map is
refused naming the key (MoE, sliding-window attention, other RoPE kinds, quantized
checkpoints, unknown model types), never imported approximately.

HF stores each linear layer as [out, in] per layer; tandem stacks layers and keeps
[in, ..out] with heads split out, so every matrix is a transpose plus reshape and every
vector (norm, bias) a reshape. Import streams one HF tensor at a time into one stacked
tandem tensor, so host memory is bounded by the largest (stacked) tensor, not the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from tandem.config import require
from tandem.model.bundle import (
    BundleError,
    atomic_directory,
    expected_params,
    write_bundle,
    write_safetensors_shards,
)
from tandem.model.config import ModelConfig, RopeScaling
from tandem.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF `model_type`. A key listed in `fixed` must hold one of its allowed values
    (the first is what export writes); `absent` is transformers' value for a key missing
    from config.json, per family, since those defaults differ (Qwen3's head_dim is 128,
    Mistral's sliding_window 4096)."""

    architecture: str  # architectures[0] of a causal LM of this family
    switches: Mapping[str, bool]  # the ModelConfig attention switches this family has
    fixed: Mapping[str, tuple[Any, ...]]
    absent: Mapping[str, Any]
    layers: Mapping[str, str]  # extra tandem param -> HF per-layer name ({i} = layer)


_NO_SWITCHES = {"attention_bias": False, "qk_norm": False}
FAMILIES: dict[str, Family] = {
    "llama": Family(
        architecture="LlamaForCausalLM",
        switches=_NO_SWITCHES,
        fixed={"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,)},
        absent={
            "num_key_value_heads": None,  # None: as many as num_attention_heads
            "head_dim": None,  # None: hidden_size // num_attention_heads
            "max_position_embeddings": 2048,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        },
        layers={},
    ),
    "mistral": Family(
        architecture="MistralForCausalLM",
        switches=_NO_SWITCHES,
        fixed={"hidden_act": ("silu",), "sliding_window": (None,)},
        absent={
            "num_key_value_heads": 8,
            "head_dim": None,
            "max_position_embeddings": 131072,
            "hidden_act": "silu",
            "sliding_window": 4096,
        },
        layers={},
    ),
    "qwen2": Family(
        architecture="Qwen2ForCausalLM",
        switches={"attention_bias": True, "qk_norm": False},
        # Qwen2 always has q/k/v biases (and none on o): transformers ignores the key.
        fixed={"hidden_act": ("silu",), "use_sliding_window": (False,)},
        absent={
            "num_key_value_heads": 32,
            "head_dim": None,
            "max_position_embeddings": 32768,
            "hidden_act": "silu",
            "use_sliding_window": False,
        },
        layers={
            "layers.q_bias": "model.layers.{i}.self_attn.q_proj.bias",
            "layers.k_bias": "model.layers.{i}.self_attn.k_proj.bias",
            "layers.v_bias": "model.layers.{i}.self_attn.v_proj.bias",
        },
    ),
    "qwen3": Family(
        architecture="Qwen3ForCausalLM",
        switches={"attention_bias": False, "qk_norm": True},
        # Qwen3's attention_bias would put a bias on o_proj too, which tandem lacks.
        fixed={"hidden_act": ("silu",), "attention_bias": (False,), "use_sliding_window": (False,)},
        absent={
            "num_key_value_heads": 32,
            "head_dim": 128,
            "max_position_embeddings": 32768,
            "hidden_act": "silu",
            "attention_bias": False,
            "use_sliding_window": False,
        },
        layers={
            "layers.q_norm": "model.layers.{i}.self_attn.q_norm.weight",
            "layers.k_norm": "model.layers.{i}.self_attn.k_norm.weight",
        },
    ),
}
# Keys every family shares: HF key -> (ModelConfig field, type). An absent key takes the
# family's `absent` value, or _SHARED_ABSENT's (the same in all four transformers configs).
_SHARED_KEYS = {
    "vocab_size": ("vocab_size", int),
    "hidden_size": ("d_model", int),
    "num_hidden_layers": ("n_layers", int),
    "num_attention_heads": ("n_heads", int),
    "num_key_value_heads": ("n_kv_heads", int),
    "head_dim": ("head_dim", int),
    "intermediate_size": ("d_ff", int),
    "max_position_embeddings": ("max_seq_len", int),
    "rms_norm_eps": ("norm_eps", float),
    "tie_word_embeddings": ("tie_embeddings", bool),
}
_SHARED_ABSENT = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0}
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)
# Mixture-of-experts keys: a dense family's config never sets them.
_MOE_KEYS = ("num_experts", "num_local_experts", "num_experts_per_tok")
_LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)

# tandem stacked name -> HF per-layer name ({i} = layer), and whether it is a matrix.
_LAYER_MAP = {
    "layers.attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "layers.wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "layers.wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "layers.wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "layers.wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "layers.mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "layers.w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "layers.w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "layers.w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
}
_GLOBAL_MAP = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}


class HFImportError(BundleError):
    """The HF directory cannot be imported; the message names the file and the problem."""


def _show(value: Any) -> str:
    """A config value as config.json spells it (true, null, 4096, 'gelu')."""
    return repr(value) if isinstance(value, str) else json.dumps(value)


def _refuse(key: str, value: Any, allowed: str) -> HFImportError:
    return HFImportError(
        f"config.json: {key}={_show(value)} is not supported (supported: {allowed})"
    )


def family_of(hf: Mapping[str, Any]) -> str:
    """The config's `model_type` (or, without one, its architecture's), if tandem maps it."""
    by_arch = {f.architecture: name for name, f in FAMILIES.items()}
    archs = hf.get("architectures") or []
    if archs and archs[0] not in by_arch:
        raise HFImportError(
            f"config.json: architecture {archs[0]!r} is not supported "
            f"(supported: {sorted(by_arch)})"
        )
    model_type = hf.get("model_type") or (by_arch[archs[0]] if archs else None)
    if model_type not in FAMILIES:
        raise _refuse("model_type", model_type, ", ".join(map(repr, FAMILIES)))
    if archs and by_arch[archs[0]] != model_type:
        raise HFImportError(
            f"config.json: architecture {archs[0]!r} does not match model_type="
            f"{model_type!r} (expected {FAMILIES[model_type].architecture!r})"
        )
    return model_type


def _check_unmapped(hf: Mapping[str, Any], family: Family) -> None:
    """Refuses every config.json setting the family table does not map."""
    for key, allowed in family.fixed.items():
        value = hf.get(key, family.absent[key])
        if value not in allowed:
            note = " (the default when the key is absent)" if key not in hf else ""
            raise _refuse(key, value, ", ".join(map(_show, allowed)) + note)
    for key in hf:
        if (key in _MOE_KEYS or key.startswith("moe_")) and hf[key]:
            raise _refuse(key, hf[key], "absent, null or 0 (dense models only)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise _refuse("layer_types", layer_types, "'full_attention' for every layer")
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, Mapping) else quant
        raise _refuse(
            "quantization_config",
            method,
            "absent (float weights; tandem quantizes at export: --quantize int8)",
        )


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling). transformers 5 nests RoPE under rope_parameters; 4.x uses
    rope_theta + rope_scaling."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(key) or {})
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", _SHARED_ABSENT["rope_theta"])))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise HFImportError(
            f"config.json: rope_type {rope_type!r} is not supported "
            "(supported: 'default', 'llama3')"
        )
    known = _LLAMA3_ROPE_KEYS if rope_type == "llama3" else ()
    unknown = sorted(set(rope) - set(known))
    if unknown:
        allowed = f"absent with rope_type {rope_type!r}"
        raise _refuse(f"{key}.{unknown[0]}", rope[unknown[0]], allowed)
    if rope_type == "default":
        return theta, None
    missing = [k for k in known if k not in rope]
    if missing:
        raise HFImportError(f"config.json: {key} lacks {missing[0]!r} (rope_type 'llama3')")
    return theta, RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def config_from_hf(hf: dict[str, Any], *, dtype: str = "float32") -> ModelConfig:
    """Translates a transformers config dict of a mapped family; refuses what tandem
    cannot represent, naming the key."""
    name = family_of(hf)
    family = FAMILIES[name]
    _check_unmapped(hf, family)
    missing = [key for key in _REQUIRED_KEYS if key not in hf]
    if missing:
        raise HFImportError(f"config.json: missing key {missing[0]!r}")
    given = {key: value for key, value in hf.items() if value is not None}
    values = {**_SHARED_ABSENT, **family.absent, **given}
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["head_dim"] is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    try:
        rope_theta, scaling = _rope_from_hf(hf)
        fields = {field: kind(values[key]) for key, (field, kind) in _SHARED_KEYS.items()}
        return ModelConfig(
            **fields,
            rope_theta=rope_theta,
            rope_scaling=scaling,
            dtype=dtype,
            param_dtype=dtype,
            family=name,
            **family.switches,
        )
    except HFImportError:
        raise
    except (TypeError, ValueError) as err:  # a value ModelConfig or RopeScaling rejects
        raise HFImportError(f"config.json: {err}") from err


class _HFTensors:
    """Random access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {name: directory / file for name, file in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="numpy") as f:
                self._where = dict.fromkeys(f.keys(), single)
        else:
            raise HFImportError(
                f"{directory}: no model.safetensors or model.safetensors.index.json"
            )
        self._open: dict[Path, Any] = {}

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise HFImportError(f"missing tensor {name!r} in the HF checkpoint")
        file = self._where[name]
        if not file.is_file():
            raise HFImportError(f"{file}: missing (listed in the index for {name!r})")
        if file not in self._open:
            self._open[file] = safe_open(file, framework="numpy")
        return self._open[file].get_tensor(name)


def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """tandem stacked name -> (HF per-layer name, is a matrix) for `cfg`'s family."""
    extra = FAMILIES[cfg.family].layers
    return {**_LAYER_MAP, **{name: (template, False) for name, template in extra.items()}}


def _to_tandem(hf_tensor: np.ndarray, is_matrix: bool, shape: tuple[int, ...]) -> np.ndarray:
    return hf_tensor.T.reshape(shape) if is_matrix else hf_tensor.reshape(shape)


def _checked(name: str, hf_name: str, tensor: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    if tuple(tensor.shape) != hf_shape:
        raise HFImportError(
            f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, config.json "
            f"implies {hf_shape} (for {name})"
        )
    return tensor


def hf_to_tandem_tensors(hf_dir: Path, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields tandem (name, stacked array) pairs, reading HF tensors one at a time. A
    checkpoint tensor that nothing reads (an o_proj bias, an expert) fails the import:
    the model would run without it."""
    source = _HFTensors(hf_dir)
    dtype = jnp.dtype(cfg.param_dtype)
    layer_map = _layer_map(cfg)
    used: set[str] = set()
    for name, spec in expected_params(cfg).items():
        shape = spec.shape
        if name in layer_map:
            template, is_matrix = layer_map[name]
            stacked = np.empty(shape, dtype)
            for i in range(cfg.n_layers):
                hf_name = template.format(i=i)
                tensor = _checked(name, hf_name, source.get(hf_name), hf_layer_shape(name, cfg))
                stacked[i] = _to_tandem(tensor, is_matrix, shape[1:])
                used.add(hf_name)
            yield name, stacked
        else:
            hf_name, is_matrix = _GLOBAL_MAP[name]
            tensor = _checked(name, hf_name, source.get(hf_name), hf_layer_shape(name, cfg))
            used.add(hf_name)
            yield name, _to_tandem(tensor, is_matrix, shape).astype(dtype)
    # Buffers old transformers saved, and a tied model's copy of its embedding.
    ignored = {n for n in source.names() if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        ignored.add("lm_head.weight")
    unread = sorted(source.names() - used - ignored)
    if unread:
        raise HFImportError(
            f"tensor {unread[0]!r} ({len(unread)} unmapped in all) has no place in a "
            f"{cfg.family!r} model; config.json does not describe this checkpoint"
        )


def hf_layer_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The HF shape of tandem tensor `name` (per layer for stacked tensors)."""
    D, N, K, H, F, V = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.d_ff,
        cfg.vocab_size,
    )
    return {
        "embed": (V, D),
        "final_norm": (D,),
        "lm_head": (V, D),
        "layers.attn_norm": (D,),
        "layers.mlp_norm": (D,),
        "layers.wq": (N * H, D),
        "layers.wk": (K * H, D),
        "layers.wv": (K * H, D),
        "layers.wo": (D, N * H),
        "layers.w_gate": (F, D),
        "layers.w_up": (F, D),
        "layers.w_down": (D, F),
        "layers.q_bias": (N * H,),
        "layers.k_bias": (K * H,),
        "layers.v_bias": (K * H,),
        "layers.q_norm": (H,),
        "layers.k_norm": (H,),
    }[name]


def config_to_hf(cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The transformers config dict of `cfg`'s family. RoPE is written in the 4.x form
    (rope_theta + rope_scaling), which transformers 5 and vLLM also read."""
    if cfg.quantization != "none":
        raise HFImportError(
            "an int8 model cannot be written in HF format; export the float "
            "weights (drop --quantize)"
        )
    family = FAMILIES[cfg.family]
    for switch, value in family.switches.items():
        has = [name for name, f in FAMILIES.items() if f.switches[switch] == getattr(cfg, switch)]
        require(
            getattr(cfg, switch) == value,
            switch,
            getattr(cfg, switch),
            f"{value} for family={cfg.family!r} (HF {family.architecture}); "
            f"families with {switch}={getattr(cfg, switch)}: {has or 'none'}",
        )
    scaling = cfg.rope_scaling
    shared = {key: getattr(cfg, field) for key, (field, _) in _SHARED_KEYS.items()}
    return {
        "architectures": [family.architecture],
        "model_type": cfg.family,
        **shared,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None
        if scaling is None
        else {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        },
        **{key: allowed[0] for key, allowed in family.fixed.items()},
        "torch_dtype": cfg.param_dtype,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }


def tandem_to_hf_tensors(
    tensors: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig
) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of `hf_to_tandem_tensors`: per-layer HF tensors ([out, in] matrices)."""
    layer_map = _layer_map(cfg)
    for name, array in tensors:
        array = np.asarray(array)
        if name in layer_map:
            template, is_matrix = layer_map[name]
            for i in range(cfg.n_layers):
                yield template.format(i=i), _to_hf(array[i], is_matrix, name, cfg)
        elif name in _GLOBAL_MAP:
            hf_name, is_matrix = _GLOBAL_MAP[name]
            yield hf_name, _to_hf(array, is_matrix, name, cfg)
        else:
            raise HFImportError(f"tensor {name!r} has no HF {cfg.family!r} equivalent")


def _to_hf(array: np.ndarray, is_matrix: bool, name: str, cfg: ModelConfig) -> np.ndarray:
    if not is_matrix:
        return array.reshape(hf_layer_shape(name, cfg))
    out, inp = hf_layer_shape(name, cfg)
    return array.reshape(inp, out).T


def write_hf_dir(
    out: str | Path,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    overwrite: bool = False,
    shard_bytes: int = 2 << 30,
) -> Path:
    """Writes a HF directory of `cfg.family` (config.json, sharded model safetensors +
    index, tokenizer) atomically, so transformers or vLLM load a tandem-trained model."""
    out = Path(out)
    config = config_to_hf(cfg, tokenizer)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(tmp)  # + generation_config.json (the stop ids) and the chat template
        weight_map = write_safetensors_shards(
            tmp,
            tandem_to_hf_tensors(tensors, cfg),
            prefix="model",
            shard_bytes=shard_bytes,
            metadata={"format": "pt"},  # transformers checks this key
        )
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def import_hf(
    hf_dir: str | Path, out: str | Path, *, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Converts a HF directory of a mapped family (config.json, safetensors, tokenizer)
    into a bundle."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise HFImportError(f"{config_path}: missing; {hf_dir} is not a HF model directory")
    hf_config = json.loads(config_path.read_text())
    if dtype is None:
        dtype = (
            "bfloat16"
            if hf_config.get("torch_dtype", hf_config.get("dtype")) in ("bfloat16", "float16")
            else "float32"
        )
    cfg = config_from_hf(hf_config, dtype=dtype)
    tokenizer = Tokenizer.from_dir(hf_dir)
    source = {
        "kind": "hf",
        "path": str(hf_dir.resolve()),
        "architecture": (hf_config.get("architectures") or ["?"])[0],
    }
    return write_bundle(
        out, cfg, tokenizer, hf_to_tandem_tensors(hf_dir, cfg), source=source, overwrite=overwrite
    )


def main(argv: list[str] | None = None) -> int:
    """`tandem import-hf HF_DIR --out BUNDLE [--dtype float32|bfloat16]`."""
    parser = argparse.ArgumentParser(
        prog="tandem import-hf",
        description="Import a Hugging Face Llama, Mistral, Qwen2 or Qwen3 directory.",
    )
    parser.add_argument("hf_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="stored/compute dtype (default: the checkpoint's)",
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    path = import_hf(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    log.info("wrote bundle %s", path)
    return 0
