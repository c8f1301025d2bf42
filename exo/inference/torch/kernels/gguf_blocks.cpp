// Matrix products straight from GGUF quantized weights, in float32, on the CPU, and a whole
// decode step of a transformer shard (decode_layers) on them.
//
// Weight types (ggml's block formats, ggml-common.h; gguf-py's quants.py dequantizes them the
// same way and is the reference): Q4_0 (GGML type 2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8)
// in blocks of 32 weights of a row; the K-quants Q4_K (12), Q5_K (13), Q6_K (14) in
// super-blocks of 256; and unquantized F32 (0), F16 (1), BF16 (30). Each type is a struct below
// (FQ4_0 ... FFloat) with its file layout, its tile layout and the arithmetic of its weights.
//
// Tiled layout (what `pack` makes and the other ops take): rows are grouped 16 at a time so
// that one SIMD lane holds one output row. A matrix (N, K), N a multiple of 16 and K of the
// type's block (32 or 256), becomes a uint8 tensor (N / 16, K / block * tile_bytes); tile
// (t, g) holds block g of rows 16t .. 16t + 15, each field of the 16 rows side by side, e.g.
//   Q4_1: d[16] (fp16), m[16] (fp16), qs[16][16] (qs[j][r]: byte j of row r's block): 320 bytes
//   Q4_K: d[16], dmin[16] (fp16), scales[8][16], mins[8][16] (the 6-bit values unpacked to
//         bytes), then per 32-weight sub-block Q4_1's nibbles: 2368 bytes
//   F32:  w[32][16]: 2048 bytes
// The bytes per weight are the file's (Q4_K and Q5_K: 2.8 and 2.3 % more, their packed 6-bit
// scales held as bytes).
//
// y = x @ W.T keeps activations and accumulation in float32 (llama.cpp instead rounds the
// activations to 8 bits), so it agrees with a float32 matmul on the dequantized weights up to
// summation order. Per sub-block: sum_j w[j] x[j] = d * sum_j q[j] x[j] + m * sum_j x[j]. On a
// CPU with AMX, products of enough rows take the tile unit instead (linear_amx below), in
// bfloat16 with each activation split into two parts, within the same error bound (every type
// but F32 and F16, whose weights bfloat16 does not hold exactly).
// Tiles are split over this library's own worker threads (WorkerPool below) rather than
// OpenMP's: an idle OpenMP worker keeps spinning for GOMP_SPINCOUNT iterations after each
// parallel region, which is what bridges the gaps between one forward pass's operations, but
// also what takes the cores from another node's forward pass on the same machine. These workers
// spin only while the engine says a forward pass is under way (`set_spin`) and sleep at once
// after it. `pack` and `dequantize_t` (the path of long prefills, next to torch's own matmul)
// run on torch's OpenMP threads instead (built with -fopenmp, this library shares torch's
// libgomp).
// The matrix kernels are written once in the compiler's generic vectors (V16 below: one AVX-512
// register, two AVX2 ones, or 16-byte ones), with each instruction set's own widening loads
// (with -DEXO_GGUF_PORTABLE: plain loops); attention and activations use AVX-512 intrinsics
// where there are, plain loops elsewhere. -DEXO_GGUF_EMULATE_AVX512 (tests only) builds the
// AVX-512 and AMX paths on any x86-64 CPU with their intrinsics emulated (avx512_emulation.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(EXO_GGUF_EMULATE_AVX512)
// Tests only: the AVX-512 and AMX paths on any x86-64 CPU, their intrinsics emulated.
#include "avx512_emulation.h"
#define EXO_GGUF_AVX512 1
#define EXO_GGUF_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#elif defined(__AVX512F__) && !defined(EXO_GGUF_PORTABLE)
#define EXO_GGUF_AVX512 1
#endif
// Intel AMX (Advanced Matrix Extensions, Intel SDM vol. 1 ch. 18): the tile unit's bfloat16
// products for batches of rows (see linear_amx). Built where the compiler targets it
// (-march=native on such a CPU); used only once the kernel grants the process the tile state.
#if !defined(EXO_GGUF_EMULATE_AVX512) && defined(EXO_GGUF_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && \
    defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512VBMI__) && defined(__linux__)
#define EXO_GGUF_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// A set of worker threads running one parallel loop at a time with the calling thread.
// Between loops a worker spins while any pass holds `spin` (set_spin(true) ... set_spin(false),
// counted, as two engines may share a process; at most kMaxSpins pauses in a row) and otherwise
// sleeps on a condition variable; the caller spins until its loop's workers are done. Every
// kSpinsPerYield pauses a spinning thread yields its CPU: where more threads want the cores
// than there are (two nodes' passes at once on one machine, a ring serving several streams),
// a spinning thread would otherwise hold a core that a preempted worker, or the other node,
// needs. Workers beyond `threads - 1` (after set_threads lowered the count) neither take part
// nor spin.
class WorkerPool {
 public:
  static WorkerPool& get() {
    static WorkerPool* pool = new WorkerPool();  // never destroyed: workers are detached
    return *pool;
  }

  // Threads taking part in a loop, the caller included (1: the caller alone).
  void set_threads(int64_t n) {
    std::lock_guard<std::mutex> run(run_mu_);
    n = std::max<int64_t>(1, n);
    while (workers_ < n - 1) {
      const int64_t index = ++workers_;
      const uint64_t start = generation_.load(std::memory_order_acquire);  // no loop is in flight
      std::thread([this, index, start] { work(index, start); }).detach();
    }
    active_.store(n - 1, std::memory_order_release);
  }

  int64_t threads() const { return active_.load(std::memory_order_acquire) + 1; }

  void set_spin(bool on) {
    if (on) {
      spin_.fetch_add(1, std::memory_order_acq_rel);
    } else {
      int64_t v = spin_.load(std::memory_order_acquire);
      while (v > 0 && !spin_.compare_exchange_weak(v, v - 1, std::memory_order_acq_rel)) {
      }
    }
  }

  // fn(begin, end) over [0, n) in contiguous chunks that the threads take in turn (about
  // kChunksPerThread each). The caller never waits for a worker that has not started: once
  // every chunk is taken it closes the loop, and waits only for the workers inside it. A worker
  // the OS has preempted (another node's process on the same cores, say) then costs at most
  // the chunk it holds, instead of stalling every loop until it runs again.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> run(run_mu_);
    const int64_t active = active_.load(std::memory_order_acquire);
    const int64_t parts = std::min<int64_t>(active + 1, n);
    if (parts <= 1) {
      if (n > 0) fn(0, n);
      return;
    }
    const int64_t chunk = std::max<int64_t>(1, n / (parts * kChunksPerThread));
    next_.store(0);
    job_ = [this, &fn, n, chunk] {
      for (int64_t begin = next_.fetch_add(chunk); begin < n; begin = next_.fetch_add(chunk))
        fn(begin, std::min(n, begin + chunk));
    };
    uint64_t generation;
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation = generation_.fetch_add(1) + 1;
      open_.store(generation);  // workers may enter
    }
    cv_.notify_all();
    job_();
    open_.store(0);  // every chunk is taken: no worker enters any more
    for (int64_t spins = 1; inside_.load() > 0; ++spins) {  // the ones that did finish their chunks
      cpu_relax();
      if (spins % kSpinsPerYield == 0) std::this_thread::yield();
    }
  }

 private:
  static constexpr int64_t kChunksPerThread = 4;
  static constexpr int64_t kSpinsPerYield = 128;  // some microseconds of pauses
  static constexpr int64_t kMaxSpins = 1 << 21;  // ~10-100 ms of pauses, if a caller forgets set_spin(false)

  void work(int64_t index, uint64_t seen) {
    for (;;) {
      int64_t spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        if (index <= active_.load(std::memory_order_acquire) && spin_.load(std::memory_order_acquire) > 0 &&
            spins++ < kMaxSpins) {
          cpu_relax();
          if (spins % kSpinsPerYield == 0) std::this_thread::yield();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        spins = 0;
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index > active_.load(std::memory_order_acquire)) continue;  // not part of this pool size
      inside_.fetch_add(1);  // sequentially consistent with the caller's close and wait
      if (open_.load() == seen) job_();
      inside_.fetch_sub(1);
    }
  }

  std::mutex run_mu_;  // one loop at a time (two engines may share a process)
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> open_{0};   // the generation workers may still enter, 0: none
  std::atomic<int64_t> inside_{0};  // workers inside a loop's job
  std::atomic<int64_t> next_{0};    // first index of the loop not yet taken
  std::atomic<int64_t> spin_{0};
  std::atomic<int64_t> active_{0};  // workers taking part: threads - 1
  std::function<void()> job_;
  int64_t workers_ = 0;
};

constexpr int64_t R = 16;   // rows per tile
constexpr int64_t PREFETCH = 2048;  // bytes ahead of the block being read that are prefetched

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

