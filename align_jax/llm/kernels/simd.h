// 16-lane float32 vectors and the helpers the native kernels share. GCC/Clang vector
// extensions compile to AVX-512 with -march=native on the CPUs these kernels were tuned on,
// and to narrower vectors elsewhere.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace align_jax {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

inline f32x16 load_f32(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_f32(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

// All lanes = s (a broadcast; `f32x16{} + s` would cost a scalar add, kept for -0.0).
inline f32x16 splat(float s) { return f32x16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

// 16 x 16 transpose of 32-bit lanes: out[r * 16 + c] = rows[c][r].
inline void transpose16(const f32x16 rows[16], float* out) {
#if defined(__AVX512F__)
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps((__m512)rows[i], (__m512)rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps((__m512)rows[i], (__m512)rows[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = (__m512)_mm512_unpacklo_pd((__m512d)t[i], (__m512d)t[i + 2]);
    u[i + 1] = (__m512)_mm512_unpackhi_pd((__m512d)t[i], (__m512d)t[i + 2]);
    u[i + 2] = (__m512)_mm512_unpacklo_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
    u[i + 3] = (__m512)_mm512_unpackhi_pd((__m512d)t[i + 1], (__m512d)t[i + 3]);
  }
  // u[4g + j] holds, in each 128-bit lane L, element 4L + j of rows 4g .. 4g + 3.
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), b = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88), d = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    _mm512_storeu_ps(out + (0 + j) * 16, _mm512_shuffle_f32x4(a, c, 0x88));   // element j
    _mm512_storeu_ps(out + (8 + j) * 16, _mm512_shuffle_f32x4(a, c, 0xDD));   // element 8 + j
    _mm512_storeu_ps(out + (4 + j) * 16, _mm512_shuffle_f32x4(b, d, 0x88));   // element 4 + j
    _mm512_storeu_ps(out + (12 + j) * 16, _mm512_shuffle_f32x4(b, d, 0xDD));  // element 12 + j
  }
#else
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) out[r * 16 + c] = rows[c][r];
#endif
}

}  // namespace align_jax
