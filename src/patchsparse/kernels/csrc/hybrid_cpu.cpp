// CPU kernels for the packed row-block hybrid (dense / 2:4) format; see kernels/packing.py.
//
// Decode (a few tokens) is limited by how many weight bytes are read, so the kernel streams each
// row block once per group of up to 4 tokens and keeps 8 output rows in one AVX2 register
// (AVX-512 where compiled: two slots of the same 8 rows per register, see row_block_avx512):
//   * a 2:4 chunk (8 inputs x 8 rows) holds 4 values per row plus one metadata byte per row; the
//     8 inputs are loaded into one register and `vpermps` picks, for each row (lane), the input
//     its kept value multiplies: 4 permutes + 4 FMAs instead of 8 FMAs, and ~half the bytes;
//   * a dense chunk is 8 columns of 8 rows: broadcast one input, FMA a column.
// Values may be stored in fp32, bf16 or fp16; arithmetic is always fp32.
// Rows are split between threads by stored bytes (the prefix sums `value_offsets`), so threads
// get equal work however the dense tiles are placed.
// Without AVX2+FMA (or on another architecture) a portable scalar loop computes the same sums.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PATCHSPARSE_AVX2 1
#endif

namespace {

constexpr int ROWS = 8;
constexpr int CHUNK = 8;
constexpr int SPARSE_VALUES = 32;
constexpr int DENSE_VALUES = 64;
constexpr int MAX_TOKENS = 4;  // tokens per pass over a row block (accumulators stay in registers)

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

struct Layout {
  const uint8_t* meta;
  const int32_t* cols;       // (NB, NC)
  const int32_t* n_sparse;   // (NB,)
  const int64_t* value_off;  // (NB,)
  const int64_t* meta_off;   // (NB,)
  int64_t n_blocks, n_chunks, out_features;
};

#ifdef PATCHSPARSE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widen to 32 bits and shift into place.
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// One row block for NT tokens. x: fp32 (NT, ldx) padded to whole chunks; out: fp32 (NT, 8).
// NACC independent accumulators per token hide the FMA latency when NT is small.
template <typename T, int NT>
void row_block_avx2(const T* vals, const uint8_t* meta, const int32_t* cols, int n_sparse, int n_chunks,
                    const float* x, int64_t ldx, float* out) {
  constexpr int NACC = NT == 1 ? 4 : (NT == 2 ? 2 : 1);
  __m256 acc[NT][NACC];
  for (int t = 0; t < NT; ++t)
    for (int a = 0; a < NACC; ++a) acc[t][a] = _mm256_setzero_ps();
  const __m256i three = _mm256_set1_epi32(3);
  const __m256i four = _mm256_set1_epi32(4);

  for (int s = 0; s < n_sparse; ++s, vals += SPARSE_VALUES, meta += ROWS) {
    const int64_t base = static_cast<int64_t>(cols[s]) * CHUNK;
    const __m256i m = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta)));
    // Lane r of idx_k = which of the chunk's 8 inputs row r's k-th kept value multiplies.
    const __m256i idx[4] = {
        _mm256_and_si256(m, three),
        _mm256_and_si256(_mm256_srli_epi32(m, 2), three),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(m, 4), three), four),
        _mm256_or_si256(_mm256_srli_epi32(m, 6), four),
    };
    __m256 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(x + t * ldx + base);
    for (int k = 0; k < 4; ++k) {
      const __m256 w = load8(vals + k * ROWS);
      for (int t = 0; t < NT; ++t)
        acc[t][k % NACC] = _mm256_fmadd_ps(w, _mm256_permutevar8x32_ps(xv[t], idx[k]), acc[t][k % NACC]);
    }
  }
  for (int d = n_sparse; d < n_chunks; ++d, vals += DENSE_VALUES) {
    const int64_t base = static_cast<int64_t>(cols[d]) * CHUNK;
    for (int k = 0; k < CHUNK; ++k) {
      const __m256 w = load8(vals + k * ROWS);
      for (int t = 0; t < NT; ++t)
        acc[t][k % NACC] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(x + t * ldx + base + k), acc[t][k % NACC]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m256 sum = acc[t][0];
    for (int a = 1; a < NACC; ++a) sum = _mm256_add_ps(sum, acc[t][a]);
    _mm256_storeu_ps(out + t * ROWS, sum);
  }
}
#endif