inline uint16_t u16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}
inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline float f16_at(const uint8_t* p) { return half_to_float(u16_at(p)); }
inline float bf16_at(const uint8_t* p) {
  const uint32_t u = static_cast<uint32_t>(u16_at(p)) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float f32_at(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}

// 16 lanes, one per row of a tile, as the compiler's generic vectors (GCC and Clang) of the
// target's register width: one AVX-512 register, two AVX2 ones, four 16-byte ones elsewhere
// (GCC keeps a vector wider than the target's registers in memory). The arithmetic is plain
// operators; only the loads that widen bytes, fp16 or bf16 to 32-bit lanes use each
// instruction set's own conversions (GCC's generic ones go through scalars).
#if defined(EXO_GGUF_AVX512)
constexpr int VB = 64;  // bytes per register
#elif defined(__AVX__)
constexpr int VB = 32;
#else
constexpr int VB = 16;
#endif

template <class T>
struct V16 {
  typedef T reg __attribute__((vector_size(VB)));
  static constexpr int N = 64 / VB, L = VB / static_cast<int>(sizeof(T));
  reg p[N];

  static V16 load(const void* src) {
    V16 v;
    std::memcpy(v.p, src, 64);
    return v;
  }
  void store(void* dst) const { std::memcpy(dst, p, 64); }
  static V16 set(T x) {
    V16 v;
    for (int i = 0; i < N; ++i) v.p[i] = reg{} + x;
    return v;
  }
  template <class U>
  V16<U> as() const {  // the same bits
    V16<U> v;
    for (int i = 0; i < N; ++i) v.p[i] = (typename V16<U>::reg)p[i];
    return v;
  }
  V16<float> to_f() const {  // integer lanes to float
    V16<float> v;
    for (int i = 0; i < N; ++i) v.p[i] = __builtin_convertvector(p[i], typename V16<float>::reg);
    return v;
  }
#define EXO_V16_OP(op)                                                   \
  friend V16 operator op(V16 a, const V16& b) {                          \
    for (int i = 0; i < N; ++i) a.p[i] = a.p[i] op b.p[i];               \
    return a;                                                            \
  }                                                                      \
  friend V16 operator op(V16 a, T b) {                                   \
    for (int i = 0; i < N; ++i) a.p[i] = a.p[i] op b;                    \
    return a;                                                            \
  }                                                                      \
  V16& operator op##=(const V16& b) { return *this = *this op b; }
  EXO_V16_OP(+)
  EXO_V16_OP(-)
  EXO_V16_OP(*)
  EXO_V16_OP(/)
#undef EXO_V16_OP
#define EXO_V16_BITS(op)                                                 \
  friend V16 operator op(V16 a, const V16& b) {                          \
    for (int i = 0; i < N; ++i) a.p[i] = a.p[i] op b.p[i];               \
    return a;                                                            \
  }                                                                      \
  friend V16 operator op(V16 a, T b) {                                   \
    for (int i = 0; i < N; ++i) a.p[i] = a.p[i] op b;                    \
    return a;                                                            \
  }
  EXO_V16_BITS(&)
  EXO_V16_BITS(|)
#undef EXO_V16_BITS
  friend V16 operator>>(V16 a, int n) {
    for (int i = 0; i < N; ++i) a.p[i] = a.p[i] >> n;
    return a;
  }
  friend V16 operator<<(V16 a, int n) {
    for (int i = 0; i < N; ++i) a.p[i] = a.p[i] << n;
    return a;
  }
  friend V16 operator-(V16 a) {
    for (int i = 0; i < N; ++i) a.p[i] = -a.p[i];
    return a;
  }
};
using vf = V16<float>;
using vi = V16<int32_t>;
using vu = V16<uint32_t>;

// Activation rows sharing one decode of a tile: as many as keep their sums in registers (32
// AVX-512 registers; 16 AVX2 ones, two per row).
constexpr int64_t MB = VB == 64 ? 8 : 4;

inline vf vload(const float* p) { return vf::load(p); }
inline void vstore(float* p, const vf& v) { v.store(p); }
inline vu load_u32x16(const uint8_t* p) { return vu::load(p); }  // 16 uint32
inline vf to_f(const vu& v) { return v.as<int32_t>().to_f(); }  // values < 2^31
inline vf to_f(const vi& v) { return v.to_f(); }

#if defined(EXO_GGUF_AVX512)
template <class V, class M>
inline V from_m512(M m) {
  V v;
  std::memcpy(v.p, &m, 64);
  return v;
}
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vu load_u8x16(const uint8_t* p) { return from_m512<vu>(_mm512_cvtepu8_epi32(load16(p))); }
inline vi load_i8x16(const uint8_t* p) { return from_m512<vi>(_mm512_cvtepi8_epi32(load16(p))); }
inline vf load_f16x16(const uint8_t* p) { return from_m512<vf>(_mm512_cvtph_ps(load32(p))); }
inline vu load_u16x16(const uint8_t* p) { return from_m512<vu>(_mm512_cvtepu16_epi32(load32(p))); }
#elif defined(__AVX2__) && defined(__F16C__) && !defined(EXO_GGUF_PORTABLE)
inline __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
template <class V>
inline V join(__m256i lo, __m256i hi) {
  V v;
  v.p[0] = (typename V::reg)lo;
  v.p[1] = (typename V::reg)hi;
  return v;
}
inline vu load_u8x16(const uint8_t* p) { return join<vu>(_mm256_cvtepu8_epi32(load8(p)), _mm256_cvtepu8_epi32(load8(p + 8))); }
inline vi load_i8x16(const uint8_t* p) { return join<vi>(_mm256_cvtepi8_epi32(load8(p)), _mm256_cvtepi8_epi32(load8(p + 8))); }
inline vf load_f16x16(const uint8_t* p) {
  vf v;
  v.p[0] = (vf::reg)_mm256_cvtph_ps(load16(p));
  v.p[1] = (vf::reg)_mm256_cvtph_ps(load16(p + 16));
  return v;
}
inline vu load_u16x16(const uint8_t* p) {
  return join<vu>(_mm256_cvtepu16_epi32(load16(p)), _mm256_cvtepu16_epi32(load16(p + 16)));
}
#else
inline vu load_u8x16(const uint8_t* p) {
  uint32_t v[16];
  for (int i = 0; i < 16; ++i) v[i] = p[i];
  return vu::load(v);
}
inline vi load_i8x16(const uint8_t* p) {
  int32_t v[16];
  for (int i = 0; i < 16; ++i) v[i] = static_cast<int8_t>(p[i]);
  return vi::load(v);
}
inline vf load_f16x16(const uint8_t* p) {
  float v[16];
  for (int i = 0; i < 16; ++i) v[i] = f16_at(p + 2 * i);
  return vf::load(v);
}
inline vu load_u16x16(const uint8_t* p) {
  uint32_t v[16];
  for (int i = 0; i < 16; ++i) v[i] = u16_at(p + 2 * i);
  return vu::load(v);
}
#endif
inline vf load_bf16x16(const uint8_t* p) { return (load_u16x16(p) << 16).as<float>(); }

// The 32 columns of a block of nibbles qs[16][16] (byte j of row r at qs[16 j + r]: low nibble
// input j, high nibble input j + 16), as integers 0..15 in float32: v(j, column).
template <class V>
inline void nibble_columns(const uint8_t* qs, V&& v) {
  for (int64_t j = 0; j < 16; ++j) {
    const vu q = load_u8x16(qs + j * R);
    v(j, to_f(q & 15));
    v(j + 16, to_f(q >> 4));
  }
}

// The same with a fifth bit from qh (16 uint32, one per row: bit i for input i): 0..31.
template <class V>
inline void nibble5_columns(const uint8_t* qs, const uint8_t* qh_p, V&& v) {
  const vu qh = load_u32x16(qh_p);
  const vu lo4 = qh << 4, hi4 = qh >> 12;  // bit j, j + 16 at 4 + j
  for (int64_t j = 0; j < 16; ++j) {
    const vu q = load_u8x16(qs + j * R);
    v(j, to_f((q & 15) | ((lo4 >> j) & 16)));
    v(j + 16, to_f((q >> 4) | ((hi4 >> j) & 16)));
  }
}

// ---------------------------------------------------------------------------------------------
// The block formats. Each is a struct of static members:
//   kType, kName: the GGML type; QB: inputs per block (a tile block holds one block of each of
//   16 rows); SB: inputs per sub-block (one scale, and minimum, per row); FILE: bytes of one
//   row's block in the file; TILE: bytes of a tile block.
//   kFloat: the weights are floats themselves (no scales); kMin: w = d q + m per sub-block
//   (else w = d q); kAmx: the integers (or the weights) are exact in bfloat16.
//   pack(file block, tile block, r): row r's block into the tile block.
//   weight(b, r, j): weight j < QB of row r of tile block b, computed as gguf-py does.
//   columns(b, s, v): v(j, the 16 rows' integers (or weights) of input j of sub-block s as
//   float32), in any order of j; scales(b, s, d, m): the sub-block's d and m of the 16 rows.
// The kernels' sums per sub-block are d * sum_j q[j] x[j] + m * sum_j x[j], which equal a sum
// of w[j] x[j] up to float32 rounding; d q + m rounded once is w exactly as gguf-py rounds it
// (d q is exact in float32: an fp16, or fp16 times 6-bit, scale times a <= 5-bit integer), but
// for Q6_K, whose d sc q may not be: dequantize_t computes its d sc (q - 32) as one product.
// ---------------------------------------------------------------------------------------------

// Q4_0 (2): file d (fp16), qs[16]; w[j] = d (q[j] - 8), q[j] = qs[j] & 15, q[j + 16] = qs[j] >> 4.
// Tile: d[16] (fp16), qs[16][16]. Kernel: m = -8 d.
struct FQ4_0 {
  static constexpr int64_t kType = 2, QB = 32, SB = 32, FILE = 18, TILE = 288;
  static constexpr bool kFloat = false, kMin = true, kAmx = true;
  static constexpr const char* kName = "Q4_0";
  static void pack(const uint8_t* f, uint8_t* t, int64_t r) {
    std::memcpy(t + 2 * r, f, 2);
    for (int64_t j = 0; j < 16; ++j) t[32 + j * R + r] = f[2 + j];
  }
  static int nib(const uint8_t* b, int64_t r, int64_t j) {
    const uint8_t q = b[32 + (j % 16) * R + r];
    return j < 16 ? q & 15 : q >> 4;
  }
  static float weight(const uint8_t* b, int64_t r, int64_t j) { return f16_at(b + 2 * r) * float(nib(b, r, j) - 8); }
  static const uint8_t* nibbles(const uint8_t* b, int64_t) { return b + 32; }  // qs[16][16] of sub-block s
  template <class V>
  static void columns(const uint8_t* b, int64_t, V&& v) { nibble_columns(b + 32, v); }
  static void scales(const uint8_t* b, int64_t, vf& d, vf& m) {
    d = load_f16x16(b);
    m = d * -8.f;
  }

};

// Q4_1 (3): file d, m (fp16), qs[16]; w[j] = d q[j] + m. Tile: d[16], m[16] (fp16), qs[16][16].
struct FQ4_1 {
  static constexpr int64_t kType = 3, QB = 32, SB = 32, FILE = 20, TILE = 320;
  static constexpr bool kFloat = false, kMin = true, kAmx = true;
  static constexpr const char* kName = "Q4_1";
  static void pack(const uint8_t* f, uint8_t* t, int64_t r) {
    std::memcpy(t + 2 * r, f, 2);
    std::memcpy(t + 32 + 2 * r, f + 2, 2);
    for (int64_t j = 0; j < 16; ++j) t[64 + j * R + r] = f[4 + j];
  }
  static float weight(const uint8_t* b, int64_t r, int64_t j) {
    const uint8_t q = b[64 + (j % 16) * R + r];
    return f16_at(b + 2 * r) * float(j < 16 ? q & 15 : q >> 4) + f16_at(b + 32 + 2 * r);
  }
  static const uint8_t* nibbles(const uint8_t* b, int64_t) { return b + 64; }  // qs[16][16] of sub-block s
  template <class V>
  static void columns(const uint8_t* b, int64_t, V&& v) { nibble_columns(b + 64, v); }
  static void scales(const uint8_t* b, int64_t, vf& d, vf& m) {
    d = load_f16x16(b);
    m = load_f16x16(b + 32);
  }

};

// Q5_0 (6): file d (fp16), qh (uint32: bit j the fifth bit of q[j]), qs[16]; w[j] = d (q[j] - 16).
// Tile: d[16] (fp16), qh[16] (uint32), qs[16][16]. Kernel: m = -16 d.
struct FQ5_0 {
  static constexpr int64_t kType = 6, QB = 32, SB = 32, FILE = 22, TILE = 352;
  static constexpr bool kFloat = false, kMin = true, kAmx = true;
  static constexpr const char* kName = "Q5_0";
  static void pack(const uint8_t* f, uint8_t* t, int64_t r) {
    std::memcpy(t + 2 * r, f, 2);
    std::memcpy(t + 32 + 4 * r, f + 2, 4);
    for (int64_t j = 0; j < 16; ++j) t[96 + j * R + r] = f[6 + j];
  }
  static int q5(const uint8_t* b, int64_t r, int64_t j) {
    const uint8_t q = b[96 + (j % 16) * R + r];
    return (j < 16 ? q & 15 : q >> 4) | ((u32_at(b + 32 + 4 * r) >> j & 1) << 4);
  }
  static float weight(const uint8_t* b, int64_t r, int64_t j) { return f16_at(b + 2 * r) * float(q5(b, r, j) - 16); }
  template <class V>
  static void columns(const uint8_t* b, int64_t, V&& v) { nibble5_columns(b + 96, b + 32, v); }
  static void scales(const uint8_t* b, int64_t, vf& d, vf& m) {
    d = load_f16x16(b);
    m = d * -16.f;
  }

};

// Q5_1 (7): file d, m (fp16), qh (uint32), qs[16]; w[j] = d q[j] + m.
// Tile: d[16], m[16] (fp16), qh[16] (uint32), qs[16][16].
struct FQ5_1 {
  static constexpr int64_t kType = 7, QB = 32, SB = 32, FILE = 24, TILE = 384;
  static constexpr bool kFloat = false, kMin = true, kAmx = true;
  static constexpr const char* kName = "Q5_1";
  static void pack(const uint8_t* f, uint8_t* t, int64_t r) {
    std::memcpy(t + 2 * r, f, 2);
    std::memcpy(t + 32 + 2 * r, f + 2, 2);
    std::memcpy(t + 64 + 4 * r, f + 4, 4);
    for (int64_t j = 0; j < 16; ++j) t[128 + j * R + r] = f[8 + j];
  }
  static float weight(const uint8_t* b, int64_t r, int64_t j) {
    const uint8_t q = b[128 + (j % 16) * R + r];
    const int q5 = (j < 16 ? q & 15 : q >> 4) | ((u32_at(b + 64 + 4 * r) >> j & 1) << 4);
    return f16_at(b + 2 * r) * float(q5) + f16_at(b + 32 + 2 * r);
  }
  template <class V>
  static void columns(const uint8_t* b, int64_t, V&& v) { nibble5_columns(b + 128, b + 64, v); }
  static void scales(const uint8_t* b, int64_t, vf& d, vf& m) {
    d = load_f16x16(b);
    m = load_f16x16(b + 32);
  }

};

// Q8_0 (8): file d (fp16), qs[32] (int8); w[j] = d qs[j]. Tile: d[16] (fp16), qs[32][16] (int8).
struct FQ8_0 {
  static constexpr int64_t kType = 8, QB = 32, SB = 32, FILE = 34, TILE = 544;
  static constexpr bool kFloat = false, kMin = false, kAmx = true;
  static constexpr const char* kName = "Q8_0";
  static void pack(const uint8_t* f, uint8_t* t, int64_t r) {
    std::memcpy(t + 2 * r, f, 2);
    for (int64_t j = 0; j < 32; ++j) t[32 + j * R + r] = f[2 + j];
  }
  static float weight(const uint8_t* b, int64_t r, int64_t j) {
    return f16_at(b + 2 * r) * float(static_cast<int8_t>(b[32 + j * R + r]));
  }
  template <class V>
  static void columns(const uint8_t* b, int64_t, V&& v) {
    for (int64_t j = 0; j < 32; ++j) v(j, to_f(load_i8x16(b + 32 + j * R)));
  }
  static void scales(const uint8_t* b, int64_t, vf& d, vf&) { d = load_f16x16(b); }

};

// Q4_K and Q5_K's 6-bit scale and minimum of sub-block s (0..7) from the 12 packed bytes
// (ggml's get_scale_min_k4).
inline void scale_min_k4(const uint8_t* q, int64_t s, uint8_t& sc, uint8_t& m) {
  if (s < 4) {
    sc = q[s] & 63;
    m = q[s + 4] & 63;
  } else {
    sc = (q[s + 4] & 15) | ((q[s - 4] >> 6) << 4);
    m = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
  }
}

// Q4_K (12), super-blocks of 256: file d, dmin (fp16), scales[12] (8 6-bit scales and 8 6-bit
// minimums), qs[128]: sub-block s (32 inputs) has w[i] = d sc[s] q[i] - dmin m[s], its nibbles
// q[i] in byte 32 (s / 2) + i, low nibble for even s. Tile: d[16], dmin[16] (fp16), sc[8][16],
// m[8][16] (uint8), then per sub-block qs[16][16] with Q4_1's nibble order (low: input j, high:
// input j + 16): 148 bytes per row and 256 weights against the file's 144.
struct FQ4_K {
  static constexpr int64_t kType = 12, QB = 256, SB = 32, FILE = 144, TILE = 2368;
  static constexpr bool kFloat = false, kMin = true, kAmx = true;
  static constexpr const char* kName = "Q4_K";
  static void pack(const uint8_t* f, uint8_t* t, int64_t r) {
    std::memcpy(t + 2 * r, f, 2);
    std::memcpy(t + 32 + 2 * r, f + 2, 2);
    for (int64_t s = 0; s < 8; ++s) {
      scale_min_k4(f + 4, s, t[64 + s * R + r], t[192 + s * R + r]);
      const uint8_t* qs = f + 16 + 32 * (s / 2);
      const int shift = 4 * (s % 2);
      for (int64_t j = 0; j < 16; ++j)
        t[320 + s * 256 + j * R + r] = static_cast<uint8_t>(((qs[j] >> shift) & 15) | (((qs[j + 16] >> shift) & 15) << 4));
    }
  }
  static float weight(const uint8_t* b, int64_t r, int64_t j) {
    const int64_t s = j / 32, i = j % 32;
    const float d = f16_at(b + 2 * r) * float(b[64 + s * R + r]);
    const float m = f16_at(b + 32 + 2 * r) * float(b[192 + s * R + r]);
    const uint8_t q = b[320 + s * 256 + (i % 16) * R + r];
    return d * float(i < 16 ? q & 15 : q >> 4) - m;
  }
  static const uint8_t* nibbles(const uint8_t* b, int64_t s) { return b + 320 + s * 256; }  // qs[16][16] of sub-block s
  template <class V>
  static void columns(const uint8_t* b, int64_t s, V&& v) { nibble_columns(b + 320 + s * 256, v); }
  static void scales(const uint8_t* b, int64_t s, vf& d, vf& m) {
    d = load_f16x16(b) * to_f(load_u8x16(b + 64 + s * R));
    m = -(load_f16x16(b + 32) * to_f(load_u8x16(b + 192 + s * R)));
  }

};

// Q5_K (13): Q4_K with a fifth bit per weight: file d, dmin, scales[12], qh[32], qs[128]; the
// fifth bit of input i of sub-block s is bit s of qh[i]. Tile: d[16], dmin[16], sc[8][16],
// m[8][16], qh[8][16] (uint32: bit i for input i of the sub-block), qs[8][16][16]: 180 bytes per
// row and 256 weights against the file's 176.
struct FQ5_K {
  static constexpr int64_t kType = 13, QB = 256, SB = 32, FILE = 176, TILE = 2880;
  static constexpr bool kFloat = false, kMin = true, kAmx = true;
  static constexpr const char* kName = "Q5_K";
  static void pack(const uint8_t* f, uint8_t* t, int64_t r) {
    std::memcpy(t + 2 * r, f, 2);
    std::memcpy(t + 32 + 2 * r, f + 2, 2);
    const uint8_t* qh = f + 16;
    for (int64_t s = 0; s < 8; ++s) {
      scale_min_k4(f + 4, s, t[64 + s * R + r], t[192 + s * R + r]);
      const uint8_t* qs = f + 48 + 32 * (s / 2);
      const int shift = 4 * (s % 2);
      uint32_t h = 0;
      for (int64_t i = 0; i < 32; ++i) h |= static_cast<uint32_t>(qh[i] >> s & 1) << i;
      std::memcpy(t + 320 + s * 64 + 4 * r, &h, 4);
      for (int64_t j = 0; j < 16; ++j)
        t[832 + s * 256 + j * R + r] = static_cast<uint8_t>(((qs[j] >> shift) & 15) | (((qs[j + 16] >> shift) & 15) << 4));
    }
  }
  static float weight(const uint8_t* b, int64_t r, int64_t j) {
    const int64_t s = j / 32, i = j % 32;
    const float d = f16_at(b + 2 * r) * float(b[64 + s * R + r]);
    const float m = f16_at(b + 32 + 2 * r) * float(b[192 + s * R + r]);
    const uint8_t q = b[832 + s * 256 + (i % 16) * R + r];
    const int q5 = (i < 16 ? q & 15 : q >> 4) | ((u32_at(b + 320 + s * 64 + 4 * r) >> i & 1) << 4);
    return d * float(q5) - m;
  }
  template <class V>
  static void columns(const uint8_t* b, int64_t s, V&& v) { nibble5_columns(b + 832 + s * 256, b + 320 + s * 64, v); }
  static void scales(const uint8_t* b, int64_t s, vf& d, vf& m) { FQ4_K::scales(b, s, d, m); }

};

// Q6_K (14), super-blocks of 256 in 16 sub-blocks of 16: file ql[128], qh[64], scales[16]
// (int8), d (fp16); w = d sc[s] (q - 32) with q = 4 low bits | 2 high bits << 4 (ggml's
// interleaving, see pack). Tile: d[16] (fp16), sc[16][16] (int8), qh[16][16] (uint32: bits 2i,
// 2i + 1 the high bits of input i of a sub-block), ql[16][8][16] (low nibble: input k, high:
// input k + 8): 210 bytes per row and 256 weights, as the file. Kernel: m = -32 d sc[s].
struct FQ6_K {
  static constexpr int64_t kType = 14, QB = 256, SB = 16, FILE = 210, TILE = 3360;
  static constexpr bool kFloat = false, kMin = true, kAmx = true;
  static constexpr const char* kName = "Q6_K";
  static void pack(const uint8_t* f, uint8_t* t, int64_t r) {
    const uint8_t *ql = f, *qh = f + 128;
    std::memcpy(t + 2 * r, f + 208, 2);
    uint8_t q[256];
    for (int64_t w = 0; w < 256; ++w) {  // gguf-py's Q6_K.dequantize_blocks, one weight at a time
      const int64_t h = w / 128, rem = w % 128;
      const int nib = (ql[h * 64 + rem % 64] >> (4 * (rem / 64))) & 15;
      const int hi = (qh[h * 32 + rem % 32] >> (2 * (rem / 32))) & 3;
      q[w] = static_cast<uint8_t>(nib | (hi << 4));
    }
    for (int64_t s = 0; s < 16; ++s) {
      t[32 + s * R + r] = f[192 + s];
      uint32_t h = 0;
      for (int64_t i = 0; i < 16; ++i) h |= static_cast<uint32_t>(q[16 * s + i] >> 4) << (2 * i);
      std::memcpy(t + 288 + s * 64 + 4 * r, &h, 4);
      for (int64_t k = 0; k < 8; ++k)
        t[1312 + s * 128 + k * R + r] = static_cast<uint8_t>((q[16 * s + k] & 15) | ((q[16 * s + k + 8] & 15) << 4));
    }
  }
  static int q6(const uint8_t* b, int64_t s, int64_t r, int64_t i) {
    const uint8_t x = b[1312 + s * 128 + (i % 8) * R + r];
    return (i < 8 ? x & 15 : x >> 4) | ((u32_at(b + 288 + s * 64 + 4 * r) >> (2 * i) & 3) << 4);
  }
  static float weight(const uint8_t* b, int64_t r, int64_t j) {
    const int64_t s = j / 16;
    const float d = f16_at(b + 2 * r) * float(static_cast<int8_t>(b[32 + s * R + r]));
    return d * float(q6(b, s, r, j % 16) - 32);
  }
  template <class V>
  static void columns(const uint8_t* b, int64_t s, V&& v) {
    const vu qh = load_u32x16(b + 288 + s * 64);
    // bits 2k, 2k + 1 (input k) and 2k + 16, 2k + 17 (input k + 8) at 4 + 2k, then 2 lower per k
    vu lo4 = qh << 4, hi4 = qh >> 12;
    const uint8_t* ql = b + 1312 + s * 128;
    for (int64_t k = 0; k < 8; ++k) {
      const vu q = load_u8x16(ql + k * R);
      v(k, to_f((q & 15) | (lo4 & 0x30)));
      v(k + 8, to_f((q >> 4) | (hi4 & 0x30)));
      lo4 = lo4 >> 2;
      hi4 = hi4 >> 2;
    }
  }
  static void scales(const uint8_t* b, int64_t s, vf& d, vf& m) {
    d = load_f16x16(b) * to_f(load_i8x16(b + 32 + s * R));
    m = d * -32.f;
  }

};

// Unquantized matrices: a tile block holds 32 inputs of 16 rows, w[j][r] (j-major), in the
// file's element type: F32 (0), F16 (1), BF16 (30).
template <int64_t type, int64_t bytes>
struct FFloat {
  static constexpr int64_t kType = type, QB = 32, SB = 32, FILE = 32 * bytes, TILE = 32 * R * bytes;
  static constexpr bool kFloat = true, kMin = false, kAmx = type == 30;  // bfloat16 weights are exact in bfloat16
  static constexpr const char* kName = type == 0 ? "F32" : type == 1 ? "F16" : "BF16";
  static void pack(const uint8_t* f, uint8_t* t, int64_t r) {
    for (int64_t j = 0; j < 32; ++j) std::memcpy(t + (j * R + r) * bytes, f + j * bytes, bytes);
  }
  static float at(const uint8_t* p) { return type == 0 ? f32_at(p) : type == 1 ? f16_at(p) : bf16_at(p); }
  static float weight(const uint8_t* b, int64_t r, int64_t j) { return at(b + (j * R + r) * bytes); }
  template <class V>
  static void columns(const uint8_t* b, int64_t, V&& v) {
    for (int64_t j = 0; j < 32; ++j) {
      const uint8_t* p = b + j * R * bytes;
      if constexpr (type == 0) v(j, vload(reinterpret_cast<const float*>(p)));
      else if constexpr (type == 1) v(j, load_f16x16(p));
      else v(j, load_bf16x16(p));
    }
  }
  static void scales(const uint8_t*, int64_t, vf&, vf&) {}

};
using FF32 = FFloat<0, 4>;
using FF16 = FFloat<1, 2>;
using FBF16 = FFloat<30, 2>;

// The facts of a GGML type at run time.
struct Format {
  int64_t qtype;
  const char* name;
  int64_t block;       // inputs per block: K must be a multiple
  int64_t file_bytes;  // bytes of one row's block in the file
  int64_t tile_bytes;  // bytes of one tile block (16 rows)
  bool amx;            // whether products of batches may take the AMX path
};

template <class F>
constexpr Format format_facts() { return Format{F::kType, F::kName, F::QB, F::FILE, F::TILE, F::kAmx}; }

constexpr Format kFormats[] = {format_facts<FF32>(),  format_facts<FF16>(),  format_facts<FQ4_0>(), format_facts<FQ4_1>(),
                               format_facts<FQ5_0>(), format_facts<FQ5_1>(), format_facts<FQ8_0>(), format_facts<FQ4_K>(),
                               format_facts<FQ5_K>(), format_facts<FQ6_K>(), format_facts<FBF16>()};

// fn(F{}) for the format struct F of `qtype`; the caller has checked it (format_of).
template <class Fn>
auto dispatch(int64_t qtype, Fn&& fn) {
  switch (qtype) {
    case 0: return fn(FF32{});
    case 1: return fn(FF16{});
    case 2: return fn(FQ4_0{});
    case 3: return fn(FQ4_1{});
    case 6: return fn(FQ5_0{});
    case 7: return fn(FQ5_1{});
    case 8: return fn(FQ8_0{});
    case 12: return fn(FQ4_K{});
    case 13: return fn(FQ5_K{});
    case 14: return fn(FQ6_K{});
    default: return fn(FBF16{});
  }
}

const Format& format_of(int64_t qtype, const char* op) {
  for (const Format& f : kFormats)
    if (f.qtype == qtype) return f;
  TORCH_CHECK(false, op, ": unsupported GGML type ", qtype,
              " (supported: F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, "
              "Q6_K = 14, BF16 = 30)");
}

// (block_weights, file_block_bytes, tile_bytes, amx) of a type, for the Python tables' test.
std::vector<int64_t> block_format(int64_t qtype) {
  const Format& f = format_of(qtype, "block_format");
  return {f.block, f.file_bytes, f.tile_bytes, f.amx ? 1 : 0};
}

// (N, G * file_bytes) file rows -> (N / 16, G * tile_bytes) tiles.
at::Tensor pack(const at::Tensor& blocks_in, int64_t qtype) {
  const Format& f = format_of(qtype, "gguf_pack");
  TORCH_CHECK(blocks_in.dim() == 2 && blocks_in.scalar_type() == at::kByte && blocks_in.device().is_cpu(),
              "gguf_pack: blocks must be (N, bytes) uint8 on the CPU, got ", blocks_in.sizes(), " ", blocks_in.scalar_type());
  TORCH_CHECK(blocks_in.size(0) % R == 0, "gguf_pack: ", f.name, " rows (", blocks_in.size(0), ") must be a multiple of ", R);
  TORCH_CHECK(blocks_in.size(1) % f.file_bytes == 0, "gguf_pack: ", blocks_in.size(1), " bytes per row is not a whole number of ",
              f.name, " blocks (", f.file_bytes, " bytes per ", f.block, " weights)");
  const at::Tensor blocks = blocks_in.contiguous();
  const int64_t N = blocks.size(0), G = blocks.size(1) / f.file_bytes, row_bytes = blocks.size(1);
  at::Tensor tiles = at::empty({N / R, G * f.tile_bytes}, blocks.options());
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = tiles.data_ptr<uint8_t>();
  dispatch(qtype, [&](auto fmt) {
    using F = decltype(fmt);
    at::parallel_for(0, N / R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t r = 0; r < R; ++r)
            F::pack(src + (t * R + r) * row_bytes + g * F::FILE, dst + (t * G + g) * F::TILE, r);
    });
  });
  return tiles;
}

