// The AVX-512 and AMX intrinsics that gguf_blocks.cpp uses, as plain C++ (GCC vector
// extensions and scalar loops), so that its AVX-512 and AMX code paths can be built and tested
// on any x86-64 CPU: built with -DEXO_GGUF_EMULATE_AVX512 (kernels.load_emulated_kernels), for
// tests only. Slow, and not bit-for-bit the hardware where the hardware rounds differently
// (TDPBF16PS sums each pair of products in float32 here; the real unit may keep more bits and
// flushes denormals), but the same lanes, masks, shuffles and tile layouts, which is what the
// tests check. Semantics: Intel's Intrinsics Guide and SDM vol. 1 ch. 18 (AMX).
//
// Included after <immintrin.h>: each intrinsic name becomes a macro for its emulation below
// (replacing the header's own, where it is a macro), and the types (__m512, __m512i, ...) stay
// the compiler's own vector types.

#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace exo_emu {

typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int16_t i16x32 __attribute__((vector_size(64)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));
typedef uint8_t u8x64 __attribute__((vector_size(64)));
typedef int8_t i8x64 __attribute__((vector_size(64)));
typedef uint8_t u8x32 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

template <class To, class From>
inline To bits(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}

inline __m512 setzero_ps() { return bits<__m512>(f32x16{}); }
inline __m512 set1_ps(float f) {
  f32x16 v;
  for (int i = 0; i < 16; ++i) v[i] = f;
  return bits<__m512>(v);
}
inline __m512i set1_epi32(int32_t x) {
  i32x16 v;
  for (int i = 0; i < 16; ++i) v[i] = x;
  return bits<__m512i>(v);
}
inline __m512i set1_epi16(int16_t x) {
  i16x32 v;
  for (int i = 0; i < 32; ++i) v[i] = x;
  return bits<__m512i>(v);
}
inline __m512i setzero_si512() { return bits<__m512i>(i32x16{}); }

#define EXO_EMU_F(name, expr)                                   \
  inline __m512 name(__m512 a_, __m512 b_) {                    \
    const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_);    \
    f32x16 r;                                                   \
    for (int i = 0; i < 16; ++i) r[i] = (expr);                 \
    return bits<__m512>(r);                                     \
  }
EXO_EMU_F(add_ps, a[i] + b[i])
EXO_EMU_F(sub_ps, a[i] - b[i])
EXO_EMU_F(mul_ps, a[i] * b[i])
EXO_EMU_F(div_ps, a[i] / b[i])
EXO_EMU_F(min_ps, a[i] < b[i] ? a[i] : b[i])
EXO_EMU_F(max_ps, a[i] > b[i] ? a[i] : b[i])
#undef EXO_EMU_F

inline __m512 fmadd_ps(__m512 a_, __m512 b_, __m512 c_) {
  const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_), c = bits<f32x16>(c_);
  f32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return bits<__m512>(r);
}
inline __m512 fnmadd_ps(__m512 a_, __m512 b_, __m512 c_) {
  const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_), c = bits<f32x16>(c_);
  f32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = std::fma(-a[i], b[i], c[i]);
  return bits<__m512>(r);
}
inline __m512 mask_add_ps(__m512 src_, __mmask16 k, __m512 a_, __m512 b_) {
  f32x16 r = bits<f32x16>(src_);
  const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) r[i] = a[i] + b[i];
  return bits<__m512>(r);
}
inline __m512 mask_max_ps(__m512 src_, __mmask16 k, __m512 a_, __m512 b_) {
  f32x16 r = bits<f32x16>(src_);
  const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) r[i] = a[i] > b[i] ? a[i] : b[i];
  return bits<__m512>(r);
}
inline float reduce_add_ps(__m512 a_) {  // the hardware sequence's pairing: halves, then halves again
  f32x16 a = bits<f32x16>(a_);
  for (int n = 8; n >= 1; n /= 2)
    for (int i = 0; i < n; ++i) a[i] = a[i] + a[i + n];
  return a[0];
}
inline float reduce_max_ps(__m512 a_) {
  const f32x16 a = bits<f32x16>(a_);
  float m = a[0];
  for (int i = 1; i < 16; ++i) m = a[i] > m ? a[i] : m;
  return m;
}
inline __m512 roundscale_ps(__m512 a_, int imm) {  // only round-to-nearest-even, scale 0
  (void)imm;
  const f32x16 a = bits<f32x16>(a_);
  f32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = std::nearbyint(a[i]);
  return bits<__m512>(r);
}
inline __m512 scalef_ps(__m512 a_, __m512 b_) {
  const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_);
  f32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = std::ldexp(a[i], static_cast<int>(std::floor(b[i])));
  return bits<__m512>(r);
}

