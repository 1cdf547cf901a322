// Kernels for the few rows of a decode step; built and loaded by cpu_kernels.py (torch.utils.cpp_extension), where
// why they exist is written. Built one of two ways, by what the CPU has:
//   AVX-512 BF16 (and VNNI; AMX tiles where present): every kernel below;
//   AVX2 + FMA (no native bf16, e.g. AMD Zen 3): the int8 and w4a8 ones (linear_int8, linear_w4a8, their fused
//   experts, dequantize_w4a8), whose exact int32 sums come from vpmaddubsw + vpmaddwd instead of vpdpbusd; the bf16
//   ones (routed_experts_bf16, linear_bf16) are AVX-512 BF16 only and not registered there.
// Both builds: linear_bf16_fp32 and routed_experts_bf16_fp32 (fp32 x, bf16 weights widened exactly; AVX2 + FMA).
//
// routed_experts_bf16: routed experts for a few tokens, each chosen expert's weights read once.
//   x [N,d] bf16, gates [N,K] fp32, indices [N,K] int64 (-1: a dropped slot), w1/w3 [E,I,d], w2 [E,d,I] bf16
//   y[n] = sum_k gates[n,k] * FFN_{indices[n,k]}(x[n]),   FFN_e(v) = w2_e (silu(w1_e v) * (w3_e v))
//
// Rounding follows the eager path (RoutedExperts.forward in bf16): each projection accumulates in fp32 and
// rounds to bf16, silu and the product round to bf16, and the gates sum the K expert outputs in fp32 in slot
// order before one last rounding.
//
// routed_experts_w4a8 and routed_experts_int8: the same sum for experts whose projections are w4a8 or w8a8
// (linear_w4a8's or linear_int8's operands, each stacked over the experts): fused_experts.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int kTokensPerPass = 8;  // token rows whose dot products share one load of a weight row
constexpr int kMaxRows = 16;       // x's rows a linear kernel's call takes (the 16 columns of an AMX B tile)

inline float to_float(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline bf16 to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16(u >> 16);
}

inline float rounded(float f) { return to_float(to_bf16(f)); }

// f(std::integral_constant<int, m>) for m in 1..8 (m > 8 as 8): the kernels' templates on their x row count
template <typename F>
void with_rows(int m, F f) {
  switch (m) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

#if defined(__AVX512BF16__)
// out[j][r] = dot(W[r], v[j]) for RB rows r of W [RB,D] and M vectors v, all bf16, fp32 sums, RB·M accumulator
// chains: each step loads RB + M vectors for RB·M dot-product instructions. Each product is summed in the same
// order whatever RB and M are, so every tiling of the rows and vectors gives the same bits. The tail of D below 32
// is read with a masked load, so any D works. Inlined: rows_dot calls it once per row, and a call a row was 8-10%
// of small's one-token experts (Zen 4).
template <int RB, int M>
__attribute__((always_inline)) inline void tile_dot(const bf16* W, int64_t D, const bf16* const* v, float* out,
                                                    int64_t out_stride) {
  const int64_t full = D / 32 * 32;
  const __mmask32 tail = D == full ? 0 : __mmask32((1ull << (D - full)) - 1);
  __m512 acc[RB][M];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < full; k += 32) {
    __m512bh wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(W + r * D + k);
    for (int j = 0; j < M; ++j) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(v[j] + k);
      for (int r = 0; r < RB; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[r]);
    }
  }
  if (tail) {
    __m512bh wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(tail, W + r * D + full);
    for (int j = 0; j < M; ++j) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, v[j] + full);
      for (int r = 0; r < RB; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[r]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) out[j * out_stride + r] = _mm512_reduce_add_ps(acc[r][j]);
}

// tile_dot for all R rows of W [R,D], one row at a time, and m <= kTokensPerPass vectors: each row read straight
// through. Rows interleaved RB at a time read 8-35% fewer GB/s of expert weights on Zen 4 when the matrix streams
// from memory once per pass (docs/benchmarks.md, eighteenth session); rows_dot_tiled is the path that reads it once.
void rows_dot(const bf16* W, int64_t R, int64_t D, const bf16* const* v, int m, float* out, int64_t out_stride) {
  with_rows(m, [&](auto rows) {
    for (int64_t r = 0; r < R; ++r) tile_dot<1, decltype(rows)::value>(W + r * D, D, v, out + r, out_stride);
  });
}

constexpr int kTileRows = 4;     // W's rows per tile_dot (4 x 6 accumulators, 4 weight and one x register: 29 of 32)
constexpr int kTileVectors = 6;  // vectors per tile_dot

// where rows_dot_tiled beats rows_dot in passes (Zen 4, 2 threads; docs/benchmarks.md, twentieth session): more than
// 4 vectors and a matrix that memory streams (V2-Lite's experts, 2.9M elements; at 12 slots an expert 0.60x the
// time); on small's, which stay in L2 (0.26M), it was 5-25% slower at 8 to 32 vectors
constexpr int kTiledMinVectors = 4;
constexpr int64_t kTiledMinElements = int64_t(1) << 20;

// rows_dot for any number m of vectors, the same bits: W's rows kTileRows at a time, each block's products for all
// m vectors kTileVectors at a time, so a block is read from memory once and again from L1 for the other vectors
// (rows_dot in passes of kTokensPerPass streams W from memory once per pass)
void rows_dot_tiled(const bf16* W, int64_t R, int64_t D, const bf16* const* v, int64_t m, float* out,
                    int64_t out_stride) {
  const auto tiles = [&](auto rows, const bf16* block, float* block_out) {
    const int64_t groups = (m + kTileVectors - 1) / kTileVectors, per_group = (m + groups - 1) / groups;
    for (int64_t j0 = 0; j0 < m; j0 += per_group)
      with_rows(int(std::min<int64_t>(per_group, m - j0)), [&](auto vectors) {
        if constexpr (decltype(vectors)::value <= kTileVectors)
          tile_dot<decltype(rows)::value, decltype(vectors)::value>(block, D, v + j0, block_out + j0 * out_stride,
                                                                    out_stride);
      });
  };
  int64_t r = 0;
  for (; r + kTileRows <= R; r += kTileRows) tiles(std::integral_constant<int, kTileRows>{}, W + r * D, out + r);
  for (; r < R; ++r) tiles(std::integral_constant<int, 1>{}, W + r * D, out + r);
}

#endif  // __AVX512BF16__

// the slots (n·K + k) of each of E experts in slot order, from contiguous int64 indices [N,K]; a dropped slot
// (id -1) belongs to none
std::vector<std::vector<int64_t>> slots_by_expert(const char* name, const at::Tensor& indices, int64_t E) {
  const int64_t* ids = indices.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> slots_of(E);
  for (int64_t s = 0; s < indices.numel(); ++s)
    if (ids[s] >= 0) {
      TORCH_CHECK(ids[s] < E, name, ": expert id ", ids[s], " out of range (", E, " experts)");
      slots_of[ids[s]].push_back(s);
    }
  return slots_of;
}

// y [N,d] in x's dtype (fp32 or bf16): y[n] = Σ_k gates[n,k]·slot_out[n·K + k], summed in fp32 in slot order
at::Tensor gated_sum(const std::vector<float>& slot_out, const at::Tensor& gates, const at::Tensor& x) {
  const int64_t N = x.size(0), d = x.size(1), K = gates.size(1);
  at::Tensor y = at::empty({N, d}, x.options());
  const bool to_bf16_out = y.scalar_type() == at::kBFloat16;
  const float* gp = gates.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < d; ++i) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += gp[n * K + k] * slot_out[(n * K + k) * d + i];
      if (to_bf16_out) reinterpret_cast<bf16*>(y.data_ptr())[n * d + i] = to_bf16(sum);
      else y.data_ptr<float>()[n * d + i] = sum;
    }
  return y;
}

