// Matrix products straight from GGUF quantized weights, in float32, on the CPU.
//
// Source formats (ggml's, ggml-common.h; gguf-py's quants.py dequantizes them the same way), a
// block of 32 consecutive weights of one row:
//   Q4_1 (GGML type 3): d (fp16), m (fp16), qs[16];
//         w[j] = d * (qs[j] & 15) + m and w[j + 16] = d * (qs[j] >> 4) + m for j < 16.
//   Q8_0 (GGML type 8): d (fp16), qs[32] (int8); w[j] = d * qs[j].
//
// Tiled layout (what `pack` makes and the other ops take): rows are grouped 16 at a time so
// that one SIMD lane holds one output row. A matrix (N, K), N a multiple of 16, becomes a uint8
// tensor (N / 16, G * tile_bytes), G = K / 32 blocks per row; tile (t, g) holds block g of rows
// 16t .. 16t + 15:
//   Q4_1: d[16] (fp16), m[16] (fp16), qs[16][16] (qs[j][r]: byte j of row r's block): 320 bytes
//   Q8_0: d[16] (fp16), qs[32][16] (int8, qs[j][r]): 544 bytes
// The bytes per weight are the file's (0.625 for Q4_1, 1.0625 for Q8_0).
//
// y = x @ W.T keeps activations and accumulation in float32 (llama.cpp instead rounds the
// activations to 8 bits), so it agrees with a float32 matmul on the dequantized weights up to
// summation order. Per block: sum_j w[j] x[j] = d * sum_j q[j] x[j] + m * sum_j x[j]. On a CPU
// with AMX, products of enough rows take the tile unit instead (linear_amx below), in bfloat16
// with each activation split into two parts, within the same error bound.
// Tiles are split over this library's own worker threads (WorkerPool below) rather than
// OpenMP's: an idle OpenMP worker keeps spinning for GOMP_SPINCOUNT iterations after each
// parallel region, which is what bridges the gaps between one forward pass's operations, but
// also what takes the cores from another node's forward pass on the same machine. These workers
// spin only while the engine says a forward pass is under way (`set_spin`) and sleep at once
// after it. `dequantize_t` (the path of long prefills, next to torch's own matmul) runs on
// torch's OpenMP threads instead (built with -fopenmp, this library shares torch's libgomp).
// With AVX-512 the inner loops use its intrinsics; elsewhere (or with
// -DEXO_GGUF_PORTABLE) plain loops that the compiler vectorizes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
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
#if !defined(EXO_GGUF_EMULATE_AVX512) && defined(EXO_GGUF_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && \
    defined(__AVX512VBMI__) && defined(__linux__)
#define EXO_GGUF_AMX 1
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

constexpr int64_t QK = 32;  // weights per block
constexpr int64_t R = 16;   // rows per tile
constexpr int64_t MB = 8;   // activation rows sharing one decode of a tile
constexpr int64_t PREFETCH = 2048;  // bytes ahead of the block being read that are prefetched

struct Format {
  int64_t block_bytes;  // bytes of one block in the file
  int64_t tile_bytes;   // bytes of one tile (16 blocks)
};

Format format_of(int64_t qtype, const char* op) {
  TORCH_CHECK(qtype == 3 || qtype == 8, op, ": unsupported GGML type ", qtype, " (Q4_1 = 3, Q8_0 = 8)");
  return qtype == 3 ? Format{20, 320} : Format{34, 544};
}

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

inline uint16_t u16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

// (N, G * block_bytes) file blocks -> (N / 16, G * tile_bytes) tiles.
at::Tensor pack(const at::Tensor& blocks_in, int64_t qtype) {
  const Format f = format_of(qtype, "gguf_pack");
  TORCH_CHECK(blocks_in.dim() == 2 && blocks_in.scalar_type() == at::kByte && blocks_in.device().is_cpu(),
              "gguf_pack: blocks must be (N, bytes) uint8 on the CPU, got ", blocks_in.sizes(), " ", blocks_in.scalar_type());
  TORCH_CHECK(blocks_in.size(0) % R == 0, "gguf_pack: rows (", blocks_in.size(0), ") must be a multiple of ", R);
  TORCH_CHECK(blocks_in.size(1) % f.block_bytes == 0, "gguf_pack: ", blocks_in.size(1),
              " bytes per row is not a whole number of ", f.block_bytes, "-byte blocks");
  const at::Tensor blocks = blocks_in.contiguous();
  const int64_t N = blocks.size(0), G = blocks.size(1) / f.block_bytes, row_bytes = blocks.size(1);
  at::Tensor tiles = at::empty({N / R, G * f.tile_bytes}, blocks.options());
  const uint8_t* src = blocks.data_ptr<uint8_t>();
  uint8_t* dst = tiles.data_ptr<uint8_t>();
  const int64_t nq = qtype == 3 ? 16 : 32, head = qtype == 3 ? 4 : 2;
  for (int64_t t = 0; t < N / R; ++t)
    for (int64_t g = 0; g < G; ++g) {
      uint8_t* o = dst + t * G * f.tile_bytes + g * f.tile_bytes;
      for (int64_t r = 0; r < R; ++r) {
        const uint8_t* b = src + (t * R + r) * row_bytes + g * f.block_bytes;
        std::memcpy(o + 2 * r, b, 2);                          // d
        if (qtype == 3) std::memcpy(o + 32 + 2 * r, b + 2, 2);  // m
        for (int64_t j = 0; j < nq; ++j) o[2 * R * (head / 2) + j * R + r] = b[head + j];
      }
    }
  return tiles;
}

