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
// Loops: the output columns n are split across the XLA intra-op thread pool (parallel.h). For a
// few rows (M <= kDirectRows) each group of kNT code rows is dequantized in registers
// and multiplied into kNT x M accumulators of 16 lanes (the rows of x are reused from
// L1). For more rows the group is dequantized once into a float32 panel [kNT, K] in
// thread-local scratch and the rows of x, in blocks of kMB rows (so x stays in L2),
// run through a register-blocked kNT x kMT multiply-add loop.
//
// The code uses GCC/Clang vector extensions, not intrinsics: compiled with
// -march=native it becomes AVX-512 on the CPUs this was tuned on (16-lane vectors)
// and AVX2 or NEON elsewhere.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using align_jax::f32x16;
using align_jax::i32x16;
using align_jax::i8x16;
using align_jax::load_f32;
using align_jax::splat;
using align_jax::store_f32;

constexpr int kLanes = 16;
constexpr int kNT = 4;           // code rows (outputs) per group
constexpr int kDirectRows = 8;   // M up to this: dequantize in registers
constexpr int kPairDotRows = 6;  // bfloat16 mode, M up to this: bfloat16 pair dot products (7 and 8
                                 // rows: float32 multiply-adds of rounded values, 1.15x faster there)
constexpr int kMT = 6;           // rows of x per register tile in the panel path
constexpr int kMB = 96;          // rows of x per cache block in the panel path

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


struct Problem {
  const float* x;        // [M, K] (in bfloat16 mode: already rounded to bfloat16 values)
  const int8_t* codes;   // [N, K]
  const float* scale;    // [N, nb]
  const float* offset;   // [N, nb] or nullptr
  float* y;              // [M, N]
  int64_t M, K, N, block, nb;
  bool bf16;             // round the dequantized weights to bfloat16 (the model's bfloat16 mode)
  const uint16_t* xa;    // x as the AMX column operand (see amx_x_operand), else nullptr
  const uint16_t* xb;    // bfloat16 mode with few rows: x as bfloat16 [M, K] (K % 32 == 0), else nullptr
  int block_shift;       // log2(block)
};

// float32 -> nearest-even bfloat16 value, kept in float32 (what vcvtneps2bf16 rounds to;
// the bit trick is portable and the inputs are finite).
inline f32x16 round_bf16(f32x16 v) {
  typedef uint32_t u32x16 __attribute__((vector_size(64)));
  u32x16 u;
  std::memcpy(&u, &v, sizeof(u));
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// Dequantized 16 weights of code row n from column k, with the block's scale and offset
// (rounded to bfloat16 values in bfloat16 mode, BF).
template <bool BF>
inline f32x16 dequant(const Problem& p, int64_t n, int64_t k, float s, float o) {
  const f32x16 w = load_codes(p.codes + n * p.K + k) * splat(s) + splat(o);
  if constexpr (BF) return round_bf16(w);
  return w;
}

inline float scale_of(const Problem& p, int64_t n, int64_t j) { return p.scale[n * p.nb + j]; }
inline float offset_of(const Problem& p, int64_t n, int64_t j) {
  return p.offset ? p.offset[n * p.nb + j] : 0.0f;
}

// Rows [0, M) (M <= kDirectRows) times code rows [n, n + NT), dequantizing in registers.
// How many groups of NT code rows ahead the direct paths prefetch: at least ~kPrefetchBytes
// ahead, so the lines arrive before they are needed even for short rows.
constexpr int64_t kPrefetchBytes = 8192;
inline int64_t prefetch_rows(int64_t nt, int64_t k) {
  const int64_t groups = (kPrefetchBytes + nt * k - 1) / (nt * k);
  return nt * (groups < 1 ? 1 : groups);
}

template <bool BF, int NT, int MR>
void direct_tile(const Problem& p, int64_t n) {
  const int8_t* next = p.codes + (n + prefetch_rows(NT, p.K)) * p.K;
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
      for (int a = 0; a < NT; ++a) w[a] = dequant<BF>(p, n + a, k, s[a], o[a]);
      for (int b = 0; b < MR; ++b) {
        const f32x16 xv = load_f32(p.x + b * p.K + k);
        for (int a = 0; a < NT; ++a) acc[a][b] += w[a] * xv;
      }
    }
  }
  for (int b = 0; b < MR; ++b)
    for (int a = 0; a < NT; ++a) p.y[b * p.N + n + a] = hsum(acc[a][b]);
}

