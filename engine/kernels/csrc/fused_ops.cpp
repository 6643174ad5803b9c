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
// float32 or bfloat16 tensors (one dtype per call), computed in float32 and rounded once.
// Sums of squares are taken in double, so the norm does not depend on their order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace {

bool supported(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 2 && supported(x) && x.is_contiguous(), op,
              ": x must be a contiguous float32 or bfloat16 [T, D], got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type() && weight.is_contiguous(),
              op, ": weight must be ", x.scalar_type(), " [", x.size(1), "], got ",
              weight.scalar_type(), " ", weight.sizes());
}

template <typename T>
inline void normalize_row(const T* h, const T* w, float eps, int64_t D, T* y) {
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

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, float eps, at::Tensor& y) {
  const int64_t T_ = x.size(0), D = x.size(1);
  const T* xd = x.data_ptr<T>();
  const T* wd = weight.data_ptr<T>();
  T* yd = y.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* h = hd + t * D;
      const T* a = xd + t * D;
      for (int64_t i = 0; i < D; ++i) {
        h[i] = static_cast<T>(static_cast<float>(h[i]) + static_cast<float>(a[i]));
      }
      normalize_row(h, wd, eps, D, yd + t * D);
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

template <typename T>
void rope_impl(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
               int64_t rotated_heads, int64_t head_dim) {
  const int64_t T_ = qkv.size(0), width = qkv.size(1), half = head_dim / 2;
  T* data = qkv.data_ptr<T>();
  const T* cos_d = cos.data_ptr<T>();
  const T* sin_d = sin.data_ptr<T>();
  at::parallel_for(0, T_, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos_d + t * head_dim;
      const T* s = sin_d + t * head_dim;
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
