// Fused CPU kernels for the soft hybrid weight W ⊙ M̃ and its gradient (one pass each).
//
// M̃ = t + (1 − t)·m, with t the soft value of the element's tile and m either the soft 2:4 mask
// m = softmax((κΠ + g)/τ)·C of its group of four, or a frozen 0/1 mask. The reference is the
// pure-PyTorch code in soft_masks.py; these kernels compute the same formulas without any
// weight-sized intermediate: the softmax is recomputed in backward instead of being stored.
#include <torch/extension.h>

#include <cfloat>
#include <cmath>
#include <vector>

namespace {

// Late in training κ/τ is large and the losing patterns' probabilities fall below FLT_MIN.
// Subnormal floats cost x86 about a hundred times a normal operation, and the GEMMs that consume
// W ⊙ M̃ slowed a whole step from 4 s to over a minute; such values are zero for every purpose here.
inline float flush_subnormal(float x) { return std::fabs(x) < FLT_MIN ? 0.f : x; }

// Positions kept by the six 2:4 patterns 1100, 1010, 1001, 0110, 0101, 0011.
constexpr int kA[6] = {0, 0, 0, 1, 1, 2};
constexpr int kB[6] = {1, 2, 3, 2, 3, 3};

inline void soft_patterns(const float* logits, const float* noise, float scale, float inv_tau, float* y) {
  float z[6];
  for (int k = 0; k < 6; ++k) z[k] = (logits[k] * scale + (noise ? noise[k] : 0.f)) * inv_tau;
  float zmax = z[0];
  for (int k = 1; k < 6; ++k) zmax = z[k] > zmax ? z[k] : zmax;
  float sum = 0.f;
  for (int k = 0; k < 6; ++k) {
    // shares below exp(-80) ≈ 1.8e-35 are set to zero, so exp never produces a subnormal
    const float d = z[k] - zmax;
    y[k] = d > -80.f ? std::exp(d) : 0.f;
    sum += y[k];
  }
  const float inv = 1.f / sum;
  for (int k = 0; k < 6; ++k) y[k] = flush_subnormal(y[k] * inv);
}

inline void mask_of(const float* y, float* m) {
  m[0] = y[0] + y[1] + y[2];
  m[1] = y[0] + y[3] + y[4];
  m[2] = y[1] + y[3] + y[5];
  m[3] = y[2] + y[4] + y[5];
}

inline float tile_value(const float* tiles, int64_t C, int64_t tile_row, int64_t col, int64_t tile_cols) {
  return tiles ? tiles[tile_row * C + col / tile_cols] : 0.f;
}

}  // namespace

// Soft 2:4 (logits given) or frozen mask (keep given) mixed with tiles (optional).
// Returns (W ⊙ M̃ (out, in), Σ_row (W ⊙ M̃)² (out,) in float64).
std::vector<torch::Tensor> forward(torch::Tensor weight, c10::optional<torch::Tensor> logits,
                                   c10::optional<torch::Tensor> noise, c10::optional<torch::Tensor> keep,
                                   c10::optional<torch::Tensor> tiles, double kappa, double tau,
                                   int64_t tile_rows, int64_t tile_cols) {
  const int64_t out_f = weight.size(0), in_f = weight.size(1), G = in_f / 4;
  auto result = torch::empty_like(weight);
  auto row_sq = torch::zeros({out_f}, weight.options().dtype(torch::kFloat64));
  const float* w = weight.data_ptr<float>();
  const float* pl = logits ? logits->data_ptr<float>() : nullptr;
  const float* pn = noise ? noise->data_ptr<float>() : nullptr;
  const bool* pk = keep ? keep->data_ptr<bool>() : nullptr;
  const float* pt = tiles ? tiles->data_ptr<float>() : nullptr;
  const int64_t C = tiles ? tiles->size(1) : 0;
  float* o = result.data_ptr<float>();
  double* sq = row_sq.data_ptr<double>();
  const float scale = static_cast<float>(kappa), inv_tau = static_cast<float>(1.0 / tau);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < out_f; ++i) {
    const int64_t tr = i / tile_rows;
    const int64_t groups_per_tile = tile_cols / 4;
    double acc = 0.0;
    for (int64_t g0 = 0; g0 < G; g0 += groups_per_tile) {  // one tile column at a time: t is constant
      const int64_t g1 = g0 + groups_per_tile < G ? g0 + groups_per_tile : G;
      const float t = tile_value(pt, C, tr, 4 * g0, tile_cols);
      float seg = 0.f;
#pragma omp simd reduction(+ : seg)
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t base = i * in_f + 4 * g;
        float m[4];
        if (pl) {
          float y[6];
          const int64_t lg = (i * G + g) * 6;
          soft_patterns(pl + lg, pn ? pn + lg : nullptr, scale, inv_tau, y);
          mask_of(y, m);
        } else {
          for (int j = 0; j < 4; ++j) m[j] = pk[base + j] ? 1.f : 0.f;
        }
        for (int j = 0; j < 4; ++j) {
          const float v = flush_subnormal(w[base + j] * (t + (1.f - t) * m[j]));
          o[base + j] = v;
          seg += v * v;
        }
      }
      acc += seg;
    }
    sq[i] = acc;
  }
  return {result, row_sq};
}

