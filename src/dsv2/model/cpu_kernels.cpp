// Routed experts for a few tokens on a CPU with AVX-512 BF16: each chosen expert's weights read once.
// Built and loaded by cpu_kernels.py (torch.utils.cpp_extension); why it exists is written there.
//
//   x [N,d] bf16, gates [N,K] fp32, indices [N,K] int64 (-1: a dropped slot), w1/w3 [E,I,d], w2 [E,d,I] bf16
//   y[n] = sum_k gates[n,k] * FFN_{indices[n,k]}(x[n]),   FFN_e(v) = w2_e (silu(w1_e v) * (w3_e v))
//
// Rounding follows the eager path (RoutedExperts.forward in bf16): each projection accumulates in fp32 and
// rounds to bf16, silu and the product round to bf16, and the gates sum the K expert outputs in fp32 in slot
// order before one last rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int kTokensPerPass = 8;  // token rows whose dot products share one load of a weight row

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

// out[j][r] = dot(W[r], v[j]) for rows r < R of W [R,D] and M vectors v, all bf16, fp32 sums. RB rows at a
// time, so RB·M independent accumulator chains hide the dot products' latency; the tail of D below 32 is read
// with a masked load, so any D works.
template <int M, int RB>
void rows_dot(const bf16* W, int64_t R, int64_t D, const bf16* const* v, float* out, int64_t out_stride) {
  const int64_t full = D / 32 * 32;
  const __mmask32 tail = D == full ? 0 : __mmask32((1ull << (D - full)) - 1);
  int64_t r = 0;
  for (; r + RB <= R; r += RB) {
    __m512 acc[RB][M];
    for (int b = 0; b < RB; ++b)
      for (int j = 0; j < M; ++j) acc[b][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {
      __m512bh wv[RB];
      for (int b = 0; b < RB; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(W + (r + b) * D + k);
      for (int j = 0; j < M; ++j) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(v[j] + k);
        for (int b = 0; b < RB; ++b) acc[b][j] = _mm512_dpbf16_ps(acc[b][j], xv, wv[b]);
      }
    }
    if (tail)
      for (int j = 0; j < M; ++j) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, v[j] + full);
        for (int b = 0; b < RB; ++b)
          acc[b][j] = _mm512_dpbf16_ps(acc[b][j], xv, (__m512bh)_mm512_maskz_loadu_epi16(tail, W + (r + b) * D + full));
      }
    for (int b = 0; b < RB; ++b)
      for (int j = 0; j < M; ++j) out[j * out_stride + r + b] = _mm512_reduce_add_ps(acc[b][j]);
  }
  if (r < R) rows_dot<M, 1>(W + r * D, R - r, D, v, out + r, out_stride);
}

// rows_dot for m <= kTokensPerPass vectors: ~16 accumulators whatever m is
void rows_dot(const bf16* W, int64_t R, int64_t D, const bf16* const* v, int m, float* out, int64_t out_stride) {
  switch (m) {
    case 1: return rows_dot<1, 8>(W, R, D, v, out, out_stride);
    case 2: return rows_dot<2, 8>(W, R, D, v, out, out_stride);
    case 3: return rows_dot<3, 4>(W, R, D, v, out, out_stride);
    case 4: return rows_dot<4, 4>(W, R, D, v, out, out_stride);
    case 5: return rows_dot<5, 2>(W, R, D, v, out, out_stride);
    case 6: return rows_dot<6, 2>(W, R, D, v, out, out_stride);
    case 7: return rows_dot<7, 2>(W, R, D, v, out, out_stride);
    default: return rows_dot<8, 2>(W, R, D, v, out, out_stride);
  }
}

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

  // the slots of each expert, in slot order (a dropped slot, id -1, belongs to none)
  const int64_t* ids = indices.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> slots_of(E);
  for (int64_t s = 0; s < N * K; ++s)
    if (ids[s] >= 0) {
      TORCH_CHECK(ids[s] < E, "routed_experts_bf16: expert id ", ids[s], " out of range (", E, " experts)");
      slots_of[ids[s]].push_back(s);
    }
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
  at::parallel_for(0, int64_t(chosen.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gate(kTokensPerPass * I), up(kTokensPerPass * I), out(kTokensPerPass * d);
    std::vector<bf16> inner(kTokensPerPass * I);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t e = chosen[c];
      const std::vector<int64_t>& slots = slots_of[e];
      for (size_t first = 0; first < slots.size(); first += kTokensPerPass) {
        const int m = int(std::min<size_t>(kTokensPerPass, slots.size() - first));
        const bf16* rows[kTokensPerPass];
        for (int j = 0; j < m; ++j) rows[j] = xp + slots[first + j] / K * d;
        rows_dot(w1p + e * I * d, I, d, rows, m, gate.data(), I);
        rows_dot(w3p + e * I * d, I, d, rows, m, up.data(), I);
        for (int64_t i = 0; i < int64_t(m) * I; ++i) {
          const float g = rounded(gate[i]);
          inner[i] = to_bf16(rounded(g / (1.0f + std::exp(-g))) * rounded(up[i]));
        }
        const bf16* inner_rows[kTokensPerPass];
        for (int j = 0; j < m; ++j) inner_rows[j] = inner.data() + j * I;
        rows_dot(w2p + e * d * I, d, I, inner_rows, m, out.data(), d);
        for (int j = 0; j < m; ++j) {
          float* dst = slot_out.data() + slots[first + j] * d;
          for (int64_t i = 0; i < d; ++i) dst[i] = rounded(out[j * d + i]);
        }
      }
    }
  });

  at::Tensor y = at::empty({N, d}, x.options());
  bf16* yp = reinterpret_cast<bf16*>(y.data_ptr());
  const float* gp = gates.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < d; ++i) {
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += gp[n * K + k] * slot_out[(n * K + k) * d + i];
      yp[n * d + i] = to_bf16(sum);
    }
  return y;
}

}  // namespace

TORCH_LIBRARY(dsv2_cpu, m) {
  m.def("routed_experts_bf16(Tensor x, Tensor gates, Tensor indices, Tensor w1, Tensor w2, Tensor w3) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) { m.impl("routed_experts_bf16", &routed_experts_bf16); }