// `tiles` hold a matrix of K columns: (N / 16, K / block * tile_bytes) uint8 on the CPU.
void check_tiles(const at::Tensor& tiles, const Format& f, int64_t K, const char* op) {
  TORCH_CHECK(tiles.dim() == 2 && tiles.scalar_type() == at::kByte && tiles.device().is_cpu(), op,
              ": tiles must be (N / 16, bytes) uint8 on the CPU, got ", tiles.sizes(), " ", tiles.scalar_type());
  TORCH_CHECK(K > 0 && K % f.block == 0, op, ": ", f.name, " needs K a multiple of ", f.block, ", got K = ", K);
  TORCH_CHECK(tiles.size(1) == K / f.block * f.tile_bytes, op, ": ", f.name, " tiles of ", tiles.size(1),
              " bytes per tile row do not hold K = ", K, " (", K / f.block * f.tile_bytes, " bytes)");
}

void check_linear(const at::Tensor& x, const at::Tensor& tiles, const Format& f) {
  TORCH_CHECK(x.device().is_cpu() && tiles.device().is_cpu(), "gguf_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gguf_linear: x must be (M, K) float32, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(tiles.dim() == 2 && tiles.scalar_type() == at::kByte, "gguf_linear: tiles must be (N / 16, bytes) uint8, got ",
              tiles.sizes(), " ", tiles.scalar_type());
  TORCH_CHECK(x.size(1) % f.block == 0 && tiles.size(1) == x.size(1) / f.block * f.tile_bytes, "gguf_linear: x has K = ",
              x.size(1), " but the ", f.name, " tiles hold ", tiles.size(1) / f.tile_bytes * f.block, " inputs per row");
}

