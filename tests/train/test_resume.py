"""End to end through `python -m train`, against one uninterrupted reference run (8 devices):
its loss goes down; SIGTERM -> final save + clean exit; kill -9 mid-training -> resume
reproduces the reference loss sequence exactly; restore onto a different mesh (8 -> 4
devices); a corrupt newest checkpoint falls back to the previous one; 2 processes
(jax.distributed, gloo) agree with the reference."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train.train_helpers import (
    SMALL,
    free_port,
    losses,
    metrics,
    read_log,
    spawn,
    spawn_cli,
)

pytestmark = pytest.mark.slow

STEPS = 40
RUN = [  # on top of SMALL (byte tokenizer, embedded corpus)
    f"steps={STEPS}",
    "checkpoint_every=5",
    "eval_every=20",
    "learning_rate=3e-3",
    "tensorboard=true",
    "mesh.data=2",
    "mesh.tensor=2",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Persistent compilation cache shared by the subprocess runs: the same programs are
    compiled once (this is also what a resumed production run does)."""
    return f"compile_cache_dir={tmp_path_factory.mktemp('xla-cache')}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The uninterrupted run (8 devices), every checkpoint kept."""
    d = tmp_path_factory.mktemp("reference") / "run"
    p = spawn(d, *RUN, cache, "keep_checkpoints=100")
    assert p.wait(timeout=300) == 0, read_log(d)[-3000:]
    ref = losses(d)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return d, ref


def test_loss_goes_down_on_tiny(reference):
    """The reference run: embedded stdlib corpus, byte tokenizer, a (2, 2, 2) mesh."""
    ref_dir, _ = reference
    ms = metrics(ref_dir)
    assert [m["step"] for m in ms] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "tokens_per_s", "mfu", "grad_norm", "lr", "step_time"):
        assert all(np.isfinite(m[key]) for m in ms), key
    first, last = ms[0]["loss"], np.mean([m["loss"] for m in ms[-5:]])
    assert first > np.log(259) - 0.5  # starts near uniform
    assert last < first - 1.2, (first, last)  # ~5.5 -> ~3.9 nats in 40 steps
    evals = [m for m in ms if "eval_loss" in m]
    assert [m["step"] for m in evals] == [20, 40]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] < first
    assert evals[1]["eval_perplexity"] == pytest.approx(np.exp(evals[1]["eval_loss"]))
    assert any((ref_dir / "tensorboard").iterdir())
    assert len(list((ref_dir / "checkpoints").iterdir())) == STEPS // 5


def _wait_for_step(run_dir: Path, proc, step: int, timeout: float = 180) -> int:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        ms = metrics(run_dir)
        if ms and ms[-1]["step"] >= step:
            return ms[-1]["step"]
        assert proc.poll() is None, f"run exited early:\n{read_log(run_dir)[-3000:]}"
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached")


def _copy_until(reference: Path, dst: Path, last_step: int) -> None:
    shutil.copytree(reference, dst)
    for ck in (dst / "checkpoints").iterdir():
        if ck.name.isdigit() and int(ck.name) > last_step:
            shutil.rmtree(ck)


def test_sigterm_then_kill9_then_resume_is_exact(reference, cache, tmp_path):
    _, ref = reference
    run = tmp_path / "run"

    p = spawn(run, *RUN, cache, log_name="1")
    _wait_for_step(run, p, 8)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0, read_log(run, "1")[-3000:]
    stopped = metrics(run)[-1]["step"]
    assert stopped < STEPS, "the run finished before SIGTERM arrived"
    steps_saved = sorted(int(c.name) for c in (run / "checkpoints").iterdir() if c.name.isdigit())
    assert steps_saved[-1] == stopped  # the final save on SIGTERM
    assert "SIGTERM" in read_log(run, "1")

    p = spawn(run, *RUN, cache, log_name="2")
    _wait_for_step(run, p, stopped + 8)
    p.kill()  # SIGKILL: no handler, no final save
    assert p.wait(timeout=60) == -signal.SIGKILL
    killed_at = metrics(run)[-1]["step"]
    assert killed_at < STEPS, "the run finished before it was killed"
    log2 = read_log(run, "2")
    assert f"resuming at step {stopped}" in log2

    p = spawn(run, *RUN, cache, log_name="3")
    assert p.wait(timeout=180) == 0, read_log(run, "3")[-3000:]
    log3 = read_log(run, "3")
    resumed = int(log3.split("resuming at step ")[1].split()[0])
    assert stopped < resumed <= killed_at
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref  # bit-for-bit the same loss sequence


def test_restore_onto_a_different_mesh(reference, cache, tmp_path):
    ref_dir, ref = reference
    run = tmp_path / "run"
    _copy_until(ref_dir, run, 30)
    # saved on 8 devices as (data 2, fsdp 2, tensor 2); resumed on 4 as (2, 1, 2)
    p = spawn(run, *RUN, cache, devices=4)
    assert p.wait(timeout=180) == 0, read_log(run)[-3000:]
    log = read_log(run)
    assert "resuming at step 30" in log and "over 4 devices" in log
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    steps = range(31, STEPS + 1)
    np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=1e-4)


