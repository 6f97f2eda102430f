"""Training data: documents -> Grain (shuffle, repeat, tokenize) -> packed rows -> batches.

Design (why it looks like this):
  * Documents come from a random-access source (`DocumentSource`: .txt = one document per
    file, .jsonl = one per line, .parquet = one per row, or the embedded corpus = the Python
    standard library's own top-level .py files, which every install has, so no download).
    A fixed held-out split (every `eval_holdout`-th document of the sorted list) is the eval set.
  * Grain does the per-document work lazily and deterministically:
    `MapDataset.source(docs).shuffle(seed).repeat(None)` (reshuffled every epoch), then a
    strided slice per batch row, then `.map(tokenize)`.
  * Row b of every global batch is its own packing stream over documents b, b+B, b+2B, ...
    of that shuffled order (B = batch_size). A stream packs documents back to back into rows of
    seq_len tokens; a document that does not fit continues in the stream's next row. Tokens get
    segment ids (1, 2, ... per piece in the row, attention never crosses them) and positions
    that restart at 0 for every piece. Targets are the next token of the same document, so the
    only unsupervised token is a document's final <eos>.
  * A stream's whole state is two integers (cursor = documents consumed, offset = tokens of
    the current document consumed). The iterator state of the run is therefore a [B, 2] int32
    array, stored *inside* the Orbax checkpoint as a sharded array: resume continues the exact
    batch order, on any number of processes or devices, because which process computes a row
    changes nothing about the row.
  * Each process builds only the rows its devices hold (`rows` from the batch sharding).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sysconfig
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from tandem.model.tokenizer import Tokenizer
from tandem.train.sft import ExampleEncoder, RecordFormat, SkipRecord, record_format, record_text

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".py", ".text")
BPE_SAMPLE_BYTES = 64 << 20  # at most this much text is used to train the BPE tokenizer


# ----------------------------------------------------------------------------- sources


def embedded_corpus_files() -> list[Path]:
    """The stdlib's top-level .py files, sorted: ~170 files, ~4.7 MB on CPython 3.11."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise ValueError(f"data=embedded: no .py files found under the stdlib dir {root}")
    return files


@dataclass(frozen=True)
class _DocRef:
    path: str
    offset: int = -1  # byte offset of the line for .jsonl; -1 = whole file
    kind: RecordFormat = "text"  # a .jsonl file's record shape (tandem/train/sft.py)


class DocumentSource:
    """Random-access documents (Grain's RandomAccessDataSource protocol: len + getitem)."""

    def __init__(self, refs: Sequence[_DocRef], text_key: str, name: str):
        self._refs = list(refs)
        self._text_key = text_key
        self._name = name
        self._tables: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self._refs)

    def __getitem__(self, i: int) -> str | dict[str, Any]:
        """A text document, or a fine-tuning record (messages / prompt + completion)."""
        ref = self._refs[i]
        if ref.path.endswith(".parquet"):
            return self._parquet(ref.path)[ref.offset]
        if ref.offset >= 0:
            with open(ref.path, "rb") as f:
                f.seek(ref.offset)
                record = json.loads(f.readline())
            return str(record[self._text_key]) if ref.kind == "text" else record
        return Path(ref.path).read_text(encoding="utf-8", errors="replace")

    def _parquet(self, path: str) -> list[str]:
        if path not in self._tables:
            import pyarrow.parquet as pq

            self._tables[path] = [str(x) for x in pq.read_table(path)[self._text_key].to_pylist()]
        return self._tables[path]

    def __repr__(self) -> str:  # stable: Grain and logs identify the source by it
        return f"DocumentSource({self._name}, n={len(self)})"

    def subset(self, idx: Sequence[int], name: str) -> DocumentSource:
        return DocumentSource([self._refs[i] for i in idx], self._text_key, name)

    def kind(self, i: int) -> RecordFormat:
        return self._refs[i].kind

    def file(self, i: int) -> str:
        return self._refs[i].path

    def sample_text(self, max_bytes: int) -> Iterator[str]:
        """Documents in order until max_bytes of text (for tokenizer training)."""
        total = 0
        for i in range(len(self)):
            t = record_text(self[i])
            yield t
            total += len(t)
            if total >= max_bytes:
                return


def _expand(spec: str, field: str) -> list[Path]:
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        p = Path(part).expanduser()
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and f.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet")
            )
            if not found:
                raise ValueError(
                    f"{field}={spec!r}: directory {p} has no .txt/.jsonl/.parquet files"
                )
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{field}={spec!r}: {p} does not exist")
    if not files:
        raise ValueError(f"{field}={spec!r}: no files given")
    return files