#if defined(__AVX512BF16__)
// bfloat16 mode, rows [0, MR): each 32 dequantized weights are rounded to bfloat16 pairs
// (vcvtne2ps2bf16) and multiplied with the bfloat16 x by the pair dot product
// (vdpbf16ps, float32 accumulation): fewer instructions than rounding in float32 and the
// same arithmetic as the tile unit. xb: x as bfloat16, [M, K].
template <int NT, int MR>
void direct_tile_bf16(const Problem& p, const uint16_t* xb, int64_t n) {
  const int8_t* next = p.codes + (n + prefetch_rows(NT, p.K)) * p.K;
  __m512 acc[NT][MR];
  for (int a = 0; a < NT; ++a)
    for (int b = 0; b < MR; ++b) acc[a][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < p.K; k += 32) {
    __builtin_prefetch(next + NT * k);
    __builtin_prefetch(next + NT * k + 64);
    const int64_t j0 = k >> p.block_shift, j1 = (k + 16) >> p.block_shift;
    __m512bh w[NT];
    for (int a = 0; a < NT; ++a) {
      const f32x16 lo = dequant<false>(p, n + a, k, scale_of(p, n + a, j0), offset_of(p, n + a, j0));
      const f32x16 hi = dequant<false>(p, n + a, k + 16, scale_of(p, n + a, j1), offset_of(p, n + a, j1));
      w[a] = _mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);
    }
    for (int b = 0; b < MR; ++b) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + b * p.K + k);
      for (int a = 0; a < NT; ++a) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], w[a], xv);
    }
  }
  for (int b = 0; b < MR; ++b)
    for (int a = 0; a < NT; ++a) p.y[b * p.N + n + a] = hsum((f32x16)acc[a][b]);
}

// 5 to 8 rows: two code rows at a time, as in the float32 path.
template <int NT, int MR>
void direct_wide_bf16(const Problem& p, const uint16_t* xb, int64_t n) {
  if constexpr (NT == 1) {
    direct_tile_bf16<1, MR>(p, xb, n);
  } else {
    for (int a = 0; a < NT; a += 2) direct_tile_bf16<2, MR>(p, xb, n + a);
  }
}

template <int NT>
void direct_rows_bf16(const Problem& p, const uint16_t* xb, int64_t n) {
  switch (p.M) {
    case 1: direct_tile_bf16<NT, 1>(p, xb, n); break;
    case 2: direct_tile_bf16<NT, 2>(p, xb, n); break;
    case 3: direct_tile_bf16<NT, 3>(p, xb, n); break;
    case 4: direct_tile_bf16<NT, 4>(p, xb, n); break;
    case 5: direct_wide_bf16<NT, 5>(p, xb, n); break;
    case 6: direct_wide_bf16<NT, 6>(p, xb, n); break;
    case 7: direct_wide_bf16<NT, 7>(p, xb, n); break;
    default: direct_wide_bf16<NT, 8>(p, xb, n); break;
  }
}
#endif

// 5 to 8 rows: at most two code rows at a time, so the accumulators fit in registers.
template <bool BF, int NT, int MR>
void direct_wide(const Problem& p, int64_t n) {
  if constexpr (NT == 1) {
    direct_tile<BF, 1, MR>(p, n);
  } else {
    for (int a = 0; a < NT; a += 2) direct_tile<BF, 2, MR>(p, n + a);
  }
}

