// Block-quantized matrix multiply for XLA:CPU, registered through the XLA FFI.
//
//   y[m, n] = sum_j sum_{k in block j} x[m, k] * w[n, k],
//   w[n, k] = scale[n, j] * codes[n, k] + offset[n, j],   j = k / block_size.
//
// Shapes: x f32 [M, K]; codes s8 [N, K] (one row per output, the GGUF/torch order);
// scale, offset f32 [N, K / block_size] (offset may be [N, 0]: no offset); y f32 [M, N].
//
// Every GGUF block format this project keeps quantized (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
// Q4_K, Q5_K with block 32; Q6_K, Q3_K, Q2_K with block 16) is exactly such an int8
// code with a per-block float32 scale and offset, so w[n, k] is computed with the same
// float32 operation as `gguf.quants.dequantize` (one fused multiply-add, which equals
// numpy's `s * q + o` because `s * q` is exact) and the product is that of the
// dequantized float32 matrix; only the summation order differs from a dense matmul.
//
// Why: a decode step is a matrix-vector product that streams every weight once. int8
// codes plus two floats per block are 1.25 bytes per weight (block 32) against 4 for
// float32, and XLA:CPU cannot fuse an int8 -> float convert into its dot (it writes
// the converted matrix to memory first, 6x slower than the float32 dot).
//
// Loops: the output columns n are split across the XLA intra-op thread pool. For a
// few rows (M <= kDirectRows) each group of kNT code rows is dequantized in registers
// and multiplied into kNT x M accumulators of 16 lanes (the rows of x are reused from
// L1). For more rows the group is dequantized once into a float32 panel [kNT, K] in
// thread-local scratch and the rows of x, in blocks of kMB rows (so x stays in L2),
// run through a register-blocked kNT x kMT multiply-add loop.
//
// The code uses GCC/Clang vector extensions, not intrinsics: compiled with
// -march=native it becomes AVX-512 on the CPUs this was tuned on (16-lane vectors)
// and AVX2 or NEON elsewhere.

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

constexpr int kLanes = 16;
constexpr int kNT = 4;           // code rows (outputs) per group
constexpr int kDirectRows = 8;   // M up to this: dequantize in registers
constexpr int kMT = 6;           // rows of x per register tile in the panel path
constexpr int kMB = 96;          // rows of x per cache block in the panel path

inline f32x16 load_f32(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 16 int8 codes widened to float32. GCC scalarises the generic int8 conversion, so
// x86 uses the sign-extending load (vpmovsxbd) directly.
inline f32x16 load_codes(const int8_t* p) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
  f32x16 v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  i8x16 q;
  std::memcpy(&q, p, sizeof(q));
  return __builtin_convertvector(__builtin_convertvector(q, i32x16), f32x16);
#endif
}