def _refs_for(files: Sequence[Path], text_key: str, field: str) -> list[_DocRef]:
    refs: list[_DocRef] = []
    for f in files:
        if f.suffix == ".jsonl":
            kind = record_format(f, text_key)
            with open(f, "rb") as fh:
                off = 0
                for line in fh:
                    if line.strip():
                        refs.append(_DocRef(str(f), off, kind))
                    off += len(line)
        elif f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ValueError(
                    f"{field}: {f} is a .parquet file but pyarrow is not installed; install "
                    "pyarrow or convert the file to .jsonl"
                ) from e
            n = pq.read_metadata(f).num_rows
            refs += [_DocRef(str(f), i) for i in range(n)]
        elif f.suffix in TEXT_SUFFIXES:
            refs.append(_DocRef(str(f)))
        else:
            raise ValueError(
                f"{field}: {f} has unsupported suffix {f.suffix!r} (.txt .jsonl .parquet)"
            )
    return refs


def load_sources(
    data: str, eval_data: str | None, eval_holdout: int, text_key: str
) -> tuple[DocumentSource, DocumentSource]:
    """(train, eval) sources; validates paths so a bad config fails at start-up."""
    if data == "embedded":
        refs = _refs_for(embedded_corpus_files(), text_key, "data")
        name = "embedded-stdlib"
    else:
        refs = _refs_for(_expand(data, "data"), text_key, "data")
        name = data
    allsrc = DocumentSource(refs, text_key, name)
    if eval_data:
        evsrc = DocumentSource(
            _refs_for(_expand(eval_data, "eval_data"), text_key, "eval_data"), text_key, eval_data
        )
        return allsrc, evsrc
    if len(refs) < 2:
        raise ValueError(
            f"data={data!r} has {len(refs)} document(s); need >= 2 to hold one out for eval "
            "(or give eval_data=...)"
        )
    ev = [i for i in range(len(refs)) if i % eval_holdout == eval_holdout - 1] or [len(refs) - 1]
    evset = set(ev)
    tr = [i for i in range(len(refs)) if i not in evset]
    return allsrc.subset(tr, f"{name}:train"), allsrc.subset(ev, f"{name}:eval")


# -------------------------------------------------------------------------- tokenizer


def build_tokenizer(
    spec: str,
    source: DocumentSource,
    vocab_size: int,
    run_dir: Path,
    *,
    is_primary: bool,
    barrier=None,
) -> Tokenizer:
    """byte / a tokenizer directory (or its tokenizer.json) / BPE trained on the train split
    ("bpe", or "auto": a run from pretrained weights passes their tokenizer's directory).

    The trained BPE is cached in run_dir/tokenizer/ (written by the primary process, moved
    into place atomically); the other processes wait at `barrier` and load it, so run_dir
    must be shared between hosts, as it already must be for checkpoints.
    """
    if spec == "byte":
        return Tokenizer.byte()
    if spec not in ("auto", "bpe"):
        p = Path(spec)
        if p.is_file() and p.name == "tokenizer.json":
            p = p.parent
        if not (p / "tokenizer.json").is_file():
            raise ValueError(
                f"tokenizer={spec!r}: not 'auto', 'bpe', 'byte' or a directory holding "
                "tokenizer.json"
            )
        return Tokenizer.from_dir(p)
    cache = run_dir / "tokenizer"
    if not (cache / "tokenizer.json").exists() and is_primary:
        log.info("training a %d-token BPE tokenizer on %r", vocab_size, source)
        run_dir.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer.train_bpe(texts=source.sample_text(BPE_SAMPLE_BYTES), vocab_size=vocab_size)
        tmp = tempfile.mkdtemp(dir=run_dir, prefix=".tokenizer-")
        tok.save(tmp)
        os.replace(tmp, cache)
    if barrier is not None:
        barrier("tokenizer")
    return Tokenizer.tandem_bpe_from_dir(cache)


# ------------------------------------------------------------------------------ packing


def drop_unusable(source: DocumentSource, encoder: ExampleEncoder, seq_len: int) -> DocumentSource:
    """`source` without the fine-tuning records that cannot be trained on (template
    failure, no loss token within seq_len), each skip counted in the log; a file none of
    whose records is usable is an error naming it. Text documents are kept as they are."""
    keep: list[int] = []
    skipped: dict[str, dict[str, int]] = {}
    usable: dict[str, int] = {}
    for i in range(len(source)):
        if source.kind(i) == "text":
            keep.append(i)
            continue
        path = source.file(i)
        usable.setdefault(path, 0)
        try:
            _, mask, _ = _truncate(*encoder(source[i]), True, seq_len)
            if not mask[1:].any():  # the first token is never a target
                raise SkipRecord(f"no loss token within seq_len={seq_len}")
        except SkipRecord as why:
            reasons = skipped.setdefault(path, {})
            reasons[str(why)] = reasons.get(str(why), 0) + 1
            continue
        usable[path] += 1
        keep.append(i)
    for path, reasons in skipped.items():
        log.warning("%s: skipped %d record(s): %s", path, sum(reasons.values()), reasons)
    empty = sorted(path for path, n in usable.items() if n == 0)
    if empty:
        raise ValueError(f"data: {empty[0]} has no usable record ({skipped.get(empty[0])})")
    return source if len(keep) == len(source) else source.subset(keep, repr(source))