inline __m512 loadu_ps(const void* p) {
  __m512 v;
  std::memcpy(&v, p, 64);
  return v;
}
inline void storeu_ps(void* p, __m512 v) { std::memcpy(p, &v, 64); }
inline __m512i loadu_si512(const void* p) {
  __m512i v;
  std::memcpy(&v, p, 64);
  return v;
}
inline void storeu_si512(void* p, __m512i v) { std::memcpy(p, &v, 64); }
inline __m512 maskz_loadu_ps(__mmask16 k, const void* p) {
  f32x16 r{};
  const float* f = static_cast<const float*>(p);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) r[i] = f[i];
  return bits<__m512>(r);
}
inline void mask_storeu_ps(void* p, __mmask16 k, __m512 v_) {
  const f32x16 v = bits<f32x16>(v_);
  float* f = static_cast<float*>(p);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) f[i] = v[i];
}

inline __m512i and_si512(__m512i a, __m512i b) { return a & b; }
inline __m512i or_si512(__m512i a, __m512i b) { return a | b; }
inline __m512i xor_si512(__m512i a, __m512i b) { return a ^ b; }
inline __m512i ternarylogic_epi32(__m512i a_, __m512i b_, __m512i c_, int imm) {
  const u32x16 a = bits<u32x16>(a_), b = bits<u32x16>(b_), c = bits<u32x16>(c_);
  u32x16 r{};
  for (int i = 0; i < 16; ++i)
    for (int bit = 0; bit < 32; ++bit) {
      const int idx = ((a[i] >> bit & 1) << 2) | ((b[i] >> bit & 1) << 1) | (c[i] >> bit & 1);
      r[i] |= static_cast<uint32_t>(imm >> idx & 1) << bit;
    }
  return bits<__m512i>(r);
}
inline __m512i add_epi32(__m512i a, __m512i b) { return bits<__m512i>(bits<i32x16>(a) + bits<i32x16>(b)); }
inline __m512i sub_epi32(__m512i a, __m512i b) { return bits<__m512i>(bits<i32x16>(a) - bits<i32x16>(b)); }
inline __m512i srli_epi32(__m512i a, unsigned n) {
  return n > 31 ? setzero_si512() : bits<__m512i>(bits<u32x16>(a) >> n);
}
inline __m512i slli_epi32(__m512i a, unsigned n) {
  return n > 31 ? setzero_si512() : bits<__m512i>(bits<u32x16>(a) << n);
}
inline __m512i srai_epi32(__m512i a, unsigned n) { return bits<__m512i>(bits<i32x16>(a) >> (n > 31 ? 31 : n)); }
inline __m512i srli_epi16(__m512i a, unsigned n) {
  return n > 15 ? setzero_si512() : bits<__m512i>(bits<u16x32>(a) >> n);
}
inline __m512i slli_epi16(__m512i a, unsigned n) {
  return n > 15 ? setzero_si512() : bits<__m512i>(bits<u16x32>(a) << n);
}
inline __m512i mask_blend_epi16(__mmask32 k, __m512i a_, __m512i b_) {
  const u16x32 a = bits<u16x32>(a_), b = bits<u16x32>(b_);
  u16x32 r;
  for (int i = 0; i < 32; ++i) r[i] = (k >> i & 1) ? b[i] : a[i];
  return bits<__m512i>(r);
}

