// Fused CPU kernels of the reconstruction loop, one pass each over float32 tensors (built and loaded
// by qdrop_hf/native.py; quantizers.py holds the torch-op versions they replace):
// - LSQ fake quantization with QDrop's drop, forward and backward. The eager kernels in quantizers.py
//   take about twelve passes over the activation for the two directions; on a small block (a CIFAR
//   ResNet block: 0.5M elements, 20-30 us a pass on 2 cores) that alone costs a third of an FP
//   forward+backward. Values are those of the eager kernels, bit for bit (the step gradient is the
//   same sum in another order).
// - AdaRound's soft weight and rounding loss with their alpha-gradients, where the eager path is
//   some thirty small ops per layer per iteration (mostly call overhead on a small conv). Their
//   sigmoid and power use the polynomial exp/log below: within a few 1e-7 of torch's.
// - QDrop's mixing of a block's input, and the three operations as C++ autograd nodes.
// - A finished layer's weight from its one-byte codes (dequantize).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <bit>
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {
constexpr int64_t kGrain = 1 << 15;

inline float quantize(float x, float s, float lo, float hi) {
  float q = std::nearbyint(x / s);
  q = q < lo ? lo : q;
  q = q > hi ? hi : q;
  return q * s;
}

// exp and log with the Cephes single-precision polynomials, written so that gcc vectorises them
// (glibc declares its vector expf/powf only under -ffast-math). Relative error about 1e-7.
inline float exp_poly(float x) {
  x = x < -87.f ? -87.f : x;
  x = x > 88.f ? 88.f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

inline float log_poly(float a) {  // a > 0 and normal
  const int32_t bits = std::bit_cast<int32_t>(a);
  float e = static_cast<float>((bits >> 23) - 126);
  float m = std::bit_cast<float>((bits & 0x007fffff) | 0x3f000000);  // a = m * 2^e, m in [0.5, 1)
  const float low = m < 0.707106781186547524f ? 1.f : 0.f;  // then a = (2m) * 2^(e - 1)
  e -= low;
  m = m + low * m - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
  return m + y + 0.693359375f * e;
}

// AdaRound's rectified sigmoid h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1) and dh/dalpha
constexpr float kGamma = -0.1f, kZeta = 1.1f, kOpen = 2.3978952728f;  // ln 11: h inside (0, 1) for |alpha| below

inline float sigmoid_poly(float a) { return 1.f / (1.f + exp_poly(-a)); }

// The clamp to [0, 1] on the bit pattern (an integer min/max, exact for non-negative floats and 0 for
// negative ones): with float compares, gcc's partial-redundancy elimination branches on the clamped
// constants and the loops around it are no longer vectorised.
inline float rect(float sig) {
  const int32_t bits = std::bit_cast<int32_t>(sig * (kZeta - kGamma) + kGamma);
  return std::bit_cast<float>(std::min(std::max(bits, int32_t{0}), int32_t{0x3f800000}));
}

inline float rect_grad(float a, float sig) { return std::fabs(a) <= kOpen ? sig * (1.f - sig) * (kZeta - kGamma) : 0.f; }

// The kernels read each tensor as one flat array, so the tensors of a call must be dense in one
// memory order: contiguous, or channels-last (the layout mkldnn's convolutions run fastest on, which a
// CNN's activations keep from block to block). x's order is the one the others are put in.
at::MemoryFormat flat_order(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// t in x's memory order: t itself when it already is (always for activations the model made), else a copy
at::Tensor in_order_of(const at::Tensor& t, const at::Tensor& x) { return t.contiguous(flat_order(x)); }

void check(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(flat_order(x)),
              name, " must be a float32 CPU tensor, dense in the memory order of the kernel's first tensor");
}

void check(const at::Tensor& t, const char* name) { check(t, name, t); }

// A mask is read in x's memory order too: DropMasks lays a pool window out with x's strides, so that
// the eager kernels' elementwise mask and this flat one pick the same elements.
void check_mask(const at::Tensor& mask, const at::Tensor& x) {
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kByte && mask.is_contiguous(flat_order(x)),
              "a drop mask must be a uint8 CPU tensor in the memory order of the tensor it drops from");
  TORCH_CHECK(mask.numel() == x.numel(), "drop mask has ", mask.numel(), " elements, x ", x.numel());
}
}  // namespace

// out = clamp(round(x / s), -zp, qmax - zp) * s, or x where the uint8 drop mask is 1 (a strided x, as
// attention's heads, is read from a contiguous copy: still two passes against the eager kernels' six)
at::Tensor fq_forward(const at::Tensor& strided_x, double scale, double zero_point, int64_t qmax,
                      const c10::optional<at::Tensor>& drop) {
  const auto x = in_order_of(strided_x, strided_x);
  check(x, "x");
  auto out = at::empty_like(x);
  const float s = static_cast<float>(scale), lo = static_cast<float>(-zero_point),
              hi = static_cast<float>(qmax - zero_point);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const uint8_t* dp = nullptr;
  if (drop.has_value()) {
    check_mask(*drop, x);
    dp = drop->data_ptr<uint8_t>();
  }
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (dp == nullptr) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) op[i] = quantize(xp[i], s, lo, hi);
    } else {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float q = quantize(xp[i], s, lo, hi);
        op[i] = dp[i] != 0 ? xp[i] : q;
      }
    }
  });
  return out;
}

