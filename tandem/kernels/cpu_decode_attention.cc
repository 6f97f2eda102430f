// Decode attention over tandem's paged KV cache on CPU, reading each page where it lies.
//
// Called through XLA's FFI (cpu_decode_attention.py builds and registers it). XLA's CPU
// backend can only gather (copy) a row's pages before attending over the copy, and does so
// at a fraction of the memory bandwidth; vLLM's CPU attention reads the pages in place, and
// so does this (docs/benchmarks.md has the figures).
//
// Work item: one (decode row, kv head). Its G = N / K query heads share every [Ps, H] key
// and value tile of the row's pages, which an online softmax visits once, in page order.
// Items are spread over XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

template <size_t rank>
using F32 = ffi::Buffer<ffi::F32, rank>;  // (aliases: a macro argument may not hold a comma)
template <size_t rank>
using S32 = ffi::Buffer<ffi::S32, rank>;

namespace {

constexpr float kMasked = -1e30f;  // the log-sum-exp of no position, as in bucketed_reference.py

struct Shape {
  int64_t n_heads, head_dim, n_kv, n_pages, page_size, table_cols;
  int32_t first_col;
};

float Dot(const float* a, const float* b, int64_t n) {
  // Eight partial sums: the compiler keeps them in one vector register.
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t h = 0;
  for (; h + 8 <= n; h += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[h + j] * b[h + j];
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; h < n; ++h) sum += a[h] * b[h];
  return sum;
}

// Attention of one row's G query heads of kv head `kv` over its first `length` positions
// from page-table column `first_col` on: normalized output [G, H] and log-sum-exp [G].
void AttendRowHead(const Shape& s, const float* q, const float* k_pages, const float* v_pages,
                   const int32_t* table, int32_t length, int64_t kv, float scale, float* out,
                   float* lse) {
  const int64_t group = s.n_heads / s.n_kv, dim = s.head_dim;
  std::vector<float> query(group * dim), acc(group * dim, 0.f), logits(group * s.page_size);
  std::vector<float> top(group, -INFINITY), total(group, 0.f);
  for (int64_t i = 0; i < group * dim; ++i) query[i] = q[i] * scale;
  for (int32_t start = 0; start < length; start += s.page_size) {
    const int64_t page = table[s.first_col + start / s.page_size];
    const int64_t count = std::min<int64_t>(s.page_size, length - start);
    const int64_t tile = ((kv * s.n_pages + page) * s.page_size) * dim;
    const float* keys = k_pages + tile;
    const float* values = v_pages + tile;
    for (int64_t t = 0; t < count; ++t)
      for (int64_t g = 0; g < group; ++g)
        logits[g * s.page_size + t] = Dot(query.data() + g * dim, keys + t * dim, dim);
    for (int64_t g = 0; g < group; ++g) {
      float* p = logits.data() + g * s.page_size;
      float new_top = top[g];
      for (int64_t t = 0; t < count; ++t) new_top = std::max(new_top, p[t]);
      const float decay = std::exp(top[g] - new_top);
      float sum = 0.f;
      for (int64_t t = 0; t < count; ++t) sum += (p[t] = std::exp(p[t] - new_top));
      total[g] = total[g] * decay + sum;
      top[g] = new_top;
      float* a = acc.data() + g * dim;
      for (int64_t h = 0; h < dim; ++h) a[h] *= decay;
      for (int64_t t = 0; t < count; ++t) {
        const float* v = values + t * dim;
        const float w = p[t];
        for (int64_t h = 0; h < dim; ++h) a[h] += w * v[h];
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const bool any = total[g] > 0.f;
    const float inv = any ? 1.f / total[g] : 0.f;
    for (int64_t h = 0; h < dim; ++h) out[g * dim + h] = acc[g * dim + h] * inv;
    lse[g] = any ? top[g] + std::log(total[g]) : kMasked;
  }
}

// Runs work(0 .. items - 1) on the calling thread and on the pool's other threads. Items are
// claimed from one counter, so a pool thread that is busy elsewhere or starts late takes
// none; the caller waits only for items already claimed, never for a task to start.
template <typename Work>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, Work work) {
  struct State {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t done = 0;
  };
  auto state = std::make_shared<State>();
  auto drain = [state, items, work]() {
    int64_t mine = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < items; ++mine) work(i);
    std::lock_guard<std::mutex> lock(state->mu);
    state->done += mine;
    state->cv.notify_all();
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([drain] { drain(); });
  drain();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == items; });
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, F32<3> q,
                           F32<4> k_pages, F32<4> v_pages,
                           S32<2> page_indices, S32<1> lengths,
                           S32<0> first_col, ffi::Result<F32<3>> out,
                           ffi::Result<F32<2>> lse, float scale) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_indices.dimensions();
  const Shape s{qd[1], qd[2], kd[0], kd[1], kd[2], td[1], first_col.typed_data()[0]};
  const int64_t rows = qd[0];
  if (kd[3] != s.head_dim || !(v_pages.dimensions() == kd) || s.n_heads % s.n_kv != 0 ||
      td[0] != rows || lengths.dimensions()[0] != rows) {
    return ffi::Error::InvalidArgument(
        "cpu decode attention: expected q [R, N, H], k/v pages [K, P, Ps, H] with K dividing "
        "N, page_indices [R, Pr], lengths [R]");
  }
  const int32_t* table = page_indices.typed_data();
  const int32_t* length = lengths.typed_data();
  for (int64_t r = 0; r < rows; ++r) {  // what a bad table would read is not ours to read
    const int64_t cols = (std::max(length[r], 0) + s.page_size - 1) / s.page_size;
    if (s.first_col < 0 || s.first_col + cols > s.table_cols) {
      return ffi::Error::InvalidArgument("cpu decode attention: row " + std::to_string(r) +
                                         " needs page-table columns past Pr");
    }
    for (int64_t c = 0; c < cols; ++c) {
      const int32_t page = table[r * s.table_cols + s.first_col + c];
      if (page < 0 || page >= s.n_pages) {
        return ffi::Error::InvalidArgument("cpu decode attention: row " + std::to_string(r) +
                                           " has page " + std::to_string(page) +
                                           ", outside the pool of " + std::to_string(s.n_pages));
      }
    }
  }
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  float* op = out->typed_data();
  float* lp = lse->typed_data();
  const int64_t group = s.n_heads / s.n_kv;
  ParallelFor(pool, rows * s.n_kv, [=](int64_t item) {
    const int64_t r = item / s.n_kv, kv = item % s.n_kv;
    const int64_t head = r * s.n_heads + kv * group;  // the group's first query head
    AttendRowHead(s, qp + head * s.head_dim, kp, vp, table + r * s.table_cols,
                  std::max(length[r], 0), kv, scale, op + head * s.head_dim, lp + head);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TandemCpuDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32<3>>()  // q [R, N, H]
                                  .Arg<F32<4>>()  // k_pages [K, P, Ps, H]
                                  .Arg<F32<4>>()  // v_pages
                                  .Arg<S32<2>>()  // page_indices [R, Pr]
                                  .Arg<S32<1>>()  // lengths [R]
                                  .Arg<S32<0>>()  // first_col []
                                  .Ret<F32<3>>()  // out [R, N, H]
                                  .Ret<F32<2>>()  // lse [R, N]
                                  .Attr<float>("scale"));
