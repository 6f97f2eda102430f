"""`tandem export`: a training checkpoint -> a serving bundle (or a Hugging Face directory).

    tandem export [CONFIG] [key=value ...] --checkpoint RUN_DIR[/STEP] --out BUNDLE
                  [--dtype bfloat16|float32] [--quantize int8] [--format tandem|hf]

(every flag is another spelling of an ExportConfig key: `--out B` = `out=B`)

What makes it boring and reliable:
- only the params are restored (never the optimizer state), one tensor at a time onto
  the host CPU with Orbax partial restore, so host memory holds one tensor plus one
  output shard while writing;
- the checkpoint's own TrainConfig defines the model; every stored param shape is
  checked against it before anything is read, with a message naming the tensor;
- after writing, a validation forward compares the bundle's logits with the training
  model's on a fixed probe batch; a mismatch removes the bundle and fails the export;
- the quality of the exported weights (held-out perplexity, and the delta against the
  unquantized weights in the same dtype) is measured, printed and kept in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tandem.config import Flag, check_choices, fingerprint, load_config, parse_command_line, require
from tandem.model.bundle import (
    Bundle,
    add_to_manifest,
    expected_params,
    forward,
    model_from_tensors,
    write_bundle,
)
from tandem.model.config import Dtype, ModelConfig
from tandem.model.hf import import_hf, write_hf_dir
from tandem.model.quant import Quantization, quantize_tensors
from tandem.model.tokenizer import Tokenizer
from tandem.train import data as tdata
from tandem.train.config import TrainConfig
from tandem.train.sft import ExampleEncoder

log = logging.getLogger(__name__)

# Validation: max |bundle logit - training-model logit| / max(1, max |training logit|).
# float32 must be exact up to float rounding; bf16/int8 bounds are ~5x what tiny and
# small models show (docs/export.md), far below what a layout mistake produces (~1).
TOLERANCE = {
    ("float32", "none"): 1e-4,
    ("bfloat16", "none"): 0.05,
    ("float32", "int8"): 0.15,
    ("bfloat16", "int8"): 0.15,
}
PROBE_SHAPE = (2, 64)


class ExportError(ValueError):
    """The export cannot proceed; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = ""  # RUN_DIR (newest step), RUN_DIR/STEP or RUN_DIR/checkpoints/STEP
    out: str = ""  # bundle (or HF) directory to write
    dtype: Dtype = "bfloat16"  # stored weights
    quantize: Quantization = "none"
    format: Literal["tandem", "hf"] = "tandem"
    overwrite: bool = False
    eval_batches: int = 4  # held-out batches for the perplexity report (0 = skip)

    def __post_init__(self) -> None:
        check_choices(self)
        require(bool(self.checkpoint), "checkpoint", self.checkpoint, "a training run_dir")
        require(bool(self.out), "out", self.out, "the directory to write")
        require(self.eval_batches >= 0, "eval_batches", self.eval_batches, ">= 0")
        require(
            self.format == "tandem" or self.quantize == "none",
            "quantize",
            self.quantize,
            "'none' with format=hf (HF directories hold float weights)",
        )


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    run_dir: Path
    directory: Path  # .../checkpoints
    step: int

    @property
    def step_dir(self) -> Path:
        return self.directory / str(self.step)


def locate(path: str | Path) -> Checkpoint:
    """Finds the checkpoint: the newest complete step of a run, or the step named."""
    path = Path(path).absolute()  # Orbax resolves metadata relative to absolute paths
    step = None
    if path.name.isdigit():
        step, path = int(path.name), path.parent
    run_dir = path.parent if path.name == "checkpoints" else path
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise ExportError(f"{directory}: missing; --checkpoint must be a training run_dir")
    steps = ocp.utils.checkpoint_steps(directory)  # finalized steps only, no temporaries
    if not steps:
        raise ExportError(f"{directory}: holds no complete checkpoint")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ExportError(
            f"{directory / str(step)}: no complete checkpoint at step {step} "
            f"(available: {sorted(steps)})"
        )
    return Checkpoint(run_dir, directory, step)


