// The decoder layer's small element-wise steps, fused: each was 6-12 torch operators a
// layer, and at decode batch sizes a step's cost was as much their dispatch as their
// arithmetic (30 layers x ~25 operators, about a fifth of a batch-1 step on 2 cores).
//
//   rms_norm(x, w, eps)          y = w * x / sqrt(mean(x^2) + eps), per row
//   add_rms_norm_(h, x, w, eps)  h += x (the residual stream, in place); y = rms_norm(h)
//   rope_qkv_(qkv, cos, sin, H, KVH, D)
//                                RoPE (rotate-half layout) on the q and k heads of the
//                                fused projection's output [T, (H + 2 KVH) D], in place;
//                                cos, sin: each token's row of the tables, [T, D]
//   silu_mul(gate_up)            silu(gate) * up, gate_up = [gate | up] per row:
//                                [T, 2I] -> [T, I]
//   row_argmax(x)                the first index of each row's maximum, [N, V] -> int64
//                                [N]: greedy choices over the logits
//
// float32 or bfloat16 tensors (one dtype per call), computed in float32 and rounded once.
//
// Where the CPU has AVX-512 (and AVX512_BF16, for bfloat16 rows), rows whose widths are
// multiples of 16 (head_dim / 2 for RoPE) go 16 values to a vector; at a prefill's 4,096
// rows the scalar loops took 2-4 ms an operator on an Intel Xeon, a quarter of the step.
// Sums of squares are then float32 on 32 lanes, in double on the scalar path; either way
// in a fixed order within the row, so a row's norm does not depend on the rows beside it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "bf16_pairs.h"  // TANDEM_AVX512, TANDEM_BF16_PAIRS, exp_nonpositive16

namespace {

bool supported(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// Rows of at least this many values make one thread's share, so decode-sized calls (a
// few dozen rows) stay on the calling thread.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 2 && supported(x) && x.is_contiguous(), op,
              ": x must be a contiguous float32 or bfloat16 [T, D], got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type() && weight.is_contiguous(),
              op, ": weight must be ", x.scalar_type(), " [", x.size(1), "], got ",
              weight.scalar_type(), " ", weight.sizes());
}

// ---- 16 values to a vector -------------------------------------------------------------

#ifdef TANDEM_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
#ifdef TANDEM_BF16_PAIRS
inline __m512 load16(const at::BFloat16* p) {  // a bfloat16 is a float32's top half
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(at::BFloat16* p, __m512 v) {  // rounded to nearest even, as Tensor.to
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
#endif

// Whether rows of T can take the vector path here (their widths are checked by the caller).
template <typename T>
constexpr bool kVectors = std::is_same_v<T, float>
#ifdef TANDEM_BF16_PAIRS
                          || std::is_same_v<T, at::BFloat16>
#endif
    ;

// y = w * h / sqrt(mean(h^2) + eps); D a multiple of 16.
template <typename T>
inline void normalize_row16(const T* h, const T* w, float eps, int64_t D, T* y) {
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= D; i += 32) {
    const __m512 a = load16(h + i), b = load16(h + i + 16);
    sum0 = _mm512_fmadd_ps(a, a, sum0);
    sum1 = _mm512_fmadd_ps(b, b, sum1);
  }
  if (i < D) {
    const __m512 a = load16(h + i);
    sum0 = _mm512_fmadd_ps(a, a, sum0);
  }
  const float sum = _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(sum / D + eps));
  for (i = 0; i < D; i += 16) {
    store16(y + i, _mm512_mul_ps(load16(w + i), _mm512_mul_ps(load16(h + i), inv)));
  }
}

// silu(g) * u = g * u / (1 + exp(-g)), exp taken of -|g| only (it cannot overflow).
inline __m512 silu_mul16(__m512 g, __m512 u) {
  const __m512 e = tandem::exp_nonpositive16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  // sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) for g < 0
  const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
  return _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), u);
}
#endif

// ---- RMSNorm ---------------------------------------------------------------------------

template <typename T>
inline void normalize_row(const T* h, const T* w, float eps, int64_t D, T* y) {
#ifdef TANDEM_AVX512
  if constexpr (kVectors<T>) {
    if (D % 16 == 0) return normalize_row16(h, w, eps, D, y);
  }
#endif
  double sum = 0.0;
  for (int64_t i = 0; i < D; ++i) {
    const double v = static_cast<float>(h[i]);
    sum += v * v;
  }
  const float inv = 1.0f / std::sqrt(static_cast<float>(sum / D) + eps);
  for (int64_t i = 0; i < D; ++i) {
    y[i] = static_cast<T>(static_cast<float>(w[i]) * (static_cast<float>(h[i]) * inv));
  }
}

