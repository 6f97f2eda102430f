"""tandem vs MaxText training throughput: same model config, same batch, same machine, one run.

For each preset, alternating for --rounds rounds (so both see the same host load), runs
  * tandem:  `benchmarks/train_bench.py --presets P` (the real train step, synthetic batches)
  * MaxText: `python -m maxtext.trainers.pre_train.train base.yml ...` in its own interpreter
    (`--maxtext-python`; MaxText needs Python >= 3.12: `pip install 'maxtext[tpu]==0.2.5'`),
    with the preset's shape mapped onto MaxText's flags, synthetic data, no checkpoints,
each as a subprocess on the CPU (JAX_PLATFORMS=cpu for both), one at a time. Throughput is tokens per step / the median step time
(MaxText: the median of its logged step times after --skip-steps). Prints a JSON line per
(system, preset, round) and one comparison line per preset: tandem / MaxText, from the
medians over rounds.

    python benchmarks/maxtext_compare.py --maxtext-python /tmp/maxtext-venv/bin/python \
        --presets tiny small --rounds 2

Exits with a clear message (status 1), before running anything, when MaxText is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from tandem.benchmarks.train_bench import SHAPES
from tandem.model.config import ModelConfig

# tandem ModelConfig.remat -> MaxText remat_policy ("minimal" saves the matmul outputs).
REMAT = {"none": "none", "dots": "minimal", "full": "full"}
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")
PARAMS_LINE = re.compile(r"number parameters: ([0-9.]+) billion")
CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def maxtext_flags(cfg: ModelConfig, batch: int, seq: int) -> list[str]:
    """MaxText config overrides describing the same model and batch as `cfg`."""
    return [
        "decoder_block=llama2",
        f"base_emb_dim={cfg.d_model}",
        f"base_num_query_heads={cfg.n_heads}",
        f"base_num_kv_heads={cfg.n_kv_heads}",
        f"head_dim={cfg.head_dim}",
        f"base_mlp_dim={cfg.d_ff}",
        f"base_num_decoder_layers={cfg.n_layers}",
        f"vocab_size={cfg.vocab_size}",
        f"logits_via_embedding={str(cfg.tie_embeddings).lower()}",
        f"normalization_layer_epsilon={cfg.norm_eps}",
        f"rope_max_timescale={int(cfg.rope_theta)}",
        f"dtype={cfg.dtype}",
        f"weight_dtype={cfg.param_dtype}",
        f"remat_policy={REMAT[cfg.remat]}",
        f"max_target_length={seq}",
        f"per_device_batch_size={batch}",
    ]


def maxtext_base_config(python: str) -> str | None:
    """Path of MaxText's base.yml as installed for `python`; None if it cannot import it."""
    found = subprocess.run(
        [python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
        capture_output=True,
        text=True,
    )
    return f"{found.stdout.strip()}/configs/base.yml" if found.returncode == 0 else None


def run_maxtext(
    python: str,
    base_yml: str,
    cfg: ModelConfig,
    batch: int,
    seq: int,
    steps: int,
    skip: int,
    workdir: Path,
) -> dict:
    cmd = [
        python, "-m", "maxtext.trainers.pre_train.train", base_yml,
        "run_name=compare", f"base_output_directory={workdir}", "dataset_type=synthetic",
        "hardware=cpu", "skip_jax_distributed_system=true", "enable_checkpointing=false",
        "enable_tensorboard=false", "attention=dot_product", f"steps={steps}",
        "log_period=1000000", *maxtext_flags(cfg, batch, seq),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=CPU_ENV)
    times = [float(s) for n, s in STEP_LINE.findall(proc.stdout + proc.stderr) if int(n) >= skip]
    if proc.returncode != 0 or not times:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"MaxText failed (exit {proc.returncode}):\n{tail}")
    step = statistics.median(times)
    params = PARAMS_LINE.search(proc.stdout + proc.stderr)  # to check it built the same model
    return {
        "step_time_s": step,
        "tokens_per_s": batch * seq / step,
        "steps_timed": len(times),
        "params_billion": float(params.group(1)) if params else None,
    }


def run_tandem(preset: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tandem.benchmarks.train_bench", "--presets", preset,
         "--steps", str(steps), "--warmup", "2"],
        capture_output=True, text=True, check=True, env=CPU_ENV,
    ).stdout  # fmt: skip
    line = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
    return {
        "step_time_s": line["step_time_s"],
        "tokens_per_s": line["tokens_per_s"],
        "steps_timed": steps,
        "params_billion": line["params"] / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maxtext-python", required=True, help="interpreter with maxtext installed")
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--skip-steps", type=int, default=3, help="MaxText steps left untimed")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tandem-maxtext-compare"))
    args = ap.parse_args(argv)
    base_yml = maxtext_base_config(args.maxtext_python)
    if base_yml is None:
        print(f"MaxText is not importable by {args.maxtext_python}: install it with Python >= "
              "3.12 (pip install 'maxtext[tpu]==0.2.5')", file=sys.stderr)  # fmt: skip
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    for preset in args.presets:
        cfg = ModelConfig.preset(preset)
        batch, seq = SHAPES[preset]["cpu"]
        results: dict[str, list[float]] = {"tandem": [], "maxtext": []}
        for rnd in range(args.rounds):
            for system in ("tandem", "maxtext"):
                if system == "tandem":
                    res = run_tandem(preset, args.steps)
                else:
                    steps = args.skip_steps + args.steps
                    res = run_maxtext(
                        args.maxtext_python, base_yml, cfg, batch, seq, steps, args.skip_steps,
                        args.workdir,
                    )  # fmt: skip
                results[system].append(res["tokens_per_s"])
                line = {"system": system, "preset": preset, "round": rnd, "batch_size": batch}
                print(json.dumps({"bench": "train_compare", **line, "seq_len": seq, **res}))
        t, m = statistics.median(results["tandem"]), statistics.median(results["maxtext"])
        ratio = {"tandem_tokens_per_s": t, "maxtext_tokens_per_s": m, "tokens_per_s_ratio": t / m}
        print(json.dumps({"bench": "train_compare", "comparison": "tandem_vs_maxtext",
                          "preset": preset, **ratio}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
