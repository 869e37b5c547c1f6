// Fused CPU kernels for the soft hybrid weight W ⊙ M̃ and its gradient (one pass each).
//
// M̃ = t + (1 − t)·m, with t the soft value of the element's tile and m either the soft 2:4 mask
// m = softmax((κΠ + g)/τ)·C of its group of four, or a frozen 0/1 mask. The reference is the
// pure-PyTorch code in soft_masks.py; these kernels compute the same formulas without any
// weight-sized intermediate: the softmax is recomputed in backward instead of being stored.
//
// Speed: written so that GCC vectorises every weight-sized loop (check with -fopt-info-vec): the
// loops are specialised (templates) per combination of inputs, so no branch is left inside them;
// the frozen mask is read as bytes (loads of bool are never vectorised); the softmax runs across
// blocks of groups (the logits' stride of six keeps a loop over single groups scalar); the
// exponential is an inline polynomial (a call to expf keeps a loop scalar); and no running sum
// sits inside a loop that also stores. The scalar version cost about a third of a CPU learning step.
#include <torch/extension.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

// Late in training κ/τ is large and the losing patterns' probabilities fall below FLT_MIN.
// Subnormal floats cost x86 about a hundred times a normal operation, and the GEMMs that consume
// W ⊙ M̃ slowed a whole step from 4 s to over a minute; such values are zero for every purpose here.
inline float flush_subnormal(float x) { return std::fabs(x) < FLT_MIN ? 0.f : x; }

// exp(d) for d <= 0, and 0 below -80 (so never a subnormal): Cody–Waite reduction d = n·ln2 + r,
// a degree-6 polynomial for e^r on |r| <= ln2/2 (Cephes' expf coefficients, about 1 ulp) and 2^n
// put into the exponent bits. Branch-free, so it vectorises.
inline float exp_nonpositive(float d) {
  const float x = d > -80.f ? d : -80.f;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // n >= -116 here: a normal 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return d > -80.f ? p * scale : 0.f;
}

// Subnormal intermediates (products of the tiny shares of late annealing) cost x86 a microcode
// assist each; inside the kernels every thread flushes them to zero (FTZ) and reads them as zero
// (DAZ), as `flush_subnormal` does for the values it stores. The caller's mode is restored.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Positions kept by the six 2:4 patterns 1100, 1010, 1001, 0110, 0101, 0011.
constexpr int kA[6] = {0, 0, 0, 1, 1, 2};
constexpr int kB[6] = {1, 2, 3, 2, 3, 3};

// Groups are processed kBlock at a time, their six logits transposed into six rows of kBlock
// lanes, so that the softmax runs across groups in vector registers (the logits' stride of six
// keeps a loop over single groups scalar). The weight-sized arrays are read and written with
// unit stride.
constexpr int kBlock = 16;

// y[k][b] = softmax_k((κΠ + g)/τ) of the n (<= kBlock) groups from `logits`; shares below FLT_MIN
// set to zero; lanes b >= n are computed on zeros and never used.
template <bool NOISE>
inline void soft_patterns_block(const float* __restrict logits, const float* __restrict noise, int64_t n,
                                float scale, float inv_tau, float (&y)[6][kBlock]) {
  float z[6][kBlock];
  for (int b = 0; b < kBlock; ++b)
    for (int k = 0; k < 6; ++k)
      z[k][b] = b < n ? (logits[6 * b + k] * scale + (NOISE ? noise[6 * b + k] : 0.f)) * inv_tau : 0.f;
  for (int b = 0; b < kBlock; ++b) {
    float zmax = z[0][b];
    for (int k = 1; k < 6; ++k) zmax = z[k][b] > zmax ? z[k][b] : zmax;
    float sum = 0.f;
    for (int k = 0; k < 6; ++k) {
      y[k][b] = exp_nonpositive(z[k][b] - zmax);
      sum += y[k][b];
    }
    const float inv = 1.f / sum;
    for (int k = 0; k < 6; ++k) y[k][b] = flush_subnormal(y[k][b] * inv);
  }
}