inline void store_f32(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(f32x16 v) {
  typedef float f32x8 __attribute__((vector_size(32)));
  typedef float f32x4 __attribute__((vector_size(16)));
  f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  f32x8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f32x8 s8 = a + b;
  f32x4 c = __builtin_shufflevector(s8, s8, 0, 1, 2, 3);
  f32x4 d = __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  f32x4 s4 = c + d;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

inline f32x16 splat(float s) { return f32x16{} + s; }

struct Problem {
  const float* x;        // [M, K]
  const int8_t* codes;   // [N, K]
  const float* scale;    // [N, nb]
  const float* offset;   // [N, nb] or nullptr
  float* y;              // [M, N]
  int64_t M, K, N, block, nb;
};

// Dequantized 16 weights of code row n from column k, with the block's scale and offset.
inline f32x16 dequant(const Problem& p, int64_t n, int64_t k, float s, float o) {
  return load_codes(p.codes + n * p.K + k) * splat(s) + splat(o);
}

inline float scale_of(const Problem& p, int64_t n, int64_t j) { return p.scale[n * p.nb + j]; }
inline float offset_of(const Problem& p, int64_t n, int64_t j) {
  return p.offset ? p.offset[n * p.nb + j] : 0.0f;
}

// Rows [0, M) (M <= kDirectRows) times code rows [n, n + NT), dequantizing in registers.
template <int NT, int MR>
void direct_tile(const Problem& p, int64_t n) {
  const int8_t* next = p.codes + (n + NT) * p.K;
  f32x16 acc[NT][MR];
  for (int a = 0; a < NT; ++a)
    for (int b = 0; b < MR; ++b) acc[a][b] = f32x16{};
  for (int64_t j = 0; j < p.nb; ++j) {
    float s[NT], o[NT];
    for (int a = 0; a < NT; ++a) {
      s[a] = scale_of(p, n + a, j);
      o[a] = offset_of(p, n + a, j);
    }
    for (int64_t k = j * p.block; k < (j + 1) * p.block; k += kLanes) {
      // The next group's NT rows are the next NT * K bytes: fetch NT * 16 of them per step
      // (short rows interleaved 4 ways defeat the hardware prefetcher).
      __builtin_prefetch(next + NT * k);
      f32x16 w[NT];
      for (int a = 0; a < NT; ++a) w[a] = dequant(p, n + a, k, s[a], o[a]);
      for (int b = 0; b < MR; ++b) {
        const f32x16 xv = load_f32(p.x + b * p.K + k);
        for (int a = 0; a < NT; ++a) acc[a][b] += w[a] * xv;
      }
    }
  }
  for (int b = 0; b < MR; ++b)
    for (int a = 0; a < NT; ++a) p.y[b * p.N + n + a] = hsum(acc[a][b]);
}

// 5 to 8 rows: at most two code rows at a time, so the accumulators fit in registers.
template <int NT, int MR>
void direct_wide(const Problem& p, int64_t n) {
  if constexpr (NT == 1) {
    direct_tile<1, MR>(p, n);
  } else {
    for (int a = 0; a < NT; a += 2) direct_tile<2, MR>(p, n + a);
  }
}

template <int NT>
void direct_rows(const Problem& p, int64_t n) {
  switch (p.M) {
    case 1: direct_tile<NT, 1>(p, n); break;
    case 2: direct_tile<NT, 2>(p, n); break;
    case 3: direct_tile<NT, 3>(p, n); break;
    case 4: direct_tile<NT, 4>(p, n); break;
    case 5: direct_wide<NT, 5>(p, n); break;
    case 6: direct_wide<NT, 6>(p, n); break;
    case 7: direct_wide<NT, 7>(p, n); break;
    default: direct_wide<NT, 8>(p, n); break;
  }
}

// Rows [m, m + MR) of x times a dequantized panel [NT, K].
template <int NT, int MR>
void panel_tile(const Problem& p, const float* panel, int64_t n, int64_t m) {
  f32x16 acc[NT][MR];
  for (int a = 0; a < NT; ++a)
    for (int b = 0; b < MR; ++b) acc[a][b] = f32x16{};
  const float* xrow = p.x + m * p.K;
  for (int64_t k = 0; k < p.K; k += kLanes) {
    f32x16 w[NT];
    for (int a = 0; a < NT; ++a) w[a] = load_f32(panel + a * p.K + k);
    for (int b = 0; b < MR; ++b) {
      const f32x16 xv = load_f32(xrow + b * p.K + k);
      for (int a = 0; a < NT; ++a) acc[a][b] += w[a] * xv;
    }
  }
  for (int b = 0; b < MR; ++b)
    for (int a = 0; a < NT; ++a) p.y[(m + b) * p.N + n + a] = hsum(acc[a][b]);
}

template <int NT>
void panel_rows(const Problem& p, const float* panel, int64_t n, int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + kMT <= m1; m += kMT) panel_tile<NT, kMT>(p, panel, n, m);
  switch (m1 - m) {
    case 1: panel_tile<NT, 1>(p, panel, n, m); break;
    case 2: panel_tile<NT, 2>(p, panel, n, m); break;
    case 3: panel_tile<NT, 3>(p, panel, n, m); break;
    case 4: panel_tile<NT, 4>(p, panel, n, m); break;
    case 5: panel_tile<NT, 5>(p, panel, n, m); break;
    default: break;
  }
}

template <int NT>
void fill_panel(const Problem& p, float* panel, int64_t n) {
  const int8_t* next = p.codes + (n + NT) * p.K;  // the next group, prefetched as above
  for (int a = 0; a < NT; ++a)
    for (int64_t j = 0; j < p.nb; ++j) {
      const float s = scale_of(p, n + a, j), o = offset_of(p, n + a, j);
      for (int64_t k = j * p.block; k < (j + 1) * p.block; k += kLanes) {
        __builtin_prefetch(next + a * p.K + k);
        store_f32(panel + a * p.K + k, dequant(p, n + a, k, s, o));
      }
    }
}

// Output columns [n0, n1) for all rows.
void run_columns(const Problem& p, int64_t n0, int64_t n1) {
  if (n0 >= n1) return;
  if (p.M <= kDirectRows) {
    int64_t n = n0;
    for (; n + kNT <= n1; n += kNT) direct_rows<kNT>(p, n);
    for (; n < n1; ++n) direct_rows<1>(p, n);
    return;
  }
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(kNT * p.K)) scratch.resize(kNT * p.K);
  float* panel = scratch.data();
  for (int64_t mb = 0; mb < p.M; mb += kMB) {
    const int64_t me = mb + kMB < p.M ? mb + kMB : p.M;
    int64_t n = n0;
    for (; n + kNT <= n1; n += kNT) {
      fill_panel<kNT>(p, panel, n);
      panel_rows<kNT>(p, panel, n, mb, me);
    }
    for (; n < n1; ++n) {
      fill_panel<1>(p, panel, n);
      panel_rows<1>(p, panel, n, mb, me);
    }
  }
}

