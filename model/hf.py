"""Hugging Face Llama <-> tandem: config and weight mapping, and `tandem import-hf`.

The mapping lives here once and serves both directions (import now, `--format hf`
export later). HF stores each linear layer as [out, in] per layer; tandem stacks layers
and keeps [in, ..out] with heads split out, so every matrix is a transpose plus reshape
and every norm is copied as is. Import streams one HF tensor at a time into one stacked
tandem tensor, so host memory is bounded by the largest (stacked) tensor, not the model.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

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

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

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


def config_from_hf(hf: dict[str, Any], *, dtype: str = "float32") -> ModelConfig:
    """Translates a transformers LlamaConfig dict; rejects what tandem cannot represent."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if archs[0] not in SUPPORTED_ARCHITECTURES and hf.get("model_type") != "llama":
        raise HFImportError(
            f"config.json: architecture {archs[0]!r} is not supported "
            f"(supported: {SUPPORTED_ARCHITECTURES})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise HFImportError(f"config.json: {flag}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFImportError(
            f"config.json: hidden_act={hf['hidden_act']!r} is not supported (supported: 'silu')"
        )
    # transformers 5 nests RoPE under rope_parameters; 4.x uses rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type == "default":
        scaling = None
    else:
        raise HFImportError(
            f"config.json: rope_type {rope_type!r} is not supported "
            "(supported: 'default', 'llama3')"
        )
    try:
        n_heads = int(hf["num_attention_heads"])
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
            d_ff=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dtype=dtype,
            param_dtype=dtype,
        )
    except KeyError as err:
        raise HFImportError(f"config.json: missing key {err.args[0]!r}") from err
    except ValueError as err:
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

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise HFImportError(f"missing tensor {name!r} in the HF checkpoint")
        file = self._where[name]
        if not file.is_file():
            raise HFImportError(f"{file}: missing (listed in the index for {name!r})")
        if file not in self._open:
            self._open[file] = safe_open(file, framework="numpy")
        return self._open[file].get_tensor(name)


def _to_tandem(hf_tensor: np.ndarray, is_matrix: bool, shape: tuple[int, ...]) -> np.ndarray:
    return hf_tensor.T.reshape(shape) if is_matrix else hf_tensor


def _checked(name: str, hf_name: str, tensor: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    if tuple(tensor.shape) != hf_shape:
        raise HFImportError(
            f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, config.json "
            f"implies {hf_shape} (for {name})"
        )
    return tensor


def hf_to_tandem_tensors(hf_dir: Path, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields tandem (name, stacked array) pairs, reading HF tensors one at a time."""
    source = _HFTensors(hf_dir)
    dtype = jnp.dtype(cfg.param_dtype)
    for name, spec in expected_params(cfg).items():
        shape = spec.shape
        if name in _LAYER_MAP:
            template, is_matrix = _LAYER_MAP[name]
            stacked = None
            for i in range(cfg.n_layers):
                hf_name = template.format(i=i)
                tensor = _checked(name, hf_name, source.get(hf_name), hf_layer_shape(name, cfg))
                if stacked is None:
                    stacked = np.empty(shape, dtype)
                stacked[i] = _to_tandem(tensor, is_matrix, shape[1:])
            yield name, stacked
        else:
            hf_name, is_matrix = _GLOBAL_MAP[name]
            tensor = _checked(name, hf_name, source.get(hf_name), hf_layer_shape(name, cfg))
            yield name, _to_tandem(tensor, is_matrix, shape).astype(dtype)


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
    }[name]


def config_to_hf(cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """The transformers LlamaConfig dict for `cfg`. RoPE is written in the 4.x form
    (rope_theta + rope_scaling), which transformers 5 and vLLM also read."""
    if cfg.quantization != "none":
        raise HFImportError(
            "an int8 model cannot be written in HF format; export the float "
            "weights (drop --quantize)"
        )
    scaling = cfg.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
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
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": cfg.param_dtype,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }


def tandem_to_hf_tensors(
    tensors: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig
) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of `hf_to_tandem_tensors`: per-layer [out, in] HF tensors."""
    for name, array in tensors:
        array = np.asarray(array)
        if name in _LAYER_MAP:
            template, is_matrix = _LAYER_MAP[name]
            for i in range(cfg.n_layers):
                yield template.format(i=i), _to_hf(array[i], is_matrix, name, cfg)
        elif name in _GLOBAL_MAP:
            hf_name, is_matrix = _GLOBAL_MAP[name]
            yield hf_name, _to_hf(array, is_matrix, name, cfg)
        else:
            raise HFImportError(f"tensor {name!r} has no HF Llama equivalent")


def _to_hf(array: np.ndarray, is_matrix: bool, name: str, cfg: ModelConfig) -> np.ndarray:
    if not is_matrix:
        return array
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
    """Writes a HF Llama directory (config.json, sharded model safetensors + index,
    tokenizer) atomically, so transformers or vLLM load a tandem-trained model."""
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
    """Converts a HF Llama directory (config.json, safetensors, tokenizer) into a bundle."""
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
        prog="tandem import-hf", description="Import a Hugging Face Llama directory."
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
