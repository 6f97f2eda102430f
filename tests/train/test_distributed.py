"""Multi-host start-up without a cluster: the launch paths of `tandem/train/mesh.py` with the
environment a TPU pod slice (GKE or a queued resource), a multislice job, SLURM or Open
MPI sets, and jax's own cluster detection given the same TPU environment. The two-process
run that goes through jax's TPU auto-detection for real is in test_resume.py."""

from __future__ import annotations

import jax
import pytest

from tandem.config import load_config
from tandem.train import mesh as tmesh
from tandem.train.config import TrainConfig

_LAUNCH_ENV = (
    "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS",
    "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID", "SLURM_NTASKS", "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE", "TANDEM_COORDINATOR_ADDRESS", "TANDEM_NUM_PROCESSES",
    "TANDEM_PROCESS_ID", "JAX_COORDINATOR_PORT",
)  # fmt: skip
# What the TPU runtime sets on host 2 of a 4-host slice (a v5p-32 or v5e-16) in slice 1 of
# a 2-slice (multislice) job.
V5P_32_MULTISLICE = {
    "TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3",
    "TPU_WORKER_ID": "2",
    "MEGASCALE_COORDINATOR_ADDRESS": "127.0.0.1",
    "MEGASCALE_NUM_SLICES": "2",
    "MEGASCALE_SLICE_ID": "1",
}


@pytest.fixture
def launch_env(monkeypatch: pytest.MonkeyPatch):
    """A clean launch environment; returns a setter."""
    for name in _LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)

    def set_env(values: dict[str, str]) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.fixture
def initialize_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """jax.distributed.initialize replaced by a recorder (and the CPU collectives left
    alone), so the start-up decision can be checked in this process."""
    calls: list = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(tmesh, "_cpu_collectives", lambda: calls.append("gloo"))
    return calls


def _cfg(tmp_path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, "tiny", [f"run_dir={tmp_path}", *overrides])


@pytest.mark.parametrize(
    ("env", "detected"),
    [
        ({}, False),
        ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, False),  # one TPU VM
        ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "1"}, True),  # pod slice
        ({"TPU_WORKER_HOSTNAMES": "h0", "MEGASCALE_COORDINATOR_ADDRESS": "h0"}, True),
        (V5P_32_MULTISLICE, True),
        ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, True),
        ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}, False),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ],
    ids=["none", "single-tpu-vm", "pod-slice", "multislice-1-host", "v5p-32-x2", "slurm-4",
         "slurm-1", "ompi-2"],
)  # fmt: skip
def test_cluster_detection(env, detected, launch_env) -> None:
    launch_env(env)
    assert tmesh._cluster_detected() is detected


def test_tpu_pod_slice_initializes_with_auto_detection(tmp_path, launch_env, initialize_calls):
    """On a pod slice nothing is passed: jax reads the TPU environment itself."""
    launch_env(V5P_32_MULTISLICE)
    assert tmesh.maybe_initialize_distributed(_cfg(tmp_path)) is True
    assert initialize_calls == ["gloo", ((), {})]


def test_explicit_coordinator_wins_over_the_tpu_environment(
    tmp_path, launch_env, initialize_calls
) -> None:
    launch_env({**V5P_32_MULTISLICE, "TANDEM_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                "TANDEM_NUM_PROCESSES": "8", "TANDEM_PROCESS_ID": "6"})  # fmt: skip
    assert tmesh.maybe_initialize_distributed(_cfg(tmp_path)) is True
    kwargs = {"coordinator_address": "10.0.0.1:1234", "num_processes": 8, "process_id": 6}
    assert initialize_calls == ["gloo", ((), kwargs)]


@pytest.mark.parametrize(
    ("env", "distributed", "calls"),
    [
        ({}, "auto", []),
        ({}, "on", ["gloo", ((), {})]),
        (V5P_32_MULTISLICE, "off", []),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, "auto", []),
    ],
    ids=["nothing", "forced-on", "forced-off", "single-tpu-vm"],
)
def test_distributed_switch(tmp_path, launch_env, initialize_calls, env, distributed, calls):
    launch_env(env)
    cfg = _cfg(tmp_path, f"distributed={distributed}")
    assert tmesh.maybe_initialize_distributed(cfg) is bool(calls)
    assert initialize_calls == calls


def test_jax_detects_the_same_tpu_cluster(launch_env, monkeypatch) -> None:
    """jax's own cluster detection, given the environment above on a Cloud TPU VM (its
    `running_in_cloud_tpu_vm` set as libtpu would set it there; no metadata server is
    asked: TPU_SKIP_MDS_QUERY, as GKE sets it): the GKE TPU cluster, 2 slices x 4 hosts =
    8 processes, this host process 1 * 4 + 2 = 6, the coordinator the multislice one."""
    from jax._src import clusters
    from jax._src.clusters import cloud_tpu_cluster

    launch_env({**V5P_32_MULTISLICE, "TPU_SKIP_MDS_QUERY": "1", "JAX_COORDINATOR_PORT": "8476"})
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    address, processes, process_id, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 10
    )
    assert (address, processes, process_id) == ("127.0.0.1:8476", 8, 6)
    assert tmesh._cluster_detected()


def test_one_slice_has_no_dcn_axis() -> None:
    """CPU devices have no slice: by default (dcn_data=-1) the mesh is the plain one."""
    cfg = load_config(TrainConfig, "tiny", ["mesh.data=2", "mesh.tensor=2"])
    assert tmesh.slice_count(jax.devices()) == 1
    mesh = tmesh.make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert tmesh.data_processes(mesh) == [[0], [0]]