#if defined(__AVX512BF16__)
at::Tensor routed_experts_bf16(const at::Tensor& x_in, const at::Tensor& gates_in, const at::Tensor& indices_in,
                               const at::Tensor& w1_in, const at::Tensor& w2_in, const at::Tensor& w3_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w1_in.scalar_type() == at::kBFloat16 &&
                  w2_in.scalar_type() == at::kBFloat16 && w3_in.scalar_type() == at::kBFloat16,
              "routed_experts_bf16: x and the expert weights must be bf16");
  const at::Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous(), w3 = w3_in.contiguous();
  const at::Tensor gates = gates_in.to(at::kFloat).contiguous(), indices = indices_in.to(at::kLong).contiguous();
  const int64_t N = x.size(0), d = x.size(1), K = indices.size(1), E = w1.size(0), I = w1.size(1);
  TORCH_CHECK(w1.size(2) == d && w3.sizes() == w1.sizes() && w2.size(0) == E && w2.size(1) == d && w2.size(2) == I,
              "routed_experts_bf16: expert weights do not match x");

  const std::vector<std::vector<int64_t>> slots_of = slots_by_expert("routed_experts_bf16", indices, E);
  std::vector<int64_t> chosen;
  for (int64_t e = 0; e < E; ++e)
    if (!slots_of[e].empty()) chosen.push_back(e);

  // each slot's expert output, rounded to bf16 and kept as fp32; a dropped slot's stays 0
  std::vector<float> slot_out(size_t(N * K * d), 0.0f);
  const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr());
  const bf16* w1p = reinterpret_cast<const bf16*>(w1.data_ptr());
  const bf16* w2p = reinterpret_cast<const bf16*>(w2.data_ptr());
  const bf16* w3p = reinterpret_cast<const bf16*>(w3.data_ptr());

  // one expert per task: a thread streams its expert's three matrices once for all the expert's tokens
  // (each product by rows_dot_tiled where it was measured faster, else rows_dot in passes: the same bits)
  at::parallel_for(0, int64_t(chosen.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gate, up, out;
    std::vector<bf16> inner;
    std::vector<const bf16*> rows, inner_rows;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e = chosen[c];
      const std::vector<int64_t>& slots = slots_of[e];
      const int64_t m = int64_t(slots.size());
      const auto products = [&](const bf16* W, int64_t R, int64_t D, const bf16* const* v, float* dst) {
        if (m > kTiledMinVectors && R * D >= kTiledMinElements) return rows_dot_tiled(W, R, D, v, m, dst, R);
        for (int64_t j0 = 0; j0 < m; j0 += kTokensPerPass)
          rows_dot(W, R, D, v + j0, int(std::min<int64_t>(kTokensPerPass, m - j0)), dst + j0 * R, R);
      };
      gate.resize(m * I), up.resize(m * I), out.resize(m * d), inner.resize(m * I);
      rows.resize(m), inner_rows.resize(m);
      for (int64_t j = 0; j < m; ++j) rows[j] = xp + slots[j] / K * d, inner_rows[j] = inner.data() + j * I;
      products(w1p + e * I * d, I, d, rows.data(), gate.data());
      products(w3p + e * I * d, I, d, rows.data(), up.data());
      for (int64_t i = 0; i < m * I; ++i) {
        const float g = rounded(gate[i]);
        inner[i] = to_bf16(rounded(g / (1.0f + std::exp(-g))) * rounded(up[i]));
      }
      products(w2p + e * d * I, d, I, inner_rows.data(), out.data());
      for (int64_t j = 0; j < m; ++j) {
        float* dst = slot_out.data() + slots[j] * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = rounded(out[j * d + i]);
      }
    }
  });

  return gated_sum(slot_out, gates, x);
}
#endif  // __AVX512BF16__

void check_shapes(const char* name, const at::Tensor& x, const at::Tensor& w, int64_t k_per_tile) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), name, ": x [M,K] and a weight [N,K], got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.size(0) <= kMaxRows && x.size(1) % k_per_tile == 0, name, ": at most ", kMaxRows,
              " rows and a width that is a multiple of ", k_per_tile, ", got x ", x.sizes());
}

// linear_bf16 and linear_int8: y [M,N] = x [M,K] Wᵀ for M <= 16 rows and W [N,K] as it is stored, on AMX tiles
// (linear_int8 on a CPU without them: the same sums on VNNI, e.g. AMD Zen 4, or on AVX2, e.g. Zen 3, below).
//
// AMX multiplies a tile A [16 rows, 64 bytes] by a tile B [16 rows, 64 bytes] whose rows interleave groups of k
// (bf16: B[k/2][j][k%2], 32 k per tile; int8: B[k/4][j][k%4], 64 k per tile) into C [16,16] (fp32 or int32).
// W's rows are A tiles as they lie in memory (16 rows of 64 bytes, a row stride apart), so the weight is read in
// place, never re-laid out; only x, a few KB, is interleaved as B (xᵀ, padded to 16 columns with zeros). Each
// step multiplies 32 rows of W by all of x: the tiles' arithmetic (16x16x32 multiply-adds an instruction, 16x16x64
// in int8) is far above what the weight's bytes allow, so the product runs at the rate W is read.
// N need not be a multiple of 32: the last block's rows are copied into a zero-padded buffer. K must be a
// multiple of one tile's k (32 or 64); the kernels refuse otherwise (cpu_kernels.py sends such matrices elsewhere).
//
// linear_int8 is "w8a8" (quant.py): each row of x is quantized to int8 on its own absmax (x ≈ q_x·a/127), W is
// int8 with one scale per output channel (W ≈ q·s), and y[j,n] = (a_j/127)·s_n·Σ_k q_x[j,k]·q[n,k], the sum exact
// in int32.

#if defined(__AVX512BF16__)
constexpr int kRowsPerStep = 32;  // W's rows per step: two A tiles, two accumulators (C tiles 0 and 1)

struct TileConfig {  // the layout ldtilecfg reads (palette 1)
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool amx_permitted() {  // Linux hands out AMX's tile state only on request (once per process)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

void configure_tiles() {  // per thread: tiles 0-1 C, 2-3 A (W rows), 4 B (x), each 16 rows x 64 bytes
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 5; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// C [N rows of W][16 columns of x] for W [N,K] of T (bf16 or int8) and xt, x interleaved as B tiles;
// emit(n, rows, c) takes each step's rows n..n+rows of C, c[i][j] for x's row j
template <typename T, typename Acc, typename Emit>
void tile_product(const T* w, int64_t N, int64_t K, const T* xt, Emit emit) {
  constexpr int64_t k_per_tile = 64 / sizeof(T);
  at::parallel_for(0, (N + kRowsPerStep - 1) / kRowsPerStep, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) Acc c[kRowsPerStep][kMaxRows];
    std::vector<T> padded;
    for (int64_t step = begin; step < end; ++step) {
      const int64_t n = step * kRowsPerStep, rows = std::min<int64_t>(kRowsPerStep, N - n);
      const T* a = w + n * K;
      if (rows < kRowsPerStep) {
        padded.assign(size_t(kRowsPerStep * K), T(0));
        std::memcpy(padded.data(), a, size_t(rows * K) * sizeof(T));
        a = padded.data();
      }
      _tile_zero(0);
      _tile_zero(1);
      // the next step's 32 rows, a line of each per k-step, are fetched into cache while this step's tiles
      // multiply: AMX tile loads from memory wait on each row's line (32 rows, 32 streams, more than the hardware
      // prefetcher follows), and this thread's next rows are known
      const int64_t next_rows = step + 1 < end ? std::min<int64_t>(kRowsPerStep, N - n - kRowsPerStep) : 0;
      const char* next = reinterpret_cast<const char*>(w + (n + kRowsPerStep) * K);
      for (int64_t k = 0; k < K; k += k_per_tile) {
        for (int64_t r = 0; r < next_rows; ++r)
          _mm_prefetch(next + (r * K + k) * int64_t(sizeof(T)), _MM_HINT_T0);
        _tile_loadd(4, xt + k * kMaxRows, 64);
        _tile_loadd(2, a + k, K * sizeof(T));
        _tile_loadd(3, a + 16 * K + k, K * sizeof(T));
        if constexpr (sizeof(T) == 2) {
          _tile_dpbf16ps(0, 2, 4);
          _tile_dpbf16ps(1, 3, 4);
        } else {
          _tile_dpbssd(0, 2, 4);
          _tile_dpbssd(1, 3, 4);
        }
      }
      _tile_stored(0, c[0], kMaxRows * sizeof(Acc));
      _tile_stored(1, c[16], kMaxRows * sizeof(Acc));
      emit(n, rows, c);
    }
    _tile_release();
  });
}

at::Tensor linear_bf16(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w_in.scalar_type() == at::kBFloat16,
              "linear_bf16: x and the weight must be bf16");
  check_shapes("linear_bf16", x_in, w_in, 32);
  // without tiles ATen's own bf16 kernel reads as fast as rows_dot would (27-30 GB/s on a Zen 4): no fallback here
  TORCH_CHECK(amx_permitted(), "linear_bf16: needs AMX tiles, and this CPU (or Linux) does not grant them");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bf16* xp = reinterpret_cast<const bf16*>(x.data_ptr());
  at::Tensor y = at::empty({M, N}, x.options());
  bf16* yp = reinterpret_cast<bf16*>(y.data_ptr());
  std::vector<bf16> xt(size_t(K * kMaxRows), 0);  // x interleaved as B tiles
  for (int64_t j = 0; j < M; ++j)
    for (int64_t k = 0; k < K; ++k) xt[(k / 2) * 2 * kMaxRows + j * 2 + (k & 1)] = xp[j * K + k];
  tile_product<bf16, float>(reinterpret_cast<const bf16*>(w.data_ptr()), N, K, xt.data(),
                            [&](int64_t n, int64_t rows, const float (*c)[kMaxRows]) {
                              for (int64_t i = 0; i < rows; ++i)
                                for (int64_t j = 0; j < M; ++j) yp[j * N + n + i] = to_bf16(c[i][j]);
                            });
  return y;
}
#endif  // __AVX512BF16__