inline __m512i cvtepu8_epi32(__m128i a) {
  uint8_t b[16];
  std::memcpy(b, &a, 16);
  i32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = b[i];
  return bits<__m512i>(r);
}
inline __m512i cvtepi8_epi32(__m128i a) {
  int8_t b[16];
  std::memcpy(b, &a, 16);
  i32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = b[i];
  return bits<__m512i>(r);
}
inline __m512i cvtepu16_epi32(__m256i a) {
  uint16_t h[16];
  std::memcpy(h, &a, 32);
  i32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = h[i];
  return bits<__m512i>(r);
}
inline __m512i cvtepi16_epi32(__m256i a) {
  int16_t h[16];
  std::memcpy(h, &a, 32);
  i32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = h[i];
  return bits<__m512i>(r);
}
inline __m512 cvtepi32_ps(__m512i a_) {
  const i32x16 a = bits<i32x16>(a_);
  f32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = static_cast<float>(a[i]);
  return bits<__m512>(r);
}
inline __m512 cvtph_ps(__m256i a) {  // F16C converts 8 at a time on this CPU
  __m128i lo = _mm256_castsi256_si128(a), hi = _mm256_extracti128_si256(a, 1);
  const __m256 l = _mm256_cvtph_ps(lo), h = _mm256_cvtph_ps(hi);
  f32x16 r;
  std::memcpy(&r, &l, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &h, 32);
  return bits<__m512>(r);
}
inline uint16_t to_bf16(float f) {  // round to nearest even (no NaN inputs here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + (u >> 16 & 1)) >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __m256bh cvtneps_pbh(__m512 a_) {
  const f32x16 a = bits<f32x16>(a_);
  u16x16 r;
  for (int i = 0; i < 16; ++i) r[i] = to_bf16(a[i]);
  return bits<__m256bh>(r);
}
inline __m512bh cvtne2ps_pbh(__m512 a_, __m512 b_) {  // lanes 0-15 from b, 16-31 from a
  const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_);
  u16x32 r;
  for (int i = 0; i < 16; ++i) {
    r[i] = to_bf16(b[i]);
    r[i + 16] = to_bf16(a[i]);
  }
  return bits<__m512bh>(r);
}

inline __m512 castsi512_ps(__m512i a) { return bits<__m512>(a); }
inline __m512i castps_si512(__m512 a) { return bits<__m512i>(a); }
inline __m512d castps_pd(__m512 a) { return bits<__m512d>(a); }
inline __m512 castpd_ps(__m512d a) { return bits<__m512>(a); }
inline __m512i castsi256_si512(__m256i a) {  // upper half undefined: zero here
  u8x64 r{};
  std::memcpy(&r, &a, 32);
  return bits<__m512i>(r);
}

inline __m512 unpacklo_ps(__m512 a_, __m512 b_) {
  const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_);
  f32x16 r;
  for (int l = 0; l < 4; ++l) {
    r[4 * l] = a[4 * l];
    r[4 * l + 1] = b[4 * l];
    r[4 * l + 2] = a[4 * l + 1];
    r[4 * l + 3] = b[4 * l + 1];
  }
  return bits<__m512>(r);
}
inline __m512 unpackhi_ps(__m512 a_, __m512 b_) {
  const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_);
  f32x16 r;
  for (int l = 0; l < 4; ++l) {
    r[4 * l] = a[4 * l + 2];
    r[4 * l + 1] = b[4 * l + 2];
    r[4 * l + 2] = a[4 * l + 3];
    r[4 * l + 3] = b[4 * l + 3];
  }
  return bits<__m512>(r);
}
inline __m512d unpacklo_pd(__m512d a_, __m512d b_) {
  const f64x8 a = bits<f64x8>(a_), b = bits<f64x8>(b_);
  f64x8 r;
  for (int l = 0; l < 4; ++l) {
    r[2 * l] = a[2 * l];
    r[2 * l + 1] = b[2 * l];
  }
  return bits<__m512d>(r);
}
inline __m512d unpackhi_pd(__m512d a_, __m512d b_) {
  const f64x8 a = bits<f64x8>(a_), b = bits<f64x8>(b_);
  f64x8 r;
  for (int l = 0; l < 4; ++l) {
    r[2 * l] = a[2 * l + 1];
    r[2 * l + 1] = b[2 * l + 1];
  }
  return bits<__m512d>(r);
}
inline __m512 shuffle_f32x4(__m512 a_, __m512 b_, int imm) {
  const f32x16 a = bits<f32x16>(a_), b = bits<f32x16>(b_);
  f32x16 r;
  for (int l = 0; l < 4; ++l) {
    const int sel = imm >> (2 * l) & 3;
    for (int i = 0; i < 4; ++i) r[4 * l + i] = (l < 2 ? a : b)[4 * sel + i];
  }
  return bits<__m512>(r);
}
inline __m512i maskz_permutexvar_epi8(__mmask64 k, __m512i idx_, __m512i a_) {
  const u8x64 idx = bits<u8x64>(idx_), a = bits<u8x64>(a_);
  u8x64 r;
  for (int i = 0; i < 64; ++i) r[i] = (k >> i & 1) ? a[idx[i] & 63] : 0;
  return bits<__m512i>(r);
}
inline __m512i permutexvar_epi16(__m512i idx_, __m512i a_) {
  const u16x32 idx = bits<u16x32>(idx_), a = bits<u16x32>(a_);
  u16x32 r;
  for (int i = 0; i < 32; ++i) r[i] = a[idx[i] & 31];
  return bits<__m512i>(r);
}
inline __m256i permutexvar_epi8_256(__m256i idx_, __m256i a_) {
  const u8x32 idx = bits<u8x32>(idx_), a = bits<u8x32>(a_);
  u8x32 r;
  for (int i = 0; i < 32; ++i) r[i] = a[idx[i] & 31];
  return bits<__m256i>(r);
}

