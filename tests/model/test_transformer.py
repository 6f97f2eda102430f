"""The training forward: packing, remat and sharding change nothing; the Pallas kernels on a
mesh give the single-device reference's numbers (the serving step's own parity with the
full forward: test_paged_step.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tandem.config import load_config
from tandem.model.config import ModelConfig
from tandem.model.sharding import param_shardings
from tandem.model.transformer import Transformer, init_paged_cache

from .test_paged_step import NUM_PAGES, PAGE_SIZE, Seq, make_step

SMALL = [
    "vocab_size=300",
    "d_model=64",
    "n_layers=2",
    "n_heads=4",
    "n_kv_heads=2",
    "head_dim=16",
    "d_ff=128",
]


def make(overrides=(), seed=0):
    cfg = load_config(ModelConfig, "tiny", [*SMALL, *overrides])
    return cfg, Transformer(cfg, rngs=nnx.Rngs(seed))


def positions_for(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def test_segment_ids_keep_packed_documents_apart():
    cfg, model = make()
    doc_a = jax.random.randint(jax.random.key(2), (1, 6), 0, cfg.vocab_size)
    doc_b = jax.random.randint(jax.random.key(3), (1, 10), 0, cfg.vocab_size)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[1] * 6 + [2] * 10])
    positions = jnp.concatenate([jnp.arange(6), jnp.arange(10)])[None]
    together = model(packed, positions, segments)
    np.testing.assert_allclose(together[:, :6], model(doc_a, positions_for(doc_a)), atol=1e-5)
    np.testing.assert_allclose(together[:, 6:], model(doc_b, positions_for(doc_b)), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_remat_changes_neither_loss_nor_gradients(tied):
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, 300)

    def loss_and_grads(remat):
        _cfg, model = make([f"remat={remat}", f"tie_embeddings={str(tied).lower()}"])

        def loss(model):
            logits = model(tokens, positions_for(tokens))
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return nnx.value_and_grad(loss)(model)

    base_loss, base_grads = loss_and_grads("none")
    for policy in ("full", "dots"):
        remat_loss, remat_grads = loss_and_grads(policy)
        np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), remat_grads, base_grads
        )


def test_sharded_forward_equals_single_device():
    assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
    cfg, model = make()
    tokens = jax.random.randint(jax.random.key(5), (4, 8), 0, cfg.vocab_size)
    expected = model(tokens, positions_for(tokens))
    graphdef, params = nnx.split(model, nnx.Param)
    mesh = jax.make_mesh(
        (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
    )
    shardings = param_shardings(params, mesh)
    sharded = jax.device_put(params, shardings)
    wq = sharded["layers"]["wq"].get_value()
    assert wq.sharding.spec == jax.P(None, "fsdp", "tensor", None)

    @jax.jit
    def forward(params, tokens):
        return nnx.merge(graphdef, params)(tokens, positions_for(tokens))

    with jax.set_mesh(mesh):
        got = forward(sharded, tokens)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AUTO,) * 3)


AUTO = jax.sharding.AxisType.Auto


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)], ids=["tp2", "tp4-kv-whole"])
def test_sharded_pallas_attention_equals_single_device(mesh_shape):
    """The Pallas kernels run per shard on a mesh (forward, grads, serving step) and give
    the single-device reference's numbers. tp4: 2 kv heads do not split 4 ways, so heads
    stay whole while the training batch is still split."""
    cfg, ref_model = make()
    _, model = make(["attention_impl=pallas_interpret"])
    tokens = jax.random.randint(jax.random.key(6), (4, 16), 0, cfg.vocab_size)
    segments = jnp.array([[1] * 9 + [2] * 7] * 4)
    positions = positions_for(tokens)
    graphdef, params = nnx.split(model, nnx.Param)
    ref_graphdef, _ = nnx.split(ref_model, nnx.Param)

    def loss(graphdef, params, tokens):
        logits = nnx.merge(graphdef, params)(tokens, positions, segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    grad = jax.grad(loss, argnums=1, has_aux=True)
    want_grads, want_logits = jax.jit(grad, static_argnums=0)(ref_graphdef, params, tokens)
    mesh = _mesh(mesh_shape)
    sharded = jax.device_put(params, param_shardings(params, mesh))
    with jax.set_mesh(mesh):
        got_grads, got_logits = jax.jit(grad, static_argnums=0)(graphdef, sharded, tokens)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grads, want_grads)

    # A serving step: two decode rows and a prompt chunk over a paged cache holding earlier
    # tokens' K/V (random here). A step's rows are never split; the kv heads are.
    cache = jax.tree.map(
        lambda pool: jax.random.normal(jax.random.key(pool.size), pool.shape),
        init_paged_cache(cfg, NUM_PAGES, PAGE_SIZE),
    )
    rows = [
        (Seq(list(range(1, 31)), [5, 9, 2, 7, 11, 3, 30, 4], done=20), 1),
        (Seq(list(range(40, 47)), [12, 13], done=0), 7),
        (Seq(list(range(100, 113)), [20, 21, 22, 23], done=12), 1),
    ]
    inputs = make_step(rows)

    def serve_step(graphdef, params, cache, inputs):
        tokens, positions, meta, logits_at = inputs
        return nnx.merge(graphdef, params).step(tokens, positions, cache, meta, logits_at)[0]

    step = jax.jit(serve_step, static_argnums=0)
    want = step(ref_graphdef, params, cache, inputs)[: len(rows)]
    with jax.set_mesh(mesh):
        got = step(graphdef, sharded, cache, inputs)[: len(rows)]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_pallas_attention_on_a_mesh_gathers_nothing():
    """A Pallas call left to XLA's partitioner would all-gather its sharded operands onto
    every device; per_shard keeps each device on its own rows and heads."""
    from tandem.model.transformer import _attention

    cfg, _ = make(["attention_impl=pallas_interpret"])
    mesh = _mesh((2, 2, 2))
    q = jnp.ones((4, 16, cfg.n_heads, cfg.head_dim))
    kv = jnp.ones((4, 16, cfg.n_kv_heads, cfg.head_dim))
    rows_heads = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))
    q, kv = jax.device_put(q, rows_heads), jax.device_put(kv, rows_heads)
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda q, k, v: _attention(cfg, q, k, v, None)).lower(q, kv, kv)
        text = hlo.compile().as_text()
    assert "all-gather" not in text


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (2, 4, 1)], ids=["dp2-fsdp2-tp2", "dp2-fsdp4"])
def test_sharded_train_step_replicates_no_activation(mesh_shape, capfd):
    """With the batch split over `fsdp` too, the embedding lookup (whose D carries the
    table's `fsdp` sharding) must reach the activation layout by a reshard, not by XLA
    replicating the whole [B, T, D] on every device, which it reports on stderr."""
    cfg, model = make()
    tokens = jax.random.randint(jax.random.key(6), (8, 16), 0, cfg.vocab_size)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens, positions_for(tokens))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    mesh = _mesh(mesh_shape)
    sharded = jax.device_put(params, param_shardings(params, mesh))
    rows = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
    capfd.readouterr()
    with jax.set_mesh(mesh):
        jax.jit(jax.grad(loss)).lower(sharded, rows).compile()
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_llama3_rope_scaling_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tandem.model.transformer import rope_frequencies

    params = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=params)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    cfg = load_config(
        ModelConfig,
        "tiny",
        [
            "d_model=128",
            "n_heads=2",
            "n_kv_heads=2",
            "head_dim=64",
            "rope_theta=500000",
            "rope_scaling.factor=8",
            "rope_scaling.original_max_position_embeddings=64",
        ],
    )
    np.testing.assert_allclose(rope_frequencies(cfg), expected.numpy(), rtol=1e-6)