// `tiles` hold a matrix of K columns: (N / 16, K / 32 * tile_bytes) uint8 on the CPU.
void check_tiles(const at::Tensor& tiles, const Format& f, int64_t K, const char* op) {
  TORCH_CHECK(tiles.dim() == 2 && tiles.scalar_type() == at::kByte && tiles.device().is_cpu(), op,
              ": tiles must be (N / 16, bytes) uint8 on the CPU");
  TORCH_CHECK(K % QK == 0 && tiles.size(1) == K / QK * f.tile_bytes, op, ": K = ", K, " does not match ",
              tiles.size(1), " bytes per tile row");
}

// Weight j of row r (0 <= r < 16) of the block at `b` of a tile (scalar: lookups and the
// portable path).
inline float weight_at(const uint8_t* b, int64_t qtype, int64_t r, int64_t j) {
  const float d = half_to_float(u16_at(b + 2 * r));
  if (qtype == 8) return d * float(static_cast<int8_t>(b[32 + j * R + r]));
  const uint8_t q = b[64 + (j % 16) * R + r];
  return d * float(j < 16 ? q & 15 : q >> 4) + half_to_float(u16_at(b + 32 + 2 * r));
}

void check_linear(const at::Tensor& x, const at::Tensor& tiles, const Format& f) {
  TORCH_CHECK(x.device().is_cpu() && tiles.device().is_cpu(), "gguf_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gguf_linear: x must be (M, K) float32, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(tiles.dim() == 2 && tiles.scalar_type() == at::kByte, "gguf_linear: tiles must be (N / 16, bytes) uint8, got ",
              tiles.sizes(), " ", tiles.scalar_type());
  TORCH_CHECK(x.size(1) % QK == 0 && tiles.size(1) == x.size(1) / QK * f.tile_bytes, "gguf_linear: x has K = ",
              x.size(1), " but the tiles hold ", tiles.size(1) / f.tile_bytes * QK, " inputs per row");
}

// Output rows [16t, 16t + 16) for activation rows [m0, m0 + mb): out[i * 16 + r]. mb is a
// template argument so that the accumulators stay in registers.
template <int64_t mb>
void tile_q4_1(const uint8_t* tile, const float* x, const float* xsum, int64_t K, int64_t m0, float* out) {
  const int64_t G = K / QK;
#ifdef EXO_GGUF_AVX512
  __m512 acc[MB];
  for (int64_t i = 0; i < mb; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = tile + g * 320;
    for (int64_t l = 0; l < 320; l += 64) _mm_prefetch(reinterpret_cast<const char*>(b + PREFETCH + l), _MM_HINT_T0);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
    __m512 s[MB];
    for (int64_t i = 0; i < mb; ++i) s[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < 16; ++j) {
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 64 + j * R)));
      const __m512 qlo = _mm512_cvtepi32_ps(_mm512_and_si512(q, low4));
      const __m512 qhi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
      for (int64_t i = 0; i < mb; ++i) {
        const float* xg = x + (m0 + i) * K + g * QK;
        s[i] = _mm512_fmadd_ps(qlo, _mm512_set1_ps(xg[j]), s[i]);
        s[i] = _mm512_fmadd_ps(qhi, _mm512_set1_ps(xg[j + 16]), s[i]);
      }
    }
    for (int64_t i = 0; i < mb; ++i) {
      acc[i] = _mm512_fmadd_ps(s[i], d, acc[i]);
      acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[(m0 + i) * G + g]), acc[i]);
    }
  }
  for (int64_t i = 0; i < mb; ++i) _mm512_storeu_ps(out + i * R, acc[i]);
#else
  for (int64_t i = 0; i < mb * R; ++i) out[i] = 0.f;
  float d[R], m[R], s[MB][R];
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = tile + g * 320;
    for (int64_t r = 0; r < R; ++r) { d[r] = half_to_float(u16_at(b + 2 * r)); m[r] = half_to_float(u16_at(b + 32 + 2 * r)); }
    for (int64_t i = 0; i < mb; ++i) std::fill(s[i], s[i] + R, 0.f);
    for (int64_t j = 0; j < 16; ++j) {
      const uint8_t* q = b + 64 + j * R;
      for (int64_t i = 0; i < mb; ++i) {
        const float xl = x[(m0 + i) * K + g * QK + j], xh = x[(m0 + i) * K + g * QK + j + 16];
        for (int64_t r = 0; r < R; ++r) s[i][r] += float(q[r] & 15) * xl + float(q[r] >> 4) * xh;
      }
    }
    for (int64_t i = 0; i < mb; ++i) {
      const float xs = xsum[(m0 + i) * G + g];
      for (int64_t r = 0; r < R; ++r) out[i * R + r] += s[i][r] * d[r] + m[r] * xs;
    }
  }