#if defined(PATCHSPARSE_AVX2) && defined(__AVX512F__) && defined(__AVX512DQ__)
#define PATCHSPARSE_AVX512 1
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The same sums with 16 lanes on the same format: lanes 0-7 take one slot (or column) of the
// 8 rows and lanes 8-15 the next, which are adjacent in memory; the chunk's 8 inputs sit in
// both halves of one register. 2 permutes + 2 FMAs per 2:4 chunk and token (AVX2: 4 + 4).
template <typename T, int NT>
void row_block_avx512(const T* vals, const uint8_t* meta, const int32_t* cols, int n_sparse, int n_chunks,
                      const float* x, int64_t ldx, float* out) {
  constexpr int NACC = NT == 1 ? 2 : 1;
  __m512 acc[NT][NACC];
  for (int t = 0; t < NT; ++t)
    for (int a = 0; a < NACC; ++a) acc[t][a] = _mm512_setzero_ps();
  const __m512i three = _mm512_set1_epi32(3);
  const __m512i four = _mm512_set1_epi32(4);
  // per-lane shifts of the metadata byte: slots 0|1 and 2|3 (arguments run from lane 15 to lane 0)
  const __m512i shift01 = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i shift23 = _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4);

  for (int s = 0; s < n_sparse; ++s, vals += SPARSE_VALUES, meta += ROWS) {
    const int64_t base = static_cast<int64_t>(cols[s]) * CHUNK;
    const __m256i m8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta)));
    const __m512i m = _mm512_inserti64x4(_mm512_castsi256_si512(m8), m8, 1);
    const __m512i idx01 = _mm512_and_si512(_mm512_srlv_epi32(m, shift01), three);
    const __m512i idx23 = _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi32(m, shift23), three), four);
    const __m512 w01 = load16(vals);
    const __m512 w23 = load16(vals + 2 * ROWS);
    for (int t = 0; t < NT; ++t) {
      const __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + t * ldx + base));
      acc[t][0] = _mm512_fmadd_ps(w01, _mm512_permutexvar_ps(idx01, xv), acc[t][0]);
      acc[t][NACC - 1] = _mm512_fmadd_ps(w23, _mm512_permutexvar_ps(idx23, xv), acc[t][NACC - 1]);
    }
  }
  for (int d = n_sparse; d < n_chunks; ++d, vals += DENSE_VALUES) {
    const int64_t base = static_cast<int64_t>(cols[d]) * CHUNK;
    __m512 xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = _mm512_broadcast_f32x8(_mm256_loadu_ps(x + t * ldx + base));
    for (int k = 0; k < CHUNK; k += 2) {
      const __m512i pick = _mm512_set_epi32(k + 1, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1,
                                            k, k, k, k, k, k, k, k);
      const __m512 w = load16(vals + k * ROWS);
      for (int t = 0; t < NT; ++t)
        acc[t][(k / 2) % NACC] = _mm512_fmadd_ps(w, _mm512_permutexvar_ps(pick, xv[t]), acc[t][(k / 2) % NACC]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m512 sum = acc[t][0];
    for (int a = 1; a < NACC; ++a) sum = _mm512_add_ps(sum, acc[t][a]);
    const __m256 rows = _mm256_add_ps(_mm512_castps512_ps256(sum), _mm512_extractf32x8_ps(sum, 1));
    _mm256_storeu_ps(out + t * ROWS, rows);
  }
}
#endif

// Portable version of the same sums (also the reference for the vector code's bookkeeping).
template <typename T>
void row_block_scalar(const T* vals, const uint8_t* meta, const int32_t* cols, int n_sparse, int n_chunks,
                      const float* x, int64_t ldx, int nt, float* out) {
  for (int i = 0; i < nt * ROWS; ++i) out[i] = 0.f;
  for (int s = 0; s < n_sparse; ++s, vals += SPARSE_VALUES, meta += ROWS) {
    const int64_t base = static_cast<int64_t>(cols[s]) * CHUNK;
    for (int r = 0; r < ROWS; ++r) {
      const int m = meta[r];
      const int pos[4] = {m & 3, (m >> 2) & 3, 4 + ((m >> 4) & 3), 4 + ((m >> 6) & 3)};
      for (int k = 0; k < 4; ++k) {
        const float w = to_float(vals[k * ROWS + r]);
        for (int t = 0; t < nt; ++t) out[t * ROWS + r] += w * x[t * ldx + base + pos[k]];
      }
    }
  }
  for (int d = n_sparse; d < n_chunks; ++d, vals += DENSE_VALUES) {
    const int64_t base = static_cast<int64_t>(cols[d]) * CHUNK;
    for (int k = 0; k < CHUNK; ++k)
      for (int r = 0; r < ROWS; ++r) {
        const float w = to_float(vals[k * ROWS + r]);
        for (int t = 0; t < nt; ++t) out[t * ROWS + r] += w * x[t * ldx + base + k];
      }
  }
}

// isa: 2 = AVX-512 where compiled, 1 = AVX2, 0 = scalar; a level that is not compiled falls back.
template <typename T>
void run_row_block(const T* vals, const Layout& L, int64_t b, const float* x, int64_t ldx, int nt,
                   int isa, float* out) {
  const uint8_t* meta = L.meta + L.meta_off[b];
  const int32_t* cols = L.cols + b * L.n_chunks;
  const int ns = L.n_sparse[b];
  const int nc = static_cast<int>(L.n_chunks);
  vals += L.value_off[b];
#ifdef PATCHSPARSE_AVX512
  if (isa >= 2) {
    switch (nt) {
      case 1: return row_block_avx512<T, 1>(vals, meta, cols, ns, nc, x, ldx, out);
      case 2: return row_block_avx512<T, 2>(vals, meta, cols, ns, nc, x, ldx, out);
      case 3: return row_block_avx512<T, 3>(vals, meta, cols, ns, nc, x, ldx, out);
      default: return row_block_avx512<T, 4>(vals, meta, cols, ns, nc, x, ldx, out);
    }
  }
#endif
#ifdef PATCHSPARSE_AVX2
  if (isa >= 1) {
    switch (nt) {
      case 1: return row_block_avx2<T, 1>(vals, meta, cols, ns, nc, x, ldx, out);
      case 2: return row_block_avx2<T, 2>(vals, meta, cols, ns, nc, x, ldx, out);
      case 3: return row_block_avx2<T, 3>(vals, meta, cols, ns, nc, x, ldx, out);
      default: return row_block_avx2<T, 4>(vals, meta, cols, ns, nc, x, ldx, out);
    }
  }
#endif
  (void)isa;
  row_block_scalar<T>(vals, meta, cols, ns, nc, x, ldx, nt, out);
}

// Row-block ranges of equal stored size, one per thread.
std::vector<int64_t> balanced_splits(const int64_t* value_off, int64_t n_blocks, int64_t total, int parts) {
  std::vector<int64_t> splits(parts + 1, n_blocks);
  splits[0] = 0;
  for (int p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    splits[p] = std::lower_bound(value_off, value_off + n_blocks, target) - value_off;
  }
  return splits;
}

template <typename T, typename O>
void hybrid_matmul_impl(const T* vals, const Layout& L, int64_t total_values, const float* x, int64_t ldx,
                        int64_t tokens, const float* bias, int isa, O* y) {
  // Waking a second thread costs microseconds (milliseconds on a loaded machine), more than the
  // smallest layers take to read, so layers under 256 KiB of values run on the calling thread. (At
  // 2 MiB, the default model's layers all ran on one thread and lost to the two-thread dense
  // product; at 256 KiB the 1536x576 and 576x1536 layers went from 0.6-0.8x to 1.9-2.4x at 45%.)
  const int threads = total_values * static_cast<int64_t>(sizeof(T)) < (256 << 10) ? 1 : at::get_num_threads();
  const std::vector<int64_t> splits = balanced_splits(L.value_off, L.n_blocks, total_values, threads);
  auto work = [&](int64_t first, int64_t last) {
    float out[MAX_TOKENS * ROWS];
    for (int64_t part = first; part < last; ++part) {
      for (int64_t b = splits[part]; b < splits[part + 1]; ++b) {
        const int64_t row0 = b * ROWS;
        const int rows = static_cast<int>(std::min<int64_t>(ROWS, L.out_features - row0));
        for (int64_t t0 = 0; t0 < tokens; t0 += MAX_TOKENS) {
          const int nt = static_cast<int>(std::min<int64_t>(MAX_TOKENS, tokens - t0));
          run_row_block<T>(vals, L, b, x + t0 * ldx, ldx, nt, isa, out);
          for (int t = 0; t < nt; ++t)
            for (int r = 0; r < rows; ++r) {
              const float v = out[t * ROWS + r] + (bias ? bias[row0 + r] : 0.f);
              y[(t0 + t) * L.out_features + row0 + r] = static_cast<O>(v);
            }
        }
      }
    }
  };
  if (threads == 1) {
    work(0, 1);  // no parallel region at all: waking idle threads costs more than a small layer
  } else {
    at::parallel_for(0, threads, 1, work);
  }
}

Layout layout_of(const at::Tensor& meta, const at::Tensor& cols, const at::Tensor& n_sparse,
                 const at::Tensor& value_off, const at::Tensor& meta_off, int64_t out_features) {
  TORCH_CHECK(meta.scalar_type() == at::kByte && cols.scalar_type() == at::kInt &&
              n_sparse.scalar_type() == at::kInt && value_off.scalar_type() == at::kLong &&
              meta_off.scalar_type() == at::kLong, "packed index tensors have the wrong dtypes");
  TORCH_CHECK(meta.is_contiguous() && cols.is_contiguous() && n_sparse.is_contiguous() &&
              value_off.is_contiguous() && meta_off.is_contiguous(), "packed tensors must be contiguous");
  TORCH_CHECK(cols.dim() == 2 && cols.size(0) == n_sparse.size(0), "chunk_cols and n_sparse disagree");
  TORCH_CHECK(cols.size(0) * ROWS >= out_features, "out_features exceeds the packed row blocks");
  return Layout{meta.data_ptr<uint8_t>(), cols.data_ptr<int32_t>(), n_sparse.data_ptr<int32_t>(),
                value_off.data_ptr<int64_t>(), meta_off.data_ptr<int64_t>(), cols.size(0), cols.size(1),
                out_features};
}

}  // namespace