// a contiguous fp32 or bf16 tensor's values as fp32 (bf16 -> fp32 is exact): the int8 kernel reads x and the
// scales in their own dtype, where three ATen conversions a call cost ~25 us (V2-Lite's w8a8 decode step makes
// 79 such calls)
std::vector<float> floats(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return std::vector<float>(t.data_ptr<float>(), t.data_ptr<float>() + t.numel());
  const bf16* p = reinterpret_cast<const bf16*>(t.data_ptr());
  std::vector<float> out(size_t(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) out[i] = to_float(p[i]);
  return out;
}

// max_k |row[k]|, a register of lanes at a time: a scalar max is a 3-cycle chain per input (~0.7 us at K=2048)
float abs_max(const float* row, int64_t K) {
  int64_t k = 0;
#if defined(__AVX512BF16__)
  __m512 lanes = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) lanes = _mm512_max_ps(lanes, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
  float amax = _mm512_reduce_max_ps(lanes);
#else
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 lanes = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) lanes = _mm256_max_ps(lanes, _mm256_and_ps(_mm256_loadu_ps(row + k), magnitude));
  alignas(32) float each[8];
  _mm256_store_ps(each, lanes);
  float amax = *std::max_element(each, each + 8);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
  return amax;
}

// one row of x on 127 levels of its own absmax: q[k] = round(row[k]·127/a) -> the step a/127 (0 for a zero row)
float quantize_row(const float* row, int64_t K, int8_t* q) {
  const float amax = abs_max(row, K), inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int64_t k = 0; k < K; ++k) q[k] = int8_t(std::nearbyint(row[k] * inverse));
  return amax / 127.0f;
}

#if defined(__AVX512BF16__)
using Lanes = __m512i;  // a register of int8 inputs: 64 on AVX-512, 32 on AVX2
inline int32_t sum_lanes(__m512i v) { return _mm512_reduce_add_epi32(v); }
inline float sum_lanes(__m512 v) { return _mm512_reduce_add_ps(v); }
#else
using Lanes = __m256i;
inline int32_t sum_lanes(__m256i v) {
  const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i two = _mm_add_epi32(four, _mm_unpackhi_epi64(four, four));
  return _mm_cvtsi128_si32(_mm_add_epi32(two, _mm_shuffle_epi32(two, 1)));
}
#endif
inline float sum_lanes(__m256 v) {  // both builds: the bf16-weight kernel below is AVX2 + FMA in either
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
constexpr int64_t kLaneBytes = sizeof(Lanes);

constexpr int kRowsPerTask = 64;   // weight rows per parallel task of the int8 and w4a8 kernels
constexpr int kPrefetchRows = 16;  // how far ahead (in weight rows) their loads' lines are prefetched

// Up to `capacity` (<= kMaxRows) rows of x [., K], each quantized to int8 on its own absmax (quantize_row), row-major
// in registers of lanes, with Σ_k q_x[j,k] per row (and, on AVX2, |q_x| beside q_x: see int8_rows)
struct Int8Rows {
  int64_t M = 0, K, capacity;
  std::vector<Lanes> qx;  // [j * K/kLaneBytes + c]
#if !defined(__AVX512BF16__)
  std::vector<Lanes> magnitude;  // |qx|, the same layout
#endif
  std::vector<float> step;  // a_j / 127
  std::vector<int32_t> sum;

  Int8Rows(int64_t K_, int64_t capacity_)
      : K(K_), capacity(capacity_), qx(size_t(capacity_ * (K_ / kLaneBytes))),
#if !defined(__AVX512BF16__)
        magnitude(qx.size()),
#endif
        step(kMaxRows, 0.0f), sum(kMaxRows, 0) {
  }

  const int8_t* row(int64_t j) const { return reinterpret_cast<const int8_t*>(qx.data()) + j * K; }

  void add(const float* x) {
    TORCH_CHECK(M < capacity && M < kMaxRows, "Int8Rows: at most ", capacity, " rows");
    const int64_t j = M++;
    int8_t* q = reinterpret_cast<int8_t*>(qx.data()) + j * K;
    step[j] = quantize_row(x, K, q);
    for (int64_t k = 0; k < K; ++k) sum[j] += q[k];
#if !defined(__AVX512BF16__)
    for (int64_t c = j * (K / kLaneBytes); c < (j + 1) * (K / kLaneBytes); ++c) magnitude[c] = _mm256_abs_epi8(qx[c]);
#endif
  }
};

#if defined(__AVX512BF16__)
// linear_int8 where there are no AMX tiles (AVX-512 VNNI, e.g. AMD Zen 4): vpdpbusd multiplies 64 unsigned bytes by
// 64 signed ones and sums each four into one of 16 int32 lanes. The weight's bytes are made unsigned as they are
// loaded (q ^ 0x80 = q + 128) and the row's sum corrected by 128·Σ_k q_x[j,k] afterwards (kWeightOffset), so c is the
// same exact integer the tiles give (|Σ (q+128)·q_x| <= 255·127·K fits int32 for K <= 65536).
// out[r][j] = Σ_k (q[r,k]+128)·q_x[j,k] for RB weight rows from w (row stride K) and M rows of x from j0.
constexpr int32_t kWeightOffset = 128;

template <int M, int RB>
void int8_rows(const int8_t* w, int64_t K, const Int8Rows& x, int64_t j0, int32_t* out) {
  const int64_t chunks = K / kLaneBytes;
  const Lanes* qx = x.qx.data() + j0 * chunks;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512i acc[RB][M];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t c = 0; c < chunks; ++c)
    for (int r = 0; r < RB; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + kPrefetchRows) * K + c * kLaneBytes), _MM_HINT_T1);
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(w + r * K + c * kLaneBytes), flip);
      for (int j = 0; j < M; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], v, qx[j * chunks + c]);
    }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) out[r * kMaxRows + j] = sum_lanes(acc[r][j]);
}

#else
// linear_int8 on AVX2 (e.g. AMD Zen 3): vpmaddubsw multiplies 32 unsigned bytes by 32 signed ones and adds each pair
// into int16, vpmaddwd each two of those into int32. Both factors lie in [-127, 127] (quantize_int8 and
// quantize_row; loading refuses -128), so |q_x| times q·sign(q_x) (vpsignb) makes the same products, and a pair sums
// to at most 2·127·127 = 32258 < 2^15: nothing saturates, and c is the same exact integer as VNNI's or the tiles'.
// out[r][j] = Σ_k q[r,k]·q_x[j,k] for RB weight rows from w (row stride K) and M rows of x from j0.
constexpr int32_t kWeightOffset = 0;

template <int M, int RB>
void int8_rows(const int8_t* w, int64_t K, const Int8Rows& x, int64_t j0, int32_t* out) {
  const int64_t chunks = K / kLaneBytes;
  const Lanes* qx = x.qx.data() + j0 * chunks;
  const Lanes* magnitude = x.magnitude.data() + j0 * chunks;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[RB][M];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm256_setzero_si256();
  for (int64_t c = 0; c < chunks; ++c)
    for (int r = 0; r < RB; ++r) {
      if (c % 2 == 0)  // one line (64 bytes) a prefetch
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + kPrefetchRows) * K + c * kLaneBytes), _MM_HINT_T1);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + c * kLaneBytes));
      for (int j = 0; j < M; ++j) {
        const __m256i pairs = _mm256_maddubs_epi16(magnitude[j * chunks + c], _mm256_sign_epi8(v, qx[j * chunks + c]));
        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) out[r * kMaxRows + j] = sum_lanes(acc[r][j]);
}
#endif

// int8_rows for m <= 8 x rows from j0 over `rows` weight rows: RB rows interleaved, 8-16 accumulators whatever m
// is; except one x row on AVX-512, whose weight rows are read one after another, a task's contiguous block as one
// stream (5-10% more GB/s on Zen 4: docs/benchmarks.md, eighteenth session; the same exact sums)
void int8_block(int m, const int8_t* w, int64_t rows, int64_t K, const Int8Rows& x, int64_t j0, int32_t* out) {
  with_rows(m, [&](auto x_rows) {
    constexpr int M = decltype(x_rows)::value;
#if defined(__AVX512BF16__)
    constexpr int RB = M == 1 ? 1 : M <= 2 ? 4 : M <= 4 ? 2 : 1;
#else
    constexpr int RB = M <= 2 ? 4 : M <= 4 ? 2 : 1;
#endif
    int64_t r = 0;
    for (; r + RB <= rows; r += RB) int8_rows<M, RB>(w + r * K, K, x, j0, out + r * kMaxRows);
    for (; r < rows; ++r) int8_rows<M, 1>(w + r * K, K, x, j0, out + r * kMaxRows);
  });
}

// An int8 weight as the int8 kernels read it: q [N,K], one fp32 or bf16 scale per row (read in its own dtype)
struct Int8Weight {
  const int8_t* q;
  const float* scale_f;  // one of the two is null
  const bf16* scale_b;
  int64_t N, K;

