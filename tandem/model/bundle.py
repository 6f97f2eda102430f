"""The serving bundle: the one on-disk format that export and HF import write and serving reads.

    BUNDLE/
      config.json                 ModelConfig (param_dtype is the stored dtype)
      tokenizer.json              HF tokenizers format (its post-processor decides BOS)
      tokenizer_config.json       names of the special tokens, the chat template
      generation_config.json      eos_token_id: the ids that end generation
      params.index.json           tensor name -> shard file (HF's index layout)
      params-00001-of-0000N.safetensors
      manifest.json               format, version, dtype, quantization, source, sha256 of
                                  every other file

Tensors are streamed in and out one at a time, so writing or loading holds at most one
shard plus one tensor in host memory. A bundle is written into a temporary sibling
directory and renamed into place, so a crash never leaves a half-written bundle that
looks valid; loading checks every file's sha256 against the manifest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from tandem.model.chat_template import ChatTemplate
from tandem.model.config import ModelConfig
from tandem.model.sharding import param_shardings
from tandem.model.tokenizer import Tokenizer
from tandem.model.transformer import Transformer

log = logging.getLogger(__name__)

FORMAT = "tandem-bundle"
FORMAT_VERSION = 2  # 2: the model's tokenizer conventions (post-processor BOS, stop ids, template)
MANIFEST = "manifest.json"
INDEX = "params.index.json"
DEFAULT_SHARD_BYTES = 2 << 30


class BundleError(ValueError):
    """A bundle (or what is being written as one) is missing, corrupt or inconsistent."""


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only params of `Transformer(cfg)`, allocating nothing."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param)


def expected_params(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat tensor name (`layers.wq`) -> shape and dtype: the bundle's contract with the model."""
    _, abstract = abstract_model(cfg)
    return {
        _name(path): jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype)
        for path, var in nnx.to_flat_state(abstract)
    }


def _name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def flat_params(params: nnx.State) -> Iterator[tuple[str, jax.Array]]:
    """(name, array) for every param of a model state, in a stable order."""
    for path, var in nnx.to_flat_state(params):
        yield _name(path), var.get_value()


