// Decode attention over tandem's paged KV cache on CPU, reading each page where it lies.
//
// Called through XLA's FFI (cpu_decode_attention.py builds and registers it). XLA's CPU
// backend can only gather (copy) a row's pages before attending over the copy, and does so
// at a fraction of the memory bandwidth; vLLM's CPU attention reads the pages in place, and
// so does this (docs/benchmarks.md has the figures).
//
// Work item: one (decode row, kv head). Its G = N / K query heads share every [Ps, H] key
// and value tile of the row's pages, which an online softmax visits once, in page order.
// Items are spread over XLA's intra-op thread pool. Pages that many rows share (a cached
// system prompt) are read by each of them; visiting them once for a block of rows measured
// no faster: the kernel is bound by its arithmetic, and the shared pages stay in cache.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
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

struct Shape {
  int64_t n_heads, head_dim, n_kv, n_pages, page_size, table_cols;
  int64_t group() const { return n_heads / n_kv; }
};

// Eight floats, in whatever vector registers the target has (one AVX register, two SSE or
// NEON ones): GCC's and Clang's vector extension, so no intrinsics tie this to one ISA.
using Vec = float __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

float Sum(Vec v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

using IVec = int32_t __attribute__((vector_size(32)));

// exp of eight floats, x <= 0 (Cephes' expf: x = n ln 2 + r with |r| <= ln 2 / 2, a degree-6
// polynomial for e^r, 2^n built in the exponent bits; NaN stays NaN). glibc's vector expf is
// only declared under -ffast-math, whose finite-math assumptions this code does not make.
Vec Exp(Vec x) {
  const Vec lowest = Vec{} - 87.33f;  // e^-87.33 is float's smallest normal
  x = x < lowest ? lowest : x;
  const Vec magic = Vec{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (x * 1.44269504f + magic) - magic;
  const Vec r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// p[t] = exp(p[t] - top) for t < count; their sum.
float ExpShifted(float* p, int64_t count, float top) {
  Vec sums{};
  int64_t t = 0;
  for (; t + kLanes <= count; t += kLanes) {
    const Vec e = Exp(Load(p + t) - top);
    Store(p + t, e);
    sums += e;
  }
  float sum = Sum(sums);
  for (; t < count; ++t) sum += (p[t] = std::exp(p[t] - top));
  return sum;
}

// out[t] = q . keys[t] for `count` key rows of `dim`. Four rows at a time: four independent
// accumulators keep the FMA units busy, where one would wait on each FMA's latency (a dot
// at a time measured about half the speed).
void Logits(const float* q, const float* keys, int64_t count, int64_t dim, float* out) {
  const int64_t whole = dim / kLanes * kLanes;
  int64_t t = 0;
  for (; t + 4 <= count; t += 4) {
    const float* k = keys + t * dim;
    Vec a0{}, a1{}, a2{}, a3{};
    for (int64_t h = 0; h < whole; h += kLanes) {
      const Vec x = Load(q + h);
      a0 += x * Load(k + h);
      a1 += x * Load(k + dim + h);
      a2 += x * Load(k + 2 * dim + h);
      a3 += x * Load(k + 3 * dim + h);
    }
    float s[4] = {Sum(a0), Sum(a1), Sum(a2), Sum(a3)};
    for (int64_t h = whole; h < dim; ++h)
      for (int j = 0; j < 4; ++j) s[j] += q[h] * k[j * dim + h];
    for (int j = 0; j < 4; ++j) out[t + j] = s[j];
  }
  for (; t < count; ++t) {
    const float* k = keys + t * dim;
    Vec a{};
    for (int64_t h = 0; h < whole; h += kLanes) a += Load(q + h) * Load(k + h);
    float sum = Sum(a);
    for (int64_t h = whole; h < dim; ++h) sum += q[h] * k[h];
    out[t] = sum;
  }
}

// acc += sum_t p[t] * values[t] for `count` value rows of `dim`: 32 dimensions at a time,
// held in registers across the rows.
void Accumulate(const float* p, const float* values, int64_t count, int64_t dim, float* acc) {
  int64_t h = 0;
  for (; h + 4 * kLanes <= dim; h += 4 * kLanes) {
    Vec a0 = Load(acc + h), a1 = Load(acc + h + 8), a2 = Load(acc + h + 16), a3 = Load(acc + h + 24);
    for (int64_t t = 0; t < count; ++t) {
      const float* v = values + t * dim + h;
      const float w = p[t];
      a0 += w * Load(v);
      a1 += w * Load(v + 8);
      a2 += w * Load(v + 16);
      a3 += w * Load(v + 24);
    }
    Store(acc + h, a0);
    Store(acc + h + 8, a1);
    Store(acc + h + 16, a2);
    Store(acc + h + 24, a3);
  }
  for (; h < dim; ++h)
    for (int64_t t = 0; t < count; ++t) acc[h] += p[t] * values[t * dim + h];
}

// The online softmax of one row's G query heads of one kv head, fed page tiles in order.
class RowState {
 public:
  RowState(const Shape& s, const float* q, float scale)
      : group_(s.group()), dim_(s.head_dim), query_(group_ * dim_), acc_(group_ * dim_, 0.f),
        logits_(group_ * s.page_size), top_(group_, -INFINITY), total_(group_, 0.f) {
    for (int64_t i = 0; i < group_ * dim_; ++i) query_[i] = q[i] * scale;
  }

  // Attends to the first `count` positions of a [Ps, H] key tile and its value tile.
  void Visit(const float* keys, const float* values, int64_t count) {
    const int64_t stride = static_cast<int64_t>(logits_.size()) / group_;
    for (int64_t g = 0; g < group_; ++g) {
      float* p = logits_.data() + g * stride;
      Logits(query_.data() + g * dim_, keys, count, dim_, p);
      float new_top = top_[g];
      for (int64_t t = 0; t < count; ++t) new_top = std::max(new_top, p[t]);
      const float decay = std::exp(top_[g] - new_top);
      total_[g] = total_[g] * decay + ExpShifted(p, count, new_top);
      top_[g] = new_top;
      float* a = acc_.data() + g * dim_;
      for (int64_t h = 0; h < dim_; ++h) a[h] *= decay;
      Accumulate(p, values, count, dim_, a);
    }
  }

  // The normalized output [G, H] (zeros for a row that saw no position).
  void Write(float* out) const {
    for (int64_t g = 0; g < group_; ++g) {
      const float inv = total_[g] > 0.f ? 1.f / total_[g] : 0.f;
      for (int64_t h = 0; h < dim_; ++h) out[g * dim_ + h] = acc_[g * dim_ + h] * inv;
    }
  }

 private:
  int64_t group_, dim_;
  std::vector<float> query_, acc_, logits_, top_, total_;
};

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

ffi::Error DecodeAttention(ffi::ThreadPool pool, F32<3> q, F32<4> k_pages, F32<4> v_pages,
                           S32<2> page_indices, S32<1> lengths, ffi::Result<F32<3>> out,
                           float scale) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_indices.dimensions();
  const Shape s{qd[1], qd[2], kd[0], kd[1], kd[2], td[1]};
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
    const std::string row = "cpu decode attention: row " + std::to_string(r);
    const int64_t cols = (std::max(length[r], 0) + s.page_size - 1) / s.page_size;
    if (cols > s.table_cols) return ffi::Error::InvalidArgument(row + " needs page-table columns past Pr");
    for (int64_t c = 0; c < cols; ++c) {
      const int32_t page = table[r * s.table_cols + c];
      if (page < 0 || page >= s.n_pages) {
        return ffi::Error::InvalidArgument(row + " has page " + std::to_string(page) +
                                           ", outside the pool of " + std::to_string(s.n_pages));
      }
    }
  }
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, rows * s.n_kv, [=](int64_t item) {
    const int64_t r = item / s.n_kv, kv = item % s.n_kv;
    const int64_t head = r * s.n_heads + kv * s.group();  // the group's first query head
    RowState state(s, qp + head * s.head_dim, scale);
    for (int64_t start = 0; start < length[r]; start += s.page_size) {
      const int64_t page = table[r * s.table_cols + start / s.page_size];
      const int64_t at = (kv * s.n_pages + page) * s.page_size * s.head_dim;
      state.Visit(kp + at, vp + at, std::min<int64_t>(s.page_size, length[r] - start));
    }
    state.Write(op + head * s.head_dim);
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
                                  .Ret<F32<3>>()  // out [R, N, H]
                                  .Attr<float>("scale"));