  float scale(int64_t n) const { return scale_f ? scale_f[n] : to_float(scale_b[n]); }
  // the e-th of stacked weights whose first this is (check_stacked)
  Int8Weight expert(int64_t e) const {
    return {q + e * N * K, scale_f ? scale_f + e * N : nullptr, scale_b ? scale_b + e * N : nullptr, N, K};
  }
};

// the operands' checks (naming `name`'s tensors), for inputs of width K; the tensors must outlive the view
Int8Weight int8_weight(const char* name, const at::Tensor& q, const at::Tensor& scale, int64_t K) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.size(1) == K && q.is_contiguous(), name,
              ": the weight must be int8 [N, K] (contiguous) for inputs of width ", K, ", got ", q.scalar_type(), " ",
              q.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0) && scale.is_contiguous(), name,
              ": one scale per output row (contiguous), got ", scale.sizes(), " for a weight ", q.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16, name,
              ": the scales must be fp32 or bf16, got ", scale.scalar_type());
  const bool f = scale.scalar_type() == at::kFloat;
  return {q.data_ptr<int8_t>(), f ? scale.data_ptr<float>() : nullptr,
          f ? nullptr : reinterpret_cast<const bf16*>(scale.data_ptr()), q.size(0), K};
}

// emit(row, j, y[j, row]) for weight rows n .. n+rows (rows <= kRowsPerTask) and every row j of x, in fp32: the exact
// int32 sum (int8_block's, less kWeightOffset·Σ_k q_x[j,k] of the flipped bytes) times the row's step and the scale
template <typename Emit>
void row_task(const Int8Rows& x, const Int8Weight& w, int64_t n, int64_t rows, Emit emit) {
  alignas(64) int32_t c[kRowsPerTask][kMaxRows];
  const int64_t K = w.K;
  for (int64_t j0 = 0; j0 < x.M; j0 += 8)  // x rows eight at a time; each row's sums are the same in any batch
    int8_block(int(std::min<int64_t>(8, x.M - j0)), w.q + n * K, rows, K, x, j0, &c[0][j0]);
  for (int64_t i = 0; i < rows; ++i) {
    const float s = w.scale(n + i);
    for (int64_t j = 0; j < x.M; ++j) emit(n + i, j, float(c[i][j] - kWeightOffset * x.sum[j]) * x.step[j] * s);
  }
}

int64_t row_tasks(int64_t N) { return (N + kRowsPerTask - 1) / kRowsPerTask; }

at::Tensor linear_int8(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& scale_in) {
  TORCH_CHECK(q_in.scalar_type() == at::kChar, "linear_int8: the weight must be int8, got ", q_in.scalar_type());
  TORCH_CHECK(scale_in.dim() == 1 && scale_in.size(0) == q_in.size(0), "linear_int8: one scale per output row, got ",
              scale_in.sizes(), " for a weight ", q_in.sizes());
  for (const at::Tensor* t : {&x_in, &scale_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16,
                "linear_int8: x and the scales must be fp32 or bf16, got ", t->scalar_type());
  check_shapes("linear_int8", x_in, q_in, 64);
  TORCH_CHECK(x_in.size(1) <= 65536, "linear_int8: K at most 65536 (int32 sums), got ", x_in.size(1));
  const at::Tensor x = x_in.contiguous(), q = q_in.contiguous(), scale = scale_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const Int8Weight w = int8_weight("linear_int8", q, scale, K);
  const std::vector<float> xf = floats(x);
  Int8Rows rows(K, M);
  for (int64_t j = 0; j < M; ++j) rows.add(xf.data() + j * K);

  at::Tensor y = at::empty({M, N}, x.options());
  const bool to_bf16_out = y.scalar_type() == at::kBFloat16;
  float* yf = to_bf16_out ? nullptr : y.data_ptr<float>();
  bf16* yb = to_bf16_out ? reinterpret_cast<bf16*>(y.data_ptr()) : nullptr;
  auto store = [&](int64_t n, int64_t j, float v) {
    if (to_bf16_out) yb[j * N + n] = to_bf16(v);
    else yf[j * N + n] = v;
  };
#if defined(__AVX512BF16__)
  if (amx_permitted()) {
    std::vector<int8_t> xt(size_t(K * kMaxRows), 0);  // q_x interleaved as B tiles
    for (int64_t j = 0; j < M; ++j)
      for (int64_t k = 0; k < K; ++k) xt[(k / 4) * 4 * kMaxRows + j * 4 + (k & 3)] = rows.row(j)[k];
    tile_product<int8_t, int32_t>(w.q, N, K, xt.data(), [&](int64_t n, int64_t count, const int32_t (*c)[kMaxRows]) {
      for (int64_t i = 0; i < count; ++i)
        for (int64_t j = 0; j < M; ++j) store(n + i, j, float(c[i][j]) * rows.step[j] * w.scale(n + i));
    });
    return y;
  }
#endif
  // no AMX tiles (or a kernel that withholds them): the same sums on VNNI or AVX2
  at::parallel_for(0, row_tasks(N), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      row_task(rows, w, task * kRowsPerTask, std::min<int64_t>(kRowsPerTask, N - task * kRowsPerTask), store);
  });
  return y;
}


// linear_w4a8: "w4a8" (quant.py), y [M,N] = x [M,K] Wᵀ for W in int4 with one scale s and zero point z per group of G
// inputs (W ≈ (q - z)·s, q in 0..15) and x quantized per row to int8 as in linear_int8 (x ≈ q_x·a/127):
//   y[j,n] = (a_j/127) · (Σ_g s[n,g]·Σ_{k in g} q_x[j,k]·q[n,k]  -  Σ_g s[n,g]·z[n,g]·Σ_{k in g} q_x[j,k])
// on AVX-512 VNNI: vpdpbusd multiplies 64 unsigned bytes (the nibbles) by 64 signed ones (q_x) and sums each four
// into one of 16 int32 lanes, exactly. The packed row holds each 64 inputs' nibbles in 32 bytes (byte b: q[k + b] in
// the low nibble, q[k + 32 + b] in the high one), so one 64-byte load and two masks give 128 inputs as two vectors,
// the lanes 0-7 of one chunk of 64 and 8-15 of the next; q_x is laid out to match once per call. Each 128 inputs'
// int32 lanes are scaled by their group's s into fp32 lanes (G = 64: each half its own group) and summed across
// lanes at the row's end; each x row's operations are the same whatever rows are beside it, so a row's result is the
// same in any batch. Why not AMX tiles as linear_int8: the nibbles must be unpacked to memory for the tile loads,
// and scaling each group means storing the accumulator tiles every group, a serial chain per group: 5-12 GB/s of
// packed weight on V2-Lite's shapes at one row, where this reads 10-20 (its cost grows with the rows, the tiles' not).
// On AVX2 (vpmaddubsw, nibbles unsigned times q_x signed, each pair summed into int16, then vpmaddwd into int32) one
// 32-byte load gives a chunk's 64 inputs as two registers, q_x in its natural order: a pair's products sum to at most
// 2·15·127 = 3810, so a group's (up to 128 inputs, four such sums a lane) stays below 2^15 and is exact in int16.
constexpr int kChunk = 64;  // inputs per 32 packed bytes (a group is one or two chunks)

#if defined(__AVX512BF16__)
constexpr int64_t kInputsPerUnit = 2 * kChunk;  // inputs per register pair of laid-out q_x (W4a8Rows)

// out[r][j] = Σ_g s[r,g]·Σ_{k in g} q_x[j,k]·q[r,k] for RB weight rows from `w` (row stride K/2 bytes) and M rows
// of laid-out q_x; groups of 64 (GC = 1: a pair's two halves are two groups) or 128 (GC = 2: one group a pair)
template <int M, int RB, int GC>
void w4a8_rows(const uint8_t* w, int64_t K, const float* scale, int64_t groups, const Lanes* xlo, const Lanes* xhi,
               float* out) {
  const int64_t pairs = (K + 2 * kChunk - 1) / (2 * kChunk), row_bytes = K / 2;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
  __m512 acc[RB][M];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm512_setzero_ps();
  auto pair = [&](int64_t p, __mmask64 bytes) {
    for (int r = 0; r < RB; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + kPrefetchRows) * row_bytes + p * kChunk), _MM_HINT_T1);
      const __m512i v = _mm512_maskz_loadu_epi8(bytes, w + r * row_bytes + p * kChunk);
      const __m512i lo = _mm512_and_si512(v, low_nibbles), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
      const float* s = scale + r * groups;
      const __m512 sv = GC == 2 ? _mm512_set1_ps(s[p])  // past K (an odd last chunk) the nibbles are 0: any scale
                                : _mm512_mask_broadcastss_ps(_mm512_set1_ps(s[2 * p]), 0xff00,
                                                             _mm_set_ss(s[std::min(groups - 1, 2 * p + 1)]));
      for (int j = 0; j < M; ++j) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[j * pairs + p]);
        dot = _mm512_dpbusd_epi32(dot, hi, xhi[j * pairs + p]);
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv, acc[r][j]);
      }
    }
  };
  const int64_t whole = K / (2 * kChunk);
  for (int64_t p = 0; p < whole; ++p) pair(p, ~__mmask64(0));
  if (whole < pairs) pair(whole, __mmask64(0xffffffffu));  // K an odd number of chunks: the last one's 32 bytes
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) out[r * kMaxRows + j] = sum_lanes(acc[r][j]);
}
#else
constexpr int64_t kInputsPerUnit = kChunk;  // inputs per register pair of laid-out q_x (W4a8Rows)

