"""Host-side bookkeeping of the paged KV cache: which pages each sequence holds, and the
prefix cache over them (after vLLM v1's `kv_cache_manager.py` and `block_pool.py`).

The device holds, per layer, a pool of `cfg.num_pages` pages of `page_size` positions; this
module only decides page numbers, the engine moves the data. A sequence holds exactly the
pages its computed (and about to be computed) tokens need: `ceil(tokens / page_size)`.

Page 0 is the null page: it is never handed out, so the engine may point the unused
entries of a page table at it (the plan's `page_indices` are padded with 0) and aim
padding tokens' writes there. Reads of it are always masked by `kv_lens`.

Prefix caching: every FULL page whose K/V has been computed is published under a hash
chained over all tokens up to and including it, rooted in `cache_key` (what else decides
the K/V: the bundle's fingerprint and the cache dtype), so equal hashes mean equal K/V. A
new sequence looks up its longest run of published pages (`lookup`) and shares them copy-
free (reference counts), but never its whole prompt: at least one token is computed, so the
step yields the logits of its next token. A page whose last holder ends keeps its content
and its hash: it is *evictable*. Free pages are of two kinds, and allocation takes empty
ones first and evicts cached ones only when none is left, least recently freed first (a
sequence's pages are freed tail first, so its later pages go before its shared head).

Two choices differ from vLLM: pages are published when the step that computes them is
committed (`cache_pages`), not when they are allocated, so a hit never depends on the
order in which one step's kernel writes and reads K/V; and empty pages are used before
any cached page is evicted (vLLM keeps one eviction queue for both).
"""

from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from tandem.config import require
from tandem.serve.config import ServeConfig

NULL_PAGE = 0


class SequenceLike(Protocol):
    """What the manager reads of a request (serve.scheduler.Request satisfies it)."""

    request_id: str
    all_token_ids: Sequence[int]  # prompt + generated tokens; only ever appended to
    num_computed_tokens: int  # leading tokens whose K/V are in the cache
    num_preemptions: int  # times preempted; a resumed sequence's lookups are not counted


