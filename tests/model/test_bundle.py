"""The bundle format: round trip, integrity checks, and no half-written bundles."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tandem.config import load_config
from tandem.model.bundle import Bundle, BundleError, flat_params, write_bundle
from tandem.model.config import ModelConfig
from tandem.model.tokenizer import Tokenizer
from tandem.model.transformer import Transformer

CFG = load_config(
    ModelConfig,
    "tiny",
    [
        "vocab_size=260",
        "d_model=32",
        "n_layers=2",
        "n_heads=2",
        "n_kv_heads=1",
        "head_dim=16",
        "d_ff=64",
    ],
)


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def write(model, path, **kwargs):
    tensors = flat_params(nnx.state(model, nnx.Param))
    return write_bundle(path, CFG, Tokenizer.byte(), tensors, source={"kind": "test"}, **kwargs)


def test_round_trip_preserves_params_and_logits(model, tmp_path):
    # Tiny shards force several files, exercising the index.
    bundle = Bundle.load(write(model, tmp_path / "b", shard_bytes=8192))
    assert len(list((tmp_path / "b").glob("params-*.safetensors"))) > 1
    assert bundle.config == CFG and bundle.tokenizer.vocab_size == 259
    loaded = dict(flat_params(bundle.params()))
    for name, value in flat_params(nnx.state(model, nnx.Param)):
        np.testing.assert_array_equal(loaded[name], value)
    tokens = np.array([[256, 1, 2, 3], [256, 9, 8, 7]], np.int32)
    positions = jnp.broadcast_to(jnp.arange(4), tokens.shape)
    np.testing.assert_allclose(bundle.logits(tokens), model(tokens, positions), atol=1e-6)
    manifest = bundle.manifest
    assert manifest["format_version"] == 2 and manifest["dtype"] == "float32"
    assert manifest["quantization"] is None and manifest["config_sha256"] == CFG.fingerprint()
    assert set(manifest["files"]) == {p.name for p in (tmp_path / "b").iterdir()} - {
        "manifest.json"
    }


def test_params_are_placed_on_a_mesh_by_the_logical_rules(model, tmp_path):
    bundle = Bundle.load(write(model, tmp_path / "b"))
    mesh = jax.make_mesh(
        (1, 1, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    params = bundle.params(mesh)
    assert params["layers"]["w_up"].get_value().sharding.spec == jax.P(None, None, "tensor")


def test_tampered_file_fails_sha256_check(model, tmp_path):
    path = write(model, tmp_path / "b")
    shard = next(path.glob("params-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{shard.name}: sha256 does not match manifest"):
        Bundle.load(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m.update(format="other"), "format 'other' is not 'tandem-bundle'"),
        (lambda m: m["files"].pop("config.json"), "lists no config.json"),
        (
            lambda m: m["files"].update({"extra.bin": "0" * 64}),
            "extra.bin: listed in the manifest but missing",
        ),
    ],
    ids=["version", "format", "unlisted-config", "missing-file"],
)
def test_bad_manifests_are_rejected(model, tmp_path, edit, message):
    path = write(model, tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        Bundle.load(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json: missing"):
        Bundle.load(tmp_path)


def test_failed_write_leaves_nothing_and_keeps_the_old_bundle(model, tmp_path):
    path = write(model, tmp_path / "b")
    before = (path / "manifest.json").read_text()

    def failing():
        yield from list(flat_params(nnx.state(model, nnx.Param)))[:3]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_bundle(path, CFG, Tokenizer.byte(), failing(), source={}, overwrite=True)
    assert (path / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    Bundle.load(path)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (lambda ts: ts[:-1], "missing tensors"),
        (lambda ts: [*ts, ("bogus", np.zeros(1))], "tensor 'bogus' is not a param"),
        (
            lambda ts: [(n, v[..., :1]) if n == "embed" else (n, v) for n, v in ts],
            r"tensor 'embed' has shape \(260, 1\), the config needs \(260, 32\)",
        ),
    ],
    ids=["missing", "unknown", "shape"],
)
def test_inconsistent_tensors_are_rejected(model, tmp_path, tensors, message):
    named = tensors(list(flat_params(nnx.state(model, nnx.Param))))
    with pytest.raises(BundleError, match=message):
        write_bundle(tmp_path / "b", CFG, Tokenizer.byte(), named, source={})
    assert not (tmp_path / "b").exists()


def test_existing_bundle_is_not_overwritten_by_default(model, tmp_path):
    write(model, tmp_path / "b")
    with pytest.raises(BundleError, match="already exists"):
        write(model, tmp_path / "b")