// out[r][j] = Σ_g s[r,g]·Σ_{k in g} q_x[j,k]·q[r,k] for RB weight rows from `w` (row stride K/2 bytes) and M rows
// of q_x (chunk c's inputs [64c, 64c+32) in xlo, [64c+32, 64c+64) in xhi); GC chunks a group (G = 64 or 128)
template <int M, int RB, int GC>
void w4a8_rows(const uint8_t* w, int64_t K, const float* scale, int64_t groups, const Lanes* xlo, const Lanes* xhi,
               float* out) {
  const int64_t chunks = K / kChunk, row_bytes = K / 2;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  __m256 acc[RB][M];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g)
    for (int r = 0; r < RB; ++r) {
      __m256i lo[GC], hi[GC];
      for (int c = 0; c < GC; ++c) {
        const uint8_t* at = w + r * row_bytes + (g * GC + c) * (kChunk / 2);
        if ((g * GC + c) % 2 == 0)  // one line (64 bytes) a prefetch
          _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchRows * row_bytes), _MM_HINT_T1);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
        lo[c] = _mm256_and_si256(v, low_nibbles);
        hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
      }
      const __m256 sv = _mm256_set1_ps(scale[r * groups + g]);
      for (int j = 0; j < M; ++j) {
        const int64_t at = j * chunks + g * GC;
        __m256i dot = _mm256_add_epi16(_mm256_maddubs_epi16(lo[0], xlo[at]), _mm256_maddubs_epi16(hi[0], xhi[at]));
        if constexpr (GC == 2)
          dot = _mm256_add_epi16(dot, _mm256_add_epi16(_mm256_maddubs_epi16(lo[1], xlo[at + 1]),
                                                       _mm256_maddubs_epi16(hi[1], xhi[at + 1])));
        acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(dot, ones)), sv, acc[r][j]);
      }
    }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) out[r * kMaxRows + j] = sum_lanes(acc[r][j]);
}
#endif

// w4a8_rows for M <= 8 x rows over `rows` weight rows. On AVX2, RB rows interleaved: 8-16 accumulators whatever M
// is. On AVX-512 one row at a time, read straight through: 10-24% more GB/s at 1-2 x rows on Zen 4, the same at 8
// (docs/benchmarks.md, eighteenth session), and the same sums in the same order
template <int M, int GC>
void w4a8_block(const uint8_t* w, int64_t rows, int64_t K, const float* scale, int64_t groups, const Lanes* xlo,
                const Lanes* xhi, float* out) {
#if defined(__AVX512BF16__)
  constexpr int RB = 1;
#else
  constexpr int RB = M <= 2 ? 4 : M <= 4 ? 2 : 1;
#endif
  int64_t r = 0;
  for (; r + RB <= rows; r += RB)
    w4a8_rows<M, RB, GC>(w + r * (K / 2), K, scale + r * groups, groups, xlo, xhi, out + r * kMaxRows);
  for (; r < rows; ++r)
    w4a8_rows<M, 1, GC>(w + r * (K / 2), K, scale + r * groups, groups, xlo, xhi, out + r * kMaxRows);
}

template <int GC>
void w4a8_block(int m, const uint8_t* w, int64_t rows, int64_t K, const float* scale, int64_t groups,
                const Lanes* xlo, const Lanes* xhi, float* out) {
  with_rows(m, [&](auto x_rows) {
    w4a8_block<decltype(x_rows)::value, GC>(w, rows, K, scale, groups, xlo, xhi, out);
  });
}

// A w4a8 weight as linear_w4a8 reads it: packed nibbles [N, K/2], fp32 scales and uint8 zero points [N, K/G],
// the group size G = K / (scales' columns), 64 or 128
struct W4a8Weight {
  const uint8_t* packed;
  const float* scale;
  const uint8_t* zero;
  int64_t N, K, G, groups;

  // the e-th of stacked weights whose first this is (check_stacked)
  W4a8Weight expert(int64_t e) const {
    return {packed + e * N * (K / 2), scale + e * N * groups, zero + e * N * groups, N, K, G, groups};
  }
};

// the operands' checks (naming `name`'s tensors), for inputs of width K; the tensors must outlive the view
W4a8Weight w4a8_weight(const char* name, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t K) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) * 2 == K &&
                  packed.is_contiguous(),
              name, ": the packed weight must be uint8 [N, K/2] (contiguous) for inputs of width ", K, ", got ",
              packed.scalar_type(), " ", packed.sizes());
  const int64_t N = packed.size(0);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) > 0 && K % scale.size(1) == 0, name,
              ": scales must be [N, K/G] for a weight [", N, ", ", K, "], got ", scale.sizes());
  const int64_t groups = scale.size(1), G = K / groups;
  TORCH_CHECK(G == 64 || G == 128, name, ": the group size must be 64 or 128, got K=", K, " in ", groups, " groups");
  TORCH_CHECK(zero.sizes() == scale.sizes(), name, ": scales and zero points must be [N, K/G] alike, got ",
              scale.sizes(), " and ", zero.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && zero.scalar_type() == at::kByte && scale.is_contiguous() &&
                  zero.is_contiguous(),
              name, ": scales must be contiguous fp32 and zero points uint8, got ", scale.scalar_type(), " and ",
              zero.scalar_type());
  return {packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<uint8_t>(), N, K, G, groups};
}

// Up to kMaxRows rows of x [., K], each quantized to int8 on its own absmax and laid out as the nibbles are: on
// AVX-512 pair p's low register holds inputs [128p, 128p+32) and [128p+64, +32), its high one [128p+32, +32) and
// [128p+96, +32) (zeros past K); on AVX2 chunk c's low one [64c, 64c+32), its high one [64c+32, +32); with
// Σ_{k in g} q_x[j,k] per group of G. A row's layout is the same whatever rows are beside it.
struct W4a8Rows {
  int64_t M = 0, K, G, units;
  std::vector<Lanes> lo, hi;  // [j * units + u]
  std::vector<float> step;    // a_j / 127
  std::vector<float> sums;    // [j][g]: Σ_{k in g} q_x[j,k]

  W4a8Rows(int64_t K_, int64_t G_)
      : K(K_), G(G_), units((K_ + kInputsPerUnit - 1) / kInputsPerUnit), lo(size_t(kMaxRows * units)),
        hi(size_t(kMaxRows * units)), step(kMaxRows, 0.0f), sums(size_t(kMaxRows * (K_ / G_)), 0.0f) {}

  void add(const float* row) {
    TORCH_CHECK(M < kMaxRows, "W4a8Rows: at most ", kMaxRows, " rows");
    const int64_t j = M++;
    std::vector<int8_t> q(size_t(units * kInputsPerUnit), 0);  // zeros past K stay zeros
    step[j] = quantize_row(row, K, q.data());
    for (int64_t g = 0; g < K / G; ++g) {  // in int32, one group at a time: exact, and no chain through memory
      int32_t sum = 0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) sum += q[k];
      sums[j * (K / G) + g] = float(sum);
    }
    for (int64_t u = 0; u < units; ++u) {  // each chunk's first 32 inputs to lo, its last 32 to hi
      const int8_t* src = q.data() + u * kInputsPerUnit;
      for (int64_t c = 0; c < kInputsPerUnit / kChunk; ++c) {
        std::memcpy(reinterpret_cast<int8_t*>(&lo[j * units + u]) + 32 * c, src + kChunk * c, 32);
        std::memcpy(reinterpret_cast<int8_t*>(&hi[j * units + u]) + 32 * c, src + kChunk * c + 32, 32);
      }
    }
  }
};

// one weight row's and one x row's Σ_g s[g]·z[g]·sums[g] (sums[g] = Σ_{k in g} q_x[k]), a register of groups a step
float zero_part(const float* s, const uint8_t* z, const float* sums, int64_t groups) {
  int64_t g = 0;
#if defined(__AVX512BF16__)
  __m512 part = _mm512_setzero_ps();
  for (; g < groups; g += 16) {
    const __mmask16 live = groups - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (groups - g)) - 1);
    const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, s + g),
                                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, z + g))));
    part = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(live, sums + g), part);
  }
  return sum_lanes(part);
#else
  __m256 part = _mm256_setzero_ps();
  for (; g + 8 <= groups; g += 8) {
    const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(z + g));
    const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(s + g), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z8)));
    part = _mm256_fmadd_ps(sz, _mm256_loadu_ps(sums + g), part);
  }
  float total = sum_lanes(part);
  for (; g < groups; ++g) total += s[g] * float(z[g]) * sums[g];
  return total;
#endif
}