class PrefixHit(NamedTuple):
    """The cached leading pages of a sequence (`lookup`): `num_tokens` = pages x page_size.

    `num_pending_tokens`: the tokens of the full pages right after the hit that another
    running sequence is computing now (same hashes, not yet published)."""

    pages: tuple[int, ...]
    num_tokens: int
    num_pending_tokens: int = 0


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold `num_tokens` positions."""
    return -(-num_tokens // page_size)


class KVCacheManager:
    """Page allocation, reference counts and the prefix cache of one KV-cache pool.

    Not thread-safe: the scheduler's loop owns it.
    """

    def __init__(self, cfg: ServeConfig, *, cache_key: bytes = b"") -> None:
        require(
            cfg.kv_cache_tokens > 0,
            "kv_cache_tokens",
            cfg.kv_cache_tokens,
            "> 0 here: the engine sets it (0 asks it to derive one from free memory)",
        )
        self.page_size = cfg.page_size
        self.num_pages = cfg.num_pages
        self.enable_prefix_caching = cfg.enable_prefix_caching
        self._root = hashlib.sha256(b"tandem-kv-page\0" + cache_key).digest()
        self._ref = [0] * self.num_pages  # holders per page
        self._hash: list[bytes | None] = [None] * self.num_pages  # published pages only
        self._cached: dict[bytes, int] = {}  # hash -> page; one page per hash
        self._empty = list(range(self.num_pages - 1, NULL_PAGE, -1))  # free, no content
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self._pages: dict[str, list[int]] = {}  # request id -> its pages, in token order
        self._hashes: dict[str, list[bytes]] = {}  # request id -> hashes of its full pages
        self._published: dict[str, int] = {}  # request id -> leading pages already examined
        # hash -> id of the sequence computing that full page now (admitted, not published)
        self._computing: dict[bytes, str] = {}
        self.prefix_queries = 0  # tokens of newly admitted sequences looked up (a counter)
        self.prefix_hits = 0  # of those, tokens found cached

    # ---- sizes ---------------------------------------------------------------------------

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1  # all but the null page

    @property
    def num_free_pages(self) -> int:
        """Pages no sequence holds: empty ones plus cached ones that may be evicted."""
        return len(self._empty) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of the usable pages that sequences hold (tandem_kv_cache_usage_ratio)."""
        return 1.0 - self.num_free_pages / self.num_usable_pages

    def pages_of(self, request_id: str) -> list[int]:
        """The pages a sequence holds, in token order (the manager's own list: read only)."""
        return self._pages.get(request_id, [])

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def evictable_pages(self) -> tuple[int, ...]:
        """Cached pages no sequence holds, the next to be evicted first."""
        return tuple(self._evictable)

    # ---- prefix cache --------------------------------------------------------------------

    def lookup(self, request: SequenceLike) -> PrefixHit:
        """The longest run of cached full pages that starts the sequence, short of its last
        token (vLLM's `get_computed_blocks`). Changes nothing; `allocate` claims the hit."""
        if not self.enable_prefix_caching:
            return PrefixHit((), 0)
        most = (len(request.all_token_ids) - 1) // self.page_size
        hashes = self._page_hashes(request, most)
        pages = []
        for h in hashes:
            page = self._cached.get(h)
            if page is None:
                break
            pages.append(page)
        pending = 0
        for h in hashes[len(pages) :]:
            if h not in self._computing:
                break
            pending += 1
        size = self.page_size
        return PrefixHit(tuple(pages), len(pages) * size, pending * size)

    def cache_pages(self, request: SequenceLike, num_computed_tokens: int) -> None:
        """Publishes the sequence's full pages among its first `num_computed_tokens` tokens,
        whose K/V a committed step has written. A page equal to one already cached (two
        sequences computed the same prefix in the same steps) stays private to its holder."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        start, end = self._published.get(rid, 0), num_computed_tokens // self.page_size
        if end <= start:
            return
        pages, hashes = self._pages[rid], self._page_hashes(request, end)
        for i in range(start, end):
            if self._computing.get(hashes[i]) == rid:
                del self._computing[hashes[i]]
            if hashes[i] not in self._cached:
                assert self._hash[pages[i]] is None, "a fresh page carries no hash"
                self._cached[hashes[i]] = pages[i]
                self._hash[pages[i]] = hashes[i]
        self._published[rid] = end

    def _page_hashes(self, request: SequenceLike, count: int) -> list[bytes]:
        """The chained hashes of the sequence's first `count` full pages (memoized: a
        sequence's tokens are only ever appended to)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        tokens, size = request.all_token_ids, self.page_size
        for i in range(len(hashes), count):
            parent = hashes[i - 1] if i else self._root
            block = array.array("q", tokens[i * size : (i + 1) * size]).tobytes()
            hashes.append(hashlib.sha256(parent + block).digest())
        return hashes

    # ---- allocation ----------------------------------------------------------------------

    def allocate(
        self, request: SequenceLike, num_new_tokens: int, hit: PrefixHit | None = None
    ) -> list[int] | None:
        """Gives the sequence the pages for `num_new_tokens` more tokens after its computed
        ones (and after `hit`, what `lookup` found for a newly admitted sequence; None for
        a running one, or for one admitted without looking: it is not a prefix query).
        Returns the pages added (possibly none), or None, changing nothing, when the pool
        cannot supply them: the caller then preempts a sequence or waits."""
        rid = request.request_id
        held = self._pages.get(rid)
        admitted = held is None
        tokens = request.num_computed_tokens + num_new_tokens
        if hit is None and held is not None and len(held) * self.page_size >= tokens:
            return []  # the common case: a decode inside its last page
        hit_pages = hit.pages if hit is not None else ()
        assert not (held and hit_pages), "prefix hits are claimed at admission only"
        tokens += hit.num_tokens if hit is not None else 0
        need = pages_for(tokens, self.page_size) - len(held or ()) - len(hit_pages)
        revived = sum(1 for p in hit_pages if self._ref[p] == 0)  # leave the free pool
        if need > self.num_free_pages - revived:
            return None
        for p in hit_pages:
            if self._ref[p] == 0:
                del self._evictable[p]
            self._ref[p] += 1
        new = [self._take_free_page() for _ in range(max(need, 0))]
        if admitted:
            held = self._pages[rid] = []
            self._published[rid] = len(hit_pages)
        held += hit_pages
        held += new
        if admitted and self.enable_prefix_caching:
            # a resumed one finds its own pages (vLLM's)
            if hit is not None and not request.num_preemptions:
                self.prefix_queries += len(request.all_token_ids)
                self.prefix_hits += hit.num_tokens
            self._mark_computing(request, len(hit_pages))
        return new

    def _mark_computing(self, request: SequenceLike, start: int) -> None:
        """Registers the full pages of a newly admitted sequence after its hit as being
        computed by it, so `lookup` can tell a sibling to wait for them rather than compute
        the same prefix again (n choices of one prompt; a burst sharing a system prompt)."""
        rid = request.request_id
        most = (len(request.all_token_ids) - 1) // self.page_size
        for h in self._page_hashes(request, most)[start:]:
            self._computing.setdefault(h, rid)

    def _take_free_page(self) -> int:
        if self._empty:
            page = self._empty.pop()
        else:  # evict the least recently freed cached page
            page, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash[page]]
            self._hash[page] = None
        self._ref[page] = 1
        return page

    def free(self, request: SequenceLike) -> None:
        """Releases the sequence's pages (finished, aborted or preempted). Published pages
        keep their content and become evictable; the rest are empty again."""
        rid = request.request_id
        for h in self._hashes.pop(rid, ()):
            if self._computing.get(h) == rid:
                del self._computing[h]
        self._published.pop(rid, None)
        for page in reversed(self._pages.pop(rid, ())):  # tail first: evicted first
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if self._hash[page] is None:
                    self._empty.append(page)
                else:
                    self._evictable[page] = None
