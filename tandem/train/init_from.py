"""Starting a run from pretrained weights: `tandem train init_from=PATH ...`.

PATH is a Hugging Face model directory (config.json + safetensors, sharded or not), a
tandem bundle, or another run's checkpoint directory (RUN_DIR, RUN_DIR/STEP or
RUN_DIR/checkpoints/STEP). The architecture and the tokenizer come from PATH; of the
`model.*` settings only those that do not change what the weights mean (compute and
param dtype, remat, attention_impl) may be set differently, anything else is refused
naming the field. MaxText's `load_parameters_path` is the anchor: params only, a fresh
optimizer state at step 0.

Weights go onto the mesh tensor by tensor, already sharded: HF and bundle tensors are
read one at a time on the host (a stacked [L, ...] tensor is the largest thing held) and
each device receives only its shard (`jax.make_array_from_callback`); a checkpoint's params
are restored by Orbax straight into their shardings. The copy happens only when run_dir
holds no checkpoint: a resumed run continues from its own.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from tandem.config import load_config, require
from tandem.model.bundle import MANIFEST, Bundle
from tandem.model.config import ModelConfig
from tandem.model.hf import config_from_hf, hf_to_tandem_tensors

# model.* fields a fine-tune may set differently from the pretrained model's config:
# how the same weights are computed, never what they are.
ADJUSTABLE_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl")
# Tokenizer files worth carrying from PATH into run_dir/tokenizer (what HF tools and the
# bundle need: vocabulary, special tokens, chat template, stop tokens).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """What `init_from` points at, identified and read (weights are read later)."""

    kind: Literal["hf", "bundle", "checkpoint"]
    path: Path  # the HF dir / bundle dir / checkpoint step dir
    model: ModelConfig
    tokenizer_dir: Path  # holds tokenizer.json (+ tokenizer_config.json, ...)


def locate(init_from: str) -> Pretrained:
    """Identifies PATH by what it holds; a path that is none of the three is refused."""
    path = Path(init_from).absolute()  # Orbax resolves paths relative to absolute ones
    require(path.exists(), "init_from", init_from, "an existing HF model dir, bundle or run dir")
    if (path / MANIFEST).is_file():
        bundle = Bundle.load(path)
        require(
            bundle.config.quantization == "none",
            "init_from",
            init_from,
            "a float bundle (this one is int8-quantized: fine-tune from its source instead)",
        )
        return Pretrained("bundle", path, bundle.config, path)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        require(
            (path / "tokenizer.json").is_file(),
            "init_from",
            init_from,
            "a HF model dir with its tokenizer.json (the fast-tokenizer file; convert a "
            "sentencepiece-only tokenizer with transformers first)",
        )
        hf_config = json.loads((path / "config.json").read_text())
        return Pretrained("hf", path, config_from_hf(hf_config), path)
    step_dir = _checkpoint_step_dir(path)
    require(
        step_dir is not None,
        "init_from",
        init_from,
        "a HF model dir (config.json + *.safetensors), a tandem bundle (manifest.json) or a "
        "training run dir holding checkpoints/",
    )
    assert step_dir is not None
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config")
    model = load_config(ModelConfig, meta["config"]["model"])
    run_dir = step_dir.parent.parent
    tokenizer_dir = run_dir / "tokenizer"
    require(
        (tokenizer_dir / "tokenizer.json").is_file(),
        "init_from",
        init_from,
        f"a run whose tokenizer is saved in {tokenizer_dir} (its BPE or pretrained tokenizer)",
    )
    return Pretrained("checkpoint", step_dir, model, tokenizer_dir)


def _checkpoint_step_dir(path: Path) -> Path | None:
    """RUN_DIR -> its newest complete step; RUN_DIR/STEP, .../checkpoints/STEP -> that step."""
    if path.name.isdigit():
        candidates = [path.parent / path.name, path.parent / "checkpoints" / path.name]
        return next((c for c in candidates if (c / "state").is_dir()), None)
    directory = path if path.name == "checkpoints" else path / "checkpoints"
    if not directory.is_dir():
        return None
    steps = ocp.utils.checkpoint_steps(directory)  # finalized steps only
    return directory / str(max(steps)) if steps else None


def resolve_model(
    requested: ModelConfig, base: ModelConfig, pretrained: ModelConfig
) -> ModelConfig:
    """The run's model config: `pretrained`'s, plus the adjustable fields the user set.

    `requested` is the config the command line built, `base` the one it started from
    before any `model.*` override (the preset's or the file's), so a field that differs
    between the two is one the user asked for.
    """
    adjusted = {}
    for f in dataclasses.fields(ModelConfig):
        wanted, default = getattr(requested, f.name), getattr(base, f.name)
        if wanted == default or wanted == getattr(pretrained, f.name):
            continue
        require(
            f.name in ADJUSTABLE_FIELDS,
            f"model.{f.name}",
            wanted,
            f"the pretrained model's {getattr(pretrained, f.name)!r} with init_from (only "
            f"{', '.join('model.' + a for a in ADJUSTABLE_FIELDS)} may differ)",
        )
        adjusted[f.name] = wanted
    return dataclasses.replace(pretrained, **adjusted)


def check_model(model: ModelConfig, pretrained: ModelConfig) -> None:
    """Refuses a run config whose model is not the pretrained one up to adjustable fields."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in ADJUSTABLE_FIELDS:
            continue
        require(
            getattr(model, f.name) == getattr(pretrained, f.name),
            f"model.{f.name}",
            getattr(model, f.name),
            f"the init_from model's {getattr(pretrained, f.name)!r}",
        )