// h += a, rounded to T.
template <typename T>
inline void add_row(T* h, const T* a, int64_t D) {
#ifdef TANDEM_AVX512
  if constexpr (kVectors<T>) {
    if (D % 16 == 0) {
      for (int64_t i = 0; i < D; i += 16) store16(h + i, _mm512_add_ps(load16(h + i), load16(a + i)));
      return;
    }
  }
#endif
  for (int64_t i = 0; i < D; ++i) {
    h[i] = static_cast<T>(static_cast<float>(h[i]) + static_cast<float>(a[i]));
  }
}

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, float eps, at::Tensor& y) {
  const int64_t T_ = x.size(0), D = x.size(1);
  const T* xd = x.data_ptr<T>();
  const T* wd = weight.data_ptr<T>();
  T* yd = y.data_ptr<T>();
  at::parallel_for(0, T_, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) normalize_row(xd + t * D, wd, eps, D, yd + t * D);
  });
}

template <typename T>
void add_rms_norm_impl(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                       float eps, at::Tensor& y) {
  const int64_t T_ = residual.size(0), D = residual.size(1);
  T* hd = residual.data_ptr<T>();
  const T* xd = x.data_ptr<T>();
  const T* wd = weight.data_ptr<T>();
  T* yd = y.data_ptr<T>();
  at::parallel_for(0, T_, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      add_row(hd + t * D, xd + t * D, D);
      normalize_row(hd + t * D, wd, eps, D, yd + t * D);  // of the rounded sum
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "rms_norm");
  at::Tensor y = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    rms_norm_impl<float>(x, weight, static_cast<float>(eps), y);
  } else {
    rms_norm_impl<at::BFloat16>(x, weight, static_cast<float>(eps), y);
  }
  return y;
}

at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                         double eps) {
  check_rows(residual, weight, "add_rms_norm_");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type() &&
                  x.is_contiguous(),
              "add_rms_norm_: x must be a contiguous ", residual.scalar_type(), " ",
              residual.sizes(), ", got ", x.scalar_type(), " ", x.sizes());
  at::Tensor y = at::empty_like(residual);
  if (x.scalar_type() == at::kFloat) {
    add_rms_norm_impl<float>(residual, x, weight, static_cast<float>(eps), y);
  } else {
    add_rms_norm_impl<at::BFloat16>(residual, x, weight, static_cast<float>(eps), y);
  }
  return y;
}

// ---- RoPE ------------------------------------------------------------------------------

template <typename T>
void rope_impl(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
               int64_t rotated_heads, int64_t head_dim) {
  const int64_t T_ = qkv.size(0), width = qkv.size(1), half = head_dim / 2;
  T* data = qkv.data_ptr<T>();
  const T* cos_d = cos.data_ptr<T>();
  const T* sin_d = sin.data_ptr<T>();
  at::parallel_for(0, T_, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos_d + t * head_dim;
      const T* s = sin_d + t * head_dim;
#ifdef TANDEM_AVX512
      if constexpr (kVectors<T>) {
        if (half % 16 == 0) {
          for (int64_t i = 0; i < half; i += 16) {  // the tables' 16 values, for every head
            const __m512 c1 = load16(c + i), c2 = load16(c + i + half);
            const __m512 s1 = load16(s + i), s2 = load16(s + i + half);
            for (int64_t h = 0; h < rotated_heads; ++h) {
              T* v = data + t * width + h * head_dim + i;
              const __m512 x1 = load16(v), x2 = load16(v + half);
              store16(v, _mm512_fnmadd_ps(x2, s1, _mm512_mul_ps(x1, c1)));
              store16(v + half, _mm512_fmadd_ps(x1, s2, _mm512_mul_ps(x2, c2)));
            }
          }
          continue;
        }
      }
#endif
      for (int64_t h = 0; h < rotated_heads; ++h) {
        T* v = data + t * width + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = static_cast<float>(v[i]), x2 = static_cast<float>(v[i + half]);
          const float c1 = static_cast<float>(c[i]), c2 = static_cast<float>(c[i + half]);
          const float s1 = static_cast<float>(s[i]), s2 = static_cast<float>(s[i + half]);
          v[i] = static_cast<T>(x1 * c1 - x2 * s1);
          v[i + half] = static_cast<T>(x2 * c2 + x1 * s2);
        }
      }
    }
  });
}

