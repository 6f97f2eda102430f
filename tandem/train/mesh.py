"""Multi-host start-up and the (data, fsdp, tensor) device mesh.

`maybe_initialize_distributed` must run before anything touches a JAX backend: it calls
`jax.distributed.initialize` when the run spans several processes. Three ways in:
  * explicit: `coordinator_address=host:port num_processes=N process_id=I` (or the env vars
    TANDEM_COORDINATOR_ADDRESS / TANDEM_NUM_PROCESSES / TANDEM_PROCESS_ID) — GPU/CPU clusters;
  * TPU pod slices: detected from the TPU runtime's env (TPU_WORKER_HOSTNAMES with several
    hosts, or MEGASCALE_*), then `jax.distributed.initialize()` auto-detects everything;
  * SLURM / Open MPI launches with more than one task: likewise auto-detected by JAX.
On CPU the gloo collectives are selected so multi-process CPU runs (tests) work.

The mesh is always 3-D with axes `model.sharding.MESH_AXES` = (data, fsdp, tensor); the batch
is sharded over (data, fsdp), params by the logical rules in `tandem/model/sharding.py`. Across TPU
slices (multislice, `mesh.dcn_data`) the data axis is outermost and spans the slices, so
only its gradient reductions travel over the data-center network.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tandem.config import require
from tandem.model.sharding import MESH_AXES
from tandem.train.config import MeshConfig, TrainConfig

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


def _cluster_detected() -> bool:
    """True when a multi-host launcher that JAX can auto-detect is present."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if _env_int("SLURM_NTASKS", 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    return _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1


def _cpu_collectives() -> None:
    """CPU devices need a collectives backend across processes; GPUs and TPUs ignore it."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def maybe_initialize_distributed(cfg: TrainConfig) -> bool:
    """Initialize jax.distributed when the run spans processes; returns True if it did."""
    if cfg.distributed == "off":
        return False
    addr = cfg.coordinator_address or os.environ.get("TANDEM_COORDINATOR_ADDRESS", "")
    nproc = cfg.num_processes or _env_int("TANDEM_NUM_PROCESSES", 0)
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int("TANDEM_PROCESS_ID", -1)
    if addr:
        if nproc < 1 or not 0 <= pid < nproc:
            raise ValueError(
                f"coordinator_address={addr!r} needs num_processes >= 1 and 0 <= process_id < "
                f"num_processes (got num_processes={nproc}, process_id={pid}); set them as "
                "flags or TANDEM_NUM_PROCESSES / TANDEM_PROCESS_ID"
            )
        if nproc == 1:
            return False
        _cpu_collectives()
        log.info(
            "jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", addr, nproc, pid
        )
        jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)
        return True
    if cfg.distributed == "on" or _cluster_detected():
        _cpu_collectives()
        log.info("jax.distributed.initialize() with cluster auto-detection")
        jax.distributed.initialize()
        return True
    return False


def resolve_mesh_shape(mesh: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Axis sizes with -1 filled; ValueError naming the field when they can't tile n_devices."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [k for k, v in sizes.items() if v == -1]
    if fill:
        if n_devices % fixed:
            fixed_names = " * ".join(f"mesh.{k}={v}" for k, v in sizes.items() if v != -1)
            raise ValueError(
                f"{fixed_names} = {fixed} does not divide the {n_devices} available devices, "
                f"so mesh.{fill[0]}=-1 cannot fill the rest"
            )
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        names = " * ".join(f"mesh.{k}={v}" for k, v in sizes.items())
        raise ValueError(
            f"{names} = {fixed} but {n_devices} devices are available; make the product equal "
            "the device count or set one axis to -1"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def slice_count(devices: list) -> int:
    """TPU slices among `devices` (a multislice run's `slice_index`); 1 elsewhere."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(cfg: TrainConfig, devices: list | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh. With `mesh.dcn_data` > 1 (or several TPU slices)
    the data axis is split into an outer DCN part, one group per slice (per process where
    devices have no slice), and an inner part laid out with fsdp and tensor over each
    slice's own devices (`mesh_utils.create_hybrid_device_mesh`), so only data-parallel
    gradient reductions cross the DCN."""
    devices = list(jax.devices()) if devices is None else devices
    shape = resolve_mesh_shape(cfg.mesh, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    slices = slice_count(devices)
    dcn = slices if cfg.mesh.dcn_data == -1 else cfg.mesh.dcn_data
    if dcn > 1:
        by_slice = slices > 1
        groups = slices if by_slice else len({d.process_index for d in devices})
        require(
            groups == dcn,
            "mesh.dcn_data",
            dcn,
            f"the number of {'TPU slices' if by_slice else 'processes'} the devices span "
            f"({groups})",
        )
        data, fsdp, tensor = shape
        require(data % dcn == 0, "mesh.dcn_data", dcn, f"a divisor of mesh.data={data}")
        grid = mesh_utils.create_hybrid_device_mesh(
            (data // dcn, fsdp, tensor), (dcn, 1, 1), devices, process_is_granule=not by_slice
        )
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def data_processes(mesh: Mesh) -> list[list[int]]:
    """The processes holding each index of the data axis: with an outer DCN data axis each
    index lies in one slice (one process per slice here, several hosts on a real one)."""
    grid = np.vectorize(lambda d: d.process_index)(mesh.devices)  # [data, fsdp, tensor]
    return [sorted({int(p) for p in row.ravel()}) for row in grid]


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def validate_batch(cfg: TrainConfig, mesh: Mesh) -> None:
    """The microbatch must split evenly over data x fsdp and over the processes."""
    dp = data_parallel_size(mesh)
    if cfg.micro_batch_size % dp:
        raise ValueError(
            f"batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} = "
            f"{cfg.micro_batch_size} sequences per microbatch is not divisible by the "
            f"data-parallel size mesh.data*mesh.fsdp={dp}"
        )
    if cfg.batch_size % jax.process_count():
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by the {jax.process_count()} processes"
        )


# ---- multi-process batches: each process feeds only the global rows its devices hold ----


def process_rows(sharding: NamedSharding, global_rows: int) -> list[int]:
    """The global batch rows whose data this process must provide."""
    rows: set[int] = set()
    for idx in sharding.addressable_devices_indices_map((global_rows, 1)).values():
        rows.update(range(global_rows)[idx[0]])
    return sorted(rows)


def to_global(
    local: np.ndarray, rows: list[int], sharding: NamedSharding, global_shape: tuple[int, ...]
) -> jax.Array:
    """A global array from this process's rows (`local[i]` is global row `rows[i]`)."""
    where = {r: i for i, r in enumerate(rows)}

    def cb(idx):
        return local[[where[r] for r in range(global_shape[0])[idx[0]]]]

    return jax.make_array_from_callback(global_shape, sharding, cb)


def local_rows(arr: jax.Array, rows: list[int]) -> np.ndarray:
    """This process's rows of a row-sharded global array, in `rows` order."""
    got: dict[int, np.ndarray] = {}
    for shard in arr.addressable_shards:
        data = np.asarray(shard.data)
        for j, r in enumerate(range(arr.shape[0])[shard.index[0]]):
            got[r] = data[j]
    return np.stack([got[r] for r in rows])