// Gradients. grad_out: ∂L/∂(W ⊙ M̃); out_scale: an extra ∂L/∂(W ⊙ M̃) = out_scale·(W ⊙ M̃) (the
// injected ‖W ⊙ M̃‖ term). Returns (∂L/∂Π (out, G, 6) or empty, ∂L/∂t per row (out, C) or empty).
std::vector<torch::Tensor> backward(torch::Tensor grad_out, torch::Tensor weight, c10::optional<torch::Tensor> logits,
                                    c10::optional<torch::Tensor> noise, c10::optional<torch::Tensor> keep,
                                    c10::optional<torch::Tensor> tiles, double kappa, double tau,
                                    int64_t tile_rows, int64_t tile_cols, double out_scale) {
  const int64_t out_f = weight.size(0), in_f = weight.size(1), G = in_f / 4;
  const float* w = weight.data_ptr<float>();
  const float* go = grad_out.data_ptr<float>();
  const float* pl = logits ? logits->data_ptr<float>() : nullptr;
  const float* pn = noise ? noise->data_ptr<float>() : nullptr;
  const bool* pk = keep ? keep->data_ptr<bool>() : nullptr;
  const float* pt = tiles ? tiles->data_ptr<float>() : nullptr;
  const int64_t C = tiles ? tiles->size(1) : 0;
  torch::Tensor grad_logits, grad_tiles;
  if (pl) grad_logits = torch::empty_like(*logits);
  if (pt) grad_tiles = torch::zeros({out_f, C}, weight.options());
  float* gl = pl ? grad_logits.data_ptr<float>() : nullptr;
  float* gt = pt ? grad_tiles.data_ptr<float>() : nullptr;
  const float scale = static_cast<float>(kappa), inv_tau = static_cast<float>(1.0 / tau);
  const float logit_scale = scale * inv_tau, extra = static_cast<float>(out_scale);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < out_f; ++i) {
    const int64_t tr = i / tile_rows;
    const int64_t groups_per_tile = tile_cols / 4;
    for (int64_t g0 = 0; g0 < G; g0 += groups_per_tile) {  // one tile column at a time
      const int64_t g1 = g0 + groups_per_tile < G ? g0 + groups_per_tile : G;
      const float t = tile_value(pt, C, tr, 4 * g0, tile_cols);
      float dt_seg = 0.f;
#pragma omp simd reduction(+ : dt_seg)
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t base = i * in_f + 4 * g;
        const int64_t lg = (i * G + g) * 6;
        float m[4], y[6];
        if (pl) {
          soft_patterns(pl + lg, pn ? pn + lg : nullptr, scale, inv_tau, y);
          mask_of(y, m);
        } else {
          for (int j = 0; j < 4; ++j) m[j] = pk[base + j] ? 1.f : 0.f;
        }
        float dm[4];
        for (int j = 0; j < 4; ++j) {
          const float wj = w[base + j];
          const float mj = t + (1.f - t) * m[j];
          const float dM = (go[base + j] + extra * wj * mj) * wj;
          dt_seg += dM * (1.f - m[j]);
          dm[j] = dM * (1.f - t);
        }
        if (gl) {
          float dy[6];
          float dot = 0.f;
          for (int k = 0; k < 6; ++k) {
            dy[k] = dm[kA[k]] + dm[kB[k]];
            dot += y[k] * dy[k];
          }
          for (int k = 0; k < 6; ++k) gl[lg + k] = flush_subnormal(y[k] * (dy[k] - dot) * logit_scale);
        }
      }
      if (gt) gt[i * C + g0 / groups_per_tile] = dt_seg;
    }
  }
  return {grad_logits, grad_tiles};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "soft hybrid weight and row sums of squares");
  m.def("backward", &backward, "gradients of the soft hybrid weight");
}