#endif
}

template <int64_t mb>
void tile_q8_0(const uint8_t* tile, const float* x, int64_t K, int64_t m0, float* out) {
  const int64_t G = K / QK;
#ifdef EXO_GGUF_AVX512
  __m512 acc[MB];
  for (int64_t i = 0; i < mb; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = tile + g * 544;
    for (int64_t l = 0; l < 544; l += 64) _mm_prefetch(reinterpret_cast<const char*>(b + PREFETCH + l), _MM_HINT_T0);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    __m512 s[MB];
    for (int64_t i = 0; i < mb; ++i) s[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < QK; ++j) {
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 + j * R))));
      for (int64_t i = 0; i < mb; ++i) s[i] = _mm512_fmadd_ps(q, _mm512_set1_ps(x[(m0 + i) * K + g * QK + j]), s[i]);
    }
    for (int64_t i = 0; i < mb; ++i) acc[i] = _mm512_fmadd_ps(s[i], d, acc[i]);
  }
  for (int64_t i = 0; i < mb; ++i) _mm512_storeu_ps(out + i * R, acc[i]);
#else
  for (int64_t i = 0; i < mb * R; ++i) out[i] = 0.f;
  float d[R], s[MB][R];
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = tile + g * 544;
    for (int64_t r = 0; r < R; ++r) d[r] = half_to_float(u16_at(b + 2 * r));
    for (int64_t i = 0; i < mb; ++i) std::fill(s[i], s[i] + R, 0.f);
    for (int64_t j = 0; j < QK; ++j) {
      const int8_t* q = reinterpret_cast<const int8_t*>(b + 32 + j * R);
      for (int64_t i = 0; i < mb; ++i) {
        const float xj = x[(m0 + i) * K + g * QK + j];
        for (int64_t r = 0; r < R; ++r) s[i][r] += float(q[r]) * xj;
      }
    }
    for (int64_t i = 0; i < mb; ++i)
      for (int64_t r = 0; r < R; ++r) out[i * R + r] += s[i][r] * d[r];
  }
#endif
}

// The tile kernels by number of activation rows (1 .. MB; the row count is a template argument).
using Q4_1Tile = void (*)(const uint8_t*, const float*, const float*, int64_t, int64_t, float*);
using Q8_0Tile = void (*)(const uint8_t*, const float*, int64_t, int64_t, float*);
constexpr Q4_1Tile kQ4_1Tiles[MB + 1] = {nullptr, tile_q4_1<1>, tile_q4_1<2>, tile_q4_1<3>, tile_q4_1<4>,
                                         tile_q4_1<5>, tile_q4_1<6>, tile_q4_1<7>, tile_q4_1<8>};
constexpr Q8_0Tile kQ8_0Tiles[MB + 1] = {nullptr, tile_q8_0<1>, tile_q8_0<2>, tile_q8_0<3>, tile_q8_0<4>,
                                         tile_q8_0<5>, tile_q8_0<6>, tile_q8_0<7>, tile_q8_0<8>};


#ifdef EXO_GGUF_AMX
// Batches of rows on the AMX tile unit, in bfloat16 with float32 accumulation but without
// rounding anything that the float32 path keeps: the weights' integers (Q4_1's 0..15 and
// Q8_0's -128..127) are exact in bfloat16, and each activation is split into two bfloat16
// parts, x = hi + lo with hi = bf16(x), lo = bf16(x - hi), which keep about 16 of float32's 24
// bits (relative error <= 2^-16). Per block g of 32 inputs and tile of 16 output rows, the unit
// computes S = sum_j x[j] q[j] for 16 activation rows at once (two TDPBF16PS, one per part,
// into one accumulator tile), and the vector unit applies the block's scales as the float32
// path does: acc += d * S (+ m * sum_j x[j] for Q4_1). The vector unit, the bottleneck of the
// float32 path at 8 or 16 rows (every multiply-add on it), now only unpacks each block of
// weights into bfloat16 pairs once for all rows and applies the scales. At 16 rows a matrix
// product takes about half the float32 path's time on this unit's 2-core machine; below
// about 8 rows the fixed cost per block loses to it (set_amx_rows).
//
// Q4_1 nibbles are unpacked without arithmetic: the bfloat16 bits 0x4300 | q are 128 + q, so
// the unit sums x * (128 + q), and the scales subtract 128 * sum_j x[j] again (that sum is
// taken over hi + lo, the values the unit multiplied, so the offset cancels up to float32
// rounding).
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
#endif
    return __builtin_cpu_supports("amx-bf16") && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Tiles 0-1: the activations' hi and lo parts (16 rows x 32 bf16); 2-4: the weights of up to
// three tiles of output rows (16 pairs of inputs x 16 rows); 5-7: their sums (16 x 16 float32).
void amx_configure() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = AMX_ROWS;
  }
  _tile_loadconfig(&c);
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

