// Decode attention for XLA:CPU: one new query per row against the static KV cache.
//
//   score[b, h, s] = scale * q[b, h, :] . k[b, h / G, s, :]     for the visible slots s
//   p[b, h, :]     = softmax(score[b, h, :]) over the visible slots
//   out[b, h, :]   = sum_s p[b, h, s] v[b, h / G, s, :]
//
// Shapes: q f32 [B, Hkv, G, hd] (query head h = hkv * G + g); k, v f32 [B, Hkv, S, hd];
// visible pred [B, S]; out f32 [B, Hkv, G, hd]. hd must be a multiple of 16. A row with no
// visible slot attends uniformly to all S slots, as the XLA formulation (scores masked to
// the lowest float, then softmax) does.
//
// Why: XLA:CPU runs a decode step's attention as a dozen small fused ops per layer (a
// batched dot with B * Hkv batches of [S, hd] x [hd, G], masks, a softmax, a second batched
// dot), ~1 ms per layer at B = 32 and S = 256: a fifth of a bfloat16 decode step. Here each
// (row, kv head) pair reads its keys and values once and is one piece of parallel work.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using align_jax::f32x16;
using align_jax::i32x16;
using align_jax::splat;
using align_jax::transpose16;

inline f32x16 load(const float* p) { return align_jax::load_f32(p); }
inline void store(float* p, f32x16 v) { align_jax::store_f32(p, v); }

inline float hsum(f32x16 v) {
  float total = 0.0f;
  for (int i = 0; i < 16; ++i) total += v[i];
  return total;
}

// exp(x) for x <= 0 (relative error ~2e-7): x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6
// Taylor polynomial, 2^n through the exponent bits. Inputs below -87 give exp(-87) ~ 1.6e-38
// (the callers mask what must be exactly zero).
inline f32x16 exp_nonpositive(f32x16 x) {
  const f32x16 lowest = splat(-87.0f);
  x = x < lowest ? lowest : x;
  const f32x16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const f32x16 t = x * splat(1.44269504088896341f) + magic;
  const f32x16 n = t - magic;
  const f32x16 r = x - n * splat(0.693145751953125f) - n * splat(1.428606765330187e-06f);
  f32x16 poly = splat(1.0f / 720.0f);
  poly = poly * r + splat(1.0f / 120.0f);
  poly = poly * r + splat(1.0f / 24.0f);
  poly = poly * r + splat(1.0f / 6.0f);
  poly = poly * r + splat(0.5f);
  poly = poly * r + splat(1.0f);
  poly = poly * r + splat(1.0f);
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return poly * two_n;
}

struct Attention {
  const float* q;
  const float* k;
  const float* v;
  const bool* visible;
  float* out;
  int64_t B, Hkv, G, S, hd;
  float scale;
};

