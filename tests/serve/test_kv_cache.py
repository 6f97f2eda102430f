"""The paged KV-cache manager: allocation, reference counts, prefix hits and LRU eviction,
checked by hand on small cases and against a simple model on a random soak."""

from __future__ import annotations

import dataclasses
import random

import pytest

from tandem.serve.config import ServeConfig
from tandem.serve.kv_cache import NULL_PAGE, KVCacheManager, PrefixHit

PS = 4  # page size in these tests


@dataclasses.dataclass
class Seq:
    request_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    num_preemptions: int = 0


def manager(num_pages: int = 9, *, caching: bool = True, cache_key: bytes = b"k") -> KVCacheManager:
    cfg = ServeConfig(kv_cache_tokens=num_pages * PS, page_size=PS, enable_prefix_caching=caching)
    return KVCacheManager(cfg, cache_key=cache_key)


def admit(kv: KVCacheManager, seq: Seq, num_new: int | None = None) -> list[int] | None:
    """Admits `seq` after its cached prefix and computes (commits) its tokens."""
    hit = kv.lookup(seq)
    n = len(seq.all_token_ids) - hit.num_tokens if num_new is None else num_new
    new = kv.allocate(seq, n, hit)
    if new is not None:
        seq.num_computed_tokens = hit.num_tokens + n
        kv.cache_pages(seq, seq.num_computed_tokens)
    return new


def test_pages_follow_the_tokens_and_skip_the_null_page() -> None:
    kv = manager(num_pages=5)
    seq = Seq("a", list(range(10)))
    assert kv.allocate(seq, 1) == [1]
    seq.num_computed_tokens = 1
    assert kv.allocate(seq, 3) == []  # still inside page 1
    seq.num_computed_tokens = 4
    assert kv.allocate(seq, 5) == [2, 3]  # tokens 4..8
    assert kv.pages_of("a") == [1, 2, 3]
    assert (kv.num_usable_pages, kv.num_free_pages, kv.usage) == (4, 1, 0.75)
    kv.free(seq)
    assert (kv.num_free_pages, kv.usage, kv.pages_of("a")) == (4, 0.0, [])
    assert kv.ref_count(NULL_PAGE) == 0


def test_allocate_returns_none_and_changes_nothing_when_the_pool_is_short() -> None:
    kv = manager(num_pages=4)  # 3 usable pages
    a, b = Seq("a", list(range(8))), Seq("b", list(range(100, 108)))
    assert kv.allocate(a, 8) == [1, 2]
    assert kv.allocate(b, 8) is None
    assert (kv.pages_of("b"), kv.num_free_pages) == ([], 1)
    assert kv.allocate(b, 4) == [3]


def test_prefix_hit_is_full_pages_and_never_the_whole_prompt() -> None:
    kv = manager()
    first = Seq("a", list(range(11)))  # pages [0..3] [4..7] full, [8..10] partial
    admit(kv, first)
    assert kv.pages_of("a") == [1, 2, 3]
    same = Seq("b", list(range(11)))
    assert kv.lookup(same) == PrefixHit((1, 2), 8)  # the partial page is never shared
    aligned = Seq("c", list(range(8)))  # exactly two pages: the last must be recomputed
    assert kv.lookup(aligned) == PrefixHit((1,), 4)
    fork = Seq("d", [0, 1, 2, 3, 4, 5, 99, 7, 8])  # differs inside the second page
    assert kv.lookup(fork) == PrefixHit((1,), 4)
    assert kv.lookup(Seq("e", [5, 1, 2, 3, 4])) == PrefixHit((), 0)


def test_a_page_is_found_only_after_the_step_computing_it_commits() -> None:
    kv = manager()
    a = Seq("a", list(range(9)))
    kv.allocate(a, 9)
    # being computed by a: pending (a sibling may wait for it), not found
    assert kv.lookup(Seq("b", list(range(9)))) == PrefixHit((), 0, 8)
    a.num_computed_tokens = 9
    kv.cache_pages(a, 5)  # one full page committed so far
    assert kv.lookup(Seq("b", list(range(9)))) == PrefixHit((1,), 4, 4)


def test_the_cache_key_separates_equal_tokens() -> None:
    cfg = ServeConfig(kv_cache_tokens=9 * PS, page_size=PS)
    kv = KVCacheManager(cfg, cache_key=b"bundle-a/float32")
    admit(kv, Seq("a", list(range(9))))
    other = KVCacheManager(cfg, cache_key=b"bundle-a/bfloat16")
    admit(other, Seq("a", list(range(9))))
    assert kv.lookup(Seq("b", list(range(9)))).num_tokens == 8
    assert kv._cached.keys().isdisjoint(other._cached.keys())