void rope_qkv_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
               int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && supported(qkv) && qkv.is_contiguous() &&
                  qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "rope_qkv_: qkv must be a contiguous float32 or bfloat16 [T, (H + 2 KVH) D], got ",
              qkv.sizes());
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == qkv.size(0) &&
                  cos.size(1) == head_dim && cos.scalar_type() == qkv.scalar_type() &&
                  sin.scalar_type() == qkv.scalar_type() && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "rope_qkv_: cos and sin must be contiguous [T, D] in qkv's dtype, got ",
              cos.sizes());
  TORCH_CHECK(head_dim % 2 == 0, "rope_qkv_: head_dim must be even, got ", head_dim);
  const int64_t rotated_heads = num_heads + num_kv_heads;  // q's, then k's; v is left alone
  if (qkv.scalar_type() == at::kFloat) {
    rope_impl<float>(qkv, cos, sin, rotated_heads, head_dim);
  } else {
    rope_impl<at::BFloat16>(qkv, cos, sin, rotated_heads, head_dim);
  }
}

// ---- SiLU-gated product ----------------------------------------------------------------

template <typename T>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t T_ = out.size(0), I = out.size(1);
  const T* in = gate_up.data_ptr<T>();
  T* od = out.data_ptr<T>();
  at::parallel_for(0, T_, row_grain(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* g = in + t * 2 * I;
      const T* u = g + I;
      T* o = od + t * I;
#ifdef TANDEM_AVX512
      if constexpr (kVectors<T>) {
        if (I % 16 == 0) {
          for (int64_t i = 0; i < I; i += 16) store16(o + i, silu_mul16(load16(g + i), load16(u + i)));
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < I; ++i) {
        const float x = static_cast<float>(g[i]);
        o[i] = static_cast<T>(x / (1.0f + std::exp(-x)) * static_cast<float>(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && supported(gate_up) && gate_up.is_contiguous() &&
                  gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be a contiguous float32 or bfloat16 [T, 2I], got ",
              gate_up.scalar_type(), " ", gate_up.sizes());
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_impl<float>(gate_up, out);
  } else {
    silu_mul_impl<at::BFloat16>(gate_up, out);
  }
  return out;
}

// ---- greedy choice -------------------------------------------------------------------

// The first index of x[0:n]'s maximum; a NaN counts as the maximum, as in torch.max.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t j = 0;
#ifdef TANDEM_AVX512
  if constexpr (kVectors<T>) {
    // One pass for the maximum (NaNs noted apart: vmaxps drops them), one to find it.
    __m512 max16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __mmask16 nan = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 v = load16(x + j);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      max16 = _mm512_max_ps(max16, v);
    }
    float best = _mm512_reduce_max_ps(max16);
    bool has_nan = nan != 0;
    for (int64_t i = j; i < n; ++i) {
      const float v = static_cast<float>(x[i]);
      has_nan |= std::isnan(v);
      best = std::max(best, v);
    }
    if (has_nan) {
      for (int64_t i = 0; i < n; ++i) {
        if (std::isnan(static_cast<float>(x[i]))) return i;
      }
    }
    const __m512 target = _mm512_set1_ps(best);
    for (j = 0; j + 16 <= n; j += 16) {
      const __mmask16 hit = _mm512_cmp_ps_mask(load16(x + j), target, _CMP_EQ_OQ);
      if (hit != 0) return j + __builtin_ctz(hit);
    }
  }
#endif
  int64_t at = j;
  float best = static_cast<float>(x[j]);
  for (int64_t i = j; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::isnan(v)) return i;
    if (v > best) best = v, at = i;
  }
  return at;
}

template <typename T>
void row_argmax_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t rows = x.size(0), width = x.size(1);
  const T* data = x.data_ptr<T>();
  int64_t* index = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) index[r] = argmax_row(data + r * width, width);
  });
}

at::Tensor row_argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && supported(x) && x.is_contiguous() && x.size(1) > 0,
              "row_argmax: x must be a contiguous float32 or bfloat16 [N, V] with V > 0, got ",
              x.scalar_type(), " ", x.sizes());
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.scalar_type() == at::kFloat) {
    row_argmax_impl<float>(x, out);
  } else {
    row_argmax_impl<at::BFloat16>(x, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "rope_qkv_(Tensor(a!) qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, "
      "int head_dim) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("row_argmax(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rope_qkv_", &rope_qkv_);
  m.impl("silu_mul", &silu_mul);
  m.impl("row_argmax", &row_argmax);
}