// One (row, kv head) pair: its G query heads against the pair's S keys and values.
void attend(const Attention& a, int64_t b, int64_t h) {
  const int64_t chunks = a.hd / 16, padded = (a.S + 15) / 16 * 16;
  const float* keys = a.k + (b * a.Hkv + h) * a.S * a.hd;
  const float* values = a.v + (b * a.Hkv + h) * a.S * a.hd;
  const float* queries = a.q + (b * a.Hkv + h) * a.G * a.hd;
  float* out = a.out + (b * a.Hkv + h) * a.G * a.hd;
  const bool* visible = a.visible + b * a.S;
  thread_local std::vector<float> scores;  // [G][padded]
  thread_local std::vector<float> keep;    // [padded]: 1 for a visible slot, else 0
  scores.assign(a.G * padded, 0.0f);
  keep.assign(padded, 0.0f);
  int64_t count = 0;
  for (int64_t s = 0; s < a.S; ++s) count += keep[s] = visible[s] ? 1.0f : 0.0f;
  const bool uniform = count == 0;  // nothing visible: every slot, equally (the XLA semantics)
  if (uniform)
    for (int64_t s = 0; s < a.S; ++s) keep[s] = 1.0f;
  // Scores of 16 slots at a time, as vectors over the slots: the block's keys are transposed
  // (kt[d] = dimension d of the 16 keys) and each query is a sum of hd broadcast multiply-adds,
  // about 3x fewer instructions than a horizontal sum per (slot, head).
  if (!uniform) {
    alignas(64) float kt[256 * 16];
    for (int64_t s0 = 0; s0 < a.S; s0 += 16) {
      bool any = false;  // skip blocks with no visible slot (padding, future slots): their keys are not read
      for (int i = 0; i < 16; ++i) any |= keep[s0 + i] != 0.0f;
      if (!any) continue;
      for (int64_t c = 0; c < chunks; ++c) {
        f32x16 rows[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t s = s0 + i < a.S ? s0 + i : a.S - 1;  // past the end: any valid row, masked later
          rows[i] = load(keys + s * a.hd + 16 * c);
        }
        transpose16(rows, kt + 16 * c * 16);
      }
      for (int64_t g = 0; g < a.G; ++g) {
        const float* query = queries + g * a.hd;
        f32x16 acc = f32x16{};
        for (int64_t d = 0; d < a.hd; ++d) acc += splat(query[d]) * load(kt + d * 16);
        store(scores.data() + g * padded + s0, acc * splat(a.scale));
      }
    }
  }
  for (int64_t g = 0; g < a.G; ++g) {
    float* row = scores.data() + g * padded;
    float top = -INFINITY;
    for (int64_t s = 0; s < a.S; ++s)
      if (keep[s] != 0.0f && row[s] > top) top = row[s];
    f32x16 total = f32x16{};
    for (int64_t s = 0; s < padded; s += 16) {
      // Masked slots are selected away, never multiplied by 0: their score (from a key not
      // written yet, say) may exceed the visible maximum by any amount, and inf * 0 is NaN.
      const f32x16 d = load(row + s) - splat(top);
      const f32x16 e = exp_nonpositive(d < 0.0f ? d : f32x16{});
      const f32x16 p = load(keep.data() + s) != 0.0f ? e : f32x16{};
      store(row + s, p);
      total += p;
    }
    const float inv = 1.0f / hsum(total);
    f32x16 acc[16];  // hd <= 256
    for (int64_t c = 0; c < chunks; ++c) acc[c] = f32x16{};
    for (int64_t s = 0; s < a.S; ++s) {
      if (row[s] == 0.0f) continue;
      const f32x16 p = splat(row[s]);
      const float* value = values + s * a.hd;
      for (int64_t c = 0; c < chunks; ++c) acc[c] += p * load(value + 16 * c);
    }
    for (int64_t c = 0; c < chunks; ++c) store(out + g * a.hd + 16 * c, acc[c] * splat(inv));
  }
}

struct AttentionJob : align_jax::ParallelJob {
  AttentionJob(const Attention& attention, int64_t parts) : ParallelJob(parts), a(attention) {}
  const Attention a;
  void run(int64_t part) override {
    const int64_t pairs = a.B * a.Hkv;
    for (int64_t i = pairs * part / parts; i < pairs * (part + 1) / parts; ++i) attend(a, i / a.Hkv, i % a.Hkv);
  }
};

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> visible,
                               ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = visible.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2)
    return ffi::Error::InvalidArgument("decode_attention: q, k, v must be 4-D and visible 2-D");
  Attention a;
  a.B = qd[0];
  a.Hkv = qd[1];
  a.G = qd[2];
  a.hd = qd[3];
  a.S = kd[2];
  if (kd[0] != a.B || kd[1] != a.Hkv || kd[3] != a.hd)
    return ffi::Error::InvalidArgument("decode_attention: k must be [B, Hkv, S, hd]");
  for (int i = 0; i < 4; ++i)
    if (vd[i] != kd[i]) return ffi::Error::InvalidArgument("decode_attention: v must have k's shape");
  if (md[0] != a.B || md[1] != a.S) return ffi::Error::InvalidArgument("decode_attention: visible must be [B, S]");
  if (a.hd % 16 || a.hd > 256) return ffi::Error::InvalidArgument("decode_attention: hd must be a multiple of 16, <= 256");
  a.q = q.typed_data();
  a.k = k.typed_data();
  a.v = v.typed_data();
  a.visible = visible.typed_data();
  a.out = out->typed_data();
  a.scale = scale;
  const int64_t pairs = a.B * a.Hkv;
  if (pairs == 0 || a.G == 0) return ffi::Error::Success();
  // Not worth a hand-off below ~32K multiply-adds per piece.
  int64_t parts = 4 * static_cast<int64_t>(pool.num_threads());
  const int64_t by_size = pairs * a.G * a.S * a.hd / (1 << 15);
  if (parts > pairs) parts = pairs;
  if (parts > by_size) parts = by_size;
  if (parts <= 1) {
    for (int64_t i = 0; i < pairs; ++i) attend(a, i / a.Hkv, i % a.Hkv);
    return ffi::Error::Success();
  }
  align_jax::run_parallel(pool, std::make_shared<AttentionJob>(a, parts));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxDecodeAttentionF32, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