// grad_x = grad where |out - x| < s/2 (in range, or dropped), else 0;
// grad_s = sum(grad * (out - x * pass)) / s (returned only when need_scale; the pass is memory-bound,
// so the sum costs nothing measurable when it is not wanted)
std::vector<at::Tensor> fq_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& out,
                                    double scale, bool need_scale) {
  check(x, "x");
  check(grad, "grad", x);
  check(out, "out", x);
  auto grad_x = at::empty_like(x);
  const float s = static_cast<float>(scale), half = static_cast<float>(scale * 0.5);
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>(), *op = out.data_ptr<float>();
  float* gx = grad_x.data_ptr<float>();
  const int64_t n = x.numel();
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
  if (!need_scale) return {grad_x};
  double total = 0.0;
  for (double p : partial) total += p;
  return {grad_x, at::scalar_tensor(total / s, x.options())};
}

// w = base + h(alpha) * step
at::Tensor soft_weight(const at::Tensor& alpha, const at::Tensor& base, const at::Tensor& step) {
  check(alpha, "alpha");
  check(base, "base", alpha);
  check(step, "step", alpha);
  auto out = at::empty_like(alpha);
  const float *ap = alpha.data_ptr<float>(), *bp = base.data_ptr<float>(), *sp = step.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, alpha.numel(), kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) op[i] = bp[i] + rect(sigmoid_poly(ap[i])) * sp[i];
  });
  return out;
}

// d(sum(grad * w))/dalpha = grad * step * dh/dalpha
at::Tensor soft_weight_backward(const at::Tensor& alpha, const at::Tensor& step, const at::Tensor& grad) {
  check(alpha, "alpha");
  check(step, "step", alpha);
  check(grad, "grad", alpha);
  auto out = at::empty_like(alpha);
  const float *ap = alpha.data_ptr<float>(), *sp = step.data_ptr<float>(), *gp = grad.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, alpha.numel(), kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) op[i] = gp[i] * sp[i] * rect_grad(ap[i], sigmoid_poly(ap[i]));
  });
  return out;
}

// 1 - |c|^beta for one alpha, c = 2h - 1, and (into grad) its alpha-gradient. Selects on floats
// here (a zero guard, a sign) make gcc branch and the loop go scalar: the guard works on bit patterns
// and the sign is copysign.
constexpr int32_t kTinyBits = 0x0D000000;  // 3.9e-31: |c| below it counts as 0 (log needs a normal number)

[[gnu::always_inline]] inline float rounding_term(float a, float beta, float beta1, float& grad) {
  const float sig = sigmoid_poly(a);
  const float c = 2.f * rect(sig) - 1.f, mag = std::fabs(c);
  const int32_t mag_bits = std::bit_cast<int32_t>(mag);
  float pow1 = exp_poly(beta1 * log_poly(std::bit_cast<float>(std::max(mag_bits, kTinyBits))));  // |c|^(beta-1)
  pow1 = std::bit_cast<float>(std::bit_cast<int32_t>(pow1) & -static_cast<int32_t>(mag_bits >= kTinyBits));
  grad = -2.f * beta * pow1 * std::copysign(1.f, c) * rect_grad(a, sig);
  return 1.f - pow1 * mag;
}

// sum(1 - |2h - 1|^beta) and its alpha-gradient -2 beta |c|^(beta - 1) sign(c) dh, c = 2h - 1, beta >= 1
std::vector<at::Tensor> rounding_loss(const at::Tensor& alpha, double beta) {
  check(alpha, "alpha");
  TORCH_CHECK(beta >= 1.0, "beta must be at least 1, got ", beta);
  auto grad = at::empty_like(alpha);
  const float b = static_cast<float>(beta), b1 = static_cast<float>(beta - 1.0);
  const float* ap = alpha.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  std::vector<double> partial(at::get_num_threads(), 0.0);
  at::parallel_for(0, alpha.numel(), kGrain, [&](int64_t begin, int64_t end) {
    constexpr int kLanes = 16;
    float lanes[kLanes] = {0.f};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
#pragma omp simd
      for (int k = 0; k < kLanes; ++k) lanes[k] += rounding_term(ap[i + k], b, b1, gp[i + k]);
    }
    for (; i < end; ++i) lanes[0] += rounding_term(ap[i], b, b1, gp[i]);
    double sum = 0.0;
    for (float lane : lanes) sum += lane;
    partial[at::get_thread_num()] += sum;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return {at::scalar_tensor(total, alpha.options()), grad};
}

// kept where the uint8 mask is 0, other where it is 1 (QDrop's mixing of a block's input)
at::Tensor mix(const at::Tensor& strided_kept, const at::Tensor& strided_other, const at::Tensor& mask) {
  const auto kept = in_order_of(strided_kept, strided_kept), other = in_order_of(strided_other, kept);
  check(kept, "kept");
  check(other, "other", kept);
  TORCH_CHECK(other.numel() == kept.numel(), "mixing tensors of ", kept.numel(), " and ", other.numel(), " elements");
  check_mask(mask, kept);
  auto out = at::empty_like(kept);
  const float *kp = kept.data_ptr<float>(), *op = other.data_ptr<float>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  float* outp = out.data_ptr<float>();
  at::parallel_for(0, kept.numel(), kGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) outp[i] = mp[i] != 0 ? op[i] : kp[i];
  });
  return out;
}