// m = y·C in the weight's own order: m4[4b + j] is position j of group b.
inline void mask_of_block(const float (&y)[6][kBlock], float* __restrict m4) {
  for (int b = 0; b < kBlock; ++b) {
    m4[4 * b + 0] = y[0][b] + y[1][b] + y[2][b];
    m4[4 * b + 1] = y[0][b] + y[3][b] + y[4][b];
    m4[4 * b + 2] = y[1][b] + y[3][b] + y[5][b];
    m4[4 * b + 3] = y[2][b] + y[4][b] + y[5][b];
  }
}

struct Layout {
  int64_t out_f, in_f, G, C, tile_rows, tile_cols;
};

// One row of W ⊙ M̃ with learned 2:4 logits; returns the row's Σ (W ⊙ M̃)².
template <bool NOISE, bool TILES>
double forward_row_soft(int64_t i, const Layout& L, const float* __restrict w, const float* __restrict pl,
                        const float* __restrict pn, const float* pt, float scale, float inv_tau, float* __restrict o) {
  const int64_t tr = i / L.tile_rows, groups_per_tile = L.tile_cols / 4;
  double acc = 0.0;
  for (int64_t g0 = 0; g0 < L.G; g0 += groups_per_tile) {  // one tile column at a time: t is constant
    const int64_t g1 = g0 + groups_per_tile < L.G ? g0 + groups_per_tile : L.G;
    const float t = TILES ? pt[tr * L.C + g0 / groups_per_tile] : 0.f;
    float seg = 0.f;
    for (int64_t gb = g0; gb < g1; gb += kBlock) {
      const int64_t n = g1 - gb < kBlock ? g1 - gb : kBlock, lg = (i * L.G + gb) * 6, base = i * L.in_f + 4 * gb;
      float y[6][kBlock], m4[4 * kBlock];
      soft_patterns_block<NOISE>(pl + lg, NOISE ? pn + lg : nullptr, n, scale, inv_tau, y);
      mask_of_block(y, m4);
      for (int64_t c = 0; c < 4 * n; ++c) {
        const float v = flush_subnormal(w[base + c] * (t + (1.f - t) * m4[c]));
        o[base + c] = v;
        seg += v * v;
      }
    }
    acc += seg;
  }
  return acc;
}

// One row of W ⊙ M̃ with a frozen 0/1 mask: W where kept, t·W elsewhere.
template <bool TILES>
double forward_row_frozen(int64_t i, const Layout& L, const float* w, const uint8_t* __restrict pk, const float* pt, float* __restrict o) {
  const int64_t tr = i / L.tile_rows;
  double acc = 0.0;
  for (int64_t c0 = 0; c0 < L.in_f; c0 += L.tile_cols) {
    const int64_t c1 = c0 + L.tile_cols < L.in_f ? c0 + L.tile_cols : L.in_f;
    const float t = TILES ? pt[tr * L.C + c0 / L.tile_cols] : 0.f;
    const float* wr = w + i * L.in_f;
    const uint8_t* kr = pk + i * L.in_f;
    float* orow = o + i * L.in_f;
    float seg = 0.f;
    for (int64_t c = c0; c < c1; ++c) {
      const float v = flush_subnormal(wr[c] * (t + (1.f - t) * static_cast<float>(kr[c])));
      orow[c] = v;
      seg += v * v;
    }
    acc += seg;
  }
  return acc;
}