def copy_tokenizer(pretrained: Pretrained, run_dir: Path) -> Path:
    """Copies the pretrained tokenizer files into run_dir/tokenizer (written once,
    atomically) so the run, its export and a later resume all read the same files."""
    target = run_dir / "tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".tokenizer-init"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in TOKENIZER_FILES:
        if (pretrained.tokenizer_dir / name).is_file():
            shutil.copy2(pretrained.tokenizer_dir / name, tmp / name)
    tmp.replace(target)
    return target


def load_params(pretrained: Pretrained, model: ModelConfig, shardings: Any) -> dict[str, Any]:
    """The pretrained params as a pure dict of global arrays laid out by `shardings` (the
    trainer's param shardings), cast to `model.param_dtype`."""
    if pretrained.kind == "checkpoint":
        return _restore_checkpoint_params(pretrained.path, shardings, np.dtype(model.param_dtype))
    tensors: Iterator[tuple[str, np.ndarray]]
    if pretrained.kind == "hf":
        tensors = hf_to_tandem_tensors(pretrained.path, model)
    else:
        tensors = Bundle.load(pretrained.path, verify=False).tensors()
    flat_shardings = _flatten(shardings)
    params: dict[str, Any] = {}
    for name, host in tensors:
        require(name in flat_shardings, "init_from", str(pretrained.path), f"no tensor {name!r}")
        sharding: NamedSharding = flat_shardings.pop(name)
        host = np.asarray(host, dtype=np.dtype(model.param_dtype))
        value = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
        _set(params, name, value)
    require(
        not flat_shardings,
        "init_from",
        str(pretrained.path),
        f"all the model's tensors (missing: {sorted(flat_shardings)})",
    )
    return params


def _restore_checkpoint_params(step_dir: Path, shardings: Any, dtype: np.dtype) -> dict[str, Any]:
    def leaf(sharding: NamedSharding, meta: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(meta.shape), dtype, sharding=sharding)

    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(step_dir / "state")
    tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
    target = {"params": jax.tree.map(leaf, shardings, dict(tree)["params"])}
    restored = checkpointer.restore(
        step_dir / "state",
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    return restored["params"]


def _flatten(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(k.key) for k in path): leaf for path, leaf in flat}


def _set(tree: dict[str, Any], name: str, value: Any) -> None:
    *parents, last = name.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value
