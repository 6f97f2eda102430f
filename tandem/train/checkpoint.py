"""Orbax checkpoints of a training run: save async, keep the last K, resume the newest good one.

Layout (Orbax's): `run_dir/checkpoints/<step>/state/` (params, optimizer state, step, RNG
key data and the data-iterator state as one sharded pytree) and `.../<step>/config/` (the
TrainConfig as JSON). Orbax writes a step into a temporary directory and renames it when
complete, so a crash mid-save never hides the previous checkpoint; leftover temporaries are
cleaned on the next start.

Restoring takes an *abstract* target (shapes, dtypes and the shardings of the current
mesh), so a run saved on 8 devices resumes on 4 (or on another mesh shape) unchanged.
A checkpoint that fails to restore is moved to `run_dir/checkpoints_corrupt/` with a
warning and the next older one is tried.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


# Fields that fix the shapes/structure of what a checkpoint holds: resuming with any of them
# changed cannot work, and must not be mistaken for a corrupt checkpoint.
STRUCTURAL_FIELDS = (
    "model.vocab_size",
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.head_dim",
    "model.d_ff",
    "model.tie_embeddings",
    "model.attention_bias",
    "model.qk_norm",
    "batch_size",
)
# Structural fields newer than the first checkpoints: a saved config without one had it off.
_ADDED_LATER = {"model.attention_bias": False, "model.qk_norm": False}


def incompatible_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field: saved -> current` for each structural field that differs."""
    out = []
    for name in STRUCTURAL_FIELDS:
        a, b = _get(saved, name), _get(current, name)
        if a != b:
            out.append(f"{name}: {a!r} in the checkpoint, {b!r} now")
    if bool(saved.get("grad_clip", 0)) != bool(current.get("grad_clip", 0)):
        out.append("grad_clip: switching clipping on/off changes the optimizer state")
    return out


def _get(config: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key; a missing one reads as None, or as its default if the
    field is newer than the checkpoint."""
    value: Any = config
    for key in dotted.split("."):
        if key not in (value or {}):
            return _ADDED_LATER.get(dotted)
        value = value[key]
    return value


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Checkpointer:
    def __init__(self, directory: Path, *, keep: int, async_save: bool):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
        )

    def save(self, step: int, state: Any, config: dict[str, Any]) -> None:
        """Starts a save of `state` (a pytree of jax arrays) at `step`; returns once the
        device->host copy is done, so the caller may donate/overwrite the arrays."""
        meta = {
            "config": config,
            "step": step,
            "time": time.time(),
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """(step, state) from the newest checkpoint that restores, or None if there is none.

        `abstract_state`: pytree of jax.ShapeDtypeStruct with the shardings to restore onto.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)),
                )
            except Exception as err:  # any failure = unusable checkpoint
                log.warning(
                    "checkpoint at step %d in %s cannot be restored (%s: %s); falling back to "
                    "the previous checkpoint",
                    step,
                    self.directory,
                    type(err).__name__,
                    str(err).splitlines()[0][:300] if str(err) else "",
                )
                self._quarantine(step)
                continue
            log.info("restored checkpoint step %d from %s", step, self.directory)
            return step, restored.state
        return None

    def _quarantine(self, step: int) -> None:
        """Moves a bad step out of Orbax's view so new saves at that step can happen."""
        _barrier(f"quarantine-{step}-a")
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory.parent / "checkpoints_corrupt" / f"{step}-{int(time.time())}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.exists():
                shutil.move(str(src), str(dst))
                log.warning("moved unreadable checkpoint %s to %s", src, dst)
        _barrier(f"quarantine-{step}-b")
        self.manager.reload()

    def saved_config(self, step: int) -> dict[str, Any] | None:
        """The TrainConfig dict stored with `step` (None if unreadable)."""
        try:
            r = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
            return dict(r.config)["config"]
        except Exception as err:  # unreadable metadata: restore_latest decides what to do
            log.warning("cannot read the config stored with step %d: %s", step, err)
            return None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