def model_from_tensors(cfg: ModelConfig, tensors: Mapping[str, Any]) -> Transformer:
    """`Transformer(cfg)` holding the given flat-named tensors (cast to the param dtypes)."""
    graphdef, abstract = abstract_model(cfg)
    flat = [
        (path, var.replace(jnp.asarray(tensors[_name(path)], var.get_value().dtype)))
        for path, var in nnx.to_flat_state(abstract)
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def forward(
    model: Transformer,
    tokens: np.ndarray,  # [B, T]
    positions: np.ndarray | None = None,  # [B, T]; default 0..T-1
    segment_ids: np.ndarray | None = None,  # [B, T]; default one document per row
) -> np.ndarray:  # [B, T, V] float32
    """Full-sequence logits of `model`, for validation and parity checks."""
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    graphdef, params = nnx.split(model, nnx.Param)
    return np.asarray(_forward(graphdef, params, tokens, positions, segment_ids), np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, positions, segment_ids):
    return nnx.merge(graphdef, params)(tokens, positions, segment_ids)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bundle(
    out_dir: str | Path,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    tensors: Iterable[tuple[str, Any]],
    *,
    source: Mapping[str, Any],
    quantization: str | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Writes a bundle atomically. `tensors` yields (name, array) once each; every name the
    model expects must appear with the right shape (cast to `cfg.param_dtype`)."""
    out_dir = Path(out_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise BundleError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {cfg.vocab_size}"
        )
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        tokenizer.save(tmp)
        _write_tensors(tmp, cfg, tensors, shard_bytes)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": cfg.param_dtype,
            "quantization": quantization,
            "config_sha256": cfg.fingerprint(),
            "source": dict(source),
            **(extra_manifest or {}),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def add_to_manifest(bundle_dir: str | Path, entries: Mapping[str, Any]) -> None:
    """Adds measured entries (validation, quality) to a written bundle's manifest.
    manifest.json is not itself hashed, so this leaves the bundle valid; it is written to
    a temporary file and renamed, never left half-written."""
    path = Path(bundle_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(entries)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def atomic_directory(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yields an empty temporary sibling of `target` to fill; when the block completes it
    replaces `target` by renames only. On any error it is deleted and `target` is left
    exactly as it was, so a crash never leaves a half-written directory that looks valid."""
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise BundleError(f"{target}: already exists and is not empty (pass overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tensors(
    directory: Path, cfg: ModelConfig, tensors: Iterable[tuple[str, Any]], shard_bytes: int
) -> None:
    expected = expected_params(cfg)
    seen: set[str] = set()

    def checked() -> Iterator[tuple[str, np.ndarray]]:
        for name, value in tensors:
            if name not in expected:
                raise BundleError(
                    f"tensor {name!r} is not a param of this model; "
                    f"expected names: {sorted(expected)}"
                )
            if name in seen:
                raise BundleError(f"tensor {name!r} given twice")
            seen.add(name)
            want = expected[name]
            array = np.asarray(jax.device_get(value))
            if array.shape != want.shape:
                raise BundleError(
                    f"tensor {name!r} has shape {array.shape}, the config needs {want.shape}"
                )
            if want.dtype == np.int8 and array.dtype != np.int8:
                raise BundleError(
                    f"tensor {name!r} is {array.dtype}, the int8 config needs "
                    "int8 (quantize it with model.quant.quantize_tensors)"
                )
            yield name, array.astype(want.dtype, copy=False)
        missing = sorted(set(expected) - seen)
        if missing:
            raise BundleError(f"missing tensors: {missing}")

    weight_map = write_safetensors_shards(
        directory, checked(), prefix="params", shard_bytes=shard_bytes
    )
    index = {"weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_safetensors_shards(
    directory: Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    prefix: str,
    shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Streams tensors into `{prefix}-0000i-of-0000n.safetensors` files of about
    `shard_bytes` each, holding one shard in memory; returns tensor name -> file name."""
    shard: dict[str, np.ndarray] = {}
    pending = 0
    files: list[Path] = []
    owner: dict[str, int] = {}

    def flush() -> None:
        path = directory / f".{prefix}-{len(files) + 1:05d}.partial"
        # safetensors writes an array's raw buffer: a transposed view would be stored
        # untransposed, so every tensor is made C-contiguous first.
        save_file(
            {k: np.ascontiguousarray(v) for k, v in shard.items()}, str(path), metadata=metadata
        )
        files.append(path)

    for name, array in tensors:
        if shard and pending + array.nbytes > shard_bytes:
            flush()
            shard, pending = {}, 0
        shard[name] = array
        owner[name] = len(files)
        pending += array.nbytes
    flush()
    names = []
    for i, path in enumerate(files):
        names.append(f"{prefix}-{i + 1:05d}-of-{len(files):05d}.safetensors")
        path.rename(directory / names[-1])
    return {name: names[i] for name, i in owner.items()}


def replace_dir(new: Path, target: Path) -> None:
    """Moves `new` to `target` with renames only, so `target` is always whole or absent."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(trash)
        new.rename(target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        new.rename(target)


class Bundle:
    """A verified bundle on disk. Loading checks the manifest and hashes; params are read
    lazily, tensor by tensor, onto an optional mesh."""

    def __init__(self, path: Path, config: ModelConfig, tokenizer: Tokenizer, manifest: dict):
        self.path, self.config, self.tokenizer, self.manifest = path, config, tokenizer, manifest

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> Bundle:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{manifest_path}: missing; {path} is not a tandem bundle")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise BundleError(f"{manifest_path}: not valid JSON ({err})") from err
        if manifest.get("format") != FORMAT:
            raise BundleError(
                f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}"
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{manifest_path}: format_version {manifest.get('format_version')!r} is not "
                f"supported (this tandem reads version {FORMAT_VERSION}; re-export the "
                "checkpoint or re-run tandem import-hf)"
            )
        files = manifest.get("files") or {}
        for name in ("config.json", "tokenizer.json", INDEX):
            if name not in files:
                raise BundleError(f"{manifest_path}: lists no {name}")
        if verify:
            for name, digest in files.items():
                file = path / name
                if not file.is_file():
                    raise BundleError(f"{file}: listed in the manifest but missing")
                if _sha256(file) != digest:
                    raise BundleError(
                        f"{file}: sha256 does not match manifest.json (corrupt or modified)"
                    )
        config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
        if manifest.get("config_sha256") not in (None, config.fingerprint()):
            raise BundleError(
                f"{path / 'config.json'}: does not match the manifest's config_sha256"
            )
        return cls(path, config, Tokenizer.from_dir(path), manifest)

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template (from tokenizer_config.json), None if it has none."""
        return self.tokenizer.chat_template

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """The ids that end generation: the EOS plus generation_config.json's."""
        return self.tokenizer.stop_ids

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) straight from the safetensors shards, one tensor at a time."""
        index = json.loads((self.path / INDEX).read_text())["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, file in index.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            with safe_open(self.path / file, framework="numpy") as f:
                for name in names:
                    yield name, f.get_tensor(name)

    def params(self, mesh: Mesh | None = None) -> nnx.State:
        """The model params, placed with the logical sharding rules when `mesh` is given."""
        _, abstract = abstract_model(self.config)
        shardings = param_shardings(abstract, mesh) if mesh is not None else None
        flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
        expected = {_name(path): path for path, _ in nnx.to_flat_state(abstract)}
        values: dict[tuple, jax.Array] = {}
        for name, array in self.tensors():
            if name not in expected:
                raise BundleError(f"{self.path}: unexpected tensor {name!r}")
            path = expected[name]
            sharding = flat_shardings.get(path)
            values[path] = jax.device_put(array, None if sharding is None else sharding.get_value())
        missing = sorted(set(expected) - {_name(p) for p in values})
        if missing:
            raise BundleError(f"{self.path}: missing tensors {missing}")
        flat = nnx.to_flat_state(abstract)
        return nnx.from_flat_state([(path, var.replace(values[path])) for path, var in flat])

    def model(self, mesh: Mesh | None = None) -> Transformer:
        graphdef, _ = abstract_model(self.config)
        return nnx.merge(graphdef, self.params(mesh))

    @cached_property
    def _model(self) -> Transformer:
        return self.model()

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Full-sequence logits, float32 [B, T, V], for parity checks against other stacks."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"tokens must be an integer array [batch, seq], got {tokens.dtype} {tokens.shape}"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return forward(self._model, tokens.astype(np.int32))