def test_shared_pages_are_reference_counted_and_counted_as_hits() -> None:
    kv = manager()
    a, b = Seq("a", list(range(9))), Seq("b", [*range(9), 50, 51])
    admit(kv, a)
    assert admit(kv, b) == [4]  # pages 1, 2 shared; the rest is new
    assert kv.pages_of("b") == [1, 2, 4]
    assert [kv.ref_count(p) for p in (1, 2, 3, 4)] == [2, 2, 1, 1]
    assert (kv.prefix_queries, kv.prefix_hits) == (9 + 11, 8)
    kv.free(a)
    assert [kv.ref_count(p) for p in (1, 2, 3, 4)] == [1, 1, 0, 1]
    assert kv.evictable_pages() == ()  # page 3 holds a partial page: empty again
    kv.free(b)
    assert kv.evictable_pages() == (2, 1)  # b's pages freed tail first
    assert kv.usage == 0.0


def test_cached_pages_are_evicted_lru_only_when_no_empty_page_is_left() -> None:
    kv = manager(num_pages=7)  # 6 usable
    a, b = Seq("a", list(range(8))), Seq("b", list(range(100, 108)))
    admit(kv, a)  # pages 1, 2
    admit(kv, b)  # pages 3, 4
    kv.free(a)
    kv.free(b)
    assert kv.evictable_pages() == (2, 1, 4, 3)
    c = Seq("c", list(range(200, 212)))
    assert kv.allocate(c, 12) == [5, 6, 2]  # the two empty pages, then the oldest cached
    assert kv.lookup(Seq("x", [*range(8), 0])) == PrefixHit((1,), 4)  # page 2 is gone
    # a hit revives a cached page: it leaves the LRU order and is not evicted meanwhile
    d = Seq("d", [*range(100, 108), 7])
    assert admit(kv, d) == [1]
    assert kv.pages_of("d") == [3, 4, 1]
    assert kv.evictable_pages() == ()


def test_with_prefix_caching_off_nothing_is_shared_or_kept() -> None:
    kv = manager(caching=False)
    admit(kv, Seq("a", list(range(9))))
    kv.free(Seq("a", []))
    b = Seq("b", list(range(9)))
    assert kv.lookup(b) == PrefixHit((), 0)
    assert kv.evictable_pages() == ()
    admit(kv, b)
    assert (kv.prefix_queries, kv.prefix_hits) == (0, 0)


# ---- random soak against a model ---------------------------------------------------------


