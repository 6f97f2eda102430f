"""The three uses of the one model agree with each other, and sharding changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tandem.config import load_config
from tandem.model.config import ModelConfig
from tandem.model.sharding import param_shardings
from tandem.model.transformer import Transformer, init_cache

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


def run_prefill_then_decode(model, cfg, tokens, prompt_lens, max_len):
    """Prefill each slot's prompt (right-padded to a common length), then decode the rest
    of `tokens` one step at a time; returns the logits at every decoded position."""
    batch, total = tokens.shape
    graphdef, params = nnx.split(model, nnx.Param)
    prefill = jax.jit(lambda p, t: nnx.merge(graphdef, p).prefill(t))
    decode = jax.jit(lambda p, *args: nnx.merge(graphdef, p).decode(*args))
    pad_to = max(prompt_lens)
    padded = jnp.where(
        jnp.arange(pad_to)[None] < jnp.array(prompt_lens)[:, None], tokens[:, :pad_to], 0
    )
    prefill_logits, kv = prefill(params, padded)
    cache = init_cache(cfg, batch, max_len)
    cache = jax.tree.map(lambda layer, prefix: layer.at[:, :, :pad_to].set(prefix), cache, kv)
    lengths = jnp.array(prompt_lens, jnp.int32)
    decoded = {}
    for _ in range(total - min(prompt_lens)):
        active = lengths < total
        step_tokens = tokens[jnp.arange(batch), jnp.minimum(lengths, total - 1)]
        logits, cache = decode(params, step_tokens, cache, lengths)
        for b in range(batch):
            if active[b]:
                decoded[(b, int(lengths[b]))] = logits[b]
        lengths = lengths + active
    return prefill_logits, decoded


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_and_decode_reproduce_the_full_forward(dtype):
    cfg, model = make([f"dtype={dtype}"])
    tokens = jax.random.randint(jax.random.key(1), (3, 14), 0, cfg.vocab_size)
    full = jax.jit(lambda t: model(t, positions_for(t)))(tokens)
    prompt_lens = [5, 9, 3]  # ragged: slots sit at different positions in the cache
    prefill_logits, decoded = run_prefill_then_decode(model, cfg, tokens, prompt_lens, 16)
    tol = 1e-5 if dtype == "float32" else 0.1
    for b, plen in enumerate(prompt_lens):
        np.testing.assert_allclose(prefill_logits[b, :plen], full[b, :plen], atol=tol, rtol=0)
    assert len(decoded) == sum(14 - p for p in prompt_lens)
    for (b, pos), logits in decoded.items():
        np.testing.assert_allclose(logits, full[b, pos], atol=tol, rtol=0)


def test_decode_over_some_slots_equals_their_rows_of_a_full_step():
    """What serving runs when few slots are in use: tokens for cache rows [3, 0] only."""
    cfg, model = make()
    graphdef, params = nnx.split(model, nnx.Param)
    decode = jax.jit(lambda p, *args: nnx.merge(graphdef, p).decode(*args))
    cache = jax.tree.map(
        lambda layer: jax.random.normal(jax.random.key(layer.size), layer.shape),
        init_cache(cfg, 4, 16),
    )
    tokens = jnp.array([7, 8, 9, 10], jnp.int32)
    lengths = jnp.array([5, 2, 9, 7], jnp.int32)
    full_logits, full_cache = decode(params, tokens, cache, lengths)
    slots = jnp.array([3, 0], jnp.int32)
    logits, cache_after = decode(params, tokens[slots], cache, lengths[slots], None, slots)
    np.testing.assert_allclose(logits, full_logits[slots], atol=1e-5, rtol=0)
    leaves = [jax.tree.leaves(c) for c in (cache, full_cache, cache_after)]
    for before, full, after in zip(*leaves, strict=True):
        np.testing.assert_array_equal(after[slots], full[slots])
        np.testing.assert_array_equal(after[1:3], before[1:3])  # rows not stepped: untouched


def test_prefill_logits_at_returns_those_positions_only():
    """What the server asks for: each prompt's last-token logits, same K/V as without."""
    cfg, model = make()
    tokens = jax.random.randint(jax.random.key(4), (3, 12), 0, cfg.vocab_size)
    last = jnp.array([4, 11, 0], jnp.int32)
    all_logits, kv = jax.jit(lambda t: model.prefill(t))(tokens)
    at_last, kv_at = jax.jit(lambda t, i: model.prefill(t, logits_at=i))(tokens, last)
    assert at_last.shape == (3, cfg.vocab_size)
    np.testing.assert_allclose(at_last, all_logits[jnp.arange(3), last], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(kv), jax.tree.leaves(kv_at), strict=True):
        np.testing.assert_array_equal(a, b)


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
    """The Pallas kernels run per shard on a mesh (forward, grads, decode) and give the
    single-device reference's numbers. tp4: 2 kv heads do not split 4 ways, so heads stay
    whole while the batch is still split."""
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

    cache = init_cache(cfg, 4, 32)
    lengths = jnp.array([3, 0, 7, 1], jnp.int32)
    step = tokens[:, 0]
    want, _ = jax.jit(lambda p: nnx.merge(ref_graphdef, p).decode(step, cache, lengths))(params)
    with jax.set_mesh(mesh):
        got, _ = jax.jit(lambda p: nnx.merge(graphdef, p).decode(step, cache, lengths))(sharded)
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