template <bool BF, int NT>
void direct_rows(const Problem& p, int64_t n) {
  switch (p.M) {
    case 1: direct_tile<BF, NT, 1>(p, n); break;
    case 2: direct_tile<BF, NT, 2>(p, n); break;
    case 3: direct_tile<BF, NT, 3>(p, n); break;
    case 4: direct_tile<BF, NT, 4>(p, n); break;
    case 5: direct_wide<BF, NT, 5>(p, n); break;
    case 6: direct_wide<BF, NT, 6>(p, n); break;
    case 7: direct_wide<BF, NT, 7>(p, n); break;
    default: direct_wide<BF, NT, 8>(p, n); break;
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

template <bool BF, int NT>
void fill_panel(const Problem& p, float* panel, int64_t n) {
  const int8_t* next = p.codes + (n + NT) * p.K;  // the next group, prefetched as above
  for (int a = 0; a < NT; ++a)
    for (int64_t j = 0; j < p.nb; ++j) {
      const float s = scale_of(p, n + a, j), o = offset_of(p, n + a, j);
      for (int64_t k = j * p.block; k < (j + 1) * p.block; k += kLanes) {
        __builtin_prefetch(next + a * p.K + k);
        store_f32(panel + a * p.K + k, dequant<BF>(p, n + a, k, s, o));
      }
    }
}

// Products of this many rows or more that take the AMX path split their rows between threads
// (declared outside the AMX block: the row split reads it on every machine).
constexpr int64_t kAmxSplitRows = 512;

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
// ---------------------------------------------------------------------------------------
// bfloat16 mode on CPUs with AMX, computed transposed: y^T [16 n x 16 m] tiles +=
// w_bf16 [16 n x 32 k] . x_bf16 [32 k x 16 m], accumulated in float32 by the tile unit
// (TDPBF16PS). The weights are the row operand, so dequantized codes go into a tile as
// they are (16 rows of 32 bfloat16, one 1 KiB tile per 32 k: no reshuffling); x is the
// column operand, laid out once per call as the tile unit wants it (pairs of consecutive
// k of one row side by side: xb[m / 16][k / 32][k % 32 / 2][m % 16][k % 2]); each output
// tile is transposed once, when its K loop is done. Tiles: 0-3 the 2 x 2 outputs
// (32 columns x 32 rows), 4-5 two weight tiles, 6-7 two x tiles.
constexpr int kAmxRows = 16;  // the AMX path is used from this many rows of x

bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// 16 x 16 transpose of 32-bit words (simd.h's, on integer lanes).
inline void transpose16(const __m512i rows[16], uint32_t* out) {
  align_jax::transpose16(reinterpret_cast<const f32x16*>(rows), reinterpret_cast<float*>(out));
}

// x -> xa [Mp / 16][K / 32][16][16][2] bfloat16 (rounded to nearest even, rows >= M zero),
// row tiles [mt0, mt1): per 16 rows and 32 k, 16 words (pairs) of each row, transposed.
void amx_x_tiles(const float* x, int64_t M, int64_t K, uint16_t* xa, int64_t mt0, int64_t mt1) {
  const int64_t kbs = K / 32;
  uint32_t* out = reinterpret_cast<uint32_t*>(xa) + mt0 * kbs * 256;
  __m512i rows[16];
  for (int64_t mt = mt0; mt < mt1; ++mt)
    for (int64_t kb = 0; kb < kbs; ++kb, out += 256) {
      for (int r = 0; r < 16; ++r) {
        const int64_t m = mt * 16 + r;
        if (m < M) {
          const float* src = x + m * K + kb * 32;
          rows[r] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src));
        } else {
          rows[r] = _mm512_setzero_si512();
        }
      }
      transpose16(rows, out);
    }
}

// Weight rows [n, n + 16) dequantized to bfloat16: panel [K / 32][16][32].
template <bool Offset>
void fill_amx_panel_t(const Problem& p, uint16_t* panel, int64_t n) {
  // The 16 rows are one contiguous stream of 16 * K bytes, read in order; fetching 4 KiB
  // ahead of it (measured: 1.3x over no prefetch, 1.2x over fetching the next panel's rows)
  // keeps it near the single-core streaming rate.
  constexpr int64_t kAhead = 4096;
  for (int c = 0; c < 16; ++c) {
    const int8_t* row = p.codes + (n + c) * p.K;
    const float* scale = p.scale + (n + c) * p.nb;
    const float* offset = Offset ? p.offset + (n + c) * p.nb : nullptr;
    for (int64_t k = 0; k < p.K; k += 32) {
      if ((k & 63) == 0) __builtin_prefetch(row + k + kAhead);
      const int64_t j0 = k >> p.block_shift, j1 = (k + 16) >> p.block_shift;
      f32x16 w0 = load_codes(row + k) * splat(scale[j0]);
      f32x16 w1 = load_codes(row + k + 16) * splat(scale[j1]);
      if constexpr (Offset) {
        w0 += splat(offset[j0]);
        w1 += splat(offset[j1]);
      }
      const __m512bh pair = _mm512_cvtne2ps_pbh((__m512)w1, (__m512)w0);  // k .. k + 31 in order
      std::memcpy(panel + ((k / 32) * 16 + c) * 32, &pair, 64);
    }
  }
}