// emit(row, j, y[j, row]) for weight rows n .. n+rows (rows <= kRowsPerTask) and every row j of x, in fp32:
// the group sums (w4a8_rows), minus the zero points' part Σ_g s·z·Σ_{k in g} q_x, times the row's step
template <typename Emit>
void row_task(const W4a8Rows& x, const W4a8Weight& w, int64_t n, int64_t rows, Emit emit) {
  alignas(64) float dots[kRowsPerTask * kMaxRows];  // [i][j]: Σ_g s[n+i,g]·Σ_{k in g} q_x[j,k]·q[n+i,k]
  const int64_t K = w.K, groups = w.groups;
  for (int64_t j0 = 0; j0 < x.M; j0 += 8) {  // x rows eight at a time; each row's sums are the same in any batch
    const int m = int(std::min<int64_t>(8, x.M - j0));
    (w.G == 64 ? w4a8_block<1> : w4a8_block<2>)(m, w.packed + n * (K / 2), rows, K, w.scale + n * groups, groups,
                                                x.lo.data() + j0 * x.units, x.hi.data() + j0 * x.units, dots + j0);
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = w.scale + (n + i) * groups;
    const uint8_t* z = w.zero + (n + i) * groups;
    for (int64_t j = 0; j < x.M; ++j)
      emit(n + i, j, (dots[i * kMaxRows + j] - zero_part(s, z, x.sums.data() + j * groups, groups)) * x.step[j]);
  }
}

at::Tensor linear_w4a8(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& scale_in,
                       const at::Tensor& zero_in, int64_t G) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "linear_w4a8: x must be fp32 or bf16, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) <= kMaxRows && x_in.size(1) % kChunk == 0, "linear_w4a8: x must be "
              "[M,K] with M <= ", kMaxRows, " and K a multiple of ", kChunk, ", got ", x_in.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  TORCH_CHECK((G == 64 || G == 128) && K % G == 0, "linear_w4a8: the group size must be 64 or 128 and divide K=", K,
              ", got ", G);
  const at::Tensor x = x_in.contiguous(), packed = packed_in.contiguous(), scale = scale_in.contiguous(),
                   zero = zero_in.contiguous();
  TORCH_CHECK(scale.dim() == 2 && scale.size(1) == K / G, "linear_w4a8: scales and zero points must be [N, K/G] = "
              "[N, ", K / G, "], got ", scale.sizes());
  const W4a8Weight w = w4a8_weight("linear_w4a8", packed, scale, zero, K);
  const std::vector<float> xf = floats(x);
  W4a8Rows rows(K, G);
  for (int64_t j = 0; j < M; ++j) rows.add(xf.data() + j * K);

  const int64_t N = w.N;
  at::Tensor y = at::empty({M, N}, x.options());
  const bool to_bf16_out = y.scalar_type() == at::kBFloat16;
  float* yf = to_bf16_out ? nullptr : y.data_ptr<float>();
  bf16* yb = to_bf16_out ? reinterpret_cast<bf16*>(y.data_ptr()) : nullptr;
  at::parallel_for(0, row_tasks(N), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task * kRowsPerTask;
      row_task(rows, w, n, std::min<int64_t>(kRowsPerTask, N - n), [&](int64_t row, int64_t j, float v) {
        if (to_bf16_out) yb[j * N + row] = to_bf16(v);
        else yf[j * N + row] = v;
      });
    }
  });
  return y;
}

// linear_bf16_fp32: y [M,N] = x [M,K] Wᵀ for a bf16 weight and fp32 x, summed in fp32: the "bf16" weight format
// (quant.py) for CPUs without native bf16 (AVX2, e.g. AMD Zen 3), where ATen's bf16 products are several times slower
// than its fp32 ones and fp32 weights are twice the bytes a memory-bound decode step must read. A bf16 value is the
// top half of an fp32 one, so eight weights widen to a register of floats with a zero extension and a shift, and each
// product is one FMA: exact products, fp32 sums (eight lanes, then across them). AVX2 + FMA, so in both builds.
// Each x row's operations are the same whatever rows are beside it: a row's result is the same in any batch.
struct Bf16Rows {  // up to `capacity` (<= kMaxRows) rows of x [., K] in fp32, row-major
  int64_t M = 0, K, capacity;
  std::vector<float> x;

  Bf16Rows(int64_t K_, int64_t capacity_) : K(K_), capacity(capacity_), x(size_t(K_ * capacity_)) {}

  const float* row(int64_t j) const { return x.data() + j * K; }

  void add(const float* r) {
    TORCH_CHECK(M < capacity && M < kMaxRows, "Bf16Rows: at most ", capacity, " rows");
    std::copy(r, r + K, x.data() + M++ * K);
  }
};

inline __m256 widened(const bf16* p) {  // eight bf16 values as fp32 lanes (exact)
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

// out[r][j] = Σ_k W[r,k]·x[j0 + j, k] for RB weight rows from w (row stride K) and M rows of x
template <int M, int RB>
void bf16_rows(const bf16* w, int64_t K, const Bf16Rows& x, int64_t j0, float* out) {
  __m256 acc[RB][M];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8)
    for (int r = 0; r < RB; ++r) {
      if (k % 32 == 0)  // one line (64 bytes) a prefetch
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + kPrefetchRows) * K + k), _MM_HINT_T1);
      const __m256 v = widened(w + r * K + k);
      for (int j = 0; j < M; ++j) acc[r][j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x.row(j0 + j) + k), acc[r][j]);
    }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < M; ++j) out[r * kMaxRows + j] = sum_lanes(acc[r][j]);
}

// bf16_rows<M, 1> for 5-8 rows, whose dot products are bound by loading x (8 rows of a 2048-wide x are 64 KB, twice
// L1): K in blocks of kBf16Block, each block of x (8 KB) used by all the task's weight rows before the next, each
// row's accumulators kept in memory between blocks. Every accumulator lane sees the same FMAs in the same order as in
// bf16_rows, so the sums are bit for bit those of the unblocked loop (a row's result is the same in any batch).
constexpr int64_t kBf16Block = 256;

template <int M>
void bf16_rows_blocked(const bf16* w, int64_t rows, int64_t K, const Bf16Rows& x, int64_t j0, float* out) {
  alignas(32) __m256 acc[kRowsPerTask][M];
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += kBf16Block) {
    const int64_t k1 = std::min(K, k0 + kBf16Block);
    for (int64_t r = 0; r < rows; ++r) {
      __m256 a[M];
      for (int j = 0; j < M; ++j) a[j] = acc[r][j];
      for (int64_t k = k0; k < k1; k += 8) {
        if (k % 32 == 0)  // this row's next block, one line a prefetch
          _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + kBf16Block), _MM_HINT_T1);
        const __m256 v = widened(w + r * K + k);
        for (int j = 0; j < M; ++j) a[j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x.row(j0 + j) + k), a[j]);
      }
      for (int j = 0; j < M; ++j) acc[r][j] = a[j];
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < M; ++j) out[r * kMaxRows + j] = sum_lanes(acc[r][j]);
}

struct Bf16Weight {  // a bf16 weight [N,K] as the kernel reads it
  const bf16* w;
  int64_t N, K;

  Bf16Weight expert(int64_t e) const { return {w + e * N * K, N, K}; }  // the e-th of stacked weights
};

Bf16Weight bf16_weight(const char* name, const at::Tensor& w, int64_t K) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.size(1) == K && w.is_contiguous(), name,
              ": the weight must be bf16 [N, K] (contiguous) for inputs of width ", K, ", got ", w.scalar_type(), " ",
              w.sizes());
  return {reinterpret_cast<const bf16*>(w.data_ptr()), w.size(0), K};
}

// emit(row, j, y[j, row]) for weight rows n .. n+rows (rows <= kRowsPerTask) and every row j of x, in fp32
template <typename Emit>
void row_task(const Bf16Rows& x, const Bf16Weight& w, int64_t n, int64_t rows, Emit emit) {
  alignas(64) float c[kRowsPerTask][kMaxRows];
  const int64_t K = w.K;
  for (int64_t j0 = 0; j0 < x.M; j0 += 8)  // x rows eight at a time: 8-16 accumulators whatever their count
    with_rows(int(std::min<int64_t>(8, x.M - j0)), [&](auto x_rows) {
      constexpr int m = decltype(x_rows)::value, RB = m <= 2 ? 4 : m <= 4 ? 2 : 1;
      if constexpr (m > 4) {
        bf16_rows_blocked<m>(w.w + n * K, rows, K, x, j0, &c[0][j0]);
      } else {
        int64_t r = 0;
        for (; r + RB <= rows; r += RB) bf16_rows<m, RB>(w.w + (n + r) * K, K, x, j0, &c[r][j0]);
        for (; r < rows; ++r) bf16_rows<m, 1>(w.w + (n + r) * K, K, x, j0, &c[r][j0]);
      }
    });
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < x.M; ++j) emit(n + i, j, c[i][j]);
}