// y (tokens, out) = x (tokens, in) @ W^T + bias, W given in the packed row-block format.
at::Tensor hybrid_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                         const at::Tensor& cols, const at::Tensor& n_sparse, const at::Tensor& value_off,
                         const at::Tensor& meta_off, int64_t out_features, int64_t in_features,
                         const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be (tokens, in_features)");
  TORCH_CHECK(!x.is_cuda() && !values.is_cuda(), "CPU kernel");
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  const Layout L = layout_of(meta, cols, n_sparse, value_off, meta_off, out_features);
  const int64_t in_padded = L.n_chunks * CHUNK;
  TORCH_CHECK(in_padded >= in_features, "in_features exceeds the packed chunks");
  const int64_t tokens = x.size(0);

  // fp32 inputs padded to whole chunks (a copy only when the input is not already so).
  at::Tensor x32;
  if (x.scalar_type() == at::kFloat && x.is_contiguous() && in_padded == in_features) {
    x32 = x;
  } else {
    x32 = at::zeros({tokens, in_padded}, x.options().dtype(at::kFloat));
    x32.narrow(1, 0, in_features).copy_(x);
  }
  at::Tensor bias32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features, "bias has the wrong size");
    bias32 = bias->to(at::kFloat).contiguous();
  }
  const float* bias_ptr = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({tokens, out_features}, x.options());
  const int64_t total = values.numel();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "hybrid_linear_values", [&] {
    using V = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "hybrid_linear_out", [&] {
      if constexpr (std::is_same_v<V, double>) {
        TORCH_CHECK(false, "float64 weights are not supported by the hybrid kernel");
      } else {
        hybrid_matmul_impl<V, scalar_t>(values.data_ptr<V>(), L, total, x32.data_ptr<float>(), in_padded,
                                        tokens, bias_ptr, static_cast<int>(isa), y.data_ptr<scalar_t>());
      }
    });
  });
  return y;
}