// Output rows [16t, 16t + 16) for activation rows [m0, m0 + mb) of x (M, K): out[i * 16 + r].
// xsum: the sums of x over each sub-block, (M, K / SB) (formats with minimums). mb is a
// template argument so that the accumulators stay in registers.
template <class F, int64_t mb>
void tile_kernel(const uint8_t* tile, const float* x, const float* xsum, int64_t K, int64_t m0, float* out) {
  constexpr int64_t NS = F::QB / F::SB;  // sub-blocks per block
  const int64_t G = K / F::QB, S = K / F::SB;
  const float* x0 = x + m0 * K;
  vf acc[MB];
  for (int64_t i = 0; i < mb; ++i) acc[i] = vf::set(0.f);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = tile + g * F::TILE;
#if defined(__GNUC__)
    for (int64_t l = 0; l < F::TILE; l += 64) __builtin_prefetch(b + PREFETCH + l);
#endif
    for (int64_t s = 0; s < NS; ++s) {
      const float* xs = x0 + g * F::QB + s * F::SB;
      vf sum[MB];
      for (int64_t i = 0; i < mb; ++i) sum[i] = vf::set(0.f);
      F::columns(b, s, [&](int64_t j, vf q) {
        for (int64_t i = 0; i < mb; ++i) sum[i] += q * xs[i * K + j];
      });
      if constexpr (F::kFloat) {
        for (int64_t i = 0; i < mb; ++i) acc[i] += sum[i];
      } else {
        vf d, m;
        F::scales(b, s, d, m);
        for (int64_t i = 0; i < mb; ++i) acc[i] += sum[i] * d;
        if constexpr (F::kMin)
          for (int64_t i = 0; i < mb; ++i) acc[i] += m * xsum[(m0 + i) * S + g * NS + s];
      }
    }
  }
  for (int64_t i = 0; i < mb; ++i) vstore(out + i * R, acc[i]);
}

// The tile kernels of a format by number of activation rows (1 .. MB).
template <class F, int64_t... mb>
constexpr std::array<void (*)(const uint8_t*, const float*, const float*, int64_t, int64_t, float*), sizeof...(mb) + 1>
tile_kernels(std::integer_sequence<int64_t, mb...>) {
  return {nullptr, tile_kernel<F, mb + 1>...};
}
template <class F>
struct TileKernels {
  static constexpr auto by_rows = tile_kernels<F>(std::make_integer_sequence<int64_t, MB>{});
};

// Sums of x (M, K) over each run of `sb` inputs: xsum (M, K / sb).
void sub_block_sums(const float* xp, int64_t M, int64_t K, int64_t sb, float* xsum) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t g = 0; g < K / sb; ++g) {
      float s = 0.f;
      for (int64_t j = 0; j < sb; ++j) s += xp[i * K + g * sb + j];
      xsum[i * (K / sb) + g] = s;
    }
}

#ifdef EXO_GGUF_AMX
// Batches of rows on the AMX tile unit, in bfloat16 with float32 accumulation but without
// rounding anything that the float32 path keeps: the weights' integers (at most 8 bits: every
// quantized type here; and bfloat16 weights themselves) are exact in bfloat16, and each
// activation is split into two bfloat16 parts, x = hi + lo with hi = bf16(x), lo = bf16(x - hi),
// which keep about 16 of float32's 24 bits (relative error <= 2^-16). Per sub-block u of SB
// inputs (32, or Q6_K's 16) and tile of 16 output rows, the unit computes S = sum_j x[j] q[j]
// for 16 activation rows at once (two TDPBF16PS, one per part, into one accumulator tile), and
// the vector unit applies the sub-block's scales as the float32 path does: acc += d * S
// (+ m * sum_j x[j]). The vector unit, the bottleneck of the float32 path at 8 or 16 rows
// (every multiply-add on it), now only unpacks each block of weights into bfloat16 pairs once
// for all rows and applies the scales. At 16 rows a matrix product takes about half the
// float32 path's time on this unit's 2-core machine; below about 8 rows the fixed cost per
// block loses to it (set_amx_rows). F32 and F16 weights (not exact in bfloat16) stay on the
// float32 path.
//
// Nibbles (Q4_0, Q4_1, Q4_K) are unpacked without arithmetic: a byte shuffle puts each into a
// 16-bit lane, a 16-bit lookup (VPERMW) turns 0..15 into its bfloat16 bits; Q8_0's bytes are
// converted through float32. The other types go through their float32 columns (exact small
// integers, whose bfloat16 bits are the top half of their float32 bits).
constexpr int64_t AMX_ROWS = 16;  // activation rows per tile

struct TileConfig {  // the 64-byte operand of LDTILECFG, palette 1
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether this process may use the tile registers: Linux hands out their 8 KB of state only
// on request (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, Linux >= 5.16).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
#ifdef EXO_GGUF_EMULATE_AVX512
    return true;
#else
    unsigned eax, ebx, ecx, edx;  // AMX-BF16: CPUID.(EAX=7, ECX=0):EDX[22] (GCC and Clang alike)
    const bool bf16 = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 22 & 1);
    return bf16 && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#endif
  }();
  return ok;
}

// Tiles 0-1: the activations' hi and lo parts (16 rows x sb bf16); 2-4: the weights of up to
// three tiles of output rows (sb / 2 pairs of inputs x 16 rows); 5-7: their sums (16 x 16
// float32).
void amx_configure(int64_t sb) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = t < 2 ? static_cast<uint16_t>(2 * sb) : 64;
    c.rows[t] = t >= 2 && t < 5 ? static_cast<uint8_t>(sb / 2) : AMX_ROWS;
  }
  _tile_loadconfig(&c);
}

// bfloat16 of 0 .. 31 in the 16-bit lanes: the table of a 16-bit lookup (VPERMW).
inline __m512i bf16_of_small_integers() {
  alignas(64) uint16_t t[32];
  for (int q = 0; q < 32; ++q) {
    const float f = static_cast<float>(q);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    t[q] = static_cast<uint16_t>(u >> 16);  // exact: q has at most 5 significant bits
  }
  return _mm512_load_si512(t);
}

inline __m512i nibble_pairs_index() {  // byte 2 * (r * 2 + c) of the result <- byte c * 16 + r
  alignas(64) uint8_t idx[64];
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 2; ++c) {
      idx[2 * (r * 2 + c)] = static_cast<uint8_t>(c * 16 + r);
      idx[2 * (r * 2 + c) + 1] = 0;
    }
  return _mm512_load_si512(idx);
}

// Sub-block s of tile block b (16 rows) as the weight operand of TDPBF16PS: SB / 2 rows of
// input pairs, row p holding (w[r][2p], w[r][2p + 1]) for r = 0..15 as bfloat16, and the
// sub-block's scales: d[r] and m[r] (for Q4_1, m[r] - 128 d[r], see above); 1 and 0 for
// bfloat16 weights.
template <class F>
inline void amx_unpack(const uint8_t* b, int64_t s, const __m512i& idx, uint16_t* out, float* dq, float* mq) {
  if (s == 0)
    for (int64_t l = 0; l < F::TILE; l += 64) _mm_prefetch(reinterpret_cast<const char*>(b + PREFETCH + l), _MM_HINT_T0);
  if constexpr (F::kType == 2 || F::kType == 3 || F::kType == 12) {  // Q4_0, Q4_1, Q4_K: Q4_1's nibble layout
    vf d, m;
    F::scales(b, s, d, m);
    vstore(dq, d);
    vstore(mq, m);
    const uint8_t* qs = F::nibbles(b, s);
    const __m512i low4 = _mm512_set1_epi16(15), bf16 = bf16_of_small_integers();
    for (int64_t p = 0; p < 8; ++p) {  // qs[2p], qs[2p + 1]: inputs 2p, 2p + 1 (low) and 2p + 16, 2p + 17 (high)
      const __m512i raw = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 2 * p * R)));
      const __m512i w = _mm512_maskz_permutexvar_epi8(0x5555555555555555ULL, idx, raw);
      _mm512_storeu_si512(out + p * 32, _mm512_permutexvar_epi16(_mm512_and_si512(w, low4), bf16));
      _mm512_storeu_si512(out + (p + 8) * 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), bf16));
    }
  } else if constexpr (F::kType == 8) {  // Q8_0
    vstore(dq, load_f16x16(b));
    const __m256i pairs = _mm256_set_epi8(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                          5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t p = 0; p < 16; ++p) {  // qs[2p], qs[2p + 1]
      const __m256i q = _mm256_permutexvar_epi8(pairs, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 + 2 * p * R)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
      _mm512_storeu_si512(out + p * 32, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  } else {
    (void)idx;
    alignas(64) float cols[F::SB][R];
    F::columns(b, s, [&](int64_t j, vf q) { vstore(cols[j], q); });
    for (int64_t p = 0; p < F::SB / 2; ++p) {  // bfloat16 pairs: the top halves of exact float32 values
      const __m512i c0 = _mm512_castps_si512(_mm512_load_ps(cols[2 * p]));
      const __m512i c1 = _mm512_castps_si512(_mm512_load_ps(cols[2 * p + 1]));
      _mm512_storeu_si512(out + p * 32, _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(c0, 16), c1));
    }
    if constexpr (F::kFloat) {
      _mm512_storeu_ps(dq, _mm512_set1_ps(1.f));
      _mm512_storeu_ps(mq, _mm512_setzero_ps());
    } else {
      vf d, m = vf::set(0.f);
      F::scales(b, s, d, m);
      vstore(dq, d);
      vstore(mq, m);
    }
  }
}