// AMX: eight tile registers of up to 16 rows of 64 bytes, per thread, shaped by the last
// LDTILECFG (palette 1: byte 0 palette, bytes 16.. colsb[16] (uint16), bytes 48.. rows[16]).
struct Tiles {
  uint8_t data[8][16][64];
  uint16_t colsb[8];
  uint8_t rows[8];
};
inline Tiles& tiles() {
  static thread_local Tiles t;
  return t;
}
inline void tile_loadconfig(const void* cfg) {
  const uint8_t* c = static_cast<const uint8_t*>(cfg);
  Tiles& t = tiles();
  for (int i = 0; i < 8; ++i) {
    std::memcpy(&t.colsb[i], c + 16 + 2 * i, 2);
    t.rows[i] = c[48 + i];
  }
  std::memset(t.data, 0, sizeof(t.data));
}
inline void tile_release() { std::memset(tiles().data, 0, sizeof(tiles().data)); }
inline void tile_loadd(int dst, const void* base, long stride) {
  Tiles& t = tiles();
  for (int r = 0; r < t.rows[dst]; ++r) std::memcpy(t.data[dst][r], static_cast<const uint8_t*>(base) + r * stride, t.colsb[dst]);
}
inline void tile_stored(int src, void* base, long stride) {
  Tiles& t = tiles();
  for (int r = 0; r < t.rows[src]; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, t.data[src][r], t.colsb[src]);
}
inline void tile_zero(int dst) { std::memset(tiles().data[dst], 0, sizeof(tiles().data[dst])); }
// C[m][n] += sum over pairs k of A[m][2k] B[k][2n] + A[m][2k + 1] B[k][2n + 1] (bfloat16 inputs,
// float32 C: rows of C = rows of A, columns of C = colsb(C) / 4, pairs = colsb(A) / 4 = rows of B).
inline void tile_dpbf16ps(int c, int a, int b) {
  Tiles& t = tiles();
  for (int m = 0; m < t.rows[c]; ++m)
    for (int n = 0; n < t.colsb[c] / 4; ++n) {
      float acc;
      std::memcpy(&acc, t.data[c][m] + 4 * n, 4);
      for (int k = 0; k < t.colsb[a] / 4; ++k) {
        uint16_t a0, a1, b0, b1;
        std::memcpy(&a0, t.data[a][m] + 4 * k, 2);
        std::memcpy(&a1, t.data[a][m] + 4 * k + 2, 2);
        std::memcpy(&b0, t.data[b][k] + 4 * n, 2);
        std::memcpy(&b1, t.data[b][k] + 4 * n + 2, 2);
        acc += from_bf16(a0) * from_bf16(b0) + from_bf16(a1) * from_bf16(b1);
      }
      std::memcpy(t.data[c][m] + 4 * n, &acc, 4);
    }
}

}  // namespace exo_emu