// Block g of a tile (16 rows) as the weight operand of TDPBF16PS: 16 rows of input pairs,
// row p holding (w[r][2p], w[r][2p + 1]) for r = 0..15 as bfloat16 (1 KB), and the block's
// scales: d[r], and for Q4_1 m[r] - 128 d[r] (see above).
inline void unpack_block(const uint8_t* b, int64_t qtype, int64_t tile_bytes, const __m512i& idx, uint16_t* out, float* dq,
                         float* mq) {
  for (int64_t l = 0; l < tile_bytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(b + PREFETCH + l), _MM_HINT_T0);
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  _mm512_storeu_ps(dq, d);
  if (qtype == 3) {
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
    _mm512_storeu_ps(mq, _mm512_fnmadd_ps(_mm512_set1_ps(128.f), d, m));
    const __m512i low4 = _mm512_set1_epi16(15), bias = _mm512_set1_epi16(0x4300);
    for (int64_t p = 0; p < 8; ++p) {  // qs[2p], qs[2p + 1]: inputs 2p, 2p + 1 (low) and 2p + 16, 2p + 17 (high)
      const __m512i raw = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 + 2 * p * R)));
      const __m512i w = _mm512_maskz_permutexvar_epi8(0x5555555555555555ULL, idx, raw);
      _mm512_storeu_si512(out + p * 32, _mm512_or_si512(_mm512_and_si512(w, low4), bias));
      _mm512_storeu_si512(out + (p + 8) * 32, _mm512_or_si512(_mm512_srli_epi16(w, 4), bias));
    }
  } else {
    const __m256i pairs = _mm256_set_epi8(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                          5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t p = 0; p < 16; ++p) {  // qs[2p], qs[2p + 1]
      const __m256i q = _mm256_permutexvar_epi8(pairs, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 + 2 * p * R)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
      _mm512_storeu_si512(out + p * 32, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
}

// Output rows [16t, 16t + 16 NT) of NT consecutive tiles (the first at `tile0`, the next
// `tile_row` bytes apart; `tile_bytes` per block) for all M activation rows, given as the split parts xh, xl (Mp, K)
// bf16, Mp = M rounded up to 16 (zero rows), with their block sums xsum (M, G). acc: (NT, M,
// 16) float32, the result. Scratch: wt 2 * NT KB, cbuf 2 * Mp * NT * 16 floats. The tile
// registers are configured for 16 rows.
//
// Block by block, three things overlap: the unit multiplies block g (both activation parts
// into each tile's accumulator, NT independent chains back to back: one chain alone waits on
// the unit's latency), while the vector unit scales block g - 1's sums into acc and unpacks
// block g + 1's weights (reading the weights is then hidden behind the unit's work).
template <int NT>
void amx_group(const uint8_t* tile0, int64_t tile_row, int64_t tile_bytes, int64_t qtype, const uint16_t* xh, const uint16_t* xl,
               const float* xsum, int64_t M, int64_t Mp, int64_t K, const __m512i& idx, uint16_t* wt, float* cbuf,
               float* acc) {
  static_assert(NT >= 1 && NT <= 3, "tiles 0-1: activations, 2..: weights, 5..: sums");
  const int64_t G = K / QK, stride = K * 2, MT = Mp / AMX_ROWS;
  const bool q4 = qtype == 3;
  alignas(64) float dq[2][NT][R], mq[2][NT][R];
  std::fill(acc, acc + NT * M * R, 0.f);
  auto unpack = [&](int64_t g) {
    for (int j = 0; j < NT; ++j)
      unpack_block(tile0 + j * tile_row + g * tile_bytes, qtype, tile_bytes, idx, wt + ((g % 2) * NT + j) * 512, dq[g % 2][j],
                   mq[g % 2][j]);
  };
  auto issue = [&](int64_t g) {
    const uint16_t* w = wt + (g % 2) * NT * 512;
    _tile_loadd(2, w, 64);
    if constexpr (NT > 1) _tile_loadd(3, w + 512, 64);
    if constexpr (NT > 2) _tile_loadd(4, w + 1024, 64);
    for (int64_t mt = 0; mt < MT; ++mt) {
      _tile_loadd(0, xh + mt * AMX_ROWS * K + g * QK, stride);
      _tile_loadd(1, xl + mt * AMX_ROWS * K + g * QK, stride);
      _tile_zero(5);
      if constexpr (NT > 1) _tile_zero(6);
      if constexpr (NT > 2) _tile_zero(7);
      _tile_dpbf16ps(5, 0, 2);
      if constexpr (NT > 1) _tile_dpbf16ps(6, 0, 3);
      if constexpr (NT > 2) _tile_dpbf16ps(7, 0, 4);
      _tile_dpbf16ps(5, 1, 2);
      if constexpr (NT > 1) _tile_dpbf16ps(6, 1, 3);
      if constexpr (NT > 2) _tile_dpbf16ps(7, 1, 4);
      float* c = cbuf + ((g % 2) * MT + mt) * NT * AMX_ROWS * R;
      _tile_stored(5, c, 64);
      if constexpr (NT > 1) _tile_stored(6, c + AMX_ROWS * R, 64);
      if constexpr (NT > 2) _tile_stored(7, c + 2 * AMX_ROWS * R, 64);
    }
  };
  auto read_out = [&](int64_t g) {
    for (int64_t mt = 0; mt < MT; ++mt)
      for (int j = 0; j < NT; ++j) {
        const float* c = cbuf + (((g % 2) * MT + mt) * NT + j) * AMX_ROWS * R;
        const int64_t rows = std::min(AMX_ROWS, M - mt * AMX_ROWS);
        float* o = acc + (j * M + mt * AMX_ROWS) * R;
        const float* xs = xsum + mt * AMX_ROWS * G + g;
        const __m512 d = _mm512_load_ps(dq[g % 2][j]);
        if (q4) {
          const __m512 m = _mm512_load_ps(mq[g % 2][j]);
          for (int64_t i = 0; i < rows; ++i)
            _mm512_storeu_ps(o + i * R, _mm512_fmadd_ps(m, _mm512_set1_ps(xs[i * G]),
                                                        _mm512_fmadd_ps(_mm512_loadu_ps(c + i * R), d, _mm512_loadu_ps(o + i * R))));
        } else {
          for (int64_t i = 0; i < rows; ++i)
            _mm512_storeu_ps(o + i * R, _mm512_fmadd_ps(_mm512_loadu_ps(c + i * R), d, _mm512_loadu_ps(o + i * R)));
        }
      }
  };
  unpack(0);
  for (int64_t g = 0; g < G; ++g) {
    issue(g);
    if (g > 0) read_out(g - 1);
    if (g + 1 < G) unpack(g + 1);
  }
  read_out(G - 1);
}

// y (M, N) = x (M, K) @ W.T as linear_into, on the tile unit (see above).
void linear_amx(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t T, int64_t tile_row, int64_t qtype,
                float* yp) {
  const int64_t N = T * R, G = K / QK, tile_bytes = format_of(qtype, "gguf_linear").tile_bytes;
  const int64_t Mp = (M + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
  // Scratch kept per thread between calls (the pool's threads live as long as the process).
  thread_local std::vector<uint16_t> xh, xl;
  thread_local std::vector<float> xsum;
  xh.resize(Mp * K);
  xl.resize(Mp * K);
  xsum.resize(M * G);
  std::fill(xh.begin() + M * K, xh.begin() + Mp * K, uint16_t{0});  // rows M .. Mp - 1 are zero
  std::fill(xl.begin() + M * K, xl.begin() + Mp * K, uint16_t{0});
  for (int64_t i = 0; i < M; ++i)
    for (int64_t g = 0; g < G; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t j = 0; j < QK; j += 16) {
        const int64_t o = i * K + g * QK + j;
        const __m512 v = _mm512_loadu_ps(xp + o);
        const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
        const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        const __m256i l = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf)));
        const __m512 lf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(l), 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xh.data() + o), h);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xl.data() + o), l);
        s = _mm512_add_ps(s, _mm512_add_ps(hf, lf));
      }
      xsum[i * G + g] = _mm512_reduce_add_ps(s);
    }
  // The workers reach this thread's scratch through these (in the lambda, the names would
  // mean each worker's own thread_local vectors).
  const uint16_t *xhp = xh.data(), *xlp = xl.data();
  const float* xsump = xsum.data();
  constexpr int64_t NT = 3;  // tiles per pass of amx_group
  WorkerPool::get().parallel_for((T + NT - 1) / NT, [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint16_t> wt;
    thread_local std::vector<float> cbuf, acc;
    wt.resize(2 * NT * 512);
    cbuf.resize(2 * Mp * NT * R);
    acc.resize(NT * M * R);
    const __m512i idx = nibble_pairs_index();
    amx_configure();
    for (int64_t t0 = begin * NT; t0 < std::min(T, end * NT); t0 += NT) {
      const int64_t nt = std::min(NT, T - t0);
      const auto group = nt == 3 ? amx_group<3> : nt == 2 ? amx_group<2> : amx_group<1>;
      group(wp + t0 * tile_row, tile_row, tile_bytes, qtype, xhp, xlp, xsump, M, Mp, K, idx, wt.data(), cbuf.data(),
            acc.data());
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

// y (M, N) = x (M, K) @ W.T for W (N, K) held as T = N / 16 tiles of `tile_row` bytes per tile
// row, all row-major and contiguous.
void linear_into(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t T, int64_t tile_row, int64_t qtype,
                 float* yp) {
#ifdef EXO_GGUF_AMX
  const int64_t amx_rows_from = amx_threshold();
  if (amx_rows_from > 0 && M >= amx_rows_from) {
    linear_amx(xp, M, K, wp, T, tile_row, qtype, yp);
    return;
  }
#endif
  const int64_t N = T * R, G = K / QK;
  std::vector<float> xsum;
  if (qtype == 3) {  // block sums of x, for the Q4_1 minimums
    xsum.resize(M * G);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t j = 0; j < QK; ++j) s += xp[i * K + g * QK + j];
        xsum[i * G + g] = s;
      }
  }
  WorkerPool::get().parallel_for(T, [&](int64_t begin, int64_t end) {
    float out[MB * R];
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = wp + t * tile_row;
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mb = std::min(MB, M - m0);
        if (qtype == 3) kQ4_1Tiles[mb](tile, xp, xsum.data(), K, m0, out);
        else kQ8_0Tiles[mb](tile, xp, K, m0, out);
        for (int64_t i = 0; i < mb; ++i) std::memcpy(yp + (m0 + i) * N + t * R, out + i * R, R * sizeof(float));
      }
    }
  });
}