at::Tensor linear_bf16_fp32(const at::Tensor& x_in, const at::Tensor& w_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "linear_bf16_fp32: x must be fp32, got ", x_in.scalar_type());
  check_shapes("linear_bf16_fp32", x_in, w_in, 8);
  const at::Tensor x = x_in.contiguous(), weight = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const Bf16Weight w = bf16_weight("linear_bf16_fp32", weight, K);
  Bf16Rows rows(K, M);
  for (int64_t j = 0; j < M; ++j) rows.add(x.data_ptr<float>() + j * K);
  at::Tensor y = at::empty({M, N}, x.options());
  float* out = y.data_ptr<float>();
  at::parallel_for(0, row_tasks(N), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      row_task(rows, w, task * kRowsPerTask, std::min<int64_t>(kRowsPerTask, N - task * kRowsPerTask),
               [&](int64_t n, int64_t j, float v) { out[j * N + n] = v; });
  });
  return y;
}

// The formats the fused experts below take: a weight view, the rows of x as its kernel multiplies them, and the
// kernel's task (64 weight rows by all the rows)
template <typename W, typename R>
struct Format {
  using Weight = W;
  using Rows = R;
  static Rows rows(const Weight& w, int64_t capacity) {
    if constexpr (std::is_same_v<Rows, W4a8Rows>) return Rows(w.K, w.G);  // laid out for the weight's groups
    else return Rows(w.K, capacity);
  }
  template <typename Emit>
  static void task(const Rows& x, const Weight& w, int64_t n, int64_t rows, Emit emit) { row_task(x, w, n, rows, emit); }
};
using W4a8 = Format<W4a8Weight, W4a8Rows>;
using Int8 = Format<Int8Weight, Int8Rows>;
using Bf16 = Format<Bf16Weight, Bf16Rows>;

// x, gates and indices as the fused experts take them (fp32 or bf16 x [N,d]; gates and indices [N,K])
void check_routing(const char* name, const at::Tensor& x, const at::Tensor& gates, const at::Tensor& indices) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name, ": x must be fp32 or bf16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && indices.dim() == 2 && gates.sizes() == indices.sizes() && indices.size(0) == x.size(0),
              name, ": x [N,d], gates and indices [N,K], got ", x.sizes(), ", ", gates.sizes(), " and ", indices.sizes());
}

// E experts' operands stacked [E, ...], each a contiguous tensor (QuantizedRoutedExperts' modules hold views of
// them, `prepare_for_inference`): a graph passes one tensor per operand, not one per expert and operand (V2-Lite:
// 9 against 576, whose boxing and guards cost ~0.3 ms a layer). Expert e's view is expert 0's, e slices on.
void check_stacked(const char* name, std::initializer_list<const at::Tensor*> operands) {
  const at::Tensor& first = **operands.begin();
  for (const at::Tensor* t : operands)
    TORCH_CHECK(t->dim() >= 2 && t->size(0) == first.size(0) && t->size(0) > 0 && t->is_contiguous(), name,
                ": every operand stacked [E, ...] for the same E > 0 experts, contiguous; got ", t->sizes(), " beside ",
                first.sizes());
}

template <typename Weight>
std::vector<Weight> expert_views(const Weight& first, int64_t E) {
  std::vector<Weight> views;
  for (int64_t e = 0; e < E; ++e) views.push_back(first.expert(e));
  return views;
}

// routed_experts_bf16's sum for experts whose projections are in `Format` (w4a8 or w8a8, one weight view per
// expert), x fp32 or bf16. Each chosen expert's slots go in passes of <= kMaxRows rows; the gate and up projections
// of every pass are the tasks of one parallel loop (64 weight rows each), the down projections of a second, so both
// threads stream weights even when the few chosen experts are uneven. Rounding is that of
// QuantizedRoutedExperts.dispatch in x's dtype: each projection is the format's linear kernel's, bit for bit (the
// same task), silu and the product round to x's dtype, and the gates sum the K outputs in fp32 in slot order.
template <typename Format>
at::Tensor fused_experts(const char* name, const at::Tensor& x_in, const at::Tensor& gates_in,
                         const at::Tensor& indices_in, const std::vector<typename Format::Weight>& gate_w,
                         const std::vector<typename Format::Weight>& up_w,
                         const std::vector<typename Format::Weight>& down_w) {
  const at::Tensor x = x_in.contiguous(), gates = gates_in.to(at::kFloat).contiguous(),
                   indices = indices_in.to(at::kLong).contiguous();
  const int64_t N = x.size(0), d = x.size(1), K = indices.size(1), E = int64_t(gate_w.size());
  const int64_t I = E ? gate_w[0].N : 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(gate_w[e].K == d && up_w[e].K == d, name, ": expert ", e, "'s w1 and w3 must take x's width ", d);
    TORCH_CHECK(gate_w[e].N == I && up_w[e].N == I, name, ": expert ", e, "'s w1 and w3 must have expert 0's ", I,
                " rows");
    TORCH_CHECK(down_w[e].K == I && down_w[e].N == d, name, ": expert ", e, "'s w2 must be [", d, ", ", I, "]");
  }

  // passes: an expert and up to kMaxRows of its slots, in slot order
  const std::vector<std::vector<int64_t>> slots_of = slots_by_expert(name, indices, E);
  struct Pass {
    int64_t expert;
    std::vector<int64_t> slots;
  };
  std::vector<Pass> passes;
  for (int64_t e = 0; e < E; ++e)
    for (size_t first = 0; first < slots_of[e].size(); first += kMaxRows)
      passes.push_back({e, std::vector<int64_t>(slots_of[e].begin() + first,
                                                slots_of[e].begin() + std::min(slots_of[e].size(), first + kMaxRows))});

  const bool round_bf16 = x.scalar_type() == at::kBFloat16;
  auto to_x = [&](float v) { return round_bf16 ? rounded(v) : v; };
  const std::vector<float> xf = floats(x);
  const int64_t P = int64_t(passes.size()), up_tasks = row_tasks(I), down_tasks = row_tasks(d);

  // gate and up: gate_up[pass][0 or 1][j][i], each value rounded to x's dtype as the linear kernel returns it
  std::vector<typename Format::Rows> inputs;
  for (const Pass& pass : passes) {
    inputs.push_back(Format::rows(gate_w[pass.expert], int64_t(pass.slots.size())));
    for (int64_t s : pass.slots) inputs.back().add(xf.data() + s / K * d);
  }
  std::vector<float> gate_up(size_t(P * 2 * kMaxRows * I));
  at::parallel_for(0, P * 2 * up_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / (2 * up_tasks), which = t / up_tasks % 2, n = t % up_tasks * kRowsPerTask;
      float* out = gate_up.data() + (p * 2 + which) * kMaxRows * I;
      Format::task(inputs[p], (which ? up_w : gate_w)[passes[p].expert], n, std::min<int64_t>(kRowsPerTask, I - n),
                   [&](int64_t row, int64_t j, float v) { out[j * I + row] = to_x(v); });
    }
  });

  // silu(gate)·up in x's dtype, the down projections' inputs
  std::vector<typename Format::Rows> inner_rows;
  std::vector<float> inner(static_cast<size_t>(I));
  for (int64_t p = 0; p < P; ++p) {
    inner_rows.push_back(Format::rows(down_w[passes[p].expert], int64_t(passes[p].slots.size())));
    const float* gate = gate_up.data() + p * 2 * kMaxRows * I;
    const float* up = gate + kMaxRows * I;
    for (size_t j = 0; j < passes[p].slots.size(); ++j) {
      for (int64_t i = 0; i < I; ++i) {
        const float g = gate[j * I + i];
        inner[i] = to_x(to_x(g / (1.0f + std::exp(-g))) * up[j * I + i]);
      }
      inner_rows.back().add(inner.data());
    }
  }

  // the down projections, each slot's output rounded to x's dtype; a dropped slot's stays 0
  std::vector<float> slot_out(size_t(N * K * d), 0.0f);
  at::parallel_for(0, P * down_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / down_tasks, n = t % down_tasks * kRowsPerTask;
      const std::vector<int64_t>& slots = passes[p].slots;
      Format::task(inner_rows[p], down_w[passes[p].expert], n, std::min<int64_t>(kRowsPerTask, d - n),
                   [&](int64_t row, int64_t j, float v) { slot_out[slots[j] * d + row] = to_x(v); });
    }
  });

  return gated_sum(slot_out, gates, x);
}