class Model:
    """What the pool should look like, kept independently of the manager: who holds each
    page, which pages are published (content -> page), the LRU order of evictable pages,
    and what every cache position physically holds (the prefix whose K/V was written)."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.holders: dict[str, list[int]] = {}
        self.published: dict[tuple, int] = {}  # tokens up to the page's end -> page
        self.content: dict[int, tuple] = {}  # page -> its published key
        self.lru: list[int] = []
        self.written: dict[tuple[int, int], tuple] = {}  # (page, offset) -> prefix written
        self.examined: dict[str, int] = {}  # leading pages a sequence had committed

    def ref(self, page: int) -> int:
        return sum(pages.count(page) for pages in self.holders.values())

    def empty(self) -> list[int]:
        held = {p for pages in self.holders.values() for p in pages}
        return [p for p in range(1, self.num_pages) if p not in held and p not in self.lru]

    def expected_hit(self, seq: Seq) -> tuple[int, ...]:
        pages = []
        for i in range((len(seq.all_token_ids) - 1) // PS):
            page = self.published.get(tuple(seq.all_token_ids[: (i + 1) * PS]))
            if page is None:
                break
            pages.append(page)
        return tuple(pages)


def check_allocation(model: Model, seq: Seq, n: int, hit: tuple[int, ...], new) -> None:
    """The manager said yes iff the model has room, and took empty pages before evicting
    the least recently freed cached ones."""
    held = model.holders.get(seq.request_id, [])
    tokens = seq.num_computed_tokens + len(hit) * PS + n
    need = max(-(-tokens // PS) - len(held) - len(hit), 0)
    lru = [p for p in model.lru if p not in hit]
    empty = model.empty()
    if need > len(empty) + len(lru):
        assert new is None
        return
    assert new is not None and len(new) == need and len(set(new)) == need
    evicted = max(need - len(empty), 0)
    if evicted:
        assert set(new) == set(empty) | set(lru[:evicted])
    else:
        assert set(new) <= set(empty)
    for page in lru[:evicted]:
        del model.published[model.content.pop(page)]
    model.lru = lru[evicted:]
    if seq.request_id not in model.holders:
        model.examined[seq.request_id] = len(hit)  # hit pages are published already
    model.holders.setdefault(seq.request_id, []).extend([*hit, *new])


def compute(model: Model, seq: Seq, start: int, end: int) -> None:
    """The engine writes the K/V of positions [start, end) into the sequence's pages."""
    pages = model.holders[seq.request_id]
    for pos in range(start, end):
        model.written[(pages[pos // PS], pos % PS)] = tuple(seq.all_token_ids[: pos + 1])


def commit(model: Model, seq: Seq) -> None:
    """Each full page is published once, when first committed, unless an equal page is."""
    pages, rid = model.holders[seq.request_id], seq.request_id
    for i in range(model.examined.get(rid, 0), seq.num_computed_tokens // PS):
        key = tuple(seq.all_token_ids[: (i + 1) * PS])
        if key not in model.published:
            model.published[key] = pages[i]
            model.content[pages[i]] = key
    model.examined[rid] = max(model.examined.get(rid, 0), seq.num_computed_tokens // PS)


def release(model: Model, seq: Seq) -> None:
    model.examined.pop(seq.request_id, None)
    for page in reversed(model.holders.pop(seq.request_id, [])):
        if model.ref(page) == 0 and page in model.content:
            model.lru.append(page)


def check_invariants(kv: KVCacheManager, model: Model, seqs: dict[str, Seq]) -> None:
    for page in range(kv.num_pages):
        assert kv.ref_count(page) == model.ref(page), page
        if model.ref(page) > 1:
            assert page in model.content  # only published pages are ever shared
    for rid, pages in model.holders.items():
        assert kv.pages_of(rid) == pages
        assert NULL_PAGE not in pages and len(set(pages)) == len(pages)
    assert kv.evictable_pages() == tuple(model.lru)
    assert kv.num_free_pages == len(model.empty()) + len(model.lru)
    for seq in seqs.values():  # every computed position still holds this sequence's K/V
        pages = model.holders[seq.request_id]
        for pos in range(seq.num_computed_tokens):
            written = model.written[(pages[pos // PS], pos % PS)]
            assert written == tuple(seq.all_token_ids[: pos + 1]), (seq.request_id, pos)


@pytest.mark.parametrize("seed", range(4))
def test_random_allocate_free_lookup_soak_matches_the_model(seed: int) -> None:
    rng = random.Random(seed)
    num_pages = 20
    kv, model = manager(num_pages=num_pages), Model(num_pages)
    bases = [[rng.randrange(3) for _ in range(3 * PS)] for _ in range(3)]  # shared prefixes
    seqs: dict[str, Seq] = {}
    hits = 0
    for step in range(1500):
        op = rng.random()
        if op < 0.3 or not seqs:  # a new sequence, often starting with a shared prefix
            base = rng.choice(bases)[: rng.randrange(3 * PS + 1)]
            seq = Seq(f"s{step}", base + [rng.randrange(3) for _ in range(rng.randrange(1, 9))])
            hit = kv.lookup(seq)
            assert hit.pages == model.expected_hit(seq)
            n = rng.randrange(1, len(seq.all_token_ids) - hit.num_tokens + 1)
            new = kv.allocate(seq, n, hit)
            check_allocation(model, seq, n, hit.pages, new)
            if new is not None:
                hits += hit.num_tokens
                seq.num_computed_tokens = hit.num_tokens
                compute(model, seq, hit.num_tokens, hit.num_tokens + n)
                seq.num_computed_tokens += n
                seqs[seq.request_id] = seq
        elif op < 0.75:  # the next chunk or decode token of a sequence
            seq = rng.choice(list(seqs.values()))
            if seq.num_computed_tokens == len(seq.all_token_ids):
                seq.all_token_ids.append(rng.randrange(3))  # the step's sampled token
            n = rng.randrange(1, len(seq.all_token_ids) - seq.num_computed_tokens + 1)
            new = kv.allocate(seq, n)
            check_allocation(model, seq, n, (), new)
            if new is not None:
                compute(model, seq, seq.num_computed_tokens, seq.num_computed_tokens + n)
                seq.num_computed_tokens += n
        elif op < 0.9:  # a step commits
            seq = rng.choice(list(seqs.values()))
            kv.cache_pages(seq, seq.num_computed_tokens)
            commit(model, seq)
        else:  # a sequence ends or is preempted
            seq = seqs.pop(rng.choice(list(seqs)))
            kv.free(seq)
            release(model, seq)
        check_invariants(kv, model, seqs)
    assert hits > 0 and kv.prefix_hits == hits
    for seq in list(seqs.values()):
        kv.free(seq)
    assert kv.usage == 0.0 and kv.num_free_pages == num_pages - 1