def test_corrupt_newest_checkpoint_falls_back(reference, cache, tmp_path):
    ref_dir, ref = reference
    run = tmp_path / "run"
    _copy_until(ref_dir, run, 30)
    # bit rot in the newest checkpoint's biggest data file
    data = max((run / "checkpoints" / "30" / "state").rglob("d/*"), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 4 :] = b"\xff" * (len(raw) - len(raw) // 4)
    data.write_bytes(bytes(raw))
    p = spawn(run, *RUN, cache)
    assert p.wait(timeout=180) == 0, read_log(run)[-3000:]
    log = read_log(run)
    assert "checkpoint at step 30" in log and "falling back" in log
    assert "resuming at step 25" in log
    assert any(c.name.startswith("30-") for c in (run / "checkpoints_corrupt").iterdir())
    assert losses(run) == ref  # same mesh, so exact again


def test_two_processes_agree_with_single_process(reference, tmp_path):
    """2 processes x 2 CPU devices, mesh (data 2, fsdp 1, tensor 2), the first 10 steps of the
    reference schedule: each process builds and feeds only its own batch rows; the data do not
    depend on the process layout, so the losses match the single-process 8-device reference
    up to reduction order."""
    _, ref = reference
    run = tmp_path / "run"
    port = free_port()
    n = 10
    procs = [
        spawn(
            run,
            *RUN,
            f"steps={n}",
            f"lr_decay_steps={STEPS}",
            devices=2,
            log_name=f"p{i}",
            env={
                "TANDEM_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "TANDEM_NUM_PROCESSES": "2",
                "TANDEM_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, read_log(run, f"p{i}")[-3000:]
    assert "over 4 devices, 2 process(es)" in read_log(run, "p0")
    got = losses(run)
    assert sorted(got) == list(range(1, n + 1))
    steps = range(1, n + 1)
    np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=1e-4)
    # both processes wrote one checkpoint together
    assert (run / "checkpoints" / str(n) / "state").is_dir()


# libtpu's start-up sets this flag on a Cloud TPU VM; set by hand, it lets jax's own TPU
# cluster detection (not tandem's TANDEM_* variables) start the processes on this CPU.
_AS_ON_A_TPU_VM = (
    "import sys; from jax._src.clusters import cloud_tpu_cluster, cluster; "
    "cloud_tpu_cluster.running_in_cloud_tpu_vm = cluster.running_in_cloud_tpu_vm = True; "
    "from tandem.cli import run; sys.exit(run('train'))"
)


@pytest.mark.slow
def test_simulated_two_slice_tpu_launch_agrees_with_single_process(reference, tmp_path):
    """docs/training.md's TPU pod recipe as far as a CPU allows: the same command on 2
    "hosts" (processes, 2 CPU devices each) with the environment the TPU runtime sets in a
    2-slice multislice job of one host per slice; jax.distributed starts through jax's
    TPU auto-detection, the data axis is split over the slices (mesh.dcn_data=2: the
    outer, DCN part of data), fsdp and tensor stay inside one. The losses are the 8-device
    reference's up to reduction order."""
    _, ref = reference
    run, port, n = tmp_path / "run", free_port(), 10
    procs = [
        spawn_cli(
            run,
            ["tiny", *SMALL, *RUN, f"steps={n}", f"lr_decay_steps={STEPS}", "mesh.dcn_data=2"],
            devices=2,
            log_name=f"slice{i}",
            entry=("-c", _AS_ON_A_TPU_VM),
            env={
                "TPU_WORKER_HOSTNAMES": "127.0.0.1",  # this slice's hosts
                "TPU_WORKER_ID": "0",
                "TPU_SKIP_MDS_QUERY": "1",
                "MEGASCALE_COORDINATOR_ADDRESS": "127.0.0.1",
                "MEGASCALE_NUM_SLICES": "2",
                "MEGASCALE_SLICE_ID": str(i),
                "JAX_COORDINATOR_PORT": str(port),
            },
        )
        for i in range(2)
    ]
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, read_log(run, f"slice{i}")[-3000:]
    log = read_log(run, "slice0")
    assert "with cluster auto-detection" in log
    assert "over 4 devices, 2 process(es), processes per data index [[0], [1]]" in log
    got = losses(run)
    assert sorted(got) == list(range(1, n + 1))
    steps = range(1, n + 1)
    np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=1e-4)
    assert (run / "checkpoints" / str(n) / "state").is_dir()


def test_finished_run_is_not_retrained_and_other_configs_are_refused(
    reference, tmp_path, monkeypatch
):
    from tandem.train.loop import Trainer
    from tests.train.train_helpers import run_inprocess

    ref_dir, ref = reference
    run = tmp_path / "run"
    _copy_until(ref_dir, run, STEPS)

    def no_compile(self):
        raise AssertionError("compiled although there was nothing to train")

    monkeypatch.setattr(Trainer, "compile", no_compile)
    out = run_inprocess(run, *RUN)  # re-running the finished command: a no-op
    assert out["step"] == STEPS and out["resumed_from"] == STEPS
    assert losses(run) == ref
    with pytest.raises(ValueError, match=r"model\.d_model: 64 in the checkpoint, 32 now"):
        run_inprocess(run, *RUN, "steps=50", "model.d_model=32")
    # the checkpoints were not mistaken for corrupt ones
    assert not (run / "checkpoints_corrupt").exists()
    assert (run / "checkpoints" / str(STEPS)).is_dir()