// Slices of output columns shared between the calling thread and pool tasks.
struct Shared {
  Shared(const Problem& problem, int64_t groups, int64_t parts)
      : p(problem), groups(groups), parts(parts) {}
  const Problem p;
  const int64_t groups, parts;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  int64_t bound(int64_t i) const {
    const int64_t n = groups * i / parts * kNT;
    return n < p.N ? n : p.N;
  }
  void work() {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= parts) return;
      run_columns(p, bound(i), bound(i + 1));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> codes,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                       ffi::ResultBuffer<ffi::F32> y, int64_t block_size) {
  const auto xd = x.dimensions();
  const auto cd = codes.dimensions();
  const auto sd = scale.dimensions();
  const auto od = offset.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2 || od.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("qmatmul: every operand must be 2-D");
  Problem p;
  p.M = xd[0];
  p.K = xd[1];
  p.N = cd[0];
  p.block = block_size;
  if (cd[1] != p.K) return ffi::Error::InvalidArgument("qmatmul: x [M, K] and codes [N, K] disagree on K");
  if (block_size <= 0 || block_size % kLanes || p.K % block_size)
    return ffi::Error::InvalidArgument("qmatmul: block_size must be a multiple of 16 dividing K");
  p.nb = p.K / block_size;
  if (sd[0] != p.N || sd[1] != p.nb)
    return ffi::Error::InvalidArgument("qmatmul: scale must be [N, K / block_size]");
  const bool has_offset = od[1] != 0;
  if (has_offset && (od[0] != p.N || od[1] != p.nb))
    return ffi::Error::InvalidArgument("qmatmul: offset must be [N, K / block_size] or [N, 0]");
  if (yd[0] != p.M || yd[1] != p.N) return ffi::Error::InvalidArgument("qmatmul: output must be [M, N]");
  p.x = x.typed_data();
  p.codes = codes.typed_data();
  p.scale = scale.typed_data();
  p.offset = has_offset ? offset.typed_data() : nullptr;
  p.y = y->typed_data();
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();

  // Split the columns into slices of whole groups, claimed from a shared counter by
  // this thread and by tasks handed to the intra-op pool. The caller never waits for a
  // task to *start*: XLA may run independent products concurrently on every pool
  // thread, so a slice nobody has claimed yet is run by whoever gets to it first, and
  // the caller only waits for slices another thread is already running. A task that
  // starts after the work is done finds no slice left and returns; the shared state is
  // reference-counted so it outlives this call.
  int64_t threads = pool.num_threads();
  if (threads < 1) threads = 1;
  const int64_t groups = (p.N + kNT - 1) / kNT;
  // Not worth a hand-off below ~64K multiply-adds per slice.
  const int64_t by_size = (p.N * p.K * p.M) / (1 << 16);
  int64_t parts = 4 * threads;
  if (parts > groups) parts = groups;
  if (parts > by_size) parts = by_size;
  if (parts < 1) parts = 1;
  if (parts == 1 || threads == 1) {
    run_columns(p, 0, p.N);
    return ffi::Error::Success();
  }
  auto shared = std::make_shared<Shared>(p, groups, parts);
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([shared] { shared->work(); });
  shared->work();
  while (shared->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxQMatmulF32, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_size"));