// y (M, N) = x (M, K) @ W.T for W (N, K) held as tiles (N / 16, G * tile_bytes).
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& tiles_in, int64_t qtype) {
  const Format f = format_of(qtype, "gguf_linear");
  check_linear(x_in, tiles_in, f);
  const at::Tensor x = x_in.contiguous(), tiles = tiles_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), T = tiles.size(0);
  at::Tensor y = at::empty({M, T * R}, x.options());
  linear_into(x.data_ptr<float>(), M, K, tiles.data_ptr<uint8_t>(), T, tiles.size(1), qtype, y.data_ptr<float>());
  return y;
}

// Dequantize rows `rows` (int64, any shape S) of W (N, K) held as tiles -> (S..., K) float32.
at::Tensor dequantize_rows(const at::Tensor& tiles_in, int64_t qtype, int64_t K, const at::Tensor& rows_in) {
  const Format f = format_of(qtype, "gguf_dequantize_rows");
  check_tiles(tiles_in, f, K, "gguf_dequantize_rows");
  TORCH_CHECK(rows_in.scalar_type() == at::kLong, "gguf_dequantize_rows: rows must be int64");
  const at::Tensor tiles = tiles_in.contiguous(), rows = rows_in.contiguous();
  const int64_t N = tiles.size(0) * R, G = K / QK, n = rows.numel(), tile_row = tiles.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(rp[i] >= 0 && rp[i] < N, "gguf_dequantize_rows: row ", rp[i], " out of range [0, ", N, ")");
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape.push_back(K);
  at::Tensor w = at::empty(shape, tiles.options().dtype(at::kFloat));
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  float* wp = w.data_ptr<float>();
  WorkerPool::get().parallel_for(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = rp[i] / R, r = rp[i] % R;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = tp + t * tile_row + g * f.tile_bytes;
        for (int64_t j = 0; j < QK; ++j) wp[i * K + g * QK + j] = weight_at(b, qtype, r, j);
      }
    }
  });
  return w;
}