#undef _mm512_setzero_ps
#define _mm512_setzero_ps exo_emu::setzero_ps
#undef _mm512_set1_ps
#define _mm512_set1_ps exo_emu::set1_ps
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 exo_emu::set1_epi32
#undef _mm512_set1_epi16
#define _mm512_set1_epi16 exo_emu::set1_epi16
#undef _mm512_setzero_si512
#define _mm512_setzero_si512 exo_emu::setzero_si512
#undef _mm512_add_ps
#define _mm512_add_ps exo_emu::add_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps exo_emu::sub_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps exo_emu::mul_ps
#undef _mm512_div_ps
#define _mm512_div_ps exo_emu::div_ps
#undef _mm512_min_ps
#define _mm512_min_ps exo_emu::min_ps
#undef _mm512_max_ps
#define _mm512_max_ps exo_emu::max_ps
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps exo_emu::fmadd_ps
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps exo_emu::fnmadd_ps
#undef _mm512_mask_add_ps
#define _mm512_mask_add_ps exo_emu::mask_add_ps
#undef _mm512_mask_max_ps
#define _mm512_mask_max_ps exo_emu::mask_max_ps
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps exo_emu::reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps exo_emu::reduce_max_ps
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps exo_emu::roundscale_ps
#undef _mm512_scalef_ps
#define _mm512_scalef_ps exo_emu::scalef_ps
#undef _mm512_loadu_ps
#define _mm512_loadu_ps exo_emu::loadu_ps
#undef _mm512_load_ps
#define _mm512_load_ps exo_emu::loadu_ps
#undef _mm512_storeu_ps
#define _mm512_storeu_ps exo_emu::storeu_ps
#undef _mm512_store_ps
#define _mm512_store_ps exo_emu::storeu_ps
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 exo_emu::loadu_si512
#undef _mm512_load_si512
#define _mm512_load_si512 exo_emu::loadu_si512
#undef _mm512_storeu_si512
#define _mm512_storeu_si512 exo_emu::storeu_si512
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps exo_emu::maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps exo_emu::mask_storeu_ps
#undef _mm512_and_si512
#define _mm512_and_si512 exo_emu::and_si512
#undef _mm512_or_si512
#define _mm512_or_si512 exo_emu::or_si512
#undef _mm512_xor_si512
#define _mm512_xor_si512 exo_emu::xor_si512
#undef _mm512_ternarylogic_epi32
#define _mm512_ternarylogic_epi32 exo_emu::ternarylogic_epi32
#undef _mm512_add_epi32
#define _mm512_add_epi32 exo_emu::add_epi32
#undef _mm512_sub_epi32
#define _mm512_sub_epi32 exo_emu::sub_epi32
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 exo_emu::srli_epi32
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 exo_emu::slli_epi32
#undef _mm512_srai_epi32
#define _mm512_srai_epi32 exo_emu::srai_epi32
#undef _mm512_srli_epi16
#define _mm512_srli_epi16 exo_emu::srli_epi16
#undef _mm512_slli_epi16
#define _mm512_slli_epi16 exo_emu::slli_epi16
#undef _mm512_mask_blend_epi16
#define _mm512_mask_blend_epi16 exo_emu::mask_blend_epi16
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32 exo_emu::cvtepu8_epi32
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 exo_emu::cvtepi8_epi32
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 exo_emu::cvtepu16_epi32
#undef _mm512_cvtepi16_epi32
#define _mm512_cvtepi16_epi32 exo_emu::cvtepi16_epi32
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps exo_emu::cvtepi32_ps
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps exo_emu::cvtph_ps
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh exo_emu::cvtneps_pbh
#undef _mm512_cvtne2ps_pbh
#define _mm512_cvtne2ps_pbh exo_emu::cvtne2ps_pbh
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps exo_emu::castsi512_ps
#undef _mm512_castps_si512
#define _mm512_castps_si512 exo_emu::castps_si512
#undef _mm512_castps_pd
#define _mm512_castps_pd exo_emu::castps_pd
#undef _mm512_castpd_ps
#define _mm512_castpd_ps exo_emu::castpd_ps
#undef _mm512_castsi256_si512
#define _mm512_castsi256_si512 exo_emu::castsi256_si512
#undef _mm512_unpacklo_ps
#define _mm512_unpacklo_ps exo_emu::unpacklo_ps
#undef _mm512_unpackhi_ps
#define _mm512_unpackhi_ps exo_emu::unpackhi_ps
#undef _mm512_unpacklo_pd
#define _mm512_unpacklo_pd exo_emu::unpacklo_pd
#undef _mm512_unpackhi_pd
#define _mm512_unpackhi_pd exo_emu::unpackhi_pd
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4 exo_emu::shuffle_f32x4
#undef _mm512_maskz_permutexvar_epi8
#define _mm512_maskz_permutexvar_epi8 exo_emu::maskz_permutexvar_epi8
#undef _mm512_permutexvar_epi16
#define _mm512_permutexvar_epi16 exo_emu::permutexvar_epi16
#undef _mm256_permutexvar_epi8
#define _mm256_permutexvar_epi8 exo_emu::permutexvar_epi8_256
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig exo_emu::tile_loadconfig
#define _tile_release exo_emu::tile_release
#define _tile_loadd exo_emu::tile_loadd
#define _tile_stored exo_emu::tile_stored
#define _tile_zero exo_emu::tile_zero
#define _tile_dpbf16ps exo_emu::tile_dpbf16ps