def _truncate(
    ids: np.ndarray, mask: np.ndarray, whole: bool, seq_len: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """A fine-tuning example must fit one row: longer ones keep their first seq_len tokens."""
    return (ids[:seq_len], mask[:seq_len], whole) if whole else (ids, mask, whole)


class _Encode(grain.transforms.Map):
    """record -> (ids, loss mask, whole): whole examples (fine-tuning records) are never
    split across rows, so an answer is never trained without its prompt."""

    def __init__(self, encoder: ExampleEncoder, seq_len: int):
        self._encoder, self._seq_len = encoder, seq_len

    def map(self, record: str | dict) -> tuple[np.ndarray, np.ndarray, bool]:
        ids, mask = self._encoder(record)
        return _truncate(ids, mask, not isinstance(record, str), self._seq_len)


class _Stream:
    """Packs documents row + k*B of the shuffled order into rows of seq_len tokens."""

    def __init__(self, docs: grain.MapDataset, cursor: int, offset: int):
        self.docs, self.cursor, self.offset = docs, int(cursor), int(offset)
        self._doc: tuple[np.ndarray, np.ndarray, bool] | None = None

    def fill(self, tokens, targets, weights, segs, pos) -> None:  # each [T], written in place
        T, filled, seg = tokens.shape[0], 0, 0
        while filled < T:
            if self._doc is None:
                self._doc = self.docs[self.cursor]
            doc, mask, whole = self._doc
            o = self.offset
            if whole and filled and len(doc) > T - filled:
                return  # starts the next row; the rest of this one is padding (weight 0)
            take = min(T - filled, len(doc) - o)
            sl = slice(filled, filled + take)
            seg += 1
            tokens[sl] = doc[o : o + take]
            nxt = slice(o + 1, o + take + 1)  # the document's next tokens: [<= take]
            n = len(doc[nxt])
            targets[filled : filled + n] = doc[nxt]
            weights[filled : filled + n] = mask[nxt]
            segs[sl] = seg
            pos[sl] = np.arange(take)
            filled += take
            self.offset += take
            if self.offset >= len(doc):
                self.cursor, self.offset, self._doc = self.cursor + 1, 0, None


class PackedBatches:
    """Iterator over this process's rows of the global batch; `state` is resumable.

    Yields dicts of np arrays [R, T] (R = len(rows)): tokens, targets, weights (float32:
    the target's loss mask, 0 where there is no next token), segment_ids (>= 1; 0 on the
    padding a whole fine-tuning example leaves at a row's end), positions.
    """

    def __init__(
        self,
        source: DocumentSource,
        encoder: ExampleEncoder,
        *,
        seq_len: int,
        batch_size: int,
        rows: Sequence[int],
        seed: int,
        state: np.ndarray | None = None,
    ):
        self.rows = list(rows)
        self.seq_len = seq_len
        base = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        st = np.zeros((len(self.rows), 2), np.int64) if state is None else np.asarray(state)
        if st.shape != (len(self.rows), 2):
            raise ValueError(f"data state has shape {st.shape}, expected {(len(self.rows), 2)}")
        self._streams = [
            _Stream(base[r::batch_size].map(_Encode(encoder, seq_len)), st[i, 0], st[i, 1])
            for i, r in enumerate(self.rows)
        ]

    def state(self) -> np.ndarray:  # [R, 2] int32: (cursor, offset) per row
        return np.asarray([[s.cursor, s.offset] for s in self._streams], np.int32)

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        R, T = len(self.rows), self.seq_len
        out = {
            "tokens": np.zeros((R, T), np.int32),
            "targets": np.zeros((R, T), np.int32),
            "weights": np.zeros((R, T), np.float32),
            "segment_ids": np.zeros((R, T), np.int32),
            "positions": np.zeros((R, T), np.int32),
        }
        for i, s in enumerate(self._streams):
            s.fill(
                *(out[k][i] for k in ("tokens", "targets", "weights", "segment_ids", "positions"))
            )
        return out


class Prefetch:
    """Runs a batch iterator (`PackedBatches`) on a host thread `depth` batches ahead, so
    packing overlaps the device step; yields (batch, iterator state after it). depth=0
    runs inline."""

    def __init__(self, it: Any, depth: int):
        self.it, self.depth = it, depth
        if depth > 0:
            self.q: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._work, daemon=True, name="data-prefetch")
            self.thread.start()

    def _work(self) -> None:
        while not self.stop.is_set():
            try:
                item = (next(self.it), self.it.state())
            except Exception as e:  # re-raised in the consumer
                item = e
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return

    def __next__(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        if self.depth == 0:
            return next(self.it), self.it.state()
        item = self.q.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        if self.depth > 0:
            self.stop.set()
            self.thread.join(timeout=5)