// Gradients of one row with learned 2:4 logits (see `backward`).
template <bool NOISE, bool TILES>
void backward_row_soft(int64_t i, const Layout& L, const float* __restrict go, const float* __restrict w,
                       const float* __restrict pl, const float* __restrict pn, const float* pt, float scale,
                       float inv_tau, float extra, float* __restrict gl, float* gt) {
  const int64_t tr = i / L.tile_rows, groups_per_tile = L.tile_cols / 4;
  const float logit_scale = scale * inv_tau;
  for (int64_t g0 = 0; g0 < L.G; g0 += groups_per_tile) {
    const int64_t g1 = g0 + groups_per_tile < L.G ? g0 + groups_per_tile : L.G;
    const float t = TILES ? pt[tr * L.C + g0 / groups_per_tile] : 0.f;
    float dt_seg = 0.f;
    for (int64_t gb = g0; gb < g1; gb += kBlock) {
      const int64_t n = g1 - gb < kBlock ? g1 - gb : kBlock, lg = (i * L.G + gb) * 6, base = i * L.in_f + 4 * gb;
      float y[6][kBlock], m4[4 * kBlock], dm4[4 * kBlock] = {}, dy[6][kBlock];
      soft_patterns_block<NOISE>(pl + lg, NOISE ? pn + lg : nullptr, n, scale, inv_tau, y);
      mask_of_block(y, m4);
      for (int64_t c = 0; c < 4 * n; ++c) {  // ∂L/∂M̃ = (∂L/∂(W ⊙ M̃) + extra·W ⊙ M̃) ⊙ W
        const float wc = w[base + c];
        const float dM = (go[base + c] + extra * wc * (t + (1.f - t) * m4[c])) * wc;
        dt_seg += dM * (1.f - m4[c]);
        dm4[c] = dM * (1.f - t);
      }
      for (int b = 0; b < kBlock; ++b) {  // through m = y·C and the softmax
        float dot = 0.f;
        for (int k = 0; k < 6; ++k) {
          dy[k][b] = dm4[4 * b + kA[k]] + dm4[4 * b + kB[k]];
          dot += y[k][b] * dy[k][b];
        }
        for (int k = 0; k < 6; ++k) dy[k][b] = flush_subnormal(y[k][b] * (dy[k][b] - dot) * logit_scale);
      }
      for (int64_t b = 0; b < n; ++b)
        for (int k = 0; k < 6; ++k) gl[lg + 6 * b + k] = dy[k][b];
    }
    if (TILES) gt[i * L.C + g0 / groups_per_tile] = dt_seg;
  }
}

// ∂L/∂t of one row with a frozen mask: Σ over the tile's dropped positions of ∂L/∂M̃ · W.
void backward_row_frozen(int64_t i, const Layout& L, const float* __restrict go, const float* __restrict w,
                         const uint8_t* __restrict pk, const float* pt, float extra, float* gt) {
  const int64_t tr = i / L.tile_rows;
  const float* wr = w + i * L.in_f;
  const float* gr = go + i * L.in_f;
  const uint8_t* kr = pk + i * L.in_f;
  for (int64_t c0 = 0; c0 < L.in_f; c0 += L.tile_cols) {
    const int64_t c1 = c0 + L.tile_cols < L.in_f ? c0 + L.tile_cols : L.in_f;
    const float t = pt[tr * L.C + c0 / L.tile_cols];
    float dt_seg = 0.f;
    for (int64_t c = c0; c < c1; ++c) {
      const float wc = wr[c];
      dt_seg += (1.f - static_cast<float>(kr[c])) * (gr[c] + extra * wc * t) * wc;
    }
    gt[i * L.C + c0 / L.tile_cols] = dt_seg;
  }
}

}  // namespace

// Soft 2:4 (logits given) or frozen mask (keep given) mixed with tiles (optional).
// Returns (W ⊙ M̃ (out, in), Σ_row (W ⊙ M̃)² (out,) in float64).
std::vector<torch::Tensor> forward(torch::Tensor weight, c10::optional<torch::Tensor> logits,
                                   c10::optional<torch::Tensor> noise, c10::optional<torch::Tensor> keep,
                                   c10::optional<torch::Tensor> tiles, double kappa, double tau,
                                   int64_t tile_rows, int64_t tile_cols) {
  const Layout L{weight.size(0), weight.size(1), weight.size(1) / 4, tiles ? tiles->size(1) : 0, tile_rows, tile_cols};
  auto result = torch::empty_like(weight);
  auto row_sq = torch::zeros({L.out_f}, weight.options().dtype(torch::kFloat64));
  const float* w = weight.data_ptr<float>();
  const float* pl = logits ? logits->data_ptr<float>() : nullptr;
  const float* pn = noise ? noise->data_ptr<float>() : nullptr;
  // bytes, not bool: GCC does not vectorise loads of bool
  const uint8_t* pk = keep ? reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>()) : nullptr;
  const float* pt = tiles ? tiles->data_ptr<float>() : nullptr;
  float* o = result.data_ptr<float>();
  double* sq = row_sq.data_ptr<double>();
  const float scale = static_cast<float>(kappa), inv_tau = static_cast<float>(1.0 / tau);
