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
//
// float32 only (the model keeps torch's operators for other dtypes). Sums of squares are
// taken in double, so the norm does not depend on the order the terms are added in.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace {

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous float32 [T, D], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              op, ": weight must be float32 [", x.size(1), "], got ", weight.sizes());
}

inline void normalize_row(const float* h, const float* w, float eps, int64_t D, float* y) {
  double sum = 0.0;
  for (int64_t i = 0; i < D; ++i) sum += static_cast<double>(h[i]) * h[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(sum / D) + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = w[i] * (h[i] * inv);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "rms_norm");
  const int64_t T = x.size(0), D = x.size(1);
  at::Tensor y = at::empty_like(x);
  const float* xd = x.data_ptr<float>();
  const float* wd = weight.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      normalize_row(xd + t * D, wd, static_cast<float>(eps), D, yd + t * D);
    }
  });
  return y;
}

at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                         double eps) {
  check_rows(residual, weight, "add_rms_norm_");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == at::kFloat &&
                  x.is_contiguous(),
              "add_rms_norm_: x must be a contiguous float32 ", residual.sizes(), ", got ",
              x.sizes());
  const int64_t T = residual.size(0), D = residual.size(1);
  at::Tensor y = at::empty_like(residual);
  float* hd = residual.data_ptr<float>();
  const float* xd = x.data_ptr<float>();
  const float* wd = weight.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* h = hd + t * D;
      const float* a = xd + t * D;
      for (int64_t i = 0; i < D; ++i) h[i] += a[i];
      normalize_row(h, wd, static_cast<float>(eps), D, yd + t * D);
    }
  });
  return y;
}

void rope_qkv_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
               int64_t num_kv_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() &&
                  qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "rope_qkv_: qkv must be a contiguous float32 [T, (H + 2 KVH) D], got ",
              qkv.sizes());
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == qkv.size(0) &&
                  cos.size(1) == head_dim && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(),
              "rope_qkv_: cos and sin must be contiguous float32 [T, D], got ", cos.sizes());
  TORCH_CHECK(head_dim % 2 == 0, "rope_qkv_: head_dim must be even, got ", head_dim);
  const int64_t T = qkv.size(0), width = qkv.size(1), half = head_dim / 2;
  const int64_t rotated_heads = num_heads + num_kv_heads;  // q's, then k's; v is left alone
  float* data = qkv.data_ptr<float>();
  const float* cos_d = cos.data_ptr<float>();
  const float* sin_d = sin.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos_d + t * head_dim;
      const float* s = sin_d + t * head_dim;
      for (int64_t h = 0; h < rotated_heads; ++h) {
        float* v = data + t * width + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i], x2 = v[i + half];
          v[i] = x1 * c[i] - x2 * s[i];
          v[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "rope_qkv_(Tensor(a!) qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, "
      "int head_dim) -> ()");
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rope_qkv_", &rope_qkv_);
}