// Output rows [16t, 16t + 16 NT) of NT consecutive tiles (the first at `tile0`, the next
// `tile_row` bytes apart) for all M activation rows, given as the split parts xh, xl (Mp, K)
// bf16, Mp = M rounded up to 16 (zero rows), with their sub-block sums xsum (M, K / SB). acc:
// (NT, M, 16) float32, the result. Scratch: wt NT * SB KB, cbuf 2 * Mp * NT * 16 floats. The
// tile registers are configured for SB.
//
// Sub-block by sub-block, three things overlap: the unit multiplies sub-block u (both
// activation parts into each tile's accumulator, NT independent chains back to back: one chain
// alone waits on the unit's latency), while the vector unit scales sub-block u - 1's sums into
// acc and unpacks sub-block u + 1's weights (reading the weights is then hidden behind the
// unit's work).
template <class F, int NT>
void amx_group(const uint8_t* tile0, int64_t tile_row, const uint16_t* xh, const uint16_t* xl, const float* xsum, int64_t M,
               int64_t Mp, int64_t K, const __m512i& idx, uint16_t* wt, float* cbuf, float* acc) {
  static_assert(NT >= 1 && NT <= 3, "tiles 0-1: activations, 2..: weights, 5..: sums");
  constexpr int64_t NS = F::QB / F::SB, WT = F::SB * R;  // uint16 per unpacked sub-block of one tile
  const int64_t U = K / F::SB, stride = K * 2, MT = Mp / AMX_ROWS;
  const bool with_min = F::kMin;
  alignas(64) float dq[2][NT][R], mq[2][NT][R];
  std::fill(acc, acc + NT * M * R, 0.f);
  auto unpack = [&](int64_t u) {
    for (int j = 0; j < NT; ++j)
      amx_unpack<F>(tile0 + j * tile_row + (u / NS) * F::TILE, u % NS, idx, wt + ((u % 2) * NT + j) * WT, dq[u % 2][j],
                    mq[u % 2][j]);
  };
  auto issue = [&](int64_t u) {
    const uint16_t* w = wt + (u % 2) * NT * WT;
    _tile_loadd(2, w, 64);
    if constexpr (NT > 1) _tile_loadd(3, w + WT, 64);
    if constexpr (NT > 2) _tile_loadd(4, w + 2 * WT, 64);
    for (int64_t mt = 0; mt < MT; ++mt) {
      _tile_loadd(0, xh + mt * AMX_ROWS * K + u * F::SB, stride);
      _tile_loadd(1, xl + mt * AMX_ROWS * K + u * F::SB, stride);
      _tile_zero(5);
      if constexpr (NT > 1) _tile_zero(6);
      if constexpr (NT > 2) _tile_zero(7);
      _tile_dpbf16ps(5, 0, 2);
      if constexpr (NT > 1) _tile_dpbf16ps(6, 0, 3);
      if constexpr (NT > 2) _tile_dpbf16ps(7, 0, 4);
      _tile_dpbf16ps(5, 1, 2);
      if constexpr (NT > 1) _tile_dpbf16ps(6, 1, 3);
      if constexpr (NT > 2) _tile_dpbf16ps(7, 1, 4);
      float* c = cbuf + ((u % 2) * MT + mt) * NT * AMX_ROWS * R;
      _tile_stored(5, c, 64);
      if constexpr (NT > 1) _tile_stored(6, c + AMX_ROWS * R, 64);
      if constexpr (NT > 2) _tile_stored(7, c + 2 * AMX_ROWS * R, 64);
    }
  };
  auto read_out = [&](int64_t u) {
    for (int64_t mt = 0; mt < MT; ++mt)
      for (int j = 0; j < NT; ++j) {
        const float* c = cbuf + (((u % 2) * MT + mt) * NT + j) * AMX_ROWS * R;
        const int64_t rows = std::min(AMX_ROWS, M - mt * AMX_ROWS);
        float* o = acc + (j * M + mt * AMX_ROWS) * R;
        const float* xs = xsum + mt * AMX_ROWS * U + u;
        const __m512 d = _mm512_load_ps(dq[u % 2][j]);
        if (with_min) {
          const __m512 m = _mm512_load_ps(mq[u % 2][j]);
          for (int64_t i = 0; i < rows; ++i)
            _mm512_storeu_ps(o + i * R, _mm512_fmadd_ps(m, _mm512_set1_ps(xs[i * U]),
                                                        _mm512_fmadd_ps(_mm512_loadu_ps(c + i * R), d, _mm512_loadu_ps(o + i * R))));
        } else {
          for (int64_t i = 0; i < rows; ++i)
            _mm512_storeu_ps(o + i * R, _mm512_fmadd_ps(_mm512_loadu_ps(c + i * R), d, _mm512_loadu_ps(o + i * R)));
        }
      }
  };
  unpack(0);
  for (int64_t u = 0; u < U; ++u) {
    issue(u);
    if (u > 0) read_out(u - 1);
    if (u + 1 < U) unpack(u + 1);
  }
  read_out(U - 1);
}

// y (M, N) = x (M, K) @ W.T as linear_into, on the tile unit (see above).
template <class F>
void linear_amx(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t T, int64_t tile_row, float* yp) {
  const int64_t N = T * R, U = K / F::SB;
  const int64_t Mp = (M + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
  // Scratch kept per thread between calls (the pool's threads live as long as the process).
  thread_local std::vector<uint16_t> xh, xl;
  thread_local std::vector<float> xsum;
  xh.resize(Mp * K);
  xl.resize(Mp * K);
  xsum.resize(M * U);
  std::fill(xh.begin() + M * K, xh.begin() + Mp * K, uint16_t{0});  // rows M .. Mp - 1 are zero
  std::fill(xl.begin() + M * K, xl.begin() + Mp * K, uint16_t{0});
  for (int64_t i = 0; i < M; ++i)
    for (int64_t u = 0; u < U; ++u) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t j = 0; j < F::SB; j += 16) {
        const int64_t o = i * K + u * F::SB + j;
        const __m512 v = _mm512_loadu_ps(xp + o);
        const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
        const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        const __m256i l = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
        const __m512 lf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(l), 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xh.data() + o), h);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xl.data() + o), l);
        s = _mm512_add_ps(s, _mm512_add_ps(hf, lf));
      }
      xsum[i * U + u] = _mm512_reduce_add_ps(s);
    }
  // The workers reach this thread's scratch through these (in the lambda, the names would
  // mean each worker's own thread_local vectors).
  const uint16_t *xhp = xh.data(), *xlp = xl.data();
  const float* xsump = xsum.data();
  constexpr int64_t NT = 3;  // tiles per pass of amx_group
  WorkerPool::get().parallel_for((T + NT - 1) / NT, [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint16_t> wt;
    thread_local std::vector<float> cbuf, acc;
    wt.resize(2 * NT * F::SB * R);
    cbuf.resize(2 * Mp * NT * R);
    acc.resize(NT * M * R);
    const __m512i idx = nibble_pairs_index();
    amx_configure(F::SB);
    for (int64_t t0 = begin * NT; t0 < std::min(T, end * NT); t0 += NT) {
      const int64_t nt = std::min(NT, T - t0);
      const auto group = nt == 3 ? amx_group<F, 3> : nt == 2 ? amx_group<F, 2> : amx_group<F, 1>;
      group(wp + t0 * tile_row, tile_row, xhp, xlp, xsump, M, Mp, K, idx, wt.data(), cbuf.data(), acc.data());
      for (int64_t j = 0; j < nt; ++j)
        for (int64_t i = 0; i < M; ++i)
          std::memcpy(yp + i * N + (t0 + j) * R, acc.data() + (j * M + i) * R, R * sizeof(float));
    }
    _tile_release();  // back to the init state: a context switch saves no tile data
  });
}

// The fewest activation rows that take the AMX path, as set_amx_rows left it (0: never).
std::atomic<int64_t> amx_min_rows{8};

// The threshold in force: amx_min_rows, or 0 where the OS refuses the tile state.
int64_t amx_threshold() { return amx_permitted() ? amx_min_rows.load(std::memory_order_relaxed) : 0; }
#endif

// y (M, N) = x (M, K) @ W.T for W (N, K) of format F held as T = N / 16 tiles of `tile_row`
// bytes per tile row, all row-major and contiguous. With allow_amx false the product stays on
// the float32 path whatever M: there each output row's sums run in the same order for any M
// (tile_kernel's rows are independent, and threads split the tiles, not the rows), so a row's
// result is the one it gets alone, bit for bit (batch invariance). The AMX path rounds each
// activation into two bfloat16 parts and so differs from the single-row path in the last bits.
template <class F>
void linear_into_t(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t T, int64_t tile_row, float* yp,
                   bool allow_amx) {
#ifdef EXO_GGUF_AMX
  if constexpr (F::kAmx) {
    if (allow_amx) {
      const int64_t amx_rows_from = amx_threshold();
      if (amx_rows_from > 0 && M >= amx_rows_from) {
        linear_amx<F>(xp, M, K, wp, T, tile_row, yp);
        return;
      }
    }
  }
#else
  (void)allow_amx;
#endif
  const int64_t N = T * R;
  std::vector<float> xsum;
  if constexpr (F::kMin) {  // sub-block sums of x, for the minimums
    xsum.resize(M * (K / F::SB));
    sub_block_sums(xp, M, K, F::SB, xsum.data());
  }
  WorkerPool::get().parallel_for(T, [&](int64_t begin, int64_t end) {
    float out[MB * R];
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = wp + t * tile_row;
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mb = std::min(MB, M - m0);
        TileKernels<F>::by_rows[mb](tile, xp, xsum.data(), K, m0, out);
        for (int64_t i = 0; i < mb; ++i) std::memcpy(yp + (m0 + i) * N + t * R, out + i * R, R * sizeof(float));
      }
    }
  });
}

void linear_into(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t T, int64_t tile_row, int64_t qtype,
                 float* yp, bool allow_amx) {
  dispatch(qtype, [&](auto fmt) { linear_into_t<decltype(fmt)>(xp, M, K, wp, T, tile_row, yp, allow_amx); });
}

// y (M, N) = x (M, K) @ W.T for W (N, K) held as tiles (N / 16, K / block * tile_bytes);
// allow_amx false keeps it off the AMX path (see linear_into_t).
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& tiles_in, int64_t qtype, bool allow_amx) {
  const Format& f = format_of(qtype, "gguf_linear");
  check_linear(x_in, tiles_in, f);
  const at::Tensor x = x_in.contiguous(), tiles = tiles_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), T = tiles.size(0);
  at::Tensor y = at::empty({M, T * R}, x.options());
  linear_into(x.data_ptr<float>(), M, K, tiles.data_ptr<uint8_t>(), T, tiles.size(1), qtype, y.data_ptr<float>(), allow_amx);
  return y;
}

