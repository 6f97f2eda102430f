"""Data pipeline: packing invariants, exact resume from the [rows, 2] state, row streams
independent of which process builds them, file sources, the embedded corpus and its BPE."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tandem.model.tokenizer import Tokenizer
from tandem.train import data as tdata
from tandem.train.sft import ExampleEncoder

T, B = 32, 4


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    for i in range(30):  # documents shorter and longer than a row
        n = int(rng.integers(3, 90))
        (d / f"doc{i:02d}.txt").write_text(f"<{i}>" + "abcdefghij"[i % 10] * n)
    return d


@pytest.fixture(scope="module")
def sources(docs_dir):
    return tdata.load_sources(str(docs_dir), "", 10, "text")


def _batches(src, rows, state=None, n=6, seed=0):
    it = tdata.PackedBatches(
        src,
        ExampleEncoder(Tokenizer.byte()),
        seq_len=T,
        batch_size=B,
        rows=rows,
        seed=seed,
        state=state,
    )
    return it, [next(it) for _ in range(n)]


def test_split_is_fixed_and_disjoint(sources, docs_dir):
    train, ev = sources
    assert len(train) == 27 and len(ev) == 3
    again = tdata.load_sources(str(docs_dir), "", 10, "text")
    assert [train[i] for i in range(len(train))] == [again[0][i] for i in range(len(train))]
    assert not {train[i] for i in range(len(train))} & {ev[i] for i in range(len(ev))}


def test_packing_invariants(sources):
    tok = Tokenizer.byte()
    _, bs = _batches(sources[0], range(B), n=8)
    for b in bs:
        for r in range(B):
            seg, pos, w = b["segment_ids"][r], b["positions"][r], b["weights"][r]
            assert seg.min() >= 1 and np.all(np.diff(seg) >= 0)
            starts = np.r_[True, seg[1:] != seg[:-1]]
            assert np.all(pos[starts] == 0)  # positions restart per piece
            assert np.all(pos[~starts] == pos[np.flatnonzero(~starts) - 1] + 1)
            # inside a piece the target is the next input token
            same = (seg[1:] == seg[:-1]) & (w[:-1] > 0)
            assert np.all(b["targets"][r][:-1][same] == b["tokens"][r][1:][same])
            # the only unsupervised token is a document's final <eos>
            assert np.all(b["tokens"][r][w == 0] == tok.eos_id)
    # several documents end in these rows, so <bos> starts new segments
    assert sum(int((b["tokens"] == tok.bos_id).sum()) for b in bs) > 4


def test_resume_from_state_is_exact(sources):
    it, _ = _batches(sources[0], range(B), n=3)
    state = it.state()
    it2, _ = _batches(sources[0], range(B), n=0, state=state)
    resumed = [next(it2) for _ in range(3)]
    _, cont = _batches(sources[0], range(B), n=6)
    for a, b in zip(resumed, cont[3:], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_rows_do_not_depend_on_who_builds_them(sources):
    _, full = _batches(sources[0], range(B), n=5)
    _, part = _batches(sources[0], [1, 3], n=5)
    for f, p in zip(full, part, strict=True):
        for k in f:
            np.testing.assert_array_equal(f[k][[1, 3]], p[k])


def test_seed_changes_order(sources):
    _, a = _batches(sources[0], range(B), n=2, seed=0)
    _, b = _batches(sources[0], range(B), n=2, seed=1)
    assert not np.array_equal(a[0]["tokens"], b[0]["tokens"])


def test_jsonl_source(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"doc {i} é"}) for i in range(5)) + "\n")
    train, ev = tdata.load_sources(str(p), "", 5, "text")
    assert len(train) == 4 and ev[0] == "doc 4 é"


def test_parquet_without_pyarrow_says_so(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        p = tmp_path / "c.parquet"
        p.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="pyarrow is not installed"):
            tdata.load_sources(str(p), "", 5, "text")
    else:
        pytest.skip("pyarrow is installed")


def test_embedded_corpus_and_bpe_cache(tmp_path):
    train, ev = tdata.load_sources("embedded", "", 20, "text")
    files = tdata.embedded_corpus_files()
    assert len(train) + len(ev) == len(files) > 50 and len(ev) == len(files) // 20
    tok = tdata.build_tokenizer("bpe", train, 512, tmp_path, is_primary=True)
    assert tok.vocab_size == 512 and (tmp_path / "tokenizer" / "tokenizer.json").exists()
    text = "def f(x):\n    return x  # é"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # BPE trained on the train split compresses the held-out source well (0.44 tokens/byte)
    held_out = "".join(ev[i] for i in range(len(ev)))
    assert len(tok.encode(held_out)) < 0.55 * len(held_out.encode())
    cached = tdata.build_tokenizer("bpe", train, 999, tmp_path, is_primary=True)
    assert cached.vocab_size == 512  # loaded from the run dir, not retrained
