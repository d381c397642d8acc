// The grouped-kernel layer in one CPU op: gather -> grouped conv -> un-permute.
//
//   y[:, o] = conv2d(x[:, gather[g*n_keep : (g+1)*n_keep]], weight[q], bias[q])   q = output_index[o]
//
// with g = q / (C_out / groups); i.e. exactly GroupedKernelConv2d.forward, float32, NCHW.
//
// Per (image, group) task the group's kept input channels are copied once into a zero-padded
// buffer (the gather folded into that copy; for stride s each padded row is stored as s phase
// planes so every kernel tap reads contiguous memory). Then blocks of D filters x R output rows x
// T vectors of 8 output columns accumulate in registers over every (kept channel, ky, kx): each
// input vector load feeds D filters and each weight broadcast feeds R*T vectors. The result is
// written straight to the filter's final channel (the un-permute costs nothing). Tasks run on
// ATen's intra-op thread pool, so torch.set_num_threads applies.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, const v8& v, int64_t lanes) {
  if (lanes == 8) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    float tmp[8];
    std::memcpy(tmp, &v, sizeof(v));
    std::memcpy(p, tmp, sizeof(float) * lanes);
  }
}

struct Geo {
  int64_t H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t Wq;     // entries per phase plane row: ceil((W + 2 pw) / sw)
  int64_t row;    // floats per padded row: sw * Wq
  int64_t plane;  // floats per gathered channel: (H + 2 ph) * row
  int64_t tap[32];  // offset of kernel column kx in the buffer row: phase plane + shift
};

// Copy the kept channels of one image into the padded, phase-split buffer. Borders are never
// written, so a buffer zeroed once stays a valid zero padding for every task that reuses it.
void fill(float* buf, const float* img, const int64_t* chans, int64_t n_keep, const Geo& g) {
  for (int64_t j = 0; j < n_keep; ++j) {
    const float* src = img + chans[j] * g.H * g.W;
    float* dst = buf + j * g.plane;
    for (int64_t iy = 0; iy < g.H; ++iy) {
      float* drow = dst + (iy + g.ph) * g.row;
      const float* srow = src + iy * g.W;
      if (g.sw == 1) {
        std::memcpy(drow + g.pw, srow, sizeof(float) * g.W);
      } else {  // padded column c goes to phase c % sw, entry c / sw
        for (int64_t phase = 0; phase < g.sw; ++phase) {
          int64_t ix = (phase - g.pw % g.sw + g.sw) % g.sw;  // first ix with (ix + pw) % sw == phase
          float* dphase = drow + phase * g.Wq + (ix + g.pw) / g.sw;
          for (; ix < g.W; ix += g.sw) *dphase++ = srow[ix];
        }
      }
    }
  }
}

struct Block {
  const float* buf;    // the task's gathered, padded input
  const float* w;      // D consecutive filters, n_keep * kh * kw each
  const float* bias;   // D values or nullptr
  float* out[8];       // D output planes (Ho * Wo), already in final channel order
  int64_t n_keep;
};

template <int D, int R, int T>
void tile(const Block& b, const Geo& g, int64_t oy, int64_t ox0, int64_t last_lanes) {
  v8 acc[D][R][T];
  for (int f = 0; f < D; ++f) {
    const float init = b.bias ? b.bias[f] : 0.f;
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[f][r][t] = (v8){} + init;
  }
  const int64_t taps = g.kh * g.kw, wstride = b.n_keep * taps;
  for (int64_t j = 0; j < b.n_keep; ++j) {
    const float* chan = b.buf + j * g.plane;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const float* rows[R];
      for (int r = 0; r < R; ++r) rows[r] = chan + ((oy + r) * g.sh + ky * g.dh) * g.row;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t at = g.tap[kx] + ox0;
        v8 xv[R][T];
        for (int r = 0; r < R; ++r)
          for (int t = 0; t < T; ++t) xv[r][t] = load8(rows[r] + at + 8 * t);
        const int64_t widx = j * taps + ky * g.kw + kx;
        for (int f = 0; f < D; ++f) {
          const float wf = b.w[f * wstride + widx];
          for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) acc[f][r][t] += wf * xv[r][t];
        }
      }
    }
  }
  for (int f = 0; f < D; ++f)
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        store8(b.out[f] + (oy + r) * g.Wo + ox0 + 8 * t, acc[f][r][t], t == T - 1 ? last_lanes : 8);
}

// One band of R output rows: chunks of at most TMAX vectors, as equal as possible (4 vectors
// run as 2 + 2, not 3 + 1: a one-vector chunk reuses each weight broadcast too little).
template <int D, int R>
void band(const Block& b, const Geo& g, int64_t oy) {
  constexpr int TMAX = (12 / (D * R)) < 1 ? 1 : ((12 / (D * R)) < 4 ? (12 / (D * R)) : 4);
  const int64_t nvec = (g.Wo + 7) / 8;
  const int64_t chunks = (nvec + TMAX - 1) / TMAX, even = (nvec + chunks - 1) / chunks;
  for (int64_t v = 0; v < nvec;) {
    const int64_t t = nvec - v < even ? nvec - v : even;
    const int64_t lanes = v + t == nvec ? g.Wo - 8 * (nvec - 1) : 8;
    const int64_t ox0 = 8 * v;
    switch (t) {
      case 1: tile<D, R, 1>(b, g, oy, ox0, lanes); break;
      case 2: tile<D, R, 2>(b, g, oy, ox0, lanes); break;
      case 3: if constexpr (TMAX >= 3) tile<D, R, 3>(b, g, oy, ox0, lanes); break;
      default: if constexpr (TMAX >= 4) tile<D, R, 4>(b, g, oy, ox0, lanes); break;
    }
    v += t;
  }
}