// Dequantize rows `rows` (int64, any shape S) of W (N, K) held as tiles -> (S..., K) float32,
// each weight as gguf-py computes it.
at::Tensor dequantize_rows(const at::Tensor& tiles_in, int64_t qtype, int64_t K, const at::Tensor& rows_in) {
  const Format& f = format_of(qtype, "gguf_dequantize_rows");
  check_tiles(tiles_in, f, K, "gguf_dequantize_rows");
  TORCH_CHECK(rows_in.scalar_type() == at::kLong, "gguf_dequantize_rows: rows must be int64");
  const at::Tensor tiles = tiles_in.contiguous(), rows = rows_in.contiguous();
  const int64_t N = tiles.size(0) * R, n = rows.numel(), tile_row = tiles.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < N, "gguf_dequantize_rows: row ", rp[i], " out of range [0, ", N, ")");
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape.push_back(K);
  at::Tensor w = at::empty(shape, tiles.options().dtype(at::kFloat));
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  float* wp = w.data_ptr<float>();
  dispatch(qtype, [&](auto fmt) {
    using F = decltype(fmt);
    WorkerPool::get().parallel_for(n, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = rp[i] / R, r = rp[i] % R;
        for (int64_t g = 0; g < K / F::QB; ++g) {
          const uint8_t* b = tp + t * tile_row + g * F::TILE;
          for (int64_t j = 0; j < F::QB; ++j) wp[i * K + g * F::QB + j] = F::weight(b, r, j);
        }
      }
    });
  });
  return w;
}

// The transpose W.T (K, N) float32 of W (N, K) held as tiles, each weight as gguf-py computes
// it: one tile's 16 rows are 16 consecutive floats of a row of W.T, so the stores are whole
// vectors. (The AVX-512 path's d q + m in one rounding equals gguf-py's two: d q is exact.)
at::Tensor dequantize_t(const at::Tensor& tiles_in, int64_t qtype, int64_t K) {
  const Format& f = format_of(qtype, "gguf_dequantize_t");
  check_tiles(tiles_in, f, K, "gguf_dequantize_t");
  const at::Tensor tiles = tiles_in.contiguous();
  const int64_t T = tiles.size(0), N = T * R, tile_row = tiles.size(1);
  at::Tensor wt = at::empty({K, N}, tiles.options().dtype(at::kFloat));
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  float* wp = wt.data_ptr<float>();
  dispatch(qtype, [&](auto fmt) {
    using F = decltype(fmt);
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t g = 0; g < K / F::QB; ++g) {
          const uint8_t* b = tp + t * tile_row + g * F::TILE;
          float* o = wp + g * F::QB * N + t * R;  // o[j * N + r]: W[16t + r, QB g + j]
          for (int64_t s = 0; s < F::QB / F::SB; ++s) {
            float* os = o + s * F::SB * N;
            if constexpr (F::kFloat) {
              F::columns(b, s, [&](int64_t j, vf q) { vstore(os + j * N, q); });
            } else {
              vf d, m = vf::set(0.f);
              F::scales(b, s, d, m);
              if constexpr (F::kType == 14)  // Q6_K: d (q - 32), one rounding as gguf-py's
                F::columns(b, s, [&](int64_t j, vf q) { vstore(os + j * N, (q - 32.f) * d); });
              else if constexpr (F::kMin)  // d q + m: d q is exact
                F::columns(b, s, [&](int64_t j, vf q) { vstore(os + j * N, q * d + m); });
              else
                F::columns(b, s, [&](int64_t j, vf q) { vstore(os + j * N, q * d); });
            }
          }
        }
    });
  });
  return wt;
}

// Sum of x[0, n) * y[0, n) in 16 independent partial sums (the compiler vectorizes them).
inline float dot(const float* x, const float* y, int64_t n) {
  float lanes[16] = {0.f};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += x[j + l] * y[j + l];
  float s = 0.f;
  for (; j < n; ++j) s += x[j] * y[j];
  for (int l = 0; l < 16; ++l) s += lanes[l];
  return s;
}

#ifdef EXO_GGUF_AVX512
// e^x for 16 floats, inputs clamped to [-87.3, 88.3]: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2,
// e^r by its degree-6 polynomial, times 2^n by vscalefps), within a few ulp of std::exp.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }
#else
// e^x of 16 lanes in the generic vectors, inputs clamped to [-87.3, 88.3]: the same Cephes expf
// as exp512 (n = round(x / ln2) by the 1.5 * 2^23 rounding trick, 2^n built in the exponent
// bits), for the targets without AVX-512 (a scalar std::exp per element cost a Gemma decode step
// ~1 ms in its GeGLU and softmax on an AVX2 machine).
inline vf exp16(vf x) {
  for (int i = 0; i < vf::N; ++i) {
    x.p[i] = x.p[i] < -87.3f ? -87.3f : x.p[i];
    x.p[i] = x.p[i] > 88.3f ? 88.3f : x.p[i];
  }
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504088896341f + kRound) - kRound;
  vf r = x - n * 0.693359375f;  // ln2 in two parts: r exact
  r = r - n * -2.12194440e-4f;
  vf p = vf::set(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.0f);
  vi e;  // 2^n: n + 127 in the exponent bits (n in [-126, 128): the clamp keeps it there)
  for (int i = 0; i < vf::N; ++i) e.p[i] = (__builtin_convertvector(n.p[i], vi::reg) + 127) << 23;
  return p * e.as<float>();
}
#endif

// x[i] = e^(x[i] - shift) for i < n; returns their sum.
inline float exp_shifted(float* x, int64_t n, float shift) {
#ifdef EXO_GGUF_AVX512
  __m512 sum = _mm512_setzero_ps();
  const __m512 s = _mm512_set1_ps(shift);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), s));
    _mm512_mask_storeu_ps(x + i, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.f;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vf e = exp16(vload(x + i) - shift);
    vstore(x + i, e);
    float lanes[16];
    e.store(lanes);
    for (int l = 0; l < 16; ++l) sum += lanes[l];
  }
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
#endif
}

// SwiGLU's product (Shazeer 2020, arXiv:2002.05202): out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + e^-g).
inline void swiglu(const float* gate, const float* up, int64_t n, float* out) {
#ifdef EXO_GGUF_AVX512
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + i)));
  }
#else
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vf g = vload(gate + i);
    vstore(out + i, g / (exp16(-g) + 1.0f) * vload(up + i));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
#endif
}

// GeGLU's product with GELU's tanh approximation (Hendrycks & Gimpel 2016, arXiv:1606.08415;
// Shazeer 2020): out[i] = gelu_tanh(gate[i]) * up[i], gelu_tanh(g) = g (1 + tanh(u)) / 2 with
// u = sqrt(2 / pi) (g + 0.044715 g^3), computed as g / (1 + e^(-2u)) (the same function:
// (1 + tanh(u)) / 2 = 1 / (1 + e^(-2u))), as torch's gelu(approximate="tanh") up to rounding.
inline void geglu(const float* gate, const float* up, int64_t n, float* out) {
  constexpr float kMinus2Sqrt2OverPi = -1.5957691216057308f, kCubic = 0.044715f;
#ifdef EXO_GGUF_AVX512
  const __m512 c = _mm512_set1_ps(kMinus2Sqrt2OverPi), k = _mm512_set1_ps(kCubic), one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 t = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(k, g), _mm512_mul_ps(g, g), g));  // -2u
    const __m512 gelu = _mm512_div_ps(g, _mm512_add_ps(one, exp512(t)));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(gelu, _mm512_maskz_loadu_ps(m, up + i)));
  }
#else
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vf g = vload(gate + i);
    vstore(out + i, g / (exp16((g * kCubic * (g * g) + g) * kMinus2Sqrt2OverPi) + 1.0f) * vload(up + i));
  }
  for (; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(kMinus2Sqrt2OverPi * (g + kCubic * g * g * g))) * up[i];
  }
#endif
}

#ifdef EXO_GGUF_AVX512
// The 16 horizontal sums of v[0..15] as one vector: lane i = v[i][0] + ... + v[i][15]. A
// transpose-and-add tree (45 shuffles and adds for the 16 sums, against some 128 for one
// _mm512_reduce_add_ps each); v is overwritten.
inline __m512 sum16(__m512* v) {
  __m512 p[8], w[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [v2k, v2k+1, v2k, v2k+1] partial sums
    p[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int m = 0; m < 4; ++m) {  // per 128-bit lane: [v4m, v4m+1, v4m+2, v4m+3] partial sums
    const __m512d a = _mm512_castps_pd(p[2 * m]), b = _mm512_castps_pd(p[2 * m + 1]);
    w[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y01, y23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// attend_group (below) for D = 16 * NV (NV = 1..16): scores 16 keys at a time (one sum16 per query head),
// then the weighted sum of the values for up to GC query heads at once, so each value row is
// read once per GC heads and the GC * NV accumulators stay in registers.
template <int NV>
void attend_group_avx512(const float* q, int64_t G, const float* kb, const float* vb, int64_t L, float scale, float* scores,
                         float* o) {
  constexpr int64_t D = 16 * NV, GC = 24 / NV;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < L; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, L - t0);
    for (int64_t g = 0; g < G; ++g) {
      __m512 qv[NV], acc[16];
      for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(q + g * D + 16 * v);
      for (int i = 0; i < 16; ++i) {
        if (i < n) {
          const float* kt = kb + (t0 + i) * D;
          __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kt));
          for (int v = 1; v < NV; ++v) a = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(kt + 16 * v), a);
          acc[i] = a;
        } else {
          acc[i] = _mm512_setzero_ps();
        }
      }
      _mm512_mask_storeu_ps(scores + g * L + t0, tail_mask(n), _mm512_mul_ps(sum16(acc), sc));
    }
  }
  float inv[GC];
  for (int64_t g0 = 0; g0 < G; g0 += GC) {
    const int64_t gc = std::min(GC, G - g0);
    for (int64_t g = g0; g < g0 + gc; ++g) {
      float* s = scores + g * L;
      __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < L; t += 16) mx = _mm512_mask_max_ps(mx, tail_mask(L - t), mx, _mm512_maskz_loadu_ps(tail_mask(L - t), s + t));
      inv[g - g0] = 1.0f / exp_shifted(s, L, _mm512_reduce_max_ps(mx));
    }
    __m512 a[GC][NV];
    for (int g = 0; g < GC; ++g)
      for (int v = 0; v < NV; ++v) a[g][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      __m512 vt[NV];
      for (int v = 0; v < NV; ++v) vt[v] = _mm512_loadu_ps(vb + t * D + 16 * v);
      for (int g = 0; g < GC; ++g) {
        if (g < gc) {
          const __m512 p = _mm512_set1_ps(scores[(g0 + g) * L + t]);
          for (int v = 0; v < NV; ++v) a[g][v] = _mm512_fmadd_ps(p, vt[v], a[g][v]);
        }
      }
    }
    for (int g = 0; g < GC; ++g)
      if (g < gc)
        for (int v = 0; v < NV; ++v)
          _mm512_storeu_ps(o + (g0 + g) * D + 16 * v, _mm512_mul_ps(a[g][v], _mm512_set1_ps(inv[g])));
  }
}
#endif

// Attention of the G query heads q (G, D) that share one KV head, over its L cached keys kb and
// values vb (L, D): o[g] = softmax(q[g] . K^T * scale) V. scores: room for G * L floats.
void attend_group(const float* q, int64_t G, const float* kb, const float* vb, int64_t L, int64_t D, float scale,
                  float* scores, float* o) {
#ifdef EXO_GGUF_AVX512
  using Kernel = void (*)(const float*, int64_t, const float*, const float*, int64_t, float, float*, float*);
  static constexpr Kernel kernels[] = {  // by D / 16: every head size that is a multiple of 16, up to 256
      attend_group_avx512<1>,  attend_group_avx512<2>,  attend_group_avx512<3>,  attend_group_avx512<4>,
      attend_group_avx512<5>,  attend_group_avx512<6>,  attend_group_avx512<7>,  attend_group_avx512<8>,
      attend_group_avx512<9>,  attend_group_avx512<10>, attend_group_avx512<11>, attend_group_avx512<12>,
      attend_group_avx512<13>, attend_group_avx512<14>, attend_group_avx512<15>, attend_group_avx512<16>};
  if (D % 16 == 0 && D >= 16 && D <= 256) return kernels[D / 16 - 1](q, G, kb, vb, L, scale, scores, o);
#endif
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * L;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < L; ++t) {
      s[t] = dot(q + g * D, kb + t * D, D) * scale;
      mx = std::max(mx, s[t]);
    }
    const float inv = 1.0f / exp_shifted(s, L, mx);
    float* og = o + g * D;
    std::fill(og, og + D, 0.f);
    for (int64_t t = 0; t < L; ++t) {
      const float p = s[t] * inv;
      const float* vt = vb + t * D;
      for (int64_t d = 0; d < D; ++d) og[d] += p * vt[d];
    }
  }
}