// The same operations as autograd nodes implemented here, so that a training step does not go
// through Python per quantizer (about 20 us a call for a Python autograd.Function, some 10% of a
// small block's iteration over its eight nodes).
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct FakeQuantNode : public torch::autograd::Function<FakeQuantNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale, double zero_point,
                            int64_t qmax, const c10::optional<at::Tensor>& drop) {
    TORCH_CHECK(scale.scalar_type() == at::kFloat, "the step must be float32");
    const auto xc = in_order_of(x, x);
    const double s = scale.item<double>();  // read once; the step does not change before backward
    auto out = fq_forward(xc, s, zero_point, qmax, drop);
    ctx->save_for_backward({xc, out});
    ctx->saved_data["scale"] = s;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool need_scale = ctx->needs_input_grad(1);
    auto g = fq_backward(in_order_of(grads[0], saved[0]), saved[0], saved[1], ctx->saved_data["scale"].toDouble(),
                         need_scale);
    return {g[0], need_scale ? g[1] : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// w = (codes - zp) * s, per output channel (axis 0) or per tensor: a finished layer's float weight
// from its one-byte codes in one pass, where the torch ops take three with two temporaries. A layer
// without an integer kernel makes its weight so at each forward (EfficientNet-Lite0 at batch 1: 49
// convolutions, 4.6M weights, 4 ms a forward on 2 cores in torch ops). The same float operations as
// the eager (codes.float() - zp) * s, so the same values.
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero_point) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() >= 1,
              "codes must be a contiguous uint8 CPU tensor");
  const auto s = scale.to(at::kFloat).contiguous(), z = zero_point.to(at::kFloat).contiguous();
  const int64_t rows = codes.size(0), cols = rows ? codes.numel() / rows : 0;
  TORCH_CHECK(s.numel() == z.numel() && (s.numel() == 1 || s.numel() == rows),
              "one scale and zero point per tensor or per output channel (axis 0)");
  auto out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float *sp = s.data_ptr<float>(), *zp = z.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const bool per_row = s.numel() > 1;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float sr = sp[per_row ? r : 0], zr = zp[per_row ? r : 0];
      const uint8_t* cr = c + r * cols;
      float* orow = o + r * cols;
      for (int64_t k = 0; k < cols; ++k) orow[k] = (static_cast<float>(cr[k]) - zr) * sr;
    }
  });
  return out;
}

struct SoftWeightNode : public torch::autograd::Function<SoftWeightNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& alpha, const at::Tensor& base, const at::Tensor& step) {
    const auto a = alpha.contiguous(), st = step.contiguous();
    ctx->save_for_backward({a, st});
    return soft_weight(a, base.contiguous(), st);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {soft_weight_backward(saved[0], saved[1], grads[0].contiguous()), at::Tensor(), at::Tensor()};
  }
};

struct RoundingLossNode : public torch::autograd::Function<RoundingLossNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& alpha, double beta) {
    auto loss_and_grad = rounding_loss(alpha.contiguous(), beta);
    ctx->save_for_backward({loss_and_grad[1]});
    return loss_and_grad[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {ctx->get_saved_variables()[0] * grads[0], at::Tensor()};
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fake_quant", [](const at::Tensor& x, const at::Tensor& scale, double zero_point, int64_t qmax,
                         const c10::optional<at::Tensor>& drop) {
    return FakeQuantNode::apply(x, scale, zero_point, qmax, drop);
  }, "fake quantization with drop, as an autograd node");
  m.def("soft_weight_node", [](const at::Tensor& alpha, const at::Tensor& base, const at::Tensor& step) {
    return SoftWeightNode::apply(alpha, base, step);
  }, "AdaRound soft weight, as an autograd node");
  m.def("rounding_loss_node", [](const at::Tensor& alpha, double beta) { return RoundingLossNode::apply(alpha, beta); },
        "AdaRound rounding loss, as an autograd node");
  m.def("mix", &mix, "QDrop input mixing");
  m.def("dequantize", &dequantize, "a weight from its codes, per output channel");
  m.def("forward", &fq_forward, "fake-quantize forward");
  m.def("backward", &fq_backward, "fake-quantize backward");
  m.def("soft_weight", &soft_weight, "AdaRound soft weight");
  m.def("soft_weight_backward", &soft_weight_backward, "AdaRound soft weight, alpha-gradient");
  m.def("rounding_loss", &rounding_loss, "AdaRound rounding loss and its alpha-gradient");
}