// The transpose W.T (K, N) float32 of W (N, K) held as tiles: one tile's 16 rows are 16
// consecutive floats of a row of W.T, so the stores are whole vectors.
at::Tensor dequantize_t(const at::Tensor& tiles_in, int64_t qtype, int64_t K) {
  const Format f = format_of(qtype, "gguf_dequantize_t");
  check_tiles(tiles_in, f, K, "gguf_dequantize_t");
  const at::Tensor tiles = tiles_in.contiguous();
  const int64_t T = tiles.size(0), N = T * R, G = K / QK, tile_row = tiles.size(1);
  at::Tensor wt = at::empty({K, N}, tiles.options().dtype(at::kFloat));
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  float* wp = wt.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = tp + t * tile_row + g * f.tile_bytes;
        float* o = wp + g * QK * N + t * R;  // o[j * N + r]: W[16t + r, 32g + j]
#ifdef EXO_GGUF_AVX512
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
        if (qtype == 3) {
          const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32)));
          const __m512i low4 = _mm512_set1_epi32(15);
          for (int64_t j = 0; j < 16; ++j) {
            const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 64 + j * R)));
            _mm512_storeu_ps(o + j * N, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low4)), d, m));
            _mm512_storeu_ps(o + (j + 16) * N, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d, m));
          }
        } else {
          for (int64_t j = 0; j < QK; ++j) {
            const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32 + j * R)));
            _mm512_storeu_ps(o + j * N, _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
          }
        }
#else
        for (int64_t j = 0; j < QK; ++j)
          for (int64_t r = 0; r < R; ++r) o[j * N + r] = weight_at(b, qtype, r, j);