namespace {

// Write rows [row0, row0 + n) of the masked dense weight into dst (n, in_features), every entry
// (pruned weights as zeros), so dst needs no clearing and can be reused.
template <typename T>
void unpack_rows(const T* all, const Layout& L, int64_t in_features, int64_t row0, int64_t n, T* dst) {
  const int64_t b_first = row0 / ROWS, b_last = (row0 + n + ROWS - 1) / ROWS;
  at::parallel_for(b_first, b_last, 8, [&](int64_t first, int64_t last) {
    T chunk[ROWS][CHUNK];
    for (int64_t b = first; b < last; ++b) {
      const T* vals = all + L.value_off[b];
      const uint8_t* meta = L.meta + L.meta_off[b];
      const int32_t* cols = L.cols + b * L.n_chunks;
      const int ns = L.n_sparse[b];
      const int rows = static_cast<int>(std::min<int64_t>(ROWS, L.out_features - b * ROWS));
      for (int64_t s = 0; s < L.n_chunks; ++s) {
        if (s < ns) {
          std::memset(chunk, 0, sizeof(chunk));  // all-zero bits are 0.0 in every float format
          for (int r = 0; r < ROWS; ++r) {
            const int m = meta[s * ROWS + r];
            chunk[r][m & 3] = vals[r];
            chunk[r][(m >> 2) & 3] = vals[ROWS + r];
            chunk[r][4 + ((m >> 4) & 3)] = vals[2 * ROWS + r];
            chunk[r][4 + ((m >> 6) & 3)] = vals[3 * ROWS + r];
          }
          vals += SPARSE_VALUES;
        } else {
          for (int k = 0; k < CHUNK; ++k)
            for (int r = 0; r < ROWS; ++r) chunk[r][k] = vals[k * ROWS + r];
          vals += DENSE_VALUES;
        }
        const int64_t base = static_cast<int64_t>(cols[s]) * CHUNK;
        const int width = static_cast<int>(std::min<int64_t>(CHUNK, in_features - base));
        T* out = dst + (b * ROWS - row0) * in_features + base;
        if (width == CHUNK) {  // constant-size copies compile to plain moves
          for (int r = 0; r < rows; ++r) std::memcpy(out + r * in_features, chunk[r], CHUNK * sizeof(T));
        } else {
          for (int r = 0; r < rows; ++r) std::memcpy(out + r * in_features, chunk[r], width * sizeof(T));
        }
      }
    }
  });
}

}  // namespace