// The arithmetic of decode_attention: request b's query heads at qp + b * q_stride (H, D), its
// new key and value heads at k_new / v_new + b * kv_stride (KV, D); its cache buffers kp[b],
// vp[b] (KV, caps[b], D), filled up to offsets[b]; output (B, H, D) at op. Query head h reads
// KV head h / (H / KV); logits are scaled by `scale`; with window W > 0 the query at position
// p = offsets[b] reads keys max(0, p + 1 - W) .. p only (and only those are read). The work is
// split by (request, KV head).
void attend(const float* qp, int64_t q_stride, const float* k_new, const float* v_new, int64_t kv_stride, int64_t B,
            int64_t H, int64_t KV, int64_t D, float* const* kp, float* const* vp, const int64_t* caps,
            const int64_t* offsets, float scale, int64_t window, float* op) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KV; ++h) {  // append this step's keys and values
      std::memcpy(kp[b] + (h * caps[b] + offsets[b]) * D, k_new + b * kv_stride + h * D, D * sizeof(float));
      std::memcpy(vp[b] + (h * caps[b] + offsets[b]) * D, v_new + b * kv_stride + h * D, D * sizeof(float));
    }
  const int64_t group = H / KV;
  WorkerPool::get().parallel_for(B * KV, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KV, kvh = i % KV, pos = offsets[b], cap = caps[b];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, pos + 1 - window) : 0, L = pos + 1 - lo;
      scores.resize(group * L);
      attend_group(qp + b * q_stride + kvh * group * D, group, kp[b] + (kvh * cap + lo) * D, vp[b] + (kvh * cap + lo) * D, L,
                   D, scale, scores.data(), op + (b * H + kvh * group) * D);
    }
  });
}

// Caches first .. first + B - 1 of k_caches / v_caches: exo's KVCache buffers (1, KV, capacity,
// D) float32, contiguous, each holding offsets[i] tokens, below its capacity.
void check_caches(at::TensorList k_caches, at::TensorList v_caches, const int64_t* offsets, int64_t first, int64_t B,
                  int64_t KV, int64_t D, const char* op) {
  for (int64_t i = first; i < first + B; ++i) {
    const at::Tensor& kc = k_caches[i];
    const at::Tensor& vc = v_caches[i];
    TORCH_CHECK(kc.dim() == 4 && kc.size(0) == 1 && kc.size(1) == KV && kc.size(3) == D && kc.is_contiguous() &&
                    kc.scalar_type() == at::kFloat && vc.sizes() == kc.sizes() && vc.is_contiguous() &&
                    vc.scalar_type() == at::kFloat,
                op, ": cache ", i, " must be contiguous (1, ", KV, ", capacity, ", D, ") float32, got ", kc.sizes());
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] < kc.size(2), op, ": offset ", offsets[i], " outside the cache capacity ",
                kc.size(2));
  }
}

// The data pointers and capacities of caches first .. first + B - 1, by b.
void cache_pointers(at::TensorList k_caches, at::TensorList v_caches, int64_t first, int64_t B, float** kp, float** vp,
                    int64_t* caps) {
  for (int64_t b = 0; b < B; ++b) {
    kp[b] = k_caches[first + b].data_ptr<float>();
    vp[b] = v_caches[first + b].data_ptr<float>();
    caps[b] = k_caches[first + b].size(2);
  }
}

// One decode step of attention for B requests, each over its own KV cache (no padding):
// appends k_new[b], v_new[b] (KV, D) to request b's cache at position p = offsets[b], then
// out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b over keys lo .. p, lo = max(0, p + 1 - window)
// for a sliding window (window > 0: the query sees itself and the window - 1 keys before it),
// else 0, with query head h reading KV head h / (H / KV) (grouped-query attention, Ainslie et
// al. 2023, arXiv:2305.13245). q (B, H, D), k_new / v_new (B, KV, D) float32; the caches are
// the (1, KV, capacity, D) float32 buffers of exo's KVCache, capacity > offsets[b]. One call
// per layer instead of a handful of torch operations per request; the softmax subtracts the row
// maximum and everything is float32, as torch's scaled_dot_product_attention on a CPU.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                            at::TensorList k_caches, at::TensorList v_caches, at::IntArrayRef offsets, double scale,
                            int64_t window) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat && q_in.device().is_cpu(),
              "decode_attention: q must be (B, H, D) float32 on the CPU, got ", q_in.sizes(), " ", q_in.scalar_type());
  const at::Tensor q = q_in.contiguous(), k_new = k_new_in.contiguous(), v_new = v_new_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(k_new.dim() == 3 && k_new.size(0) == B && k_new.size(2) == D && k_new.scalar_type() == at::kFloat &&
                  v_new.sizes() == k_new.sizes() && v_new.scalar_type() == at::kFloat,
              "decode_attention: k_new and v_new must be (B, KV, D) float32 like q, got ", k_new.sizes(), " and ", v_new.sizes());
  const int64_t KV = k_new.size(1);
  TORCH_CHECK(KV > 0 && H % KV == 0, "decode_attention: ", H, " query heads are not a multiple of ", KV, " KV heads");
  TORCH_CHECK(window >= 0, "decode_attention: window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == B && static_cast<int64_t>(v_caches.size()) == B &&
                  static_cast<int64_t>(offsets.size()) == B,
              "decode_attention: one KV cache and offset per request");
  check_caches(k_caches, v_caches, offsets.data(), 0, B, KV, D, "decode_attention");
  std::vector<float*> kp(B), vp(B);
  std::vector<int64_t> caps(B);
  cache_pointers(k_caches, v_caches, 0, B, kp.data(), vp.data(), caps.data());
  at::Tensor out = at::empty({B, H, D}, q.options());
  attend(q.data_ptr<float>(), H * D, k_new.data_ptr<float>(), v_new.data_ptr<float>(), KV * D, B, H, KV, D, kp.data(),
         vp.data(), caps.data(), offsets.data(), static_cast<float>(scale), window, out.data_ptr<float>());
  return out;
}

// RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) of `rows` rows of n: y = w * x / sqrt(mean(x^2) + eps).
// y may be x.
void rms_norm_into(const float* x, const float* w, int64_t rows, int64_t n, float eps, float* y) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * n;
    const float r = 1.0f / std::sqrt(dot(xi, xi, n) / static_cast<float>(n) + eps);
    for (int64_t j = 0; j < n; ++j) y[i * n + j] = w[j] * (xi[j] * r);
  }
}

// decode_layers' weight slots per layer: exo/models/architectures.py LAYER_KEYS.
enum Slot : int64_t {
  kAttnNorm, kQ, kK, kV, kQBias, kKBias, kVBias, kQNorm, kKNorm, kO, kAttnPostNorm, kFfnNorm, kGate, kUp, kDown,
  kFfnPostNorm, kSlots
};
constexpr const char* kSlotNames[kSlots] = {"attn_norm", "q",      "k",        "v",    "q_bias", "k_bias",
                                            "v_bias",    "q_norm", "k_norm",   "o",    "attn_post_norm",
                                            "ffn_norm",  "gate",   "up",       "down", "ffn_post_norm"};

// A vector slot: float32 contiguous of n (or, where optional, empty: absent). Returns its data
// or nullptr when absent.
const float* layer_vector(const at::Tensor& w, int64_t n, bool optional, int64_t layer, int64_t slot) {
  if (optional && w.numel() == 0) return nullptr;
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == n,
              "decode_layers: layer ", layer, "'s ", kSlotNames[slot], " must be ", optional ? "empty or " : "",
              "contiguous float32 of ", n, ", got ", w.sizes(), " ", w.scalar_type());
  return w.data_ptr<float>();
}

// A matrix slot: contiguous tiles of GGML type qtype holding (rows, cols).
void layer_matrix(const at::Tensor& w, int64_t qtype, int64_t rows, int64_t cols, int64_t layer, int64_t slot) {
  const std::string op = "decode_layers (layer " + std::to_string(layer) + "'s " + kSlotNames[slot] + ")";
  const Format& f = format_of(qtype, op.c_str());
  check_tiles(w, f, cols, op.c_str());
  TORCH_CHECK(w.is_contiguous() && w.size(0) * R == rows, op, ": ", f.name, " tiles of ", w.size(0) * R,
              " rows, expected ", rows, " rows of ", cols, " (contiguous)");
}

// One layer's pointers, checked.
struct LayerWeights {
  const float *attn_norm, *q_bias, *k_bias, *v_bias, *q_norm, *k_norm, *attn_post_norm, *ffn_norm, *ffn_post_norm;
  bool fused_qkv, fused_gate_up;
  int64_t I;  // intermediate size
};