#endif
      }
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
  for (int64_t i = 0; i < n; ++i) {
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
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
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
// KV head h / (H / KV); the work is split by (request, KV head).
void attend(const float* qp, int64_t q_stride, const float* k_new, const float* v_new, int64_t kv_stride, int64_t B,
            int64_t H, int64_t KV, int64_t D, float* const* kp, float* const* vp, const int64_t* caps,
            const int64_t* offsets, float* op) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KV; ++h) {  // append this step's keys and values
      std::memcpy(kp[b] + (h * caps[b] + offsets[b]) * D, k_new + b * kv_stride + h * D, D * sizeof(float));
      std::memcpy(vp[b] + (h * caps[b] + offsets[b]) * D, v_new + b * kv_stride + h * D, D * sizeof(float));
    }
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t group = H / KV;
  WorkerPool::get().parallel_for(B * KV, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KV, kvh = i % KV, L = offsets[b] + 1, cap = caps[b];
      scores.resize(group * L);
      attend_group(qp + b * q_stride + kvh * group * D, group, kp[b] + kvh * cap * D, vp[b] + kvh * cap * D, L, D, scale,
                   scores.data(), op + (b * H + kvh * group) * D);
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
// appends k_new[b], v_new[b] (KV, D) to request b's cache at position offsets[b], then
// out[b, h] = softmax(q[b, h] . K_b^T / sqrt(D)) V_b over its offsets[b] + 1 keys, with query
// head h reading KV head h / (H / KV) (grouped-query attention, Ainslie et al. 2023,
// arXiv:2305.13245). q (B, H, D), k_new / v_new (B, KV, D) float32; the caches are the
// (1, KV, capacity, D) float32 buffers of exo's KVCache, capacity > offsets[b]. One call per
// layer instead of a handful of torch operations per request; the softmax subtracts the row
// maximum and everything is float32, as torch's scaled_dot_product_attention on a CPU.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                            at::TensorList k_caches, at::TensorList v_caches, at::IntArrayRef offsets) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat && q_in.device().is_cpu(),
              "decode_attention: q must be (B, H, D) float32 on the CPU, got ", q_in.sizes(), " ", q_in.scalar_type());
  const at::Tensor q = q_in.contiguous(), k_new = k_new_in.contiguous(), v_new = v_new_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(k_new.dim() == 3 && k_new.size(0) == B && k_new.size(2) == D && k_new.scalar_type() == at::kFloat &&
                  v_new.sizes() == k_new.sizes() && v_new.scalar_type() == at::kFloat,
              "decode_attention: k_new and v_new must be (B, KV, D) float32 like q, got ", k_new.sizes(), " and ", v_new.sizes());
  const int64_t KV = k_new.size(1);
  TORCH_CHECK(KV > 0 && H % KV == 0, "decode_attention: ", H, " query heads are not a multiple of ", KV, " KV heads");
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == B && static_cast<int64_t>(v_caches.size()) == B &&
                  static_cast<int64_t>(offsets.size()) == B,
              "decode_attention: one KV cache and offset per request");
  check_caches(k_caches, v_caches, offsets.data(), 0, B, KV, D, "decode_attention");
  std::vector<float*> kp(B), vp(B);
  std::vector<int64_t> caps(B);
  cache_pointers(k_caches, v_caches, 0, B, kp.data(), vp.data(), caps.data());
  at::Tensor out = at::empty({B, H, D}, q.options());
  attend(q.data_ptr<float>(), H * D, k_new.data_ptr<float>(), v_new.data_ptr<float>(), KV * D, B, H, KV, D, kp.data(),
         vp.data(), caps.data(), offsets.data(), out.data_ptr<float>());
  return out;
}

// RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) of `rows` rows of n: y = w * x / sqrt(mean(x^2) + eps).
void rms_norm_into(const float* x, const float* w, int64_t rows, int64_t n, float eps, float* y) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * n;
    const float r = 1.0f / std::sqrt(dot(xi, xi, n) / static_cast<float>(n) + eps);
    for (int64_t j = 0; j < n; ++j) y[i * n + j] = w[j] * (xi[j] * r);
  }
}