// routed_experts_w4a8: fused_experts for w4a8 projections, each operand of linear_w4a8 stacked over the experts
at::Tensor routed_experts_w4a8(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& indices,
                               const at::Tensor& w1, const at::Tensor& w1_scale, const at::Tensor& w1_zero,
                               const at::Tensor& w3, const at::Tensor& w3_scale, const at::Tensor& w3_zero,
                               const at::Tensor& w2, const at::Tensor& w2_scale, const at::Tensor& w2_zero) {
  const char* name = "routed_experts_w4a8";
  check_routing(name, x, gates, indices);
  check_stacked(name, {&w1, &w1_scale, &w1_zero, &w3, &w3_scale, &w3_zero, &w2, &w2_scale, &w2_zero});
  const int64_t d = x.size(1), E = w1.size(0), I = w1.size(1);
  TORCH_CHECK(d % kChunk == 0, name, ": x's width must be a multiple of ", kChunk, ", got ", d);
  TORCH_CHECK(I % kChunk == 0, name, ": the experts' width must be a multiple of ", kChunk, ", got ", I);
  const W4a8Weight gate = w4a8_weight("routed_experts_w4a8 (w1)", w1[0], w1_scale[0], w1_zero[0], d),
                   up = w4a8_weight("routed_experts_w4a8 (w3)", w3[0], w3_scale[0], w3_zero[0], d),
                   down = w4a8_weight("routed_experts_w4a8 (w2)", w2[0], w2_scale[0], w2_zero[0], I);
  TORCH_CHECK(up.G == gate.G, name, ": w1 and w3 have different group sizes");
  return fused_experts<W4a8>(name, x, gates, indices, expert_views(gate, E), expert_views(up, E),
                             expert_views(down, E));
}

// routed_experts_int8: fused_experts for w8a8 projections, each operand of linear_int8 stacked over the experts
at::Tensor routed_experts_int8(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& indices,
                               const at::Tensor& w1, const at::Tensor& w1_scale, const at::Tensor& w3,
                               const at::Tensor& w3_scale, const at::Tensor& w2, const at::Tensor& w2_scale) {
  const char* name = "routed_experts_int8";
  check_routing(name, x, gates, indices);
  check_stacked(name, {&w1, &w1_scale, &w3, &w3_scale, &w2, &w2_scale});
  const int64_t d = x.size(1), E = w1.size(0), I = w1.size(1);
  TORCH_CHECK(d % 64 == 0 && d <= 65536, name, ": x's width must be a multiple of 64, at most 65536, got ", d);
  TORCH_CHECK(I % 64 == 0 && I <= 65536, name, ": the experts' width must be a multiple of 64, at most 65536, got ",
              I);
  const Int8Weight gate = int8_weight("routed_experts_int8 (w1)", w1[0], w1_scale[0], d),
                   up = int8_weight("routed_experts_int8 (w3)", w3[0], w3_scale[0], d),
                   down = int8_weight("routed_experts_int8 (w2)", w2[0], w2_scale[0], I);
  return fused_experts<Int8>(name, x, gates, indices, expert_views(gate, E), expert_views(up, E),
                             expert_views(down, E));
}

// routed_experts_bf16_fp32: fused_experts for bf16 weights and fp32 x (linear_bf16_fp32's), stacked over the experts
at::Tensor routed_experts_bf16_fp32(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& indices,
                                    const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2) {
  const char* name = "routed_experts_bf16_fp32";
  check_routing(name, x, gates, indices);
  TORCH_CHECK(x.scalar_type() == at::kFloat, name, ": x must be fp32, got ", x.scalar_type());
  check_stacked(name, {&w1, &w3, &w2});
  const int64_t d = x.size(1), E = w1.size(0), I = w1.size(1);
  TORCH_CHECK(d % 8 == 0 && I % 8 == 0, name, ": x's and the experts' widths must be multiples of 8, got ", d, " and ",
              I);
  const Bf16Weight gate = bf16_weight("routed_experts_bf16_fp32 (w1)", w1[0], d),
                   up = bf16_weight("routed_experts_bf16_fp32 (w3)", w3[0], d),
                   down = bf16_weight("routed_experts_bf16_fp32 (w2)", w2[0], I);
  return fused_experts<Bf16>(name, x, gates, indices, expert_views(gate, E), expert_views(up, E),
                             expert_views(down, E));
}

// dequantize_w4a8: W [N,K] = (q - z)·s from linear_w4a8's operands, each value computed in fp32 and rounded once to
// `dtype` (fp32 or bf16) - what a prefill chunk multiplies by (torch's GEMM), one pass over the packed weight
at::Tensor dequantize_w4a8(const at::Tensor& packed_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                           int64_t G, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize_w4a8: fp32 or bf16 out, got ", dtype);
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 2 && (packed_in.size(1) * 2) % kChunk == 0,
              "dequantize_w4a8: the packed weight must be uint8 [N, K/2] with K a multiple of ", kChunk, ", got ",
              packed_in.sizes());
  const int64_t N = packed_in.size(0), K = packed_in.size(1) * 2;
  TORCH_CHECK((G == 64 || G == 128) && K % G == 0, "dequantize_w4a8: the group size must be 64 or 128 and divide K=",
              K, ", got ", G);
  const int64_t groups = K / G;
  TORCH_CHECK(scale_in.scalar_type() == at::kFloat && zero_in.scalar_type() == at::kByte && scale_in.dim() == 2 &&
                  zero_in.dim() == 2 && scale_in.size(0) == N && zero_in.size(0) == N && scale_in.size(1) == groups &&
                  zero_in.size(1) == groups,
              "dequantize_w4a8: fp32 scales and uint8 zero points [N, K/G] = [", N, ", ", groups, "], got ",
              scale_in.sizes(), " and ", zero_in.sizes());
  const at::Tensor packed = packed_in.contiguous(), scale = scale_in.contiguous(), zero = zero_in.contiguous();
  at::Tensor w = at::empty({N, K}, packed.options().dtype(dtype));
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const uint8_t* zp = zero.data_ptr<uint8_t>();
  bf16* wb = dtype == at::kBFloat16 ? reinterpret_cast<bf16*>(w.data_ptr()) : nullptr;
  float* wf = wb ? nullptr : w.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t c = 0; c < K / kChunk; ++c) {
        const int64_t g = c * kChunk / G;
        const float s = sp[n * groups + g], z = float(zp[n * groups + g]);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + n * (K / 2) + c * 32));
        alignas(64) uint8_t q[kChunk];
        _mm256_store_si256(reinterpret_cast<__m256i*>(q), _mm256_and_si256(v, _mm256_set1_epi8(0x0f)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + 32),
                           _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0f)));
#if defined(__AVX512BF16__)
        for (int i = 0; i < kChunk; i += 16) {
          const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + i))));
          const __m512 value = _mm512_mul_ps(_mm512_sub_ps(qf, _mm512_set1_ps(z)), _mm512_set1_ps(s));
          const int64_t at = n * K + c * kChunk + i;
          if (wb) _mm256_storeu_si256(reinterpret_cast<__m256i*>(wb + at), (__m256i)_mm512_cvtneps_pbh(value));
          else _mm512_storeu_ps(wf + at, value);
        }
#else
        for (int i = 0; i < kChunk; i += 8) {
          const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
          const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8));
          const __m256 value = _mm256_mul_ps(_mm256_sub_ps(qf, _mm256_set1_ps(z)), _mm256_set1_ps(s));
          const int64_t at = n * K + c * kChunk + i;
          if (wb) {  // no bf16 conversion instruction: round each to nearest even as torch does
            alignas(32) float each[8];
            _mm256_store_ps(each, value);
            for (int e = 0; e < 8; ++e) wb[at + e] = to_bf16(each[e]);
          } else {
            _mm256_storeu_ps(wf + at, value);
          }
        }
#endif
      }
  });
  return w;
}

}  // namespace

TORCH_LIBRARY(dsv2_cpu, m) {
#if defined(__AVX512BF16__)
  m.def("routed_experts_bf16(Tensor x, Tensor gates, Tensor indices, Tensor w1, Tensor w2, Tensor w3) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor weight) -> Tensor");
#endif
  m.def("linear_int8(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("linear_w4a8(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group_size) -> Tensor");
  m.def("dequantize_w4a8(Tensor packed, Tensor scale, Tensor zero, int group_size, ScalarType dtype) -> Tensor");
  m.def("routed_experts_w4a8(Tensor x, Tensor gates, Tensor indices, Tensor w1, Tensor w1_scale, Tensor w1_zero, "
        "Tensor w3, Tensor w3_scale, Tensor w3_zero, Tensor w2, Tensor w2_scale, Tensor w2_zero) -> Tensor");
  m.def("routed_experts_int8(Tensor x, Tensor gates, Tensor indices, Tensor w1, Tensor w1_scale, Tensor w3, "
        "Tensor w3_scale, Tensor w2, Tensor w2_scale) -> Tensor");
  m.def("linear_bf16_fp32(Tensor x, Tensor weight) -> Tensor");
  m.def("routed_experts_bf16_fp32(Tensor x, Tensor gates, Tensor indices, Tensor w1, Tensor w3, Tensor w2) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) {
#if defined(__AVX512BF16__)
  m.impl("routed_experts_bf16", &routed_experts_bf16);
  m.impl("linear_bf16", &linear_bf16);
#endif
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_w4a8", &linear_w4a8);
  m.impl("dequantize_w4a8", &dequantize_w4a8);
  m.impl("routed_experts_w4a8", &routed_experts_w4a8);
  m.impl("routed_experts_int8", &routed_experts_int8);
  m.impl("linear_bf16_fp32", &linear_bf16_fp32);
  m.impl("routed_experts_bf16_fp32", &routed_experts_bf16_fp32);
}