template <int D, int R>
void plane(const Block& b, const Geo& g) {
  int64_t oy = 0;
  for (; oy + R <= g.Ho; oy += R) band<D, R>(b, g, oy);
  for (; oy < g.Ho; ++oy) band<D, 1>(b, g, oy);
}

// About 12 accumulator vectors (of AVX2's 16 registers): D filters x R rows x T vectors, more
// rows when the output is narrow (an 8-column output has one vector per row).
template <int D>
void plane_rows(const Block& b, const Geo& g) {
  const int64_t nvec = (g.Wo + 7) / 8, t = nvec < 4 ? nvec : 4;
  const int64_t r = 12 / (D * t);
  if (r >= 3) plane<D, 3>(b, g);
  else if (r == 2) plane<D, 2>(b, g);
  else plane<D, 1>(b, g);
}

at::Tensor grouped_kernel_conv_cpu(
    const at::Tensor& x_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
    const at::Tensor& gather_, const at::Tensor& output_index_, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x_.dim() == 4 && weight_.dim() == 4, "gkp_fused: x and weight must be 4-D");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && weight_.scalar_type() == at::kFloat,
              "gkp_fused: float32 only");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "gkp_fused: stride, padding and dilation take two values");
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous();
  const at::Tensor gather = gather_.to(at::kLong).contiguous();
  const at::Tensor outidx = output_index_.to(at::kLong).contiguous();
  const int64_t N = x.size(0), C_in = x.size(1), C_out = weight.size(0), n_keep = weight.size(1);
  TORCH_CHECK(groups >= 1 && C_out % groups == 0, "gkp_fused: groups must divide the filters");
  TORCH_CHECK(gather.numel() == groups * n_keep, "gkp_fused: gather_index has the wrong length");
  TORCH_CHECK(outidx.numel() == C_out, "gkp_fused: output_index has the wrong length");
  TORCH_CHECK(gather.numel() == 0 || (gather.min().item<int64_t>() >= 0 &&
                                      gather.max().item<int64_t>() < C_in),
              "gkp_fused: gather_index out of range");
  Geo g{};
  g.H = x.size(2); g.W = x.size(3); g.kh = weight.size(2); g.kw = weight.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1];
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0,
              "gkp_fused: bad stride, padding or dilation");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "gkp_fused: the output would be empty");
  g.Wq = (g.W + 2 * g.pw + g.sw - 1) / g.sw;
  g.row = g.sw * g.Wq;
  g.plane = (g.H + 2 * g.ph) * g.row;
  TORCH_CHECK(g.kw <= 32, "gkp_fused: kernels wider than 32 columns are not supported");
  for (int64_t kx = 0; kx < g.kw; ++kx) {
    const int64_t col = kx * g.dw;
    g.tap[kx] = (col % g.sw) * g.Wq + col / g.sw;
  }

  const int64_t d = C_out / groups;
  std::vector<int64_t> pos(C_out, -1);  // grouped filter q -> final channel o
  const int64_t* oi = outidx.data_ptr<int64_t>();
  for (int64_t o = 0; o < C_out; ++o) {
    TORCH_CHECK(oi[o] >= 0 && oi[o] < C_out && pos[oi[o]] < 0,
                "gkp_fused: output_index must be a permutation");
    pos[oi[o]] = o;
  }
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->numel() == C_out, "gkp_fused: bias has the wrong length");
    bias = bias_->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({N, C_out, g.Ho, g.Wo}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t* gp = gather.data_ptr<int64_t>();
  float* yp = y.data_ptr<float>();
  const int D = d % 8 == 0 ? 8 : (d % 4 == 0 ? 4 : (d % 2 == 0 ? 2 : 1));
  const int64_t slack = 8 * 4 + 8;  // vector loads may run past a plane's end into this

  at::parallel_for(0, N * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n_keep * g.plane + slack, 0.f);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / groups, grp = task % groups;
      fill(buf.data(), xp + n * C_in * g.H * g.W, gp + grp * n_keep, n_keep, g);
      for (int64_t q = grp * d; q < (grp + 1) * d; q += D) {
        Block b{buf.data(), wp + q * n_keep * g.kh * g.kw, bp ? bp + q : nullptr, {}, n_keep};
        for (int f = 0; f < D; ++f) b.out[f] = yp + (n * C_out + pos[q + f]) * g.Ho * g.Wo;
        if (D == 8) plane<8, 1>(b, g);
        else if (D == 4) plane_rows<4>(b, g);
        else if (D == 2) plane_rows<2>(b, g);
        else plane_rows<1>(b, g);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gkp_fused, m) {
  m.def(
      "grouped_kernel_conv(Tensor x, Tensor weight, Tensor? bias, Tensor gather_index, "
      "Tensor output_index, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(gkp_fused, CPU, m) {
  m.impl("grouped_kernel_conv", &grouped_kernel_conv_cpu);
}