void fill_amx_panel(const Problem& p, uint16_t* panel, int64_t n) {
  if (p.offset)
    fill_amx_panel_t<true>(p, panel, n);
  else
    fill_amx_panel_t<false>(p, panel, n);
}

// Output tiles (rows [16 mt, +32), columns [n, +32)) of one pass over K; `two` / `rows2`
// say whether the second column / row half exists.
void amx_block(const Problem& p, const uint16_t* panel0, const uint16_t* panel1, int64_t n, int64_t mt,
               bool two, bool rows2) {
  const int64_t kbs = p.K / 32;
  const uint16_t* x0 = p.xa + mt * kbs * 512;
  const uint16_t* x1 = x0 + kbs * 512;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < kbs; ++kb) {
    _tile_loadd(4, panel0 + kb * 512, 64);
    _tile_loadd(6, x0 + kb * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (rows2) {
      _tile_loadd(7, x1 + kb * 512, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (two) {
      _tile_loadd(5, panel1 + kb * 512, 64);
      _tile_dpbf16ps(2, 5, 6);
      if (rows2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  // Output tile t = (column half, row half); transpose y^T to y, drop padding rows.
  alignas(64) float tile[16 * 16];
  alignas(64) uint32_t transposed[16 * 16];
  for (int t = 0; t < 4; ++t) {
    const bool second_cols = t >> 1, second_rows = t & 1;
    if ((second_cols && !two) || (second_rows && !rows2)) continue;
    switch (t) {
      case 0: _tile_stored(0, tile, 64); break;
      case 1: _tile_stored(1, tile, 64); break;
      case 2: _tile_stored(2, tile, 64); break;
      default: _tile_stored(3, tile, 64); break;
    }
    __m512i rows[16];
    for (int r = 0; r < 16; ++r) rows[r] = _mm512_load_si512(tile + r * 16);
    transpose16(rows, transposed);
    const int64_t m0 = (mt + second_rows) * 16, nc = n + (second_cols ? 16 : 0);
    for (int r = 0; r < 16 && m0 + r < p.M; ++r) std::memcpy(p.y + (m0 + r) * p.N + nc, transposed + r * 16, 64);
  }
}

// Columns [n0, n1) (multiples of 16) of every row through the tile unit, in blocks of
// kAmxColumns columns whose converted weights (kAmxColumns * K * 2 bytes) stay in L2 while
// every row tile of x passes over them: x is read once per block, not once per 32 columns
// (for a 4096-row prefill that is the difference between x coming from L2 and from DRAM).
// With a single pair of row tiles (a decode step of up to 32 rows) nothing is reused across
// blocks, and blocks of 32 columns keep the converted weights in L1 instead (1.1x).
constexpr int64_t kAmxColumns = 256;
void amx_columns(const Problem& p, int64_t n0, int64_t n1) {
  configure_tiles();
  thread_local std::vector<uint16_t> scratch;
  const int64_t kbs = p.K / 32;
  const size_t panel_size = static_cast<size_t>(kbs) * 512;  // 16 columns
  if (scratch.size() < (kAmxColumns / 16) * panel_size) scratch.resize((kAmxColumns / 16) * panel_size);
  const int64_t m_tiles = (p.M + 15) / 16;
  const int64_t block = m_tiles <= 2 ? 32 : kAmxColumns;
  for (int64_t nb = n0; nb < n1; nb += block) {
    const int64_t ne = nb + block < n1 ? nb + block : n1;
    for (int64_t n = nb; n < ne; n += 16) fill_amx_panel(p, scratch.data() + (n - nb) / 16 * panel_size, n);
    for (int64_t mt = 0; mt < m_tiles; mt += 2)
      for (int64_t n = nb; n < ne; n += 32) {
        const uint16_t* panel0 = scratch.data() + (n - nb) / 16 * panel_size;
        amx_block(p, panel0, panel0 + panel_size, n, mt, n + 16 < ne, mt + 1 < m_tiles);
      }
  }
  _tile_release();
}
#endif

template <bool BF>
void fma_columns(const Problem& p, int64_t n0, int64_t n1);

// Output columns [n0, n1) for all rows.
void run_columns(const Problem& p, int64_t n0, int64_t n1) {
  if (n0 >= n1) return;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  if (p.xa != nullptr) {
    const int64_t whole = n0 + (n1 - n0) / 16 * 16;
    if (whole > n0) amx_columns(p, n0, whole);
    n0 = whole;
    if (n0 >= n1) return;
  }
#endif
  if (p.bf16)
    fma_columns<true>(p, n0, n1);
  else
    fma_columns<false>(p, n0, n1);
}

// Output columns [n0, n1) for all rows on the vector units (float32 multiply-adds).
// ---------------------------------------------------------------------------------------
// More than kDirectRows rows on the vector units: a packed GEMM. The weights of 32 output
// columns are dequantized once into a float32 panel laid out k-major, wt[k][32] (16 x 16
// transposes of dequantized rows), then every tile of kGemmRows rows of x runs through a
// register-blocked kGemmRows x 32 multiply-add loop: per k, two panel vectors times kGemmRows
// broadcast x values into 2 * kGemmRows accumulators (no horizontal sums, each weight
// vector reused kGemmRows times from registers). The panel (32 * K floats) stays in L2.
constexpr int kGemmRows = 12;
constexpr int kGemmCols = 32;
// Packing costs 0.5-1 cycle per weight, the GEMM ~1 cycle per 30 rows of a weight: below this
// many rows the row-panel loop (dequantizing in registers, horizontal sums) is faster.
constexpr int64_t kGemmMinRows = 64;

template <bool BF>
void pack_gemm_panel(const Problem& p, float* wt, int64_t n) {
  f32x16 rows[16];
  alignas(64) float block[16 * 16];
  for (int half = 0; half < kGemmCols / 16; ++half) {
    const int64_t n0 = n + 16 * half;
    for (int64_t k = 0; k < p.K; k += 16) {
      const int64_t j = k >> p.block_shift;
      for (int c = 0; c < 16; ++c) {
        if ((k & 63) == 0) __builtin_prefetch(p.codes + (n0 + c) * p.K + k + 256);
        rows[c] = dequant<BF>(p, n0 + c, k, scale_of(p, n0 + c, j), offset_of(p, n0 + c, j));
      }
      align_jax::transpose16(rows, block);  // block[kk][c] = w[n0 + c][k + kk]
      for (int kk = 0; kk < 16; ++kk) std::memcpy(wt + (k + kk) * kGemmCols + 16 * half, block + kk * 16, 64);
    }
  }
}

template <int MR>
void gemm_tile(const Problem& p, const float* wt, int64_t n, int64_t m) {
  f32x16 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = f32x16{};
  const float* x = p.x + m * p.K;
  for (int64_t k = 0; k < p.K; ++k) {
    const f32x16 w0 = load_f32(wt + k * kGemmCols), w1 = load_f32(wt + k * kGemmCols + 16);
    for (int r = 0; r < MR; ++r) {
      const f32x16 xv = splat(x[r * p.K + k]);
      acc0[r] += w0 * xv;
      acc1[r] += w1 * xv;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store_f32(p.y + (m + r) * p.N + n, acc0[r]);
    store_f32(p.y + (m + r) * p.N + n + 16, acc1[r]);
  }
}

void gemm_rows(const Problem& p, const float* wt, int64_t n) {
  int64_t m = 0;
  for (; m + kGemmRows <= p.M; m += kGemmRows) gemm_tile<kGemmRows>(p, wt, n, m);
  switch (p.M - m) {
    case 1: gemm_tile<1>(p, wt, n, m); break;
    case 2: gemm_tile<2>(p, wt, n, m); break;
    case 3: gemm_tile<3>(p, wt, n, m); break;
    case 4: gemm_tile<4>(p, wt, n, m); break;
    case 5: gemm_tile<5>(p, wt, n, m); break;
    case 6: gemm_tile<6>(p, wt, n, m); break;
    case 7: gemm_tile<7>(p, wt, n, m); break;
    case 8: gemm_tile<8>(p, wt, n, m); break;
    case 9: gemm_tile<9>(p, wt, n, m); break;
    case 10: gemm_tile<10>(p, wt, n, m); break;
    case 11: gemm_tile<11>(p, wt, n, m); break;
    default: break;
  }
}

template <bool BF>
void fma_columns(const Problem& p, int64_t n0, int64_t n1) {
#if defined(__AVX512BF16__)
  if (BF && p.xb != nullptr && p.M <= kPairDotRows) {
    int64_t n = n0;
    for (; n + kNT <= n1; n += kNT) direct_rows_bf16<kNT>(p, p.xb, n);
    for (; n < n1; ++n) direct_rows_bf16<1>(p, p.xb, n);
    return;
  }
#endif
  if (p.M <= kDirectRows) {
    int64_t n = n0;
    for (; n + kNT <= n1; n += kNT) direct_rows<BF, kNT>(p, n);
    for (; n < n1; ++n) direct_rows<BF, 1>(p, n);
    return;
  }
  if (p.M >= kGemmMinRows && p.K % 16 == 0) {
    thread_local std::vector<float> packed;
    if (packed.size() < static_cast<size_t>(kGemmCols * p.K)) packed.resize(kGemmCols * p.K);
    for (; n0 + kGemmCols <= n1; n0 += kGemmCols) {
      pack_gemm_panel<BF>(p, packed.data(), n0);
      gemm_rows(p, packed.data(), n0);
    }
    if (n0 >= n1) return;  // fewer than 32 columns left: the row-panel loop below
  }
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(kNT * p.K)) scratch.resize(kNT * p.K);
  float* panel = scratch.data();
  for (int64_t mb = 0; mb < p.M; mb += kMB) {
    const int64_t me = mb + kMB < p.M ? mb + kMB : p.M;
    int64_t n = n0;
    for (; n + kNT <= n1; n += kNT) {
      fill_panel<BF, kNT>(p, panel, n);
      panel_rows<kNT>(p, panel, n, mb, me);
    }
    for (; n < n1; ++n) {
      fill_panel<BF, 1>(p, panel, n);
      panel_rows<1>(p, panel, n, mb, me);
    }
  }
}

// The product as pieces of whole groups of `unit` output columns times, on the tile unit,
// `row_parts` ranges of whole pairs of row tiles (see parallel.h).
struct QMatmulJob : align_jax::ParallelJob {
  QMatmulJob(const Problem& problem, int64_t unit, int64_t groups, int64_t column_parts, int64_t row_parts)
      : ParallelJob(column_parts * row_parts), p(problem), unit(unit), groups(groups),
        column_parts(column_parts), row_parts(row_parts) {}
  Problem p;
  const int64_t unit, groups, column_parts, row_parts;

  int64_t bound(int64_t i) const {
    const int64_t n = groups * i / column_parts * unit;
    return n < p.N ? n : p.N;
  }
  void run(int64_t part) override {
    const int64_t c = part / row_parts, r = part % row_parts;
    if (row_parts == 1) return run_columns(p, bound(c), bound(c + 1));
    const int64_t pairs = (p.M + 31) / 32;
    const int64_t m0 = pairs * r / row_parts * 32, m1 = std::min(p.M, pairs * (r + 1) / row_parts * 32);
    if (m0 >= m1) return;
    Problem q = p;  // rows [m0, m1): every row-indexed operand shifted
    q.M = m1 - m0;
    q.x = p.x + m0 * p.K;
    q.y = p.y + m0 * p.N;
    if (p.xa != nullptr) q.xa = p.xa + m0 * p.K;  // whole row tiles: 16 * K values each
    run_columns(q, bound(c), bound(c + 1));
  }
};

ffi::Error QMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> codes,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                       ffi::ResultBuffer<ffi::F32> y, int64_t block_size, int64_t bf16) {
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
  p.bf16 = bf16 != 0;
  p.xa = nullptr;
  p.xb = nullptr;
  p.block_shift = 0;
  while ((int64_t{1} << p.block_shift) < p.block) ++p.block_shift;
  if ((int64_t{1} << p.block_shift) != p.block)
    return ffi::Error::InvalidArgument("qmatmul: block_size must be a power of two");
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();

  // bfloat16 mode: x is rounded to bfloat16 once here (in parallel, by rows); with AMX and
  // enough rows the products run on the tile unit from a bfloat16 copy of x laid out in
  // whole row tiles, which is all they read.
  int64_t threads = pool.num_threads();
  if (threads < 1) threads = 1;
  align_jax::AlignedBuffer<float> x_rounded;  // uninitialised: every value is written below
  std::vector<uint16_t> xb;
  align_jax::AlignedBuffer<uint16_t> xa;
  int64_t unit = p.M >= kGemmMinRows ? kGemmCols : kNT;  // slices of whole GEMM panels
  if (p.bf16) {
    bool amx = false;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    amx = p.M >= kAmxRows && p.K % 32 == 0 && amx_permitted();
#endif
    // Pieces of whole rows, at least ~64K values each.
    const int64_t prep_parts = std::max<int64_t>(1, std::min<int64_t>(4 * threads, p.M * p.K / (1 << 16)));
    const float* x_in = p.x;
    if (!amx || p.N % 16 != 0) {  // read by the vector-unit paths
      x_rounded.resize(p.M * p.K);
      align_jax::parallel_for(pool, prep_parts, [&](int64_t part) {
        const int64_t r0 = p.M * part / prep_parts, r1 = p.M * (part + 1) / prep_parts;
        float* out = x_rounded.data();
        for (int64_t i = r0 * p.K; i < r1 * p.K; i += kLanes) store_f32(out + i, round_bf16(load_f32(x_in + i)));
      });
      p.x = x_rounded.data();
    }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    if (amx) {
      const int64_t m_tiles = (p.M + 15) / 16;
      const int64_t tile_parts = std::min(prep_parts, m_tiles);
      xa.resize(m_tiles * 16 * p.K);
      align_jax::parallel_for(pool, tile_parts, [&](int64_t part) {
        amx_x_tiles(x_in, p.M, p.K, xa.data(), m_tiles * part / tile_parts, m_tiles * (part + 1) / tile_parts);
      });
      p.xa = xa.data();
      unit = 32;
    }
#endif
#if defined(__AVX512BF16__)
    if (p.M <= kPairDotRows && p.K % 32 == 0) {
      xb.resize(p.M * p.K);
      for (int64_t i = 0; i < p.M * p.K; ++i) {
        uint32_t bits;
        std::memcpy(&bits, x_rounded.data() + i, 4);
        xb[i] = static_cast<uint16_t>(bits >> 16);
      }
      p.xb = xb.data();
    }
#endif
  }

  // Pieces of whole column groups, shared with the pool (parallel.h); not worth a
  // hand-off below ~64K multiply-adds per piece.
  const int64_t groups = (p.N + unit - 1) / unit;
  const int64_t by_size = (p.N * p.K * p.M) / (1 << 16);
  int64_t parts = 4 * threads;
  if (parts > by_size) parts = by_size;
  // On the tile unit with many rows, each thread also takes a range of rows, so that x is
  // read from memory fewer times (each piece reads its rows of x once per column block).
  int64_t row_parts = 1;
  if (p.xa != nullptr && p.M >= kAmxSplitRows) row_parts = std::min(threads, p.M / (kAmxSplitRows / 2));
  int64_t column_parts = (parts + row_parts - 1) / row_parts;
  if (column_parts > groups) column_parts = groups;
  if (column_parts < 1) column_parts = 1;
  if (column_parts * row_parts == 1 || threads == 1) {
    run_columns(p, 0, p.N);
    return ffi::Error::Success();
  }
  align_jax::run_parallel(pool, std::make_shared<QMatmulJob>(p, unit, groups, column_parts, row_parts));
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
                                  .Attr<int64_t>("block_size")
                                  .Attr<int64_t>("bf16"));