def read_config(ckpt: Checkpoint) -> TrainConfig:
    path = ckpt.step_dir / "config"
    try:
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)
        return load_config(TrainConfig, meta["config"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: missing or unreadable training config ({err})") from err
    except ValueError as err:
        raise ExportError(f"{path}: the saved config is not valid here: {err}") from err


def _checkpoint_shapes(ckpt: Checkpoint) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Stored shape and dtype of every param, from the checkpoint's metadata alone."""
    state = ckpt.step_dir / "state"
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(state)
        tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
        params = dict(tree)["params"]
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        return {".".join(str(k.key) for k in path): (tuple(m.shape), m.dtype) for path, m in flat}
    except Exception as err:  # missing, truncated or foreign metadata all end here
        raise ExportError(
            f"{state}: unreadable checkpoint metadata ({type(err).__name__}: {err})"
        ) from err


def restore_params(ckpt: Checkpoint, model_cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every param, each restored on its own onto the host."""
    stored = _checkpoint_shapes(ckpt)
    expected = expected_params(model_cfg)
    for name, spec in expected.items():
        if name not in stored:
            raise ExportError(
                f"{ckpt.step_dir / 'state'}: tensor params.{name} is missing "
                "(checkpoint does not match its config)"
            )
        if stored[name][0] != spec.shape:
            raise ExportError(
                f"{ckpt.step_dir / 'state'}: tensor params.{name} has shape "
                f"{stored[name][0]}, the config needs {spec.shape}"
            )
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    checkpointer = ocp.PyTreeCheckpointer()
    for name, spec in expected.items():
        leaf = jax.ShapeDtypeStruct(spec.shape, stored[name][1], sharding=cpu)
        target: dict = {"params": {}}
        node = target["params"]
        *parents, last = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
        try:
            restored = checkpointer.restore(
                ckpt.step_dir / "state",
                args=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                ),
            )
        except Exception as err:  # truncated / corrupt tensor files surface here
            raise ExportError(
                f"{ckpt.step_dir / 'state'}: cannot read params.{name} "
                f"({type(err).__name__}: {err})"
            ) from err
        value = restored["params"]
        for part in name.split("."):
            value = value[part]
        yield name, np.asarray(value, dtype=np.float32)


def _serving_config(model_cfg: ModelConfig, dtype: str, quantize: str) -> ModelConfig:
    """`dtype` is how the weights are stored. Compute stays as wide as training computed
    (a float32-trained model keeps float32 activations over bf16 weights, which is also
    what CPUs run fastest), and float32 weights always compute in float32."""
    impl = "auto" if model_cfg.attention_impl == "pallas_interpret" else model_cfg.attention_impl
    compute = "float32" if "float32" in (dtype, model_cfg.dtype) else "bfloat16"
    return dataclasses.replace(
        model_cfg,
        dtype=compute,
        param_dtype=dtype,
        quantization=quantize,
        remat="none",
        attention_impl=impl,
    )


def _perplexity(model: nnx.Module, batches: list[dict[str, np.ndarray]]) -> tuple[float, int]:
    """exp(mean next-token loss) over the held-out batches' weighted targets."""
    total, count = 0.0, 0.0
    for batch in batches:
        logits = forward(model, batch["tokens"], batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
        weights = jnp.asarray(batch["weights"])
        total += float(jnp.sum(nll * weights))
        count += float(jnp.sum(weights))
    return math.exp(min(total / max(count, 1.0), 80.0)), int(count)


def export(cfg: ExportConfig) -> tuple[Path, dict]:
    """Writes the bundle (or HF directory) and returns it with the validation/quality report."""
    ckpt = locate(cfg.checkpoint)
    train_cfg = read_config(ckpt)
    source_cfg = train_cfg.model
    serving_cfg = _serving_config(source_cfg, cfg.dtype, cfg.quantize)
    tokenizer = _tokenizer(train_cfg, ckpt.run_dir)
    log.info(
        "exporting %s step %d (%s, %s) -> %s",
        ckpt.run_dir,
        ckpt.step,
        cfg.dtype,
        cfg.quantize,
        cfg.out,
    )
    params = dict(restore_params(ckpt, source_cfg))
    out = Path(cfg.out)
    if cfg.format == "hf":
        write_hf_dir(out, serving_cfg, tokenizer, params.items(), overwrite=cfg.overwrite)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            # Validate what a HF consumer would load: re-import it through tandem/model/hf.py.
            try:
                bundle = import_hf(out, Path(tmp) / "bundle", dtype=cfg.dtype)
                report = _validate(cfg, source_cfg, params, Bundle.load(bundle))
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)
                raise
        return out, report
    tensors = iter(params.items())
    if cfg.quantize == "int8":
        tensors = quantize_tensors(tensors)
    source = {
        "kind": "checkpoint",
        "run_dir": str(ckpt.run_dir.resolve()),
        "step": ckpt.step,
        "train_config_sha256": fingerprint(train_cfg.to_dict()),
    }
    write_bundle(
        out,
        serving_cfg,
        tokenizer,
        tensors,
        source=source,
        quantization=None if cfg.quantize == "none" else cfg.quantize,
        overwrite=cfg.overwrite,
    )
    try:
        bundle = Bundle.load(out)
        report = _validate(cfg, source_cfg, params, bundle)
        if cfg.eval_batches:
            report["quality"] = _quality(cfg, train_cfg, ckpt, params, tokenizer, bundle)
        report["bundle_bytes"] = sum(  # everything but the manifest this report joins
            p.stat().st_size for p in out.iterdir() if p.name != "manifest.json"
        )
        add_to_manifest(out, report)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out, report


def _validate(
    cfg: ExportConfig, source_cfg: ModelConfig, params: dict[str, np.ndarray], bundle: Bundle
) -> dict:
    """The bundle's logits on a fixed probe batch must match the training model's."""
    probe = np.random.default_rng(0).integers(
        0,
        bundle.tokenizer.vocab_size,
        (PROBE_SHAPE[0], min(PROBE_SHAPE[1], source_cfg.max_seq_len)),
    )
    training_model = model_from_tensors(_serving_config(source_cfg, "float32", "none"), params)
    reference = forward(training_model, probe)
    got = bundle.logits(probe)
    error = float(np.max(np.abs(got - reference)) / max(1.0, float(np.max(np.abs(reference)))))
    limit = TOLERANCE[(cfg.dtype, cfg.quantize)]
    if not error <= limit:
        raise ExportError(
            f"{cfg.out}: validation failed: exported logits differ from the "
            f"training model by {error:.3g} (relative), allowed {limit}; "
            "output removed"
        )
    return {
        "validation": {"probe_shape": list(probe.shape), "max_rel_error": error, "tolerance": limit}
    }


def _quality(
    cfg: ExportConfig,
    train_cfg: TrainConfig,
    ckpt: Checkpoint,
    params: dict[str, np.ndarray],
    tokenizer: Tokenizer,
    bundle: Bundle,
) -> dict:
    """Held-out perplexity of the bundle and of the unquantized weights in the same dtype."""
    batches = _heldout_batches(train_cfg, tokenizer, cfg.eval_batches)
    unquantized = model_from_tensors(_serving_config(train_cfg.model, cfg.dtype, "none"), params)
    ppl_reference, n_tokens = _perplexity(unquantized, batches)
    ppl_bundle, _ = _perplexity(bundle.model(), batches)
    return {
        "heldout_tokens": n_tokens,
        "reference": f"{cfg.dtype}, unquantized",
        "perplexity_reference": ppl_reference,
        "perplexity_bundle": ppl_bundle,
        "perplexity_delta": ppl_bundle - ppl_reference,
    }


def _heldout_batches(
    train_cfg: TrainConfig, tokenizer: Tokenizer, n: int
) -> list[dict[str, np.ndarray]]:
    """The run's own held-out split, packed exactly as the trainer's eval packs it."""
    _, eval_source = tdata.load_sources(
        train_cfg.data, train_cfg.eval_data, train_cfg.eval_holdout, train_cfg.text_key
    )
    encoder = ExampleEncoder(tokenizer)
    eval_source = tdata.drop_unusable(eval_source, encoder, train_cfg.seq_len)
    batch = min(train_cfg.batch_size, 8)
    it = tdata.PackedBatches(
        eval_source,
        encoder,
        seq_len=train_cfg.seq_len,
        batch_size=batch,
        rows=range(batch),
        seed=train_cfg.seed + 1,
    )
    return [next(it) for _ in range(n)]


def _tokenizer(train_cfg: TrainConfig, run_dir: Path) -> Tokenizer:
    """The tokenizer the run trained with (a trained BPE, or the init_from model's files,
    cached in the run dir)."""
    if train_cfg.tokenizer in ("auto", "bpe"):  # trained BPE or init_from's, cached
        cached = run_dir / "tokenizer"
        if not (cached / "tokenizer.json").is_file():
            raise ExportError(
                f"{cached / 'tokenizer.json'}: missing; the run's BPE tokenizer "
                "is needed to export it"
            )
        if train_cfg.init_from:  # the pretrained model's own files
            return Tokenizer.from_dir(cached)
        return Tokenizer.tandem_bpe_from_dir(cached)
    train_source, _ = tdata.load_sources(
        train_cfg.data, train_cfg.eval_data, train_cfg.eval_holdout, train_cfg.text_key
    )
    return tdata.build_tokenizer(
        train_cfg.tokenizer, train_source, train_cfg.model.vocab_size, run_dir, is_primary=False
    )


FLAGS = (
    Flag(
        "--checkpoint", "checkpoint", "RUN_DIR (newest step), RUN_DIR/STEP or .../checkpoints/STEP"
    ),
    Flag("--out", "out", "bundle (or HF) directory to write"),
    Flag("--dtype", "dtype", "stored weights: bfloat16 (default) or float32"),
    Flag("--quantize", "quantize", "none (default) or int8"),
    Flag("--format", "format", "tandem (default: a serving bundle) or hf"),
    Flag("--eval-batches", "eval_batches", "held-out batches for the perplexity report (0 = skip)"),
    Flag("--overwrite", "overwrite", "replace an existing OUT", switch="true"),
)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command_line(
        ExportConfig,
        sys.argv[1:] if argv is None else argv,
        prog="tandem export",
        description=__doc__,
        flags=FLAGS,
    )
    out, report = export(cfg)
    print(json.dumps({"out": str(out), **report}))
    return 0