// Decode steps of B requests through L consecutive transformer layers of the block exo's
// architectures share (exo/models/architectures.py; all float32, the arithmetic of the
// engines' torch modules), in one call, so that a step pays one operator dispatch per shard
// instead of some thirty per layer. Per layer l, with h the residual stream:
//   xn = rmsnorm(h, attn_norm); q, k, v = projections of xn (+ biases where present);
//   rmsnorm over each head's D values of q and k (q_norm, k_norm, where present); RoPE on the
//   first rope_dim dims of each q and k head (table layer_rope[l]); the step's k, v appended to
//   the caches, attention over them (scale attn_scale, sliding window layer_window[l] > 0);
//   a = o(attn) (rmsnorm(a, attn_post_norm) where present); h += a;
//   xn = rmsnorm(h, ffn_norm); f = down(act(gate(xn)) * up(xn)) (rmsnorm(f, ffn_post_norm)
//   where present); h += f.
//   x: (B, 1, hidden) or (B, hidden) float32 hidden states, one row per request.
//   weights: 16 per layer in the slots of kSlotNames (LAYER_KEYS). Matrices (q, k, v, o, gate,
//     up, down) are tiles of the slot's GGML type in qtypes (16 per layer; any value for the
//     vector slots; layers may differ); vectors are contiguous float32. An absent optional slot
//     (biases, q_norm / k_norm, attn_post_norm / ffn_post_norm) is an empty tensor. With k and v
//     empty, q holds the fused rows (H + 2 KV) * D (Q, then K, then V) and q_bias (if present)
//     the fused bias; with up empty, gate holds I rows of gate, then I of up.
//   cos, sin: RoPE tables, each (B, rope_dim) at each request's position, sin with the first
//     half of each row negated (RoFormer, "rotate half" layout over the first rope_dim dims:
//     x * cos + swap_halves(x) * sin; the other D - rope_dim dims pass unchanged);
//     layer_rope[l] picks layer l's table. layer_window[l]: 0, or the sliding window W.
//   k_caches, v_caches: L * B buffers (1, KV, capacity, D), layer-major; offsets: L * B tokens
//     already held, each below its capacity. Each step's keys and values are appended.
//   activation: 0 SwiGLU (silu), 1 GeGLU (gelu, tanh approximation).
//   allow_amx: false keeps every product on the float32 path, so that each request's row is
//     computed exactly as it is alone, whatever B (batch invariance; see linear_into_t); true
//     lets products of amx_rows() rows or more take the AMX path, if built.
// Returns the hidden states after the last layer, shaped as x.
at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef qtypes, at::TensorList cos_in,
                         at::TensorList sin_in, at::IntArrayRef layer_rope, at::IntArrayRef layer_window,
                         at::TensorList k_caches, at::TensorList v_caches, at::IntArrayRef offsets, int64_t n_heads,
                         int64_t n_kv_heads, int64_t head_dim, int64_t rope_dim, double eps, double attn_scale,
                         int64_t activation, bool allow_amx) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() >= 2 && x_in.size(-1) > 0,
              "decode_layers: x must be (B, 1, hidden) float32 on the CPU, got ", x_in.sizes(), " ", x_in.scalar_type());
  TORCH_CHECK(!weights.empty() && weights.size() % kSlots == 0 && qtypes.size() == weights.size(),
              "decode_layers: ", kSlots, " weights and ", kSlots, " GGML types per layer, got ", weights.size(), " and ",
              qtypes.size());
  const int64_t L = weights.size() / kSlots, hidden = x_in.size(-1), B = x_in.numel() / hidden;
  const int64_t H = n_heads, KV = n_kv_heads, D = head_dim;
  TORCH_CHECK(B > 0 && H > 0 && KV > 0 && H % KV == 0, "decode_layers: ", H, " query heads are not a multiple of ", KV,
              " KV heads");
  TORCH_CHECK(D > 0 && rope_dim >= 0 && rope_dim <= D && rope_dim % 2 == 0, "decode_layers: rope_dim (", rope_dim,
              ") must be even and at most head_dim (", D, ")");
  TORCH_CHECK(activation == 0 || activation == 1, "decode_layers: activation must be 0 (silu) or 1 (gelu_tanh), got ",
              activation);
  TORCH_CHECK(static_cast<int64_t>(layer_rope.size()) == L && static_cast<int64_t>(layer_window.size()) == L,
              "decode_layers: one layer_rope and one layer_window per layer (", L, "), got ", layer_rope.size(), " and ",
              layer_window.size());
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == L * B && static_cast<int64_t>(v_caches.size()) == L * B &&
                  static_cast<int64_t>(offsets.size()) == L * B,
              "decode_layers: one KV cache and offset per layer and request (", L * B, "), got ", k_caches.size(), ", ",
              v_caches.size(), ", ", offsets.size());
  TORCH_CHECK(cos_in.size() == sin_in.size(), "decode_layers: as many cos as sin tables, got ", cos_in.size(), " and ",
              sin_in.size());
  std::vector<at::Tensor> cos, sin;
  for (size_t i = 0; i < cos_in.size(); ++i) {
    cos.push_back(cos_in[i].contiguous());
    sin.push_back(sin_in[i].contiguous());
    TORCH_CHECK(cos[i].device().is_cpu() && cos[i].scalar_type() == at::kFloat && sin[i].scalar_type() == at::kFloat &&
                    sin[i].device().is_cpu() && cos[i].numel() == B * rope_dim && sin[i].numel() == B * rope_dim,
                "decode_layers: RoPE table ", i, " must be cos and sin (B, rope_dim) = (", B, ", ", rope_dim,
                ") float32, got ", cos[i].sizes(), " and ", sin[i].sizes());
  }
  const int64_t n_q = H * D, n_kv = KV * D, n_qkv = n_q + 2 * n_kv;
  std::vector<LayerWeights> lw(L);
  int64_t max_I = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[kSlots * l];
    const int64_t* qt = qtypes.data() + kSlots * l;
    LayerWeights& p = lw[l];
    TORCH_CHECK(layer_rope[l] >= 0 && layer_rope[l] < static_cast<int64_t>(cos.size()) && layer_window[l] >= 0,
                "decode_layers: layer ", l, " has RoPE table ", layer_rope[l], " of ", cos.size(), " and window ",
                layer_window[l]);
    p.attn_norm = layer_vector(w[kAttnNorm], hidden, false, l, kAttnNorm);
    p.ffn_norm = layer_vector(w[kFfnNorm], hidden, false, l, kFfnNorm);
    p.attn_post_norm = layer_vector(w[kAttnPostNorm], hidden, true, l, kAttnPostNorm);
    p.ffn_post_norm = layer_vector(w[kFfnPostNorm], hidden, true, l, kFfnPostNorm);
    p.q_norm = layer_vector(w[kQNorm], D, true, l, kQNorm);
    p.k_norm = layer_vector(w[kKNorm], D, true, l, kKNorm);
    p.fused_qkv = w[kK].numel() == 0 && w[kV].numel() == 0;
    if (p.fused_qkv) {
      layer_matrix(w[kQ], qt[kQ], n_qkv, hidden, l, kQ);
      p.q_bias = layer_vector(w[kQBias], n_qkv, true, l, kQBias);
      TORCH_CHECK(w[kKBias].numel() == 0 && w[kVBias].numel() == 0, "decode_layers: layer ", l,
                  " has fused q, k, v rows: its bias is q_bias alone (k_bias and v_bias empty)");
      p.k_bias = p.v_bias = nullptr;
    } else {
      layer_matrix(w[kQ], qt[kQ], n_q, hidden, l, kQ);
      layer_matrix(w[kK], qt[kK], n_kv, hidden, l, kK);
      layer_matrix(w[kV], qt[kV], n_kv, hidden, l, kV);
      p.q_bias = layer_vector(w[kQBias], n_q, true, l, kQBias);
      p.k_bias = layer_vector(w[kKBias], n_kv, true, l, kKBias);
      p.v_bias = layer_vector(w[kVBias], n_kv, true, l, kVBias);
    }
    layer_matrix(w[kO], qt[kO], hidden, n_q, l, kO);
    p.fused_gate_up = w[kUp].numel() == 0;
    TORCH_CHECK(w[kGate].dim() == 2 && w[kDown].dim() == 2, "decode_layers: layer ", l, "'s gate and down must be tiles");
    p.I = p.fused_gate_up ? w[kGate].size(0) * R / 2 : w[kGate].size(0) * R;
    TORCH_CHECK(p.I > 0, "decode_layers: layer ", l, " has no gate rows");
    layer_matrix(w[kGate], qt[kGate], p.fused_gate_up ? 2 * p.I : p.I, hidden, l, kGate);
    if (!p.fused_gate_up) layer_matrix(w[kUp], qt[kUp], p.I, hidden, l, kUp);
    layer_matrix(w[kDown], qt[kDown], hidden, p.I, l, kDown);
    max_I = std::max(max_I, p.I);
    check_caches(k_caches, v_caches, offsets.data(), l * B, B, KV, D, "decode_layers");
  }
  at::Tensor out = x_in.contiguous().clone();
  float* h = out.data_ptr<float>();
  const float feps = static_cast<float>(eps), scale = static_cast<float>(attn_scale);
  std::vector<float> xn(B * hidden), qkv(B * n_qkv), part(B * n_q), att(B * n_q), delta(B * hidden), gu(B * 2 * max_I),
      act(B * max_I), rot(D);
  std::vector<float*> kp(B), vp(B);
  std::vector<int64_t> caps(B);
  const int64_t half = rope_dim / 2;
  auto project = [&](const float* in, int64_t K, const at::Tensor& w, int64_t qtype, float* y) {
    linear_into(in, B, K, w.data_ptr<uint8_t>(), w.size(0), w.size(1), qtype, y, allow_amx);
  };
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[kSlots * l];
    const int64_t* qt = qtypes.data() + kSlots * l;
    const LayerWeights& p = lw[l];
    rms_norm_into(h, p.attn_norm, B, hidden, feps, xn.data());
    if (p.fused_qkv) {
      project(xn.data(), hidden, w[kQ], qt[kQ], qkv.data());
    } else {  // into the fused layout, (B, H D + 2 KV D)
      const int64_t slots[3] = {kQ, kK, kV}, sizes[3] = {n_q, n_kv, n_kv}, at[3] = {0, n_q, n_q + n_kv};
      for (int k = 0; k < 3; ++k) {
        project(xn.data(), hidden, w[slots[k]], qt[slots[k]], part.data());
        for (int64_t b = 0; b < B; ++b)
          std::memcpy(qkv.data() + b * n_qkv + at[k], part.data() + b * sizes[k], sizes[k] * sizeof(float));
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      float* row = qkv.data() + b * n_qkv;
      if (p.fused_qkv && p.q_bias) {
        for (int64_t i = 0; i < n_qkv; ++i) row[i] += p.q_bias[i];
      } else {
        if (p.q_bias)
          for (int64_t i = 0; i < n_q; ++i) row[i] += p.q_bias[i];
        if (p.k_bias)
          for (int64_t i = 0; i < n_kv; ++i) row[n_q + i] += p.k_bias[i];
        if (p.v_bias)
          for (int64_t i = 0; i < n_kv; ++i) row[n_q + n_kv + i] += p.v_bias[i];
      }
      if (p.q_norm) rms_norm_into(row, p.q_norm, H, D, feps, row);
      if (p.k_norm) rms_norm_into(row + n_q, p.k_norm, KV, D, feps, row + n_q);
      const float* c = cos[layer_rope[l]].data_ptr<float>() + b * rope_dim;
      const float* sn = sin[layer_rope[l]].data_ptr<float>() + b * rope_dim;
      for (int64_t j = 0; j < H + KV; ++j) {  // RoPE on the query and key heads
        float* v = row + j * D;
        std::memcpy(rot.data(), v, rope_dim * sizeof(float));
        for (int64_t d = 0; d < half; ++d) v[d] = rot[d] * c[d] + rot[d + half] * sn[d];
        for (int64_t d = half; d < rope_dim; ++d) v[d] = rot[d] * c[d] + rot[d - half] * sn[d];
      }
    }
    cache_pointers(k_caches, v_caches, l * B, B, kp.data(), vp.data(), caps.data());
    attend(qkv.data(), n_qkv, qkv.data() + n_q, qkv.data() + n_q + n_kv, n_qkv, B, H, KV, D, kp.data(), vp.data(),
           caps.data(), offsets.data() + l * B, scale, layer_window[l], att.data());
    project(att.data(), n_q, w[kO], qt[kO], delta.data());
    if (p.attn_post_norm) rms_norm_into(delta.data(), p.attn_post_norm, B, hidden, feps, delta.data());
    for (int64_t i = 0; i < B * hidden; ++i) h[i] += delta[i];
    rms_norm_into(h, p.ffn_norm, B, hidden, feps, xn.data());
    const int64_t I = p.I;
    const float *gate, *up;
    int64_t stride;  // between requests' rows of gate and of up
    if (p.fused_gate_up) {
      project(xn.data(), hidden, w[kGate], qt[kGate], gu.data());
      gate = gu.data(), up = gu.data() + I, stride = 2 * I;
    } else {
      project(xn.data(), hidden, w[kGate], qt[kGate], gu.data());
      project(xn.data(), hidden, w[kUp], qt[kUp], gu.data() + B * I);
      gate = gu.data(), up = gu.data() + B * I, stride = I;
    }
    for (int64_t b = 0; b < B; ++b) {
      if (activation == 0) swiglu(gate + b * stride, up + b * stride, I, act.data() + b * I);
      else geglu(gate + b * stride, up + b * stride, I, act.data() + b * I);
    }
    project(act.data(), I, w[kDown], qt[kDown], delta.data());
    if (p.ffn_post_norm) rms_norm_into(delta.data(), p.ffn_post_norm, B, hidden, feps, delta.data());
    for (int64_t i = 0; i < B * hidden; ++i) h[i] += delta[i];
  }
  return out;
}

void set_threads(int64_t n) { WorkerPool::get().set_threads(n); }
int64_t get_threads() { return WorkerPool::get().threads(); }
void set_spin(bool on) { WorkerPool::get().set_spin(on); }

// Sets the fewest activation rows of a matrix product that take the AMX tile path (0: never)
// and returns the value in force: 0 where the path is not built or the OS refuses it.
int64_t set_amx_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "set_amx_rows: rows must be >= 0, got ", rows);
#ifdef EXO_GGUF_AMX
  if (!amx_permitted()) return 0;
  amx_min_rows.store(rows);
  return rows;
#else
  return 0;
#endif
}
int64_t get_amx_rows() {
#ifdef EXO_GGUF_AMX
  return amx_threshold();
#else
  return 0;
#endif
}

}  // namespace

// The operator namespace: torch.ops.exo_gguf (a test builds the portable path under another).
#ifndef EXO_GGUF_NAMESPACE
#define EXO_GGUF_NAMESPACE exo_gguf
#endif

TORCH_LIBRARY(EXO_GGUF_NAMESPACE, m) {
  m.def("pack(Tensor blocks, int qtype) -> Tensor");
  m.def("linear(Tensor x, Tensor tiles, int qtype, bool allow_amx=True) -> Tensor");
  m.def("dequantize_rows(Tensor tiles, int qtype, int K, Tensor rows) -> Tensor");
  m.def("dequantize_t(Tensor tiles, int qtype, int K) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "int[] offsets, float scale, int window) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] qtypes, Tensor[] cos, Tensor[] sin, int[] layer_rope, "
        "int[] layer_window, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int[] offsets, int n_heads, int n_kv_heads, "
        "int head_dim, int rope_dim, float eps, float attn_scale, int activation, bool allow_amx=True) -> Tensor");
  m.def("block_format(int qtype) -> int[]");
  m.def("set_threads(int n) -> ()");
  m.def("get_threads() -> int");
  m.def("set_spin(bool on) -> ()");
  m.def("set_amx_rows(int rows) -> int");
  m.def("amx_rows() -> int");
}

TORCH_LIBRARY_IMPL(EXO_GGUF_NAMESPACE, CatchAll, m) {
  m.impl("set_threads", set_threads);
  m.impl("get_threads", get_threads);
  m.impl("set_spin", set_spin);
  m.impl("set_amx_rows", set_amx_rows);
  m.impl("amx_rows", get_amx_rows);
  m.impl("block_format", block_format);
}

TORCH_LIBRARY_IMPL(EXO_GGUF_NAMESPACE, CPU, m) {
  m.impl("pack", pack);
  m.impl("linear", linear);
  m.impl("dequantize_rows", dequantize_rows);
  m.impl("dequantize_t", dequantize_t);
  m.impl("decode_attention", decode_attention);
  m.impl("decode_layers", decode_layers);
}