// The masked dense weight (out, in) in the values' dtype.
at::Tensor hybrid_unpack(const at::Tensor& values, const at::Tensor& meta, const at::Tensor& cols,
                         const at::Tensor& n_sparse, const at::Tensor& value_off, const at::Tensor& meta_off,
                         int64_t out_features, int64_t in_features) {
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  const Layout L = layout_of(meta, cols, n_sparse, value_off, meta_off, out_features);
  at::Tensor w = at::empty({out_features, in_features}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "hybrid_unpack", [&] {
    unpack_rows<scalar_t>(values.data_ptr<scalar_t>(), L, in_features, 0, out_features, w.data_ptr<scalar_t>());
  });
  return w;
}

// Prefill (many tokens): expand a band of rows at a time into a small reused buffer that stays
// in cache and multiply it with the BLAS GEMM, so no full dense copy of the weight is made.
// Computes y^T (out, tokens) band by band (contiguous rows), then transposes once.
at::Tensor hybrid_linear_prefill(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                 const at::Tensor& cols, const at::Tensor& n_sparse, const at::Tensor& value_off,
                                 const at::Tensor& meta_off, int64_t out_features, int64_t in_features,
                                 const c10::optional<at::Tensor>& bias, int64_t band_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be (tokens, in_features)");
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
  const Layout L = layout_of(meta, cols, n_sparse, value_off, meta_off, out_features);
  const at::Tensor xt = x.to(values.scalar_type()).contiguous().t();          // (in, tokens) view
  at::Tensor yt = at::empty({out_features, x.size(0)}, values.options());
  int64_t band = band_bytes / std::max<int64_t>(1, in_features * values.element_size());
  band = std::max<int64_t>(ROWS, band / ROWS * ROWS);
  at::Tensor scratch = at::empty({std::min(band, out_features), in_features}, values.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "hybrid_prefill", [&] {
    for (int64_t row0 = 0; row0 < out_features; row0 += band) {
      const int64_t n = std::min(band, out_features - row0);
      unpack_rows<scalar_t>(values.data_ptr<scalar_t>(), L, in_features, row0, n, scratch.data_ptr<scalar_t>());
      at::Tensor out = yt.narrow(0, row0, n);
      at::mm_out(out, scratch.narrow(0, 0, n), xt);
    }
  });
  at::Tensor y = yt.t().contiguous();
  if (bias.has_value() && bias->defined()) y.add_(bias->to(y.scalar_type()));
  return y.to(x.scalar_type());
}

// The best instruction-set level compiled in: 2 = AVX-512, 1 = AVX2+FMA, 0 = scalar only.
int64_t vector_level() {
#if defined(PATCHSPARSE_AVX512)
  return 2;
#elif defined(PATCHSPARSE_AVX2)
  return 1;
#else
  return 0;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hybrid_linear", &hybrid_linear, "hybrid dense/2:4 linear on the packed row-block format");
  m.def("hybrid_unpack", &hybrid_unpack, "packed row-block format -> masked dense weight");
  m.def("hybrid_linear_prefill", &hybrid_linear_prefill, "hybrid linear for many tokens: banded expand + GEMM");
  m.def("vector_level", &vector_level, "2 = AVX-512, 1 = AVX2+FMA, 0 = scalar only");
}
