// LSQ fake quantization with QDrop's drop, forward and backward, one pass each over float32 CPU tensors.
//
// The eager kernels in quantizers.py take about twelve passes over the activation for the two
// directions; on a small block (a CIFAR ResNet block: 0.5M elements, 20-30 us a pass on 2 cores) that
// alone costs a third of an FP forward+backward. Values are those of the eager kernels, bit for bit
// (the step gradient is the same sum in another order).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {
constexpr int64_t kGrain = 1 << 15;

inline float quantize(float x, float s, float lo, float hi) {
  float q = std::nearbyint(x / s);
  q = q < lo ? lo : q;
  q = q > hi ? hi : q;
  return q * s;
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}
}  // namespace

// out = clamp(round(x / s), -zp, qmax - zp) * s, or x where drop is 1
at::Tensor fq_forward(const at::Tensor& x, double scale, double zero_point, int64_t qmax,
                      const c10::optional<at::Tensor>& drop) {
  check(x, "x");
  auto out = at::empty_like(x);
  const float s = static_cast<float>(scale), lo = static_cast<float>(-zero_point),
              hi = static_cast<float>(qmax - zero_point);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* dp = nullptr;
  if (drop.has_value()) {
    check(*drop, "drop");
    TORCH_CHECK(drop->numel() == x.numel(), "drop mask has ", drop->numel(), " elements, x ", x.numel());
    dp = drop->data_ptr<float>();
  }
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (dp == nullptr) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) op[i] = quantize(xp[i], s, lo, hi);
    } else {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float q = quantize(xp[i], s, lo, hi);
        op[i] = dp[i] != 0.f ? xp[i] : q;
      }
    }
  });
  return out;
}

// grad_x = grad where |out - x| < s/2 (in range, or dropped), else 0;
// grad_s = sum(grad * (out - x * pass)) / s (returned only when need_scale)
std::vector<at::Tensor> fq_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                                    double scale, bool need_scale) {
  check(grad, "grad");
  check(x, "x");
  check(out, "out");
  auto grad_x = at::empty_like(x);
  const float s = static_cast<float>(scale), half = static_cast<float>(scale * 0.5);
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>(), *op = out.data_ptr<float>();
  float* gx = grad_x.data_ptr<float>();
  const int64_t n = x.numel();
  if (!need_scale) {
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float pass = std::fabs(op[i] - xp[i]) < half ? 1.f : 0.f;
        gx[i] = gp[i] * pass;
      }
    });
    return {grad_x};
  }
  // Partial sums per thread, each over kLanes independent accumulators: gcc's `omp simd reduction`
  // keeps its lanes in memory here and runs 15x slower than this.
  std::vector<double> partial(at::get_num_threads(), 0.0);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    constexpr int kLanes = 16;
    float lanes[kLanes] = {0.f};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
#pragma omp simd
      for (int k = 0; k < kLanes; ++k) {
        const float pass = std::fabs(op[i + k] - xp[i + k]) < half ? 1.f : 0.f;
        gx[i + k] = gp[i + k] * pass;
        lanes[k] += gp[i + k] * (op[i + k] - xp[i + k] * pass);
      }
    }
    double sum = 0.0;
    for (; i < end; ++i) {
      const float pass = std::fabs(op[i] - xp[i]) < half ? 1.f : 0.f;
      gx[i] = gp[i] * pass;
      sum += gp[i] * (op[i] - xp[i] * pass);
    }
    for (float lane : lanes) sum += lane;
    partial[at::get_thread_num()] += sum;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return {grad_x, at::scalar_tensor(total / s, x.options())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fq_forward, "fake-quantize forward");
  m.def("backward", &fq_backward, "fake-quantize backward");
}