// Decode steps of B requests through L consecutive Llama layers (pre-norm RMSNorm, RoPE,
// grouped-query attention over each request's KV cache, SwiGLU; the same arithmetic as
// ShardedLlama's torch modules, all float32) in one call, so that a step pays one operator
// dispatch per shard instead of some thirty per layer.
//   x: (B, 1, hidden) or (B, hidden) float32 hidden states, one row per request.
//   weights: 6 per layer: input norm (hidden), qkv tiles (Q rows H * D, then K, then V rows
//     KV * D each), o tiles, post-attention norm (hidden), gate_up tiles (I rows of gate, then
//     I of up), down tiles; qtypes: the GGML types of qkv, o, gate_up, down.
//   cos, sin: (B, D) RoPE tables at each request's position, sin with the first half of each
//     row negated (RoFormer, "rotate half" layout: x * cos + swap_halves(x) * sin).
//   k_caches, v_caches: L * B buffers (1, KV, capacity, D), layer-major; offsets: L * B tokens
//     already held, each below its capacity. Each step's keys and values are appended.
// Returns the hidden states after the last layer, shaped as x.
at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef qtypes, const at::Tensor& cos_in,
                         const at::Tensor& sin_in, at::TensorList k_caches, at::TensorList v_caches,
                         at::IntArrayRef offsets, int64_t n_heads, int64_t n_kv_heads, double eps) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() >= 2,
              "decode_layers: x must be (B, 1, hidden) float32 on the CPU, got ", x_in.sizes(), " ", x_in.scalar_type());
  TORCH_CHECK(weights.size() % 6 == 0 && !weights.empty() && qtypes.size() == 4,
              "decode_layers: 6 weights per layer and 4 GGML types, got ", weights.size(), " and ", qtypes.size());
  const int64_t L = weights.size() / 6, hidden = x_in.size(-1), B = x_in.numel() / hidden;
  const int64_t H = n_heads, KV = n_kv_heads;
  TORCH_CHECK(B > 0 && H > 0 && KV > 0 && H % KV == 0, "decode_layers: ", H, " query heads are not a multiple of ", KV, " KV heads");
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == L * B && static_cast<int64_t>(v_caches.size()) == L * B &&
                  static_cast<int64_t>(offsets.size()) == L * B,
              "decode_layers: one KV cache and offset per layer and request (", L * B, "), got ", k_caches.size(), ", ",
              v_caches.size(), ", ", offsets.size());
  const Format fq = format_of(qtypes[0], "decode_layers"), fo = format_of(qtypes[1], "decode_layers"),
               fg = format_of(qtypes[2], "decode_layers"), fd = format_of(qtypes[3], "decode_layers");
  const int64_t n_qkv = weights[1].size(0) * R, D = n_qkv / (H + 2 * KV), I = weights[4].size(0) * R / 2;
  TORCH_CHECK(D > 0 && n_qkv == (H + 2 * KV) * D, "decode_layers: ", n_qkv, " qkv rows are not (", H, " + 2 * ", KV, ") heads");
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[6 * l];
    for (int k : {0, 3})
      TORCH_CHECK(w[k].scalar_type() == at::kFloat && w[k].is_contiguous() && w[k].numel() == hidden,
                  "decode_layers: layer ", l, "'s norm weights must be (", hidden, ") contiguous float32");
    check_tiles(w[1], fq, hidden, "decode_layers (qkv)");
    check_tiles(w[2], fo, H * D, "decode_layers (o)");
    check_tiles(w[4], fg, hidden, "decode_layers (gate_up)");
    check_tiles(w[5], fd, I, "decode_layers (down)");
    TORCH_CHECK(w[1].size(0) * R == n_qkv && w[2].size(0) * R == hidden && w[4].size(0) * R == 2 * I &&
                    w[5].size(0) * R == hidden && w[1].is_contiguous() && w[2].is_contiguous() &&
                    w[4].is_contiguous() && w[5].is_contiguous(),
                "decode_layers: layer ", l, "'s matrices differ in shape from the first layer's");
    check_caches(k_caches, v_caches, offsets.data(), l * B, B, KV, D, "decode_layers");
  }
  const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.numel() == B * D &&
                  sin.numel() == B * D,
              "decode_layers: cos and sin must be (B, D) = (", B, ", ", D, ") float32");
  at::Tensor out = x_in.contiguous().clone();
  float* h = out.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  std::vector<float> xn(B * hidden), qkv(B * n_qkv), att(B * H * D), delta(B * hidden), gu(B * 2 * I), act(B * I),
      rot(D);
  std::vector<float*> kp(B), vp(B);
  std::vector<int64_t> caps(B);
  const int64_t half = D / 2;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[6 * l];
    rms_norm_into(h, w[0].data_ptr<float>(), B, hidden, feps, xn.data());
    linear_into(xn.data(), B, hidden, w[1].data_ptr<uint8_t>(), w[1].size(0), w[1].size(1), qtypes[0], qkv.data());
    for (int64_t b = 0; b < B; ++b)  // RoPE on the query and key heads
      for (int64_t j = 0; j < H + KV; ++j) {
        float* v = qkv.data() + b * n_qkv + j * D;
        const float* c = cp + b * D;
        const float* sn = sp + b * D;
        std::memcpy(rot.data(), v, D * sizeof(float));
        for (int64_t d = 0; d < half; ++d) v[d] = rot[d] * c[d] + rot[d + half] * sn[d];
        for (int64_t d = half; d < D; ++d) v[d] = rot[d] * c[d] + rot[d - half] * sn[d];
      }
    cache_pointers(k_caches, v_caches, l * B, B, kp.data(), vp.data(), caps.data());
    attend(qkv.data(), n_qkv, qkv.data() + H * D, qkv.data() + (H + KV) * D, n_qkv, B, H, KV, D, kp.data(), vp.data(),
           caps.data(), offsets.data() + l * B, att.data());
    linear_into(att.data(), B, H * D, w[2].data_ptr<uint8_t>(), w[2].size(0), w[2].size(1), qtypes[1], delta.data());
    for (int64_t i = 0; i < B * hidden; ++i) h[i] += delta[i];
    rms_norm_into(h, w[3].data_ptr<float>(), B, hidden, feps, xn.data());
    linear_into(xn.data(), B, hidden, w[4].data_ptr<uint8_t>(), w[4].size(0), w[4].size(1), qtypes[2], gu.data());
    for (int64_t b = 0; b < B; ++b) swiglu(gu.data() + b * 2 * I, gu.data() + b * 2 * I + I, I, act.data() + b * I);
    linear_into(act.data(), B, I, w[5].data_ptr<uint8_t>(), w[5].size(0), w[5].size(1), qtypes[3], delta.data());
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
  m.def("linear(Tensor x, Tensor tiles, int qtype) -> Tensor");
  m.def("dequantize_rows(Tensor tiles, int qtype, int K, Tensor rows) -> Tensor");
  m.def("dequantize_t(Tensor tiles, int qtype, int K) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int[] offsets) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] qtypes, Tensor cos, Tensor sin, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, int[] offsets, int n_heads, int n_kv_heads, float eps) -> Tensor");
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
}

TORCH_LIBRARY_IMPL(EXO_GGUF_NAMESPACE, CPU, m) {
  m.impl("pack", pack);
  m.impl("linear", linear);
  m.impl("dequantize_rows", dequantize_rows);
  m.impl("dequantize_t", dequantize_t);
  m.impl("decode_attention", decode_attention);
  m.impl("decode_layers", decode_layers);
}