#pragma omp parallel
  {
  FlushDenormals flush;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < L.out_f; ++i) {
    if (pl) {
      sq[i] = pn ? (pt ? forward_row_soft<true, true>(i, L, w, pl, pn, pt, scale, inv_tau, o)
                       : forward_row_soft<true, false>(i, L, w, pl, pn, pt, scale, inv_tau, o))
                 : (pt ? forward_row_soft<false, true>(i, L, w, pl, pn, pt, scale, inv_tau, o)
                       : forward_row_soft<false, false>(i, L, w, pl, pn, pt, scale, inv_tau, o));
    } else {
      sq[i] = pt ? forward_row_frozen<true>(i, L, w, pk, pt, o) : forward_row_frozen<false>(i, L, w, pk, pt, o);
    }
  }
  }
  return {result, row_sq};
}

// Gradients. grad_out: ∂L/∂(W ⊙ M̃); out_scale: an extra ∂L/∂(W ⊙ M̃) = out_scale·(W ⊙ M̃) (the
// injected ‖W ⊙ M̃‖ term). Returns (∂L/∂Π (out, G, 6) or empty, ∂L/∂t per row (out, C) or empty).
std::vector<torch::Tensor> backward(torch::Tensor grad_out, torch::Tensor weight, c10::optional<torch::Tensor> logits,
                                    c10::optional<torch::Tensor> noise, c10::optional<torch::Tensor> keep,
                                    c10::optional<torch::Tensor> tiles, double kappa, double tau,
                                    int64_t tile_rows, int64_t tile_cols, double out_scale) {
  const Layout L{weight.size(0), weight.size(1), weight.size(1) / 4, tiles ? tiles->size(1) : 0, tile_rows, tile_cols};
  const float* w = weight.data_ptr<float>();
  const float* go = grad_out.data_ptr<float>();
  const float* pl = logits ? logits->data_ptr<float>() : nullptr;
  const float* pn = noise ? noise->data_ptr<float>() : nullptr;
  // bytes, not bool: GCC does not vectorise loads of bool
  const uint8_t* pk = keep ? reinterpret_cast<const uint8_t*>(keep->data_ptr<bool>()) : nullptr;
  const float* pt = tiles ? tiles->data_ptr<float>() : nullptr;
  torch::Tensor grad_logits, grad_tiles;
  if (pl) grad_logits = torch::empty_like(*logits);
  if (pt) grad_tiles = torch::zeros({L.out_f, L.C}, weight.options());
  float* gl = pl ? grad_logits.data_ptr<float>() : nullptr;
  float* gt = pt ? grad_tiles.data_ptr<float>() : nullptr;
  if (!pl && !pt) return {grad_logits, grad_tiles};  // a frozen mask without tiles has nothing to learn
  const float scale = static_cast<float>(kappa), inv_tau = static_cast<float>(1.0 / tau);
  const float extra = static_cast<float>(out_scale);
#pragma omp parallel
  {
  FlushDenormals flush;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < L.out_f; ++i) {
    if (!pl) {
      backward_row_frozen(i, L, go, w, pk, pt, extra, gt);
    } else if (pn) {
      pt ? backward_row_soft<true, true>(i, L, go, w, pl, pn, pt, scale, inv_tau, extra, gl, gt)
         : backward_row_soft<true, false>(i, L, go, w, pl, pn, pt, scale, inv_tau, extra, gl, gt);
    } else {
      pt ? backward_row_soft<false, true>(i, L, go, w, pl, pn, pt, scale, inv_tau, extra, gl, gt)
         : backward_row_soft<false, false>(i, L, go, w, pl, pn, pt, scale, inv_tau, extra, gl, gt);
    }
  }
  }
  return {grad_logits, grad_tiles};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "soft hybrid weight and row sums of squares");
  m.def("backward", &backward, "gradients of the soft hybrid weight");
}
