// The grouped-kernel layer in one CPU op: gather -> grouped conv -> un-permute.
//
//   y[:, o] = conv2d(x[:, gather[g*n_keep : (g+1)*n_keep]], weight[q], bias[q])   q = output_index[o]
//
// with g = q / (C_out / groups); i.e. exactly GroupedKernelConv2d.forward, float32, NCHW or
// channels-last (a channels-last input is read in place and the output comes back
// channels-last, so no layout conversion surrounds the op). Two paths, by batch size:
//
// The rows path (small batches; GKP_FUSED_PATH=rows forces it). Input planes are copied into a
// zero-padded buffer (for stride s each padded row is stored as s phase planes, so every kernel
// tap reads contiguous memory), and each group reads its kept channels from that buffer through
// the index table (the gather costs one pointer per channel). When the batch splits evenly over
// the threads (N a multiple of them, or at least 4 per thread) each thread pads one image at a
// time into its own buffer and runs all that image's groups while it is in cache; otherwise all
// planes are padded once into a shared buffer and (image, group) tasks, or (image, band of
// output rows) tasks for layers run band by band (below), are spread over the threads.
// Tiles of D filters x R output rows x T vectors of 8 output columns accumulate in registers
// over every (kept channel, ky, kx): each input vector load feeds D filters and each weight
// broadcast feeds R*T vectors (whichever of the two sets is smaller is held in registers, so a
// tile never needs more than AVX2's 16 vector registers). The tile shape is chosen per layer by a
// small cost model (FMA throughput, loads, FMA latency, edge waste; GKP_FUSED_TILE="D,R,T" forces
// one, and GKP_FUSED_ORDER=band|group the loop order below, for kernel tuning and tests only);
// 3x3 and 1x1 kernels with unit stride and dilation get fully unrolled tap loops. A channels-last
// output is staged as NCHW planes per image and transposed into place while in cache.
//
// The lanes path (batches of at least LANES images with at most a quarter of the lanes empty;
// LANES = 16 with AVX-512, else 8; GKP_FUSED_PATH=lanes forces it): LANES images share each
// vector, so every tap of every output pixel is one aligned vector load for any stride and
// width, and row ends need no partial vectors. Described with its code below.
//
// A second op, grouped_conv_filters (the filters path; channels-last input and output; weights
// packed once by the caller): each group's filters in the vector lanes, the input read in place
// through the index table and broadcast. Described with its code at the end of this file.
//
// An optional epilogue, y = relu(y + residual) or y + residual or relu(y) (residual: a tensor of
// y's shape, read in y's layout), is applied where results reach the output: as the lanes path
// transposes them out, and on each image's output while it is in cache on the rows path. A
// ResNet block's conv -> ReLU and conv -> add -> ReLU then need no passes of their own over
// the activations (gkp/epilogue.py rewrites networks so).
//
// Both paths pack the weights once per call as [block of D filters][kept channel][tap][D] (the
// lanes path small weights once per thread: own_packing) so a tile's broadcasts are sequential,
// write each filter's results to its final channel (the un-permute costs nothing), keep their
// buffers as per-thread scratch memory between calls, and run on ATen's intra-op thread pool
// (torch.set_num_threads).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <unistd.h>

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v8 broadcast(float v) { return (v8){v, v, v, v, v, v, v, v}; }

struct Geo {
  int64_t H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t Wq;     // entries per phase plane row: ceil((W + 2 pw) / sw)
  int64_t row;    // floats per padded row: sw * Wq
  int64_t rows;   // padded rows per plane: the padded input, or more for the last band's reads
  int64_t plane;  // floats per padded channel: rows * row
  int64_t tap[32];  // offset of kernel column kx in the buffer row: phase plane + shift
};

// Bytes of L2 cache per core (512 KB when the system does not say).
int64_t l2_bytes() {
  static const int64_t l2 = sysconf(_SC_LEVEL2_CACHE_SIZE) > 0 ? sysconf(_SC_LEVEL2_CACHE_SIZE)
                                                               : 512 << 10;
  return l2;
}

// Scratch memory of the calling thread, kept between calls: 64-byte aligned (every vector of the
// lanes path is one cache line), grown on demand, freed when the thread ends. Buffers allocated
// and first touched on every call cost page faults comparable to the work of a small layer.
// Slots: 0 padded input, 1 staged output, 2 packed weights, 3 a block's whole staged output
// (the calling thread's, shared by the tasks of a split over groups).
float* scratch(int slot, int64_t floats) {
  struct Buf {
    float* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[4];
  Buf& b = bufs[slot];
  if (floats > b.n) {
    std::free(b.p);
    b.p = nullptr;
    b.n = 0;
    void* mem = nullptr;
    TORCH_CHECK(posix_memalign(&mem, 64, sizeof(float) * std::max<int64_t>(floats, 16)) == 0,
                "gkp_fused: could not allocate ", sizeof(float) * floats, " bytes of scratch");
    b.p = static_cast<float*>(mem);
    b.n = floats;
  }
  return b.p;
}

// Copy one input plane into its zero-padded, phase-split buffer plane (rows beyond the padded
// input, read by the last band of tiles, are zeros too).
void pad_plane(float* dst, const float* src, const Geo& g) {
  for (int64_t py = 0; py < g.rows; ++py) {
    float* __restrict drow = dst + py * g.row;
    const int64_t iy = py - g.ph;
    if (iy < 0 || iy >= g.H) {
      std::memset(drow, 0, sizeof(float) * g.row);
      continue;
    }
    const float* __restrict srow = src + iy * g.W;
    if (g.sw == 1) {
      for (int64_t c = 0; c < g.pw; ++c) drow[c] = 0.f;
      for (int64_t ix = 0; ix < g.W; ++ix) drow[g.pw + ix] = srow[ix];
      for (int64_t c = g.pw + g.W; c < g.row; ++c) drow[c] = 0.f;
    } else {  // padded column c goes to phase c % sw, entry c / sw
      std::memset(drow, 0, sizeof(float) * g.row);
      for (int64_t phase = 0; phase < g.sw; ++phase) {
        int64_t ix = (phase - g.pw % g.sw + g.sw) % g.sw;  // first ix with (ix + pw) % sw == phase
        float* dphase = drow + phase * g.Wq + (ix + g.pw) / g.sw;
        for (; ix < g.W; ix += g.sw) *dphase++ = srow[ix];
      }
    }
  }
}

// Channels [c0, c1) of one channels-last image (pixel (iy, ix) at src + (iy * W + ix) * C) into
// their padded planes: zeroed, then filled pixel by pixel, each pixel's channels in one read.
void pad_channels_last(float* dst, const float* src, const Geo& g, int64_t C, int64_t c0,
                       int64_t c1) {
  std::memset(dst + c0 * g.plane, 0, sizeof(float) * (c1 - c0) * g.plane);
  for (int64_t iy = 0; iy < g.H; ++iy)
    for (int64_t ix = 0; ix < g.W; ++ix) {
      const int64_t col = ix + g.pw;  // padded column: phase plane col % sw, entry col / sw
      float* d = dst + (iy + g.ph) * g.row + (col % g.sw) * g.Wq + col / g.sw;
      const float* __restrict px = src + (iy * g.W + ix) * C;
      for (int64_t c = c0; c < c1; ++c) d[c * g.plane] = px[c];
    }
}

// Pixels [p0, p1) of one image from NCHW planes (HW floats each) to channels-last.
void to_channels_last(float* dst, const float* src, int64_t C, int64_t HW, int64_t p0,
                      int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* __restrict d = dst + p * C;
    for (int64_t c = 0; c < C; ++c) d[c] = src[c * HW + p];
  }
}

// The epilogue: what is added to the output (nullptr: nothing; same layout and offsets as the
// output) and whether a ReLU follows.
struct Epi {
  const float* res = nullptr;
  bool relu = false;
  bool any() const { return res || relu; }
};

// y[i] = relu?(y[i] + r[i]) for i in [0, n): a stretch of the output and its residual.
void epilogue(float* __restrict y, const float* __restrict r, int64_t n, bool relu) {
  if (r && relu)
    for (int64_t i = 0; i < n; ++i) y[i] = std::max(y[i] + r[i], 0.f);
  else if (r)
    for (int64_t i = 0; i < n; ++i) y[i] += r[i];
  else if (relu)
    for (int64_t i = 0; i < n; ++i) y[i] = std::max(y[i], 0.f);
}

// One tile: D filters x R output rows x T vectors from output column ox0. K > 0: a K x K kernel
// with unit stride and dilation (tap offsets are compile-time); K == 0: any kernel, stride and
// dilation. w holds the block's packed weights [n_keep][taps][D]. Rows and columns past the
// output are computed (the buffer covers their reads) but not stored.
template <int D, int R, int T, int K>
void tile(const float* const* chan, const float* w, const float* bias, float* const* out,
          int64_t n_keep, const Geo& g, int64_t oy, int64_t ox0) {
  v8 acc[D][R][T];
  for (int f = 0; f < D; ++f) {
    const float init = bias ? bias[f] : 0.f;
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[f][r][t] = (v8){} + init;
  }
  const int64_t kh = K ? K : g.kh, kw = K ? K : g.kw, taps = kh * kw;
  const int64_t rstep = K ? g.row : g.sh * g.row;  // buffer floats between output rows
  const int64_t start = oy * rstep + ox0;
  for (int64_t j = 0; j < n_keep; ++j, w += taps * D) {
    const float* base = chan[j] + start;
    for (int64_t ky = 0; ky < kh; ++ky) {
      for (int64_t kx = 0; kx < kw; ++kx) {
        const float* at = base + (K ? ky * g.row + kx : ky * g.dh * g.row + g.tap[kx]);
        const float* wt = w + (ky * kw + kx) * D;
        if constexpr (D * R * T + D + 1 <= 16) {  // accumulators + held broadcasts + one load
          v8 wv[D];  // D broadcasts held; each input vector is loaded once and feeds D filters
          for (int f = 0; f < D; ++f) wv[f] = broadcast(wt[f]);
          for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) {
              v8 xv = load8(at + r * rstep + 8 * t);
              asm("" : "+x"(xv));  // keep it in a register: a load per FMA saturates the load ports
              for (int f = 0; f < D; ++f) acc[f][r][t] += wv[f] * xv;
            }
        } else {
          v8 xv[R][T];  // R*T input vectors held; each weight broadcast feeds them all
          for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) xv[r][t] = load8(at + r * rstep + 8 * t);
          for (int f = 0; f < D; ++f) {
            v8 wv = broadcast(wt[f]);
            asm("" : "+x"(wv));
            for (int r = 0; r < R; ++r)
              for (int t = 0; t < T; ++t) acc[f][r][t] += wv * xv[r][t];
          }
        }
      }
    }
  }
  const bool full = oy + R <= g.Ho && ox0 + 8 * T <= g.Wo;
  for (int f = 0; f < D; ++f)
    for (int r = 0; r < R; ++r) {
      if (!full && oy + r >= g.Ho) break;
      float* dst = out[f] + (oy + r) * g.Wo + ox0;
      for (int t = 0; t < T; ++t) {
        const int64_t lanes = full ? 8 : std::min<int64_t>(8, g.Wo - ox0 - 8 * t);
        if (lanes == 8) {
          std::memcpy(dst + 8 * t, &acc[f][r][t], sizeof(v8));
        } else if (lanes > 0) {
          float tmp[8];
          std::memcpy(tmp, &acc[f][r][t], sizeof(v8));
          std::memcpy(dst + 8 * t, tmp, sizeof(float) * lanes);
        }
      }
    }
}

using TileFn = void (*)(const float* const*, const float*, const float*, float* const*, int64_t,
                        const Geo&, int64_t, int64_t);

struct Shape {
  int D, R, T;
  TileFn fn[3];  // 3x3 unit stride, 1x1 unit stride, anything
};

#define GKP_SHAPE(D, R, T) \
  { D, R, T, { &tile<D, R, T, 3>, &tile<D, R, T, 1>, &tile<D, R, T, 0> } }
// 8 to 12 accumulators (of AVX2's 16 vector registers) plus the held operands: at most 16
// registers in all, so nothing spills (shapes needing 17, like (4, 3, 1), ran at half speed).
const Shape SHAPES[] = {
    GKP_SHAPE(1, 3, 4), GKP_SHAPE(1, 6, 2), GKP_SHAPE(1, 8, 1), GKP_SHAPE(2, 1, 4),
    GKP_SHAPE(2, 2, 3), GKP_SHAPE(2, 3, 2), GKP_SHAPE(2, 6, 1),
    GKP_SHAPE(4, 1, 2), GKP_SHAPE(4, 2, 1), GKP_SHAPE(8, 1, 1),
};
#undef GKP_SHAPE

// Modelled cycles of one filter group's plane with a tile shape: per tap the larger of FMA
// issue (2 per cycle), loads (2 per cycle) and FMA latency (4 cycles per accumulator chain),
// plus a fixed cost per tile; partial tiles at the bottom and right edges cost in full.
double cost(const Shape& s, int64_t d, int64_t n_keep, const Geo& g) {
  const double acc = s.D * s.R * s.T, loads = s.R * s.T + s.D;
  const double per_tap = std::max({acc / 2, loads / 2, 4.0}) + 0.5;
  const int64_t nvec = (g.Wo + 7) / 8;
  const double tiles = double(d / s.D) * ((g.Ho + s.R - 1) / s.R) * ((nvec + s.T - 1) / s.T);
  return tiles * (n_keep * g.kh * g.kw * per_tap + 2 * acc + 20);
}

const Shape& choose(int64_t d, int64_t n_keep, const Geo& g) {
  const Shape* best = nullptr;
  double best_cost = 0;
  if (const char* force = std::getenv("GKP_FUSED_TILE")) {  // "D,R,T": for kernel tuning only
    int D = 0, R = 0, T = 0;
    TORCH_CHECK(std::sscanf(force, "%d,%d,%d", &D, &R, &T) == 3,
                "gkp_fused: GKP_FUSED_TILE must be \"D,R,T\", got \"", force, "\"");
    const Shape* forced = nullptr;
    for (const Shape& s : SHAPES)
      if (s.D == D && s.R == R && s.T == T) forced = &s;
    TORCH_CHECK(forced, "gkp_fused: GKP_FUSED_TILE=", force, " is not one of the kernel's tile "
                "shapes (SHAPES in grouped_kernel_conv.cpp)");
    if (d % D == 0) return *forced;  // a layer whose filter groups it does not divide: the model
  }
  for (const Shape& s : SHAPES) {
    if (d % s.D != 0) continue;
    const double c = cost(s, d, n_keep, g);
    if (!best || c < best_cost) best = &s, best_cost = c;
  }
  return *best;  // D = 1 shapes always qualify
}

// Which tile instantiation runs a kernel: 0 a 3x3 and 1 a 1x1 with unit stride and dilation
// (taps unrolled at compile time), 2 anything else. Both paths' shape tables are laid out so.
template <class G>
int tap_variant(const G& g) {
  const bool unit = g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1;
  return unit && g.kh == 3 && g.kw == 3 ? 0 : (unit && g.kh == 1 && g.kw == 1 ? 1 : 2);
}

// ---- The lanes path (large batches): LANES images in the vector lanes -------------------------
//
// A block of LANES images (16 with AVX-512, else 8) is padded into [channel][padded row][padded
// column][image] (transposed LANES x LANES at a time), so every kernel tap of every output pixel
// is one aligned vector load, for any stride, and a tile of D filters x P output pixels of one
// row is D*P accumulators with no partial vectors at the right edge. Tiles write
// [channel][pixel][image] staging planes that are transposed back into the output (NCHW or
// channels-last, each image's channels in their final order). A last block of fewer than LANES
// images runs with zero lanes. Work is split into (block, band of output rows) tasks: a block
// per task when the blocks split evenly over the threads, else each block's rows in bands too.
// A task runs as a pipeline of rows in its thread's own buffers: the input rows an output row
// reads are padded just before it is computed for every group, and finished pixels go out to
// the output every 64 or more; the padded rows and the staged pixels live in windows of their
// planes that are reused as the task moves down, so what it touches stays in cache (a whole
// block's planes would not: ResNet-50's first stage needs 14 MB for 16 images).

#if defined(__AVX512F__)
constexpr int LANES = 16;
#else
constexpr int LANES = 8;
#endif
#if defined(__AVX512F__) || defined(__AVX512VL__)
constexpr int VREGS = 32;  // AVX-512: 32 vector registers
#else
constexpr int VREGS = 16;
#endif
typedef float vl __attribute__((vector_size(4 * LANES)));
typedef int vli __attribute__((vector_size(4 * LANES)));

inline vl loadl(const float* p) {
  vl v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storel(float* p, vl v) { std::memcpy(p, &v, sizeof(v)); }


template <std::size_t... I>
inline vl splat(float v, std::index_sequence<I...>) {
  return vl{(static_cast<void>(I), v)...};
}
// v in every lane (a plain splat, which the compiler turns into a broadcast load)
inline vl splat(float v) { return splat(v, std::make_index_sequence<LANES>()); }

// Output element i of y (at yp) gets v through the epilogue: its residual e.res[i] added, a ReLU.
inline void put(float* yp, int64_t i, vl v, const Epi& e) {
  if (e.res) v += loadl(e.res + i);
  if (e.relu) v = v > splat(0.f) ? v : splat(0.f);
  storel(yp + i, v);
}
inline void put(float* yp, int64_t i, float v, const Epi& e) {
  if (e.res) v += e.res[i];
  yp[i] = e.relu ? std::max(v, 0.f) : v;
}

// Lane masks of one transpose round: in each 2b x 2b block of the matrix the two off-diagonal
// b x b blocks swap (lo: row i's new contents, hi: row i + b's, from rows i and i + b; indices
// from LANES on pick row i + b's lanes).
constexpr int lo_lane(int b, int p) { return (p & b) ? LANES + p - b : p; }
constexpr int hi_lane(int b, int p) { return (p & b) ? LANES + p : p + b; }
template <int b, std::size_t... P>
constexpr vli lo_mask(std::index_sequence<P...>) { return vli{lo_lane(b, P)...}; }
template <int b, std::size_t... P>
constexpr vli hi_mask(std::index_sequence<P...>) { return vli{hi_lane(b, P)...}; }

template <int b>
inline void transpose_round(vl* r) {
  constexpr vli lo_m = lo_mask<b>(std::make_index_sequence<LANES>());
  constexpr vli hi_m = hi_mask<b>(std::make_index_sequence<LANES>());
  for (int i = 0; i < LANES; ++i)
    if (!(i & b)) {
#if defined(__clang__)
      vl lo, hi;  // clang's shuffle takes constant indices only: lane by lane
      for (int p = 0; p < LANES; ++p) {
        const int l = lo_lane(b, p), h = hi_lane(b, p);
        lo[p] = l < LANES ? r[i][l] : r[i + b][l - LANES];
        hi[p] = h < LANES ? r[i][h] : r[i + b][h - LANES];
      }
#else
      const vl lo = __builtin_shuffle(r[i], r[i + b], lo_m);
      const vl hi = __builtin_shuffle(r[i], r[i + b], hi_m);
#endif
      r[i] = lo;
      r[i + b] = hi;
    }
}

// r[i][j] -> r[j][i] for a LANES x LANES block held as LANES vectors.
inline void transpose(vl* r) {
  if constexpr (LANES == 16) transpose_round<8>(r);
  transpose_round<4>(r);
  transpose_round<2>(r);
  transpose_round<1>(r);
}

struct LGeo {
  int64_t H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t Wp;  // padded columns
};

// One tile: D filters x P output pixels of row oy from column ox0, LANES images per vector,
// written to row so of the staging planes out. K > 0: a K x K kernel with stride ST (both
// directions) and unit dilation, known at compile time; K == 0: any. oy is the output row
// counted from the one whose first input row is the window's first (chan: the window's planes).
// Pixels past the row are computed from whatever the buffer holds there (never stored).
template <int D, int P, int K, int ST = 1>
void ltile(const float* const* chan, const float* w, const float* bias, float* const* out,
           int64_t n_keep, const LGeo& g, int64_t oy, int64_t ox0, int64_t so) {
  vl acc[D][P];
  for (int f = 0; f < D; ++f)
    for (int p = 0; p < P; ++p) acc[f][p] = splat(bias ? bias[f] : 0.f);
  const int64_t kh = K ? K : g.kh, kw = K ? K : g.kw, taps = kh * kw;
  const int64_t step = (K ? ST : g.sw) * LANES;  // floats between output pixels
  const int64_t start = ((K ? oy * ST : oy * g.sh) * g.Wp + (K ? ox0 * ST : ox0 * g.sw)) * LANES;
  for (int64_t j = 0; j < n_keep; ++j, w += taps * D) {
    const float* base = chan[j] + start;
    for (int64_t ky = 0; ky < kh; ++ky)
      for (int64_t kx = 0; kx < kw; ++kx) {
        const float* at =
            base + (K ? ky * g.Wp + kx : ky * g.dh * g.Wp + kx * g.dw) * LANES;
        const float* wt = w + (ky * kw + kx) * D;
        vl wv[D];
        for (int f = 0; f < D; ++f) wv[f] = splat(wt[f]);
        for (int p = 0; p < P; ++p) {
          const vl xv = loadl(at + p * step);
          for (int f = 0; f < D; ++f) acc[f][p] += wv[f] * xv;
        }
      }
  }
  const int64_t valid = std::min<int64_t>(P, g.Wo - ox0);
  for (int f = 0; f < D; ++f) {
    float* dst = out[f] + (so * g.Wo + ox0) * LANES;
    for (int p = 0; p < valid; ++p) storel(dst + p * LANES, acc[f][p]);
  }
}

using TileFn_l = void (*)(const float* const*, const float*, const float*, float* const*,
                           int64_t, const LGeo&, int64_t, int64_t, int64_t);

struct LShape {
  int D, P;
  TileFn_l fn[4];  // 3x3 unit stride, 1x1 unit stride, anything, 3x3 stride 2 (lane_variant)
};

#define GKP_LSHAPE(D, P) \
  { D, P, { &ltile<D, P, 3>, &ltile<D, P, 1>, &ltile<D, P, 0>, &ltile<D, P, 3, 2> } }
// At most 16 accumulators: larger tiles (28 accumulators of AVX-512's 32 registers, like (2, 14)
// or (4, 6)) measured slower. On equal modelled cost the earlier shape wins. The one-pixel
// shapes (8, 1) and (16, 1) serve the layers whose rows do not stay in the L1 cache (lchoose).
const LShape LSHAPES[] = {
    GKP_LSHAPE(4, 4), GKP_LSHAPE(2, 8), GKP_LSHAPE(8, 2), GKP_LSHAPE(2, 7), GKP_LSHAPE(1, 16),
    GKP_LSHAPE(2, 4), GKP_LSHAPE(1, 8), GKP_LSHAPE(1, 7), GKP_LSHAPE(8, 1), GKP_LSHAPE(16, 1),
};
#undef GKP_LSHAPE

// Registers a shape needs: its accumulators, one input vector and the D weight broadcasts,
// except for a one-pixel tile with AVX-512, whose FMAs take each weight as a broadcast memory
// operand (GCC emits vfmadd231ps m32{1to16}), so (16, 1) needs 17 of the 32.
constexpr int lregs(int D, int P) { return D * P + (LANES == 16 && P == 1 ? 0 : D) + 1; }

// The least bytes of kept input rows that one output row of a group reads (n_keep channels x
// the kernel's rows x the padded row's LANES-image vectors) for which lchoose takes a one-pixel
// tile: an eighth of the L2 cache (128 KB of the AMD EPYC's 1 MB).
int64_t one_pixel_bytes() { return l2_bytes() / 8; }

// Modelled cycles of one filter group's plane: per tap the larger of FMA issue (2 per cycle),
// loads (an input vector, from the L2-resident buffer, a cycle; a weight broadcast half) and
// FMA latency, plus a cost per tile; pixels computed past the row's end cost in full.
double lcost(const LShape& s, int64_t d, int64_t n_keep, const LGeo& g) {
  const double acc = s.D * s.P;
  const double per_tap = std::max({acc / 2, s.P + s.D / 2.0, 4.0}) + 0.5;
  const double tiles = double(d / s.D) * g.Ho * ((g.Wo + s.P - 1) / s.P);
  return tiles * (n_keep * g.kh * g.kw * per_tap + 2 * acc + 20);
}

// The tile shape of a layer: GKP_FUSED_LANE_TILE if set (and its D divides the groups), else
// for a layer whose kept rows per output row exceed one_pixel_bytes() (every 3x3 layer of
// ResNet-50 at batch 16: 400-900 KB at p = 0.4375) the one-pixel shape with the most filters,
// else the cheapest shape by lcost. Wide tiles of those layers read their inputs from the L2
// cache, P vector loads per tap serving D filters each; a one-pixel tile loads one vector per
// tap for D = 16 (or 8) filters and streams the filters' weights, 16 to a cache line. On the
// 2-core AMD EPYC at batch 16 on 2 threads, every shape forced in turn (scripts/bench_fused.py
// --lane-tiles) put the one-pixel shapes at or near the top on every ResNet-50 3x3 layer, where
// the model's wide tiles had run the stride-2 C=512 layer at about 1.1x of dense against 1.6x;
// ResNet-56's layers (59-69 KB) keep the model's choice, within noise of their best shape.
const LShape& lchoose(int64_t d, int64_t n_keep, const LGeo& g) {
  if (const char* force = std::getenv("GKP_FUSED_LANE_TILE")) {  // "D,P": for tuning and tests
    int D = 0, P = 0;
    TORCH_CHECK(std::sscanf(force, "%d,%d", &D, &P) == 2,
                "gkp_fused: GKP_FUSED_LANE_TILE must be \"D,P\", got \"", force, "\"");
    const LShape* forced = nullptr;
    for (const LShape& s : LSHAPES)
      if (s.D == D && s.P == P) forced = &s;
    TORCH_CHECK(forced, "gkp_fused: GKP_FUSED_LANE_TILE=", force, " is not one of the kernel's "
                "lane tile shapes (LSHAPES in grouped_kernel_conv.cpp)");
    if (d % D == 0) return *forced;  // a layer whose filter groups it does not divide: the model
  }
  const LShape* best = nullptr;
  const int64_t rows_bytes = n_keep * ((g.kh - 1) * g.dh + 1) * g.Wp * LANES * int64_t(sizeof(float));
  if (rows_bytes > one_pixel_bytes()) {
    for (const LShape& s : LSHAPES)  // the one-pixel shape with the most filters (at least 4)
      if (s.P == 1 && s.D >= 4 && d % s.D == 0 && lregs(s.D, 1) <= VREGS &&
          (!best || s.D > best->D))
        best = &s;
    if (best) return *best;
  }
  double best_cost = 0;
  for (const LShape& s : LSHAPES) {
    if (d % s.D != 0 || lregs(s.D, s.P) > VREGS) continue;
    const double c = lcost(s, d, n_keep, g);
    if (!best || c < best_cost) best = &s, best_cost = c;
  }
  return *best;  // (1, 8) and (1, 7) always qualify
}

// The whole number >= least in the environment variable `name`, or `fallback` when it is unset
// (the kernel's numeric overrides; anything else, "4M" or "-1" included, is refused by name).
int64_t env_count(const char* name, int64_t least, int64_t fallback) {
  const char* text = std::getenv(name);
  if (!text) return fallback;
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text, &end, 10);
  TORCH_CHECK(end != text && *end == '\0' && errno == 0 && value >= least, "gkp_fused: ", name,
              " must be a whole number >= ", least, ", got \"", text, "\"");
  return value;
}

// Rows of the lanes path's padded input window (row: floats of one padded row of every channel):
// what fits in half the L2 cache (GKP_FUSED_LANE_WINDOW=rows forces a number, for tests). The
// caller raises it to the rows one output row reads plus a stride, so a layer whose rows are
// wide (ResNet-50's first stage: 237 KB per row of 16 images' 64 channels) gets a window larger
// than that budget: 4 rows there.
int64_t window_rows(int64_t row) {
  return env_count("GKP_FUSED_LANE_WINDOW", 1, l2_bytes() / 2 / (row * int64_t(sizeof(float))));
}

// Whether a batch of N runs on the lanes path: LANES or more images with at most a quarter of the
// lanes empty (GKP_FUSED_PATH=lanes|rows forces it, for tuning and tests).
bool use_lanes(int64_t N) {
  if (const char* path = std::getenv("GKP_FUSED_PATH")) {
    TORCH_CHECK(!std::strcmp(path, "lanes") || !std::strcmp(path, "rows"),
                "gkp_fused: GKP_FUSED_PATH must be \"lanes\" or \"rows\", got \"", path, "\"");
    return !std::strcmp(path, "lanes");
  }
  const int64_t empty = (N + LANES - 1) / LANES * LANES - N;
  return N >= LANES && 4 * empty <= N;
}

// A call with fewer images than threads (where the rows path splits each image's work) and
// fewer multiply-adds than this runs on the calling thread alone, with no parallel region
// (GKP_FUSED_SERIAL_MACS=n sets another bound, for tests and tuning; 0 splits every call). On
// the 2-core AMD EPYC, ResNet-56's 3x3 layers at batch 1 (1.3 million multiply-adds, about
// 40 us on one thread) ran 0.75-1.1x as fast on two threads as on one (scripts/ab_fused.py
// --batch-one): three parallel regions a call (four with a channels-last input), and at times
// one of this shared machine's cores slowed down, which holds every region up (a tuned
// ResNet-56 then took 6.9 ms at batch 1 on 2 threads, 3.8 ms on 1). ResNet-50's 3x3 layers at
// batch 1 (65 million each at 9/16 of the channels kept) gain on two threads.
constexpr int64_t SERIAL_MACS = int64_t(4) << 20;

int64_t serial_macs() { return env_count("GKP_FUSED_SERIAL_MACS", 0, SERIAL_MACS); }

// How the lanes path splits a block over threads when blocks are fewer than threads (see
// lanes_path): 0, the default, by bands of rows, or by groups where the rows do not split evenly
// over the bands; GKP_FUSED_LANE_SPLIT=rows (1) or groups (2: wherever the groups and the shared
// output buffer allow) forces one, for tests and tuning.
int lane_split() {
  const char* v = std::getenv("GKP_FUSED_LANE_SPLIT");
  if (!v) return 0;
  TORCH_CHECK(!std::strcmp(v, "rows") || !std::strcmp(v, "groups"),
              "gkp_fused: GKP_FUSED_LANE_SPLIT must be \"rows\" or \"groups\", got \"", v, "\"");
  return std::strcmp(v, "rows") ? 2 : 1;
}

// Blocks of LANES filters (the one-pixel tiles' (16, 1) with AVX-512) are packed LANES x LANES
// at a time through a register transpose where the weights allow it: LANES filters' vectors of
// LANES kept channels at one tap (channels adjacent: channels-last weights) or of LANES
// consecutive (channel, tap) floats (contiguous weights) become LANES vectors of the D filters'
// weights, each stored whole where it belongs; 64-byte loads and stores instead of one float at
// a time (ResNet-50's 512-channel layer spent 7% of its call packing, `perf record` at 1 thread).
template <int D>
bool pack_block_transposed(float* dst, const float* src, int64_t n_keep, int64_t kh, int64_t kw,
                           int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  if constexpr (D != LANES) {
    return false;
  } else {
    const int64_t taps = kh * kw;
    vl r[LANES];
    if (s1 == 1) {  // a tap's kept channels adjacent in memory
      for (int64_t ky = 0; ky < kh; ++ky)
        for (int64_t kx = 0; kx < kw; ++kx) {
          const int64_t t = ky * kw + kx;
          const float* from = src + ky * s2 + kx * s3;
          int64_t j = 0;
          for (; j + LANES <= n_keep; j += LANES) {
            for (int f = 0; f < LANES; ++f) r[f] = loadl(from + f * s0 + j);
            transpose(r);
            for (int k = 0; k < LANES; ++k) storel(dst + ((j + k) * taps + t) * D, r[k]);
          }
          for (; j < n_keep; ++j)
            for (int f = 0; f < D; ++f) dst[(j * taps + t) * D + f] = from[f * s0 + j];
        }
      return true;
    }
    if (s3 == 1 && s2 == kw && s1 == taps) {  // a filter's (channel, tap) floats in packing order
      const int64_t per_filter = n_keep * taps;
      int64_t i = 0;
      for (; i + LANES <= per_filter; i += LANES) {
        for (int f = 0; f < LANES; ++f) r[f] = loadl(src + f * s0 + i);
        transpose(r);
        for (int k = 0; k < LANES; ++k) storel(dst + (i + k) * D, r[k]);
      }
      for (; i < per_filter; ++i)
        for (int f = 0; f < D; ++f) dst[i * D + f] = src[f * s0 + i];
      return true;
    }
    return false;
  }
}

// Blocks [begin, end) of D filters of pack_weights (D known at compile time: a tap's D floats
// are D unrolled loads and stores, written in order). Weights whose kept channels are adjacent
// in memory (channels-last: [filter][ky][kx][channel]) are read in that order instead, each
// filter as one sequential stream: read tap by tap across the D filters, their taps are
// kh * kw * D streams that no prefetcher follows (with D = 16, ResNet-50's 512-channel layers,
// whose weights have left the cache by the time a pass comes back to them, took about 1 ms
// longer a call, its 1.3 million floats, with channels-last weights than with contiguous ones).
// Blocks of LANES filters go through pack_block_transposed where their strides allow.
template <int D>
void pack_blocks(float* pk, const float* wp, int64_t begin, int64_t end, int64_t n_keep,
                 int64_t kh, int64_t kw, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  const int64_t taps = kh * kw, per_filter = n_keep * taps;
  const bool by_filter = s1 == 1 && taps > 1 && s3 >= n_keep && s2 >= kw * s3;
  for (int64_t blk = begin; blk < end; ++blk) {
    float* dst = pk + blk * D * per_filter;
    const float* src = wp + blk * D * s0;
    if (pack_block_transposed<D>(dst, src, n_keep, kh, kw, s0, s1, s2, s3)) continue;
    if (by_filter) {
      for (int f = 0; f < D; ++f)
        for (int64_t ky = 0; ky < kh; ++ky)
          for (int64_t kx = 0; kx < kw; ++kx) {
            const float* from = src + f * s0 + ky * s2 + kx * s3;
            float* to = dst + (ky * kw + kx) * D + f;
            for (int64_t j = 0; j < n_keep; ++j) to[j * taps * D] = from[j];
          }
      continue;
    }
    for (int64_t j = 0; j < n_keep; ++j)
      for (int64_t ky = 0; ky < kh; ++ky)
        for (int64_t kx = 0; kx < kw; ++kx, dst += D) {
          const float* tap = src + j * s1 + ky * s2 + kx * s3;
          for (int f = 0; f < D; ++f) dst[f] = tap[f * s0];
        }
  }
}

// Weights of fewer floats than this are packed by the calling thread: a parallel region costs
// more than their copy.
constexpr int64_t PACK_PARALLEL_FLOATS = 1 << 15;

// Weights [C_out][n_keep][kh][kw] (any strides: a network converted to channels-last has
// channels-last weights, which are read in place rather than copied on every call) packed per
// block of D filters: [block][kept channel][tap][D]. This runs on every call, so it must be
// cheap: the loop it replaced wrote one filter at a time, every D-th float, at about 3 ns a
// float (scripts/ab_fused.py --batch-one: at batch 1 it took more than half of a ResNet-56
// 64-channel layer's call and of a ResNet-50 512-channel one's).
const float* pack_weights(const at::Tensor& weight, int64_t D, bool serial) {
  const int64_t C_out = weight.size(0), n_keep = weight.size(1);
  const int64_t kh = weight.size(2), kw = weight.size(3), per_filter = n_keep * kh * kw;
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1), s2 = weight.stride(2),
                s3 = weight.stride(3);
  const float* wp = weight.data_ptr<float>();
  float* pk = scratch(2, C_out * per_filter);
  TORCH_CHECK(D == 1 || D == 2 || D == 4 || D == 8 || D == 16, "gkp_fused: no packing for blocks of ",
              D);
  const auto run = D == 16 ? &pack_blocks<16> : D == 8 ? &pack_blocks<8> : D == 4 ? &pack_blocks<4>
                   : D == 2 ? &pack_blocks<2> : &pack_blocks<1>;
  auto pack = [&](int64_t begin, int64_t end) {
    run(pk, wp, begin, end, n_keep, kh, kw, s0, s1, s2, s3);
  };
  if (serial || C_out * per_filter < PACK_PARALLEL_FLOATS)
    pack(0, C_out / D);
  else
    at::parallel_for(0, C_out / D, 1, pack);
  return pk;
}

// Whether every thread of the lanes path packs its own copy of the weights (in its own scratch,
// inside the parallel region) rather than reading one copy packed before it: by default where the
// copy would be packed by the calling thread alone anyway (fewer than PACK_PARALLEL_FLOATS), so
// the other threads, idle while it packed, pack their own at the same time, and no thread reads
// weights that another core has just written (on the 2-core AMD EPYC the other core's copy cost
// tuned ResNet-56 about 1 ms of 62 at batch 64 on 2 threads while the machine ran its slow mode,
// and nothing measurable otherwise: scripts/phase_probe.py --env GKP_FUSED_PACK=shared). Larger
// weights keep one copy packed by all threads together (each thread packing all of them would
// double the work). GKP_FUSED_PACK=own|shared forces either, for tests and tuning.
bool own_packing(int64_t floats) {
  const char* v = std::getenv("GKP_FUSED_PACK");
  if (!v) return floats < PACK_PARALLEL_FLOATS;
  TORCH_CHECK(!std::strcmp(v, "own") || !std::strcmp(v, "shared"),
              "gkp_fused: GKP_FUSED_PACK must be \"own\" or \"shared\", got \"", v, "\"");
  return !std::strcmp(v, "own");
}

// The lanes path's tile instantiations add 3: a 3x3 kernel with stride 2 and unit dilation (the
// downsampling 3x3 convs of ResNets, which the generic tile ran at 0.7-1.2x of dense; see
// scripts/bench_fused.py --downsampling).
template <class G>
int lane_variant(const G& g) {
  const bool s2 = g.sh == 2 && g.sw == 2 && g.dh == 1 && g.dw == 1 && g.kh == 3 && g.kw == 3;
  return s2 ? 3 : tap_variant(g);
}

at::Tensor lanes_path(const at::Tensor& x, bool cl, const at::Tensor& weight, const float* bp,
                      const int64_t* gp, const std::vector<int64_t>& pos, int64_t groups,
                      LGeo g, at::Tensor y, const Epi& e) {
  const int64_t N = x.size(0), C_in = x.size(1), C_out = weight.size(0), n_keep = weight.size(1);
  const int64_t d = C_out / groups, HW = g.H * g.W, HWo = g.Ho * g.Wo;
  const LShape& s = lchoose(d, n_keep, g);
  const TileFn_l run = s.fn[lane_variant(g)];
  const int64_t per_filter = n_keep * g.kh * g.kw;
  const bool own = own_packing(C_out * per_filter);
  const float* pk_shared = own ? nullptr : pack_weights(weight, s.D, false);
  // reads past the last plane: the last tile's pixels beyond the row, one row down at most
  const int64_t slack = (g.Wp + s.P * g.sw + g.kw * g.dw) * LANES;
  const int64_t nblk = (N + LANES - 1) / LANES;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  static const float zeros[LANES] = {};

  // Input rows [iy0, iy1) of block b into padded planes at dst (plane floats each, first row:
  // padded row py0), with their zero columns left and right.
  auto pad = [&](float* dst, int64_t plane, int64_t py0, int64_t b, int64_t iy0, int64_t iy1) {
    const int64_t n0 = b * LANES, nimg = std::min<int64_t>(LANES, N - n0);
    const int64_t first = (iy0 + g.ph - py0) * g.Wp * LANES;  // row iy0 in a plane
    for (int64_t c = 0; c < C_in; ++c)
      for (int64_t iy = iy0; iy < iy1; ++iy) {
        float* row = dst + c * plane + first + (iy - iy0) * g.Wp * LANES;
        std::memset(row, 0, sizeof(float) * g.pw * LANES);
        std::memset(row + (g.pw + g.W) * LANES, 0, sizeof(float) * (g.Wp - g.pw - g.W) * LANES);
      }
    if (!cl) {  // image k's row of LANES pixels -> LANES pixels' vectors of LANES images
      for (int64_t c = 0; c < C_in; ++c)
        for (int64_t iy = iy0; iy < iy1; ++iy) {
          const float* src[LANES];
          for (int k = 0; k < LANES; ++k)
            src[k] = k < nimg ? xp + ((n0 + k) * C_in + c) * HW + iy * g.W : nullptr;
          float* row = dst + c * plane + first + ((iy - iy0) * g.Wp + g.pw) * LANES;
          int64_t ix = 0;
          for (; ix + LANES <= g.W; ix += LANES) {
            vl r[LANES];
            for (int k = 0; k < LANES; ++k) r[k] = src[k] ? loadl(src[k] + ix) : (vl){};
            transpose(r);
            for (int j = 0; j < LANES; ++j) storel(row + (ix + j) * LANES, r[j]);
          }
          for (; ix < g.W; ++ix)
            for (int k = 0; k < LANES; ++k) row[ix * LANES + k] = src[k] ? src[k][ix] : 0.f;
        }
      return;
    }
    for (int64_t iy = iy0; iy < iy1; ++iy)  // image k's LANES channels of a pixel -> their vectors
      for (int64_t ix = 0; ix < g.W; ++ix) {
        const float* src[LANES];
        for (int k = 0; k < LANES; ++k)
          src[k] = k < nimg ? xp + (n0 + k) * C_in * HW + (iy * g.W + ix) * C_in : zeros;
        float* at = dst + first + ((iy - iy0) * g.Wp + ix + g.pw) * LANES;
        int64_t c = 0;
        for (; c + LANES <= C_in; c += LANES) {
          vl r[LANES];
          for (int k = 0; k < LANES; ++k) r[k] = k < nimg ? loadl(src[k] + c) : (vl){};
          transpose(r);
          for (int j = 0; j < LANES; ++j) storel(at + (c + j) * plane, r[j]);
        }
        for (; c < C_in; ++c)
          for (int k = 0; k < LANES; ++k) at[c * plane + k] = k < nimg ? src[k][c] : 0.f;
      }
  };
  // Staged pixels [p0, p1) of block b (stage: C_out planes of sst floats, [pixel][LANES] each,
  // its pixel 0 being output pixel base) into the output.
  auto unstage = [&](const float* stage, int64_t sst, int64_t base, int64_t b, int64_t p0,
                     int64_t p1) {
    const int64_t n0 = b * LANES, nimg = std::min<int64_t>(LANES, N - n0);
    if (!cl) {
      for (int64_t o = 0; o < C_out; ++o) {
        const float* src = stage + o * sst;
        const int64_t at = o * HWo + base;  // + image's offset
        int64_t p = p0;
        for (; p + LANES <= p1; p += LANES) {
          vl r[LANES];
          for (int j = 0; j < LANES; ++j) r[j] = loadl(src + (p + j) * LANES);
          transpose(r);
          for (int k = 0; k < nimg; ++k) put(yp, at + (n0 + k) * C_out * HWo + p, r[k], e);
        }
        for (; p < p1; ++p)
          for (int k = 0; k < nimg; ++k) put(yp, at + (n0 + k) * C_out * HWo + p, src[p * LANES + k], e);
      }
      return;
    }
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t at = (base + p) * C_out;  // + image's offset
      int64_t o = 0;
      for (; o + LANES <= C_out; o += LANES) {
        vl r[LANES];
        for (int j = 0; j < LANES; ++j) r[j] = loadl(stage + (o + j) * sst + p * LANES);
        transpose(r);
        for (int k = 0; k < nimg; ++k) put(yp, at + (n0 + k) * HWo * C_out + o, r[k], e);
      }
      for (; o < C_out; ++o)
        for (int k = 0; k < nimg; ++k)
          put(yp, at + (n0 + k) * HWo * C_out + o, stage[o * sst + p * LANES + k], e);
    }
  };
  // One task: output rows [oy0, oy1) of block b, in this thread's own buffers, as a pipeline
  // of rows: each output row is computed for every group right after the input rows it reads
  // were padded, and every 64 or more finished pixels go out to the output. Both buffers are
  // windows that stay in cache rather than the band's whole planes (ResNet-50's first stage:
  // 14 MB of padded input and 13 MB of staged output for 16 images): the padded input holds
  // `wr` rows per channel (what fits in half the L2 cache, but at least one output row's rows
  // and a stride more), slid back over itself when the next output row reads past it; the staging
  // planes hold the rows not yet written out. Written to cold memory instead, every row cost
  // its cache misses (README, "Deploy speed": scripts/ab_fused.py against the whole planes).
  // With `whole` (a task of groups [g0, g1) only, every row), the filters go to the block's
  // whole staged output there, written out later by all threads together.
  auto band = [&](int64_t b, int64_t oy0, int64_t oy1, std::vector<const float*>& chan,
                  int64_t g0, int64_t g1, float* whole, const float* pk) {
    const int64_t py0 = oy0 * g.sh, rows = (oy1 - oy0 - 1) * g.sh + (g.kh - 1) * g.dh + 1;
    const int64_t span = (g.kh - 1) * g.dh + 1, rowf = g.Wp * LANES;  // rows one output row reads
    const int64_t wr = std::min(rows, std::max(span + g.sh, window_rows(C_in * rowf)));
    const int64_t plane = wr * rowf;
    const int64_t sst =
        whole ? HWo * LANES : std::min<int64_t>(oy1 - oy0, (64 + g.Wo - 1) / g.Wo) * g.Wo * LANES;
    float* buf = scratch(0, C_in * plane + slack);
    std::memset(buf + C_in * plane, 0, sizeof(float) * slack);
    float* stage = whole ? whole : scratch(1, C_out * sst);
    for (int64_t i = 0; i < groups * n_keep; ++i) chan[i] = buf + gp[i] * plane;
    // band rows (padded rows from py0): the window's first, one past the last padded; output
    // pixels of the band written out
    int64_t base = 0, filled = 0, written = 0;
    float* out[16];
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      const int64_t orow = oy - oy0, first = orow * g.sh, need = first + span;
      if (need > base + wr) {  // slide: the rows from this output row's first to the top
        for (int64_t c = 0; c < C_in && filled > first; ++c)
          std::memmove(buf + c * plane, buf + c * plane + (first - base) * rowf,
                       sizeof(float) * (filled - first) * rowf);
        base = first;  // a multiple of the stride: tiles address rows from it
        filled = std::max(filled, first);
      }
      while (filled < need) {  // zeros above and below the input, else its rows
        const int64_t iy = py0 + filled - g.ph;
        if (iy < 0 || iy >= g.H) {
          for (int64_t c = 0; c < C_in; ++c)
            std::memset(buf + c * plane + (filled - base) * rowf, 0, sizeof(float) * rowf);
          ++filled;
        } else {
          const int64_t iy1 = std::min(g.H, py0 + need - g.ph);
          pad(buf, plane, py0 + base, b, iy, iy1);
          filled += iy1 - iy;
        }
      }
      for (int64_t grp = g0; grp < g1; ++grp)
        for (int64_t q = grp * d; q < (grp + 1) * d; q += s.D) {
          for (int f = 0; f < s.D; ++f) out[f] = stage + pos[q + f] * sst;
          const float* bq = bp ? bp + q : nullptr;
          for (int64_t ox0 = 0; ox0 < g.Wo; ox0 += s.P)
            run(chan.data() + grp * n_keep, pk + q * per_filter, bq, out, n_keep, g,
                orow - base / g.sh, ox0, orow - written / g.Wo);
        }
      const int64_t done = (orow + 1) * g.Wo;
      if (!whole && (done - written >= 64 || oy + 1 == oy1))
        unstage(stage, sst, oy0 * g.Wo + written, b, 0, done - written), written = done;
    }
  };
  // Blocks split over the threads; when there are fewer blocks than threads (or an uneven few),
  // each block's rows too, in bands (bands recompute nothing: they only re-pad the input rows
  // they share). Rows that do not split evenly into the bands (ResNet-50's 7-row last stage at
  // batch 16 on 2 threads: bands of 4 and 3 rows, one thread waiting) split the block's groups
  // instead, when there are as many groups as bands and the block's whole output fits a small
  // shared buffer: each task runs every row of its share of the groups (padding the block's
  // input for itself, cheap beside the convolution there) into that buffer, and then all
  // threads write it out together, by pixels.
  const int64_t threads = at::get_num_threads();
  const int64_t nband = nblk % threads == 0 || nblk >= 4 * threads
                            ? 1
                            : std::min(g.Ho, (threads + nblk - 1) / nblk);
  const int split = lane_split();
  const int64_t whole_floats = nblk * C_out * HWo * LANES;
  const bool by_groups = nband > 1 && groups >= nband && whole_floats <= (int64_t(4) << 20) &&
                         (split == 2 || (split == 0 && g.Ho % nband != 0));
  float* whole = by_groups ? scratch(3, whole_floats) : nullptr;
  const int64_t per_band = (g.Ho + nband - 1) / nband;
  at::parallel_for(0, nblk * nband, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> chan(groups * n_keep);
    const float* pk = own ? pack_weights(weight, s.D, true) : pk_shared;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nband, k = t % nband;
      if (by_groups)
        band(b, 0, g.Ho, chan, k * groups / nband, (k + 1) * groups / nband,
             whole + b * C_out * HWo * LANES, pk);
      else if (k * per_band < g.Ho)
        band(b, k * per_band, std::min(g.Ho, (k + 1) * per_band), chan, 0, groups, nullptr, pk);
    }
  });
  if (by_groups)  // every block's pixels, split over the threads
    at::parallel_for(0, nblk * HWo, LANES, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end;) {
        const int64_t b = t / HWo, p0 = t % HWo, p1 = std::min(HWo, p0 + (end - t));
        unstage(whole + b * C_out * HWo * LANES, HWo * LANES, 0, b, p0, p1);
        t += p1 - p0;
      }
    });
  return y;
}

// The checks and conversions both ops make of their index tables, bias and residual.
struct LayerArgs {
  at::Tensor gather;         // int64, each in [0, C_in)
  std::vector<int64_t> pos;  // grouped filter q -> final channel (output_index's inverse)
  at::Tensor bias;           // float32, C_out values, or undefined
};

LayerArgs layer_args(const at::Tensor& gather_, const at::Tensor& output_index_,
                     const std::optional<at::Tensor>& bias_, int64_t C_in, int64_t C_out,
                     int64_t kept) {
  LayerArgs a;
  a.gather = gather_.to(at::kLong).contiguous();
  const at::Tensor outidx = output_index_.to(at::kLong).contiguous();
  TORCH_CHECK(a.gather.numel() == kept, "gkp_fused: gather_index has the wrong length");
  TORCH_CHECK(outidx.numel() == C_out, "gkp_fused: output_index has the wrong length");
  const int64_t* gp = a.gather.data_ptr<int64_t>();
  for (int64_t i = 0; i < kept; ++i)
    TORCH_CHECK(gp[i] >= 0 && gp[i] < C_in, "gkp_fused: gather_index out of range");
  a.pos.assign(C_out, -1);
  const int64_t* oi = outidx.data_ptr<int64_t>();
  for (int64_t o = 0; o < C_out; ++o) {
    TORCH_CHECK(oi[o] >= 0 && oi[o] < C_out && a.pos[oi[o]] < 0,
                "gkp_fused: output_index must be a permutation");
    a.pos[oi[o]] = o;
  }
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->numel() == C_out, "gkp_fused: bias has the wrong length");
    a.bias = bias_->to(at::kFloat).contiguous();
  }
  return a;
}

// The residual, checked against y and in y's layout (undefined: none).
at::Tensor residual_like(const std::optional<at::Tensor>& residual, const at::Tensor& y,
                         at::MemoryFormat layout) {
  if (!residual.has_value() || !residual->defined()) return {};
  TORCH_CHECK(residual->sizes() == y.sizes() && residual->scalar_type() == at::kFloat,
              "gkp_fused: residual must be float32 of the output's shape ", y.sizes(), ", got ",
              residual->scalar_type(), " ", residual->sizes());
  return residual->contiguous(layout);
}

at::Tensor grouped_kernel_conv_cpu(
    const at::Tensor& x_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
    const at::Tensor& gather_, const at::Tensor& output_index_, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const std::optional<at::Tensor>& residual_, bool relu) {
  TORCH_CHECK(x_.dim() == 4 && weight_.dim() == 4, "gkp_fused: x and weight must be 4-D");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && weight_.scalar_type() == at::kFloat,
              "gkp_fused: float32 only");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "gkp_fused: stride, padding and dilation take two values");
  // a channels-last input is read as it is and gives a channels-last output (tiles fill NCHW
  // planes of a per-image staging buffer, transposed into the output while still in cache)
  const bool cl = x_.dim() == 4 && x_.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  !x_.is_contiguous();
  const at::Tensor x = cl ? x_ : x_.contiguous(), weight = weight_;  // packed through strides
  const int64_t N = x.size(0), C_in = x.size(1), C_out = weight.size(0), n_keep = weight.size(1);
  TORCH_CHECK(groups >= 1 && C_out % groups == 0, "gkp_fused: groups must divide the filters");
  const LayerArgs args = layer_args(gather_, output_index_, bias_, C_in, C_out, groups * n_keep);
  const int64_t* gp = args.gather.data_ptr<int64_t>();
  const std::vector<int64_t>& pos = args.pos;  // grouped filter q -> final channel o
  const at::Tensor& bias = args.bias;
  Geo g{};
  g.H = x.size(2); g.W = x.size(3); g.kh = weight.size(2); g.kw = weight.size(3);
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1];
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0,
              "gkp_fused: bad stride, padding or dilation");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, "gkp_fused: the output would be empty");
  TORCH_CHECK(g.kw <= 32, "gkp_fused: kernels wider than 32 columns are not supported");
  g.Wq = (g.W + 2 * g.pw + g.sw - 1) / g.sw;
  g.row = g.sw * g.Wq;
  for (int64_t kx = 0; kx < g.kw; ++kx) {
    const int64_t col = kx * g.dw;
    g.tap[kx] = (col % g.sw) * g.Wq + col / g.sw;
  }

  const int64_t d = C_out / groups;
  const at::MemoryFormat layout =
      cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty({N, C_out, g.Ho, g.Wo}, x.options().memory_format(layout));
  if (y.numel() == 0) return y;
  // read at y's offsets: y's shape, in y's layout
  const at::Tensor residual = residual_like(residual_, y, layout);
  const Epi e{residual.defined() ? residual.data_ptr<float>() : nullptr, relu};

  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (use_lanes(N)) {
    LGeo lg{g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.Ho, g.Wo, g.W + 2 * g.pw};
    return lanes_path(x, cl, weight, bp, gp, pos, groups, lg, y, e);
  }

  const Shape& s = choose(d, n_keep, g);
  const TileFn run = s.fn[tap_variant(g)];
  // buffer rows: the padded input, or more when the last band of R rows reads past it
  const int64_t bands = (g.Ho + s.R - 1) / s.R, nvec = (g.Wo + 7) / 8;
  g.rows = std::max(g.H + 2 * g.ph, (bands * s.R - 1) * g.sh + (g.kh - 1) * g.dh + 1);
  g.plane = g.rows * g.row;
  const int64_t cols = ((nvec + s.T - 1) / s.T) * s.T * 8;  // columns the tiles compute
  const int64_t slack = g.row + g.tap[g.kw - 1] + cols + 8;  // reads past the last plane

  // weights packed per block of D grouped filters: [block][kept channel][tap][D]
  const int64_t per_filter = n_keep * g.kh * g.kw;
  // fewer images than threads and little work: one thread, no parallel region (serial_macs;
  // read on every rows-path call, so a bad override is refused whatever the batch)
  const int64_t bound = serial_macs();
  const bool serial = N < at::get_num_threads() && double(y.numel()) * per_filter < double(bound);
  const float* pk = pack_weights(weight, s.D, serial);

  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  // Groups [g0, g1) and output rows [oy0, oy1) of image n (img: its padded planes; chan: room
  // for groups * n_keep channel pointers). Group by group (each block of D filters swept over the
  // rows), or, when one group's kept planes overflow the L2 cache, band by band of R rows with
  // every group inside, so that a band's input rows stay in cache for all groups (group-major
  // wins otherwise: it streams each block's weights once, not once per band).
  bool by_band = n_keep * g.plane * int64_t(sizeof(float)) > l2_bytes() * 3 / 4;
  if (const char* order = std::getenv("GKP_FUSED_ORDER")) {  // "band" or "group": tuning, tests
    TORCH_CHECK(!std::strcmp(order, "band") || !std::strcmp(order, "group"),
                "gkp_fused: GKP_FUSED_ORDER must be \"band\" or \"group\", got \"", order, "\"");
    by_band = !std::strcmp(order, "band");
  }
  const int64_t HWo = g.Ho * g.Wo;
  // ybase: image n's output planes (NCHW: in y; channels-last: a staging buffer)
  auto compute = [&](const float* img, float* ybase, int64_t g0, int64_t g1, int64_t oy0,
                     int64_t oy1, const float** chan) {
    for (int64_t i = g0 * n_keep; i < g1 * n_keep; ++i) chan[i] = img + gp[i] * g.plane;
    auto block = [&](int64_t q, int64_t oy) {  // D filters from grouped filter q, R rows from oy
      float* out[8];
      for (int f = 0; f < s.D; ++f) out[f] = ybase + pos[q + f] * HWo;
      const float* b = bp ? bp + q : nullptr;
      for (int64_t ox0 = 0; ox0 < g.Wo; ox0 += 8 * s.T)
        run(chan + (q / d) * n_keep, pk + q * per_filter, b, out, n_keep, g, oy, ox0);
    };
    if (by_band) {
      for (int64_t oy = oy0; oy < oy1; oy += s.R)
        for (int64_t q = g0 * d; q < g1 * d; q += s.D) block(q, oy);
    } else {
      for (int64_t q = g0 * d; q < g1 * d; q += s.D)
        for (int64_t oy = oy0; oy < oy1; oy += s.R) block(q, oy);
    }
  };
  // channels [c0, c1) of image n into its padded planes at dst
  auto pad = [&](float* dst, int64_t n, int64_t c0, int64_t c1) {
    const float* img = xp + n * C_in * g.H * g.W;
    if (cl) return pad_channels_last(dst, img, g, C_in, c0, c1);
    for (int64_t c = c0; c < c1; ++c) pad_plane(dst + c * g.plane, img + c * g.H * g.W, g);
  };
  const int64_t threads = serial ? 1 : at::get_num_threads();
  if (N % threads == 0 || N >= 4 * threads) {
    // images split evenly enough over the threads: each pads one image at a time into its own
    // buffer and computes it while that buffer is still in cache
    // (serial: one thread takes every image, the grain above the range opens no region)
    const int64_t grain = serial ? std::numeric_limits<int64_t>::max() : 1;
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      float* buf = scratch(0, C_in * g.plane + slack);
      std::memset(buf + C_in * g.plane, 0, sizeof(float) * slack);
      float* staging = cl ? scratch(1, C_out * HWo) : nullptr;
      std::vector<const float*> chan(groups * n_keep);
      for (int64_t n = begin; n < end; ++n) {
        pad(buf, n, 0, C_in);
        float* yn = yp + n * C_out * HWo;
        compute(buf, cl ? staging : yn, 0, groups, 0, g.Ho, chan.data());
        if (cl) to_channels_last(yn, staging, C_out, HWo, 0, HWo);
        if (e.any())  // while the image's output is in cache (both layouts: C_out * HWo floats)
          epilogue(yn, e.res ? e.res + n * C_out * HWo : nullptr, C_out * HWo, e.relu);
      }
    });
    return y;
  }
  // fewer images than threads: every input plane padded once, in parallel, into a shared
  // buffer, then (image, band of R rows) or (image, group) tasks are spread over the threads
  float* pp = scratch(0, N * C_in * g.plane + slack);
  std::memset(pp + N * C_in * g.plane, 0, sizeof(float) * slack);
  // tasks of one plane in NCHW; in channels-last, of 16 channels (a cache line per pixel), or
  // fewer when that leaves a thread idle (with 16-channel tasks, a 16-channel layer at batch 1
  // was padded by one thread, about half of each call on ResNet-56's first stage at 2 threads)
  const int64_t per_task = cl ? std::clamp<int64_t>((C_in + threads - 1) / threads, 1, 16) : 1;
  const int64_t chunks = (C_in + per_task - 1) / per_task;
  at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / chunks, c0 = t % chunks * per_task;
      pad(pp + n * C_in * g.plane, n, c0, std::min(C_in, c0 + per_task));
    }
  });
  float* ys = cl ? scratch(1, N * C_out * HWo) : yp;
  const int64_t per_image = by_band ? bands : groups;
  // the epilogue goes with the last pass over each stretch of output, inside the same parallel
  // region (not a region of its own: at batch 1 every region is a wake-up and a barrier of the
  // threads, which costs the most in small layers)
  at::parallel_for(0, N * per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<const float*> chan(groups * n_keep);
    for (int64_t task = begin; task < end;) {  // this call's consecutive tasks of one image
      const int64_t n = task / per_image, first = task % per_image;
      const int64_t last = std::min(end, (n + 1) * per_image) - n * per_image;  // exclusive
      const float* img = pp + n * C_in * g.plane;
      float* yn = ys + n * C_out * HWo;
      const float* rn = e.res ? e.res + n * C_out * HWo : nullptr;
      if (by_band) {
        const int64_t oy0 = first * s.R, oy1 = std::min(g.Ho, last * s.R);
        compute(img, yn, 0, groups, oy0, oy1, chan.data());
        if (!cl && e.any())  // rows [oy0, oy1) of every channel
          for (int64_t c = 0; c < C_out; ++c)
            epilogue(yn + c * HWo + oy0 * g.Wo, rn ? rn + c * HWo + oy0 * g.Wo : nullptr,
                     (oy1 - oy0) * g.Wo, e.relu);
      } else {
        compute(img, yn, first, last, 0, g.Ho, chan.data());
        if (!cl && e.any())  // the planes of these groups' filters
          for (int64_t q = first * d; q < last * d; ++q)
            epilogue(yn + pos[q] * HWo, rn ? rn + pos[q] * HWo : nullptr, HWo, e.relu);
      }
      task = n * per_image + last;
    }
  });
  if (cl)
    at::parallel_for(0, N * g.Ho, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {  // one output row of one image per task
        const int64_t n = t / g.Ho, p0 = t % g.Ho * g.Wo;
        float* yn = yp + n * C_out * HWo;
        to_channels_last(yn, ys + n * C_out * HWo, C_out, HWo, p0, p0 + g.Wo);
        if (e.any())  // the row's pixels, all channels: contiguous in channels-last
          epilogue(yn + p0 * C_out, e.res ? e.res + n * C_out * HWo + p0 * C_out : nullptr,
                   g.Wo * C_out, e.relu);
      }
    });
  return y;
}

// ---- The filters path (the op grouped_conv_filters; channels-last input and output) ----------
// For groups of many filters (ResNet-50's C = 256 and 512 stages at G = 8: 32 and 64 filters a
// group), where the lanes path's transposes of 16 images in and out cost more than they save: a
// group's filters fill the vector lanes, as oneDNN's direct conv does for a dense layer, and the
// input is read where it lies. A tile is P pixels of one output row by DV vectors of VW filters
// of one group, accumulated in registers over every (tap, kept channel): each weight vector feeds
// P pixels, each input value (one float of a channels-last pixel, found through the index table,
// broadcast) feeds DV vectors; for kernels 3 wide with unit stride along x, row tiles loop over
// the input pixels instead, each broadcast feeding the three output pixels that read it. Taps
// outside the input are skipped (no padded copy), and results go to their final channels (one
// vector store where a vector's filters are consecutive channels there, else one store per
// filter) through the epilogue. Weights come packed by the caller as [group][ky][kx][kept
// channel][filter] (gkp.fused.pack_filters, kept with the layer), so a call packs nothing. The
// layer table of the README ("Deploy speed", scripts/bench_fused.py) times it beside the lanes
// path: faster with 32 and 64 filters a group, slower with 8, about even with 16, so it is an
// autotune candidate (backend "fused_filters") rather than a replacement.

#if defined(__AVX512F__)
constexpr int FP = 7;  // pixels per tile: 7 x 4 vectors = 28 of the 32 registers hold sums
#else
constexpr int FP = 6;  // 6 x 2 vectors = 12 of the 16 registers
#endif

template <int VW>
struct FVec {
  typedef float t __attribute__((vector_size(4 * VW)));
};

// v in every lane, as one broadcast load (`vf{} + v` costs an add and a shuffle: -0.0 + 0.0)
template <int VW, std::size_t... I>
inline typename FVec<VW>::t fsplat(float v, std::index_sequence<I...>) {
  return typename FVec<VW>::t{(static_cast<void>(I), v)...};
}
template <int VW>
inline typename FVec<VW>::t fsplat(float v) {
  return fsplat<VW>(v, std::make_index_sequence<VW>());
}

template <int VW>
inline typename FVec<VW>::t fload(const float* p) {
  typename FVec<VW>::t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// A tile's sums start at its filters' biases (null: zero).
template <int VW, int P, int DV>
inline void filters_start(typename FVec<VW>::t (&acc)[P][DV], const float* bias) {
  for (int j = 0; j < DV; ++j) {
    const typename FVec<VW>::t b0 = bias ? fload<VW>(bias + j * VW) : typename FVec<VW>::t{};
    for (int p = 0; p < P; ++p) acc[p][j] = b0;
  }
}

template <int VW, int P, int DV>
inline void filters_store(typename FVec<VW>::t (&acc)[P][DV], const int64_t* pos, bool contig,
                          float* const* out, const float* const* res, bool relu);

// One tile. px[t * FP + p]: pixel p's input pixel (channel 0) under tap t, or nullptr where the
// tap falls outside the input (or p is past the row's end); w: the group's packed weights at the
// tile's first filter (row of d floats per (tap, kept channel)); bias, pos: the tile's filters'
// biases (grouped order; null: none) and final channels; out[p], res[p]: pixel p's output and
// residual pixels (null: past the row's end / no residual).
template <int VW, int DV>
void filters_tile(const float* const* px, int64_t T, const int64_t* gi, int64_t nk,
                  const float* w, int64_t d, const float* bias, const int64_t* pos, bool contig,
                  float* const* out, const float* const* res, bool relu) {
  typedef typename FVec<VW>::t vf;
  vf acc[FP][DV];
  filters_start<VW, FP, DV>(acc, bias);
  for (int64_t t = 0; t < T; ++t) {
    const float* pp[FP];
    bool any = false, all = true;
    for (int p = 0; p < FP; ++p) {
      pp[p] = px[t * FP + p];
      any |= pp[p] != nullptr;
      all &= pp[p] != nullptr;
    }
    if (!any) continue;
    const float* wt = w + t * nk * d;
    if (all) {
      for (int64_t c = 0; c < nk; ++c) {
        const int64_t ch = gi[c];
        vf wv[DV];
        for (int j = 0; j < DV; ++j) wv[j] = fload<VW>(wt + c * d + j * VW);
        for (int p = 0; p < FP; ++p) {
          const vf b = fsplat<VW>(pp[p][ch]);
          for (int j = 0; j < DV; ++j) acc[p][j] += b * wv[j];
        }
      }
    } else {  // a row's first or last pixels (or a short tile): skip the missing taps
      for (int64_t c = 0; c < nk; ++c) {
        const int64_t ch = gi[c];
        vf wv[DV];
        for (int j = 0; j < DV; ++j) wv[j] = fload<VW>(wt + c * d + j * VW);
        for (int p = 0; p < FP; ++p) {
          if (!pp[p]) continue;
          const vf b = fsplat<VW>(pp[p][ch]);
          for (int j = 0; j < DV; ++j) acc[p][j] += b * wv[j];
        }
      }
    }
  }
  filters_store<VW, FP, DV>(acc, pos, contig, out, res, relu);
}

using FTileFn = void (*)(const float* const*, int64_t, const int64_t*, int64_t, const float*,
                         int64_t, const float*, const int64_t*, bool, float* const*,
                         const float* const*, bool);

// A tile's results: P pixels' DV vectors through the epilogue to their final channels (out[p],
// res[p]: pixel p's output and residual pixels; null: past the row's end / no residual).
template <int VW, int P, int DV>
inline void filters_store(typename FVec<VW>::t (&acc)[P][DV], const int64_t* pos, bool contig,
                          float* const* out, const float* const* res, bool relu) {
  typedef typename FVec<VW>::t vf;
  for (int j = 0; j < DV; ++j) {
    const int64_t* pj = pos + j * VW;
    int64_t o[VW];  // the vector's final channels, read once for all P pixels
    for (int k = 0; k < VW; ++k) o[k] = pj[k];
    for (int p = 0; p < P; ++p) {
      if (!out[p]) continue;
      vf v = acc[p][j];
      if (contig) {
        if (res[p]) v += fload<VW>(res[p] + o[0]);
        if (relu) v = v > vf{} ? v : vf{};
        std::memcpy(out[p] + o[0], &v, sizeof(v));
        continue;
      }
      if (res[p]) {
        vf r;
        for (int k = 0; k < VW; ++k) r[k] = res[p][o[k]];
        v += r;
      }
      if (relu) v = v > vf{} ? v : vf{};
      for (int k = 0; k < VW; ++k) out[p][o[k]] = v[k];
    }
  }
}

// The row tile, for kernels 3 wide with dilation 1 and stride SX (1 or 2) along x: P output
// pixels of one row, SX apart in the input, by DV vectors of VW filters, looping over the
// SX (P - 1) + 3 input pixels they read rather than over output pixels, so each broadcast input
// value feeds every output pixel that reads it (three at stride 1, one or two at stride 2),
// with the three taps' weight vectors held in registers: a third (stride 1) or two thirds
// (stride 2) of the broadcasts of filters_tile per multiply-add, which is what limits that tile
// for groups of 8 or 16 filters. rows[ky]: input row oy * sh + ky * dh - ph (pixel 0, channel
// 0), null outside the input; ix0: the input column of the tile's first pixel's first tap.
// Columns outside [0, W) count as zeros: SL >= 0 says which at compile time (the first SL and
// the last SR of the tile's input columns: a row's first and last tiles), SL < 0 checks each.
template <int VW, int P, int DV, int SX, int SL, int SR>
void filters_row_tile(const float* const* rows, int64_t kh, int64_t C_in, int64_t ix0, int64_t W,
                      const int64_t* gi, int64_t nk, const float* w, int64_t d,
                      const float* bias, const int64_t* pos, bool contig, float* const* out,
                      const float* const* res, bool relu) {
  typedef typename FVec<VW>::t vf;
  constexpr int NI = SX * (P - 1) + 3;  // input columns read
  vf acc[P][DV];
  filters_start<VW, P, DV>(acc, bias);
  for (int64_t ky = 0; ky < kh; ++ky) {
    if (!rows[ky]) continue;
    const float* wk = w + ky * 3 * nk * d;
    const float* row = rows[ky] + ix0 * C_in;
    for (int64_t c = 0; c < nk; ++c) {
      const float* xc = row + gi[c];
      vf wv[3][DV];
      for (int kx = 0; kx < 3; ++kx)
        for (int j = 0; j < DV; ++j) wv[kx][j] = fload<VW>(wk + (kx * nk + c) * d + j * VW);
#pragma GCC unroll 32
      for (int i = 0; i < NI; ++i) {
        if (SL >= 0 ? i < SL || i >= NI - SR : ix0 + i < 0 || ix0 + i >= W) continue;
        const vf b = fsplat<VW>(xc[i * C_in]);
#pragma GCC unroll 3
        for (int kx = 0; kx < 3; ++kx) {
          const int p = (i - kx) / SX;
          if (i < kx || (i - kx) % SX || p >= P) continue;
          for (int j = 0; j < DV; ++j) acc[p][j] += b * wv[kx][j];
        }
      }
    }
  }
  filters_store<VW, P, DV>(acc, pos, contig, out, res, relu);
}

using FRowFn = void (*)(const float* const*, int64_t, int64_t, int64_t, int64_t, const int64_t*,
                        int64_t, const float*, int64_t, const float*, const int64_t*, bool,
                        float* const*, const float* const*, bool);

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__GNUC__) && !defined(__clang__)
#define GKP_ASM_TILES 1
// The row tile of VW filters (8 or 16) x 14 pixels at stride SX along x (1 or 2) in assembly,
// for inputs of CB / 4 channels (64 to 512), a constant, so each input column the tile reads is
// a constant offset from the kept channel's pointer. Same arguments, results and order of
// additions as filters_row_tile<VW, 14, 1, SX, SL, SR> (the tests compare the two bit for bit).
// Each multiply-add takes its input value as a broadcast memory operand (vfmadd231ps
// m32{1toVW}); with 8 filters at stride 1, the columns in the bit mask RM are broadcast into a
// register once for their three multiply-adds instead. Why: GCC compiles filters_row_tile with
// every input value broadcast into a register, and on the AMD EPYC (Zen 4) a 256-bit broadcast
// takes a slot of the FMA pipes (12 FMAs with 6 broadcasts ran at 83% of the FMA rate, with 4
// at 98%, 12 FMAs with broadcast operands at 100%; 512-bit FMAs, at half the rate, lose
// nothing to 6 broadcasts, yet the stride-2 tile, 29 broadcasts to 42 FMAs, runs 6% faster in
// assembly, and the stride-1 tile of 16 filters 1-4%). With 8 filters (2 FMAs a cycle)
// operands from memory alone need more loads than the core issues (10% slower than compiled),
// so 6 of the 16 columns stay in registers (3-4% faster).
// Multiply-adds run kernel column by kernel column: one sum's updates are 7 instructions apart.
// One multiply-add of sum q of the statement's 7 (sum base + q of the tile) with kernel column
// kx's weights and input column i = SX * (base + q) + kx (an expression the assembler
// evaluates), skipped where column i is outside the input: the input value from memory, or at
// stride 1, for the register columns (2-13, in the mask RM), from ymm r = ymm(17 + i).
#define GKP_COL(base, q, kx) "(%c[sx]*(" #base "+" #q ")+" #kx ")"
#define GKP_IN(base, q, kx) ".if " GKP_COL(base, q, kx) " >= %c[sl] && " GKP_COL(base, q, kx) \
  " < %c[ni] - %c[sr]\n\t"
#define GKP_MEM(base, q, kx)                                                               \
  "vfmadd231ps 0+" GKP_COL(base, q, kx) "*%c[cb](%[x])%{1to%c[vw]%}, %[w" #kx "], %[a" #q \
  "]\n\t"
#define GKP_FMA(base, q, kx) GKP_IN(base, q, kx) GKP_MEM(base, q, kx) ".endif\n\t"
#define GKP_FMA_R(base, q, kx, r)                                                      \
  GKP_IN(base, q, kx) ".if %c[sx] == 1 && (%c[rm] >> " GKP_COL(base, q, kx) ") & 1\n\t" \
  "vfmadd231ps %%ymm" #r ", %[w" #kx "], %[a" #q "]\n\t"                                \
  ".else\n\t" GKP_MEM(base, q, kx) ".endif\n\t.endif\n\t"
// Register column i (stride 1) broadcast into ymm r = ymm(17 + i).
#define GKP_BCAST(i, r)                                                               \
  ".if %c[sx] == 1 && (%c[rm] >> " #i ") & 1 && " #i " >= %c[sl] && " #i              \
  " < %c[ni] - %c[sr]\n\t"                                                            \
  "vbroadcastss " #i "*%c[cb](%[x]), %%ymm" #r "\n\t.endif\n\t"
// The operands: 7 sums, the three kernel columns' weights, the kept channel's input pointer
// and the tile's constants; the registers broadcast columns go to (stride 1).
#define GKP_SUMS(a, b, c, d, e, f, g)                                                   \
  [a0] "+v"(a), [a1] "+v"(b), [a2] "+v"(c), [a3] "+v"(d), [a4] "+v"(e), [a5] "+v"(f), \
      [a6] "+v"(g)
#define GKP_INPUTS                                                                      \
  [w0] "v"(w0), [w1] "v"(w1), [w2] "v"(w2), [x] "r"(x), [cb] "n"(CB), [sl] "n"(SL),    \
      [sr] "n"(SR), [rm] "n"(RM), [ni] "n"(NI), [vw] "n"(VW), [sx] "n"(SX),             \
      "m"(*(const float(*)[NI * CB / 4])x)
#define GKP_COLUMN_REGS                                                                 \
  "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", \
      "xmm29", "xmm30"
template <int VW, int SX, int CB, int SL, int SR, int RM>
void filters_row_tile_asm(const float* const* rows, int64_t kh, int64_t C_in, int64_t ix0,
                          int64_t W, const int64_t* gi, int64_t nk, const float* w, int64_t d,
                          const float* bias, const int64_t* pos, bool contig, float* const* out,
                          const float* const* res, bool relu) {
  typedef typename FVec<VW>::t vf;
  constexpr int NI = SX * 13 + 3;  // input columns read
  static_assert(RM == 0 || (SX == 1 && VW == 8), "register columns: 8 filters, stride 1 only");
  const vf b0 = bias ? fload<VW>(bias) : vf{};
  vf a0 = b0, a1 = b0, a2 = b0, a3 = b0, a4 = b0, a5 = b0, a6 = b0, a7 = b0, a8 = b0, a9 = b0,
     a10 = b0, a11 = b0, a12 = b0, a13 = b0;
  for (int64_t ky = 0; ky < kh; ++ky) {
    if (!rows[ky]) continue;
    const float* wk = w + ky * 3 * nk * d;
    const float* row = rows[ky] + ix0 * C_in;
    for (int64_t c = 0; c < nk; ++c) {
      const float* x = row + gi[c];
      const vf w0 = fload<VW>(wk + c * d), w1 = fload<VW>(wk + (nk + c) * d),
               w2 = fload<VW>(wk + (2 * nk + c) * d);
      // two blocks of 7 sums (an asm statement takes at most 30 operands): for base = 0 and 7,
      // the block's register columns (stride 1) broadcast, then for kx = 0..2 and q = 0..6 the
      // multiply-add of sum base + q with column SX * (base + q) + kx
      asm(
          GKP_BCAST(2, 19)
          GKP_BCAST(3, 20)
          GKP_BCAST(4, 21)
          GKP_BCAST(5, 22)
          GKP_BCAST(6, 23)
          GKP_BCAST(7, 24)
          GKP_BCAST(8, 25)
          GKP_FMA(0, 0, 0)
          GKP_FMA(0, 1, 0)
          GKP_FMA_R(0, 2, 0, 19)
          GKP_FMA_R(0, 3, 0, 20)
          GKP_FMA_R(0, 4, 0, 21)
          GKP_FMA_R(0, 5, 0, 22)
          GKP_FMA_R(0, 6, 0, 23)
          GKP_FMA(0, 0, 1)
          GKP_FMA_R(0, 1, 1, 19)
          GKP_FMA_R(0, 2, 1, 20)
          GKP_FMA_R(0, 3, 1, 21)
          GKP_FMA_R(0, 4, 1, 22)
          GKP_FMA_R(0, 5, 1, 23)
          GKP_FMA_R(0, 6, 1, 24)
          GKP_FMA_R(0, 0, 2, 19)
          GKP_FMA_R(0, 1, 2, 20)
          GKP_FMA_R(0, 2, 2, 21)
          GKP_FMA_R(0, 3, 2, 22)
          GKP_FMA_R(0, 4, 2, 23)
          GKP_FMA_R(0, 5, 2, 24)
          GKP_FMA_R(0, 6, 2, 25)
          : GKP_SUMS(a0, a1, a2, a3, a4, a5, a6)
          : GKP_INPUTS
          : GKP_COLUMN_REGS);
      asm(
          GKP_BCAST(7, 24)
          GKP_BCAST(8, 25)
          GKP_BCAST(9, 26)
          GKP_BCAST(10, 27)
          GKP_BCAST(11, 28)
          GKP_BCAST(12, 29)
          GKP_BCAST(13, 30)
          GKP_FMA_R(7, 0, 0, 24)
          GKP_FMA_R(7, 1, 0, 25)
          GKP_FMA_R(7, 2, 0, 26)
          GKP_FMA_R(7, 3, 0, 27)
          GKP_FMA_R(7, 4, 0, 28)
          GKP_FMA_R(7, 5, 0, 29)
          GKP_FMA_R(7, 6, 0, 30)
          GKP_FMA_R(7, 0, 1, 25)
          GKP_FMA_R(7, 1, 1, 26)
          GKP_FMA_R(7, 2, 1, 27)
          GKP_FMA_R(7, 3, 1, 28)
          GKP_FMA_R(7, 4, 1, 29)
          GKP_FMA_R(7, 5, 1, 30)
          GKP_FMA(7, 6, 1)
          GKP_FMA_R(7, 0, 2, 26)
          GKP_FMA_R(7, 1, 2, 27)
          GKP_FMA_R(7, 2, 2, 28)
          GKP_FMA_R(7, 3, 2, 29)
          GKP_FMA_R(7, 4, 2, 30)
          GKP_FMA(7, 5, 2)
          GKP_FMA(7, 6, 2)
          : GKP_SUMS(a7, a8, a9, a10, a11, a12, a13)
          : GKP_INPUTS
          : GKP_COLUMN_REGS);
    }
  }
  vf acc[14][1] = {{a0}, {a1}, {a2}, {a3}, {a4}, {a5}, {a6}, {a7}, {a8}, {a9}, {a10}, {a11},
                   {a12}, {a13}};
  filters_store<VW, 14, 1>(acc, pos, contig, out, res, relu);
}

template <int VW, int SX, int CB, int RM>
void row_tiles_asm(FRowFn (&row)[5]) {
  row[1] = &filters_row_tile_asm<VW, SX, CB, 0, 0, RM>;
  row[2] = &filters_row_tile_asm<VW, SX, CB, 1, 0, RM>;
  row[3] = &filters_row_tile_asm<VW, SX, CB, 0, 1, RM>;
  row[4] = &filters_row_tile_asm<VW, SX, CB, 1, 1, RM>;
}
#undef GKP_COL
#undef GKP_IN
#undef GKP_MEM
#undef GKP_FMA
#undef GKP_FMA_R
#undef GKP_BCAST
#undef GKP_SUMS
#undef GKP_INPUTS
#undef GKP_COLUMN_REGS
#endif

// A chunk's row tiles of P pixels at stride sx along x (1 or 2): columns checked one by one,
// then with the first SL and the last SR of the tile's input columns outside the input for
// (SL, SR) = (0, 0), (1, 0), (0, 1), (1, 1).
template <int VW, int P, int DV, int SX>
void row_tiles_at(FRowFn (&row)[5]) {
  row[0] = &filters_row_tile<VW, P, DV, SX, -1, 0>;
  row[1] = &filters_row_tile<VW, P, DV, SX, 0, 0>;
  row[2] = &filters_row_tile<VW, P, DV, SX, 1, 0>;
  row[3] = &filters_row_tile<VW, P, DV, SX, 0, 1>;
  row[4] = &filters_row_tile<VW, P, DV, SX, 1, 1>;
}
template <int VW, int P, int DV>
void row_tiles(FRowFn (&row)[5], int64_t sx) {
  if (sx == 1)
    row_tiles_at<VW, P, DV, 1>(row);
  else
    row_tiles_at<VW, P, DV, 2>(row);
}

// A chunk's row tiles of 14 pixels and VW filters at stride SX in assembly, where they are built
// for the input's channels (64 to 512, powers of two; the tiles that skip no column or the first
// or last; the chunk's other tiles stay compiled).
template <int VW, int SX>
void asm_row_tiles_at(FRowFn (&row)[5], int64_t C_in) {
#if GKP_ASM_TILES
  // 8 filters at stride 1: 6 of the 16 columns held in registers (above)
  constexpr int RM = VW == 8 && SX == 1 ? (1 << 2) | (1 << 4) | (1 << 6) | (1 << 9) | (1 << 11) |
                                              (1 << 13)
                                        : 0;
  switch (C_in) {
    case 64: row_tiles_asm<VW, SX, 256, RM>(row); break;
    case 128: row_tiles_asm<VW, SX, 512, RM>(row); break;
    case 256: row_tiles_asm<VW, SX, 1024, RM>(row); break;
    case 512: row_tiles_asm<VW, SX, 2048, RM>(row); break;
  }
#endif
  static_cast<void>(row), static_cast<void>(C_in);
}
// ... at stride sx; 8 filters at stride 1 only (at stride 2 every column would come from
// memory, which at 2 FMAs a cycle needs more loads than the core issues)
template <int VW>
void asm_row_tiles(FRowFn (&row)[5], int64_t sx, int64_t C_in) {
  if (sx == 1) asm_row_tiles_at<VW, 1>(row, C_in);
  if constexpr (VW == 16)
    if (sx == 2) asm_row_tiles_at<VW, 2>(row, C_in);
}

at::Tensor grouped_conv_filters_cpu(const at::Tensor& x_, const at::Tensor& packed_,
                                    const std::optional<at::Tensor>& bias_,
                                    const at::Tensor& gather_, const at::Tensor& output_index_,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation,
                                    const std::optional<at::Tensor>& residual_, bool relu) {
  TORCH_CHECK(x_.dim() == 4, "gkp_fused: grouped_conv_filters: x must be 4-D, got ", x_.dim());
  TORCH_CHECK(packed_.dim() == 5,
              "gkp_fused: grouped_conv_filters: the weight must be packed as [groups, kh, kw, "
              "n_keep, filters per group] (gkp.fused.pack_filters), got ", packed_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat && packed_.scalar_type() == at::kFloat,
              "gkp_fused: float32 only");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "gkp_fused: stride, padding and dilation take two values");
  const at::Tensor x = x_.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor wpk = packed_.contiguous();
  const int64_t N = x.size(0), C_in = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t groups = wpk.size(0), kh = wpk.size(1), kw = wpk.size(2), nk = wpk.size(3),
                d = wpk.size(4), C_out = groups * d, T = kh * kw;
  TORCH_CHECK(d % 8 == 0, "gkp_fused: grouped_conv_filters needs a multiple of 8 filters per ",
              "group, got ", d, " (use the op grouped_kernel_conv)");
  const LayerArgs args = layer_args(gather_, output_index_, bias_, C_in, C_out, groups * nk);
  const int64_t* gp = args.gather.data_ptr<int64_t>();
  const std::vector<int64_t>& pos = args.pos;
  const at::Tensor& bias = args.bias;
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1],
                dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0,
              "gkp_fused: bad stride, padding or dilation");
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "gkp_fused: the output would be empty");
  at::Tensor y =
      at::empty({N, C_out, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const at::Tensor residual = residual_like(residual_, y, at::MemoryFormat::ChannelsLast);
  // The tiles of a group's filters, widest first; kernels 3 wide with stride 1 or 2 and dilation
  // 1 along x take row tiles (filters_row_tile; GKP_FUSED_ROW_TILES=0 turns them off, for
  // tuning and tests) where a chunk's vectors are at most 2, else filters_tile.
  const bool row_ok =
      kw == 3 && (sw == 1 || sw == 2) && dw == 1 && env_count("GKP_FUSED_ROW_TILES", 0, 1);
  // the assembly row tiles where they apply (filters_row_tile_asm; GKP_FUSED_ASM=0: the
  // compiled ones everywhere, for tests, which compare the two, and tuning)
  const bool use_asm = env_count("GKP_FUSED_ASM", 0, 1) > 0;
  struct Chunk {
    int64_t f;      // first filter in the group
    int width;      // filters
    FTileFn fn;     // the pixel tile (FP pixels)
    FRowFn row[5];  // the row tiles of rp pixels (row_tiles; null: none)
    int rp;
  };
  std::vector<Chunk> chunks;
  for (int64_t f = 0; f < d;) {
    const int64_t left = d - f;
    Chunk c{f, 8, &filters_tile<8, 1>, {}, 0};
#if defined(__AVX512F__)
    if (left >= 64) {
      c = {f, 64, &filters_tile<16, 4>, {}, 0};
    } else if (left >= 32) {
      c = {f, 32, &filters_tile<16, 2>, {}, 7};  // 14 sums + 6 weights
      row_tiles<16, 7, 2>(c.row, sw);
    } else if (left >= 16) {
      c = {f, 16, &filters_tile<16, 1>, {}, 14};  // 14 sums + 3 weights
      row_tiles<16, 14, 1>(c.row, sw);
      if (use_asm) asm_row_tiles<16>(c.row, sw, C_in);
    } else {
      c = {f, 8, &filters_tile<8, 1>, {}, 14};
      row_tiles<8, 14, 1>(c.row, sw);
      if (use_asm) asm_row_tiles<8>(c.row, sw, C_in);
    }
#else
    if (left >= 16) {
      c = {f, 16, &filters_tile<8, 2>, {}, 4};  // 8 sums + 6 weights
      row_tiles<8, 4, 2>(c.row, sw);
    } else {
      c = {f, 8, &filters_tile<8, 1>, {}, 8};
      row_tiles<8, 8, 1>(c.row, sw);
    }
#endif
    if (!row_ok) std::fill(c.row, c.row + 5, nullptr);
    chunks.push_back(c);
    f += c.width;
  }
  // whether each (group, chunk)'s filters go to consecutive final channels (its vectors are then
  // stored whole; GKP's grouping permutes them, so most are stored filter by filter)
  const int64_t nch = chunks.size();
  std::vector<char> whole(groups * nch);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < nch; ++i) {
      const int64_t q = g * d + chunks[i].f;
      bool ok = true;
      for (int k = 1; k < chunks[i].width; ++k) ok &= pos[q + k] == pos[q] + k;
      whole[g * nch + i] = ok;
    }
  const float* xp = x.data_ptr<float>();
  const float* wp = wpk.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const float* rp = residual.defined() ? residual.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Rows of the output (image, output row) in equal chunks whose input rows fit half the L2
  // cache, as many chunks as a multiple of the threads (each thread gets as many rows). A task
  // runs one chunk's rows tile position by tile position, each position for every group in turn:
  // the input pixels a tile reads stay in L1 across the groups, and each output pixel is
  // completed while it is in cache (run group by group, a group of 8 filters writes a quarter of
  // a pixel's cache lines on each of 8 passes over the chunk's outputs: 10-20% slower on
  // ResNet-50's first stages at batch 16, and no faster on its last, whose weights stream well).
  // Where rows are few (rows < 4 x threads: ResNet-50's 7 rows at batch 1), tasks are (row,
  // group), so the threads get even shares. GKP_FUSED_GROUPS_INNER=0/1 forces either (tests,
  // tuning). A call of fewer multiply-adds than serial_macs() (any batch) runs on the calling
  // thread alone.
  const int64_t rows = N * Ho, macs = N * Ho * Wo * C_out * nk * T;
  const int64_t threads = macs < serial_macs() ? 1 : at::get_num_threads();
  const int64_t row_bytes = std::max<int64_t>(1, sh * W * C_in * int64_t(sizeof(float)));
  const int64_t per_chunk = std::max<int64_t>(1, std::min(rows, l2_bytes() / 2 / row_bytes));
  int64_t nchunk = (rows + per_chunk - 1) / per_chunk;
  nchunk = rows < 4 * threads ? rows : (nchunk + threads - 1) / threads * threads;
  constexpr int MAXP = 16;  // pixels of the widest tile
  const bool inner = env_count("GKP_FUSED_GROUPS_INNER", 0, rows >= 4 * threads ? 1 : 0) > 0;
  const int64_t per_task = inner ? groups : 1;  // groups per task
  const int64_t ntask = nchunk * groups / per_task;
  // row tiles prefetch the input and output of the tile position this many on
  // (GKP_FUSED_PREFETCH; 0: none)
  const int64_t ahead = env_count("GKP_FUSED_PREFETCH", 0, 2);
  auto run = [&](int64_t begin, int64_t end) {
    std::vector<const float*> px(T * FP), inrows(kh);
    float* out[MAXP];
    const float* res[MAXP];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ck = task * per_task / groups, g0 = task * per_task % groups;
      for (int64_t r = ck * rows / nchunk; r < (ck + 1) * rows / nchunk; ++r) {
        const int64_t n = r / Ho, oy = r % Ho;
        for (int64_t ky = 0; ky < kh; ++ky) {
          const int64_t iy = oy * sh + ky * dh - ph;
          inrows[ky] = iy >= 0 && iy < H ? xp + (n * H + iy) * W * C_in : nullptr;
        }
        // output and residual pixels [ox0, ox0 + np) (null past the row's end)
        auto pixels = [&](int64_t ox0, int np) {
          for (int p = 0; p < np; ++p) {
            const int64_t ox = ox0 + p, at = ((n * Ho + oy) * Wo + ox) * C_out;
            out[p] = ox < Wo ? yp + at : nullptr;
            res[p] = ox < Wo && rp ? rp + at : nullptr;
          }
        };
        for (int64_t i = 0; i < nch; ++i) {
          const Chunk& c = chunks[i];
          if (c.row[0]) {
            // tiles of rp pixels from the row's start, the last one moved back to end at the
            // row's end (recomputing a few pixels of the one before it: the same values written
            // twice), each with the columns it reads outside the input known at compile time
            // where row_tiles has that case
            // tile u's first output pixel, and the input columns [ix, ix + span) it reads
            const int64_t per_row = (Wo + c.rp - 1) / c.rp, span = sw * (c.rp - 1) + 3;
            auto first = [&](int64_t u) {
              return std::max<int64_t>(0, std::min(u * c.rp, Wo - c.rp));
            };
            for (int64_t u = 0; u < per_row; ++u) {
              const int64_t at = first(u), ix0 = at * sw - pw;
              const int64_t sl = std::max<int64_t>(0, -ix0),
                            sr = std::max<int64_t>(0, ix0 + span - W);
              const FRowFn fn = c.row[Wo < c.rp || sl > 1 || sr > 1 ? 0 : 1 + sl + 2 * sr];
              pixels(at, c.rp);
              if (ahead) {
                // into L2, the input pixels of the tile position `ahead` on from this one (on
                // into the next rows), read while the tiles before it run (ResNet-50's first
                // stages at batch 16 otherwise wait on these reads: 5-10% of their time)
                const int64_t oy2 = oy + (u + ahead) / per_row, at2 = first((u + ahead) % per_row);
                const int64_t ix2 = at2 * sw - pw;
                const int64_t a0 = std::max<int64_t>(0, ix2) * C_in,
                              a1 = std::min<int64_t>(W, ix2 + span) * C_in;
                for (int64_t ky = 0; ky < kh && oy2 < Ho; ++ky) {
                  const int64_t iy = oy2 * sh + ky * dh - ph;
                  if (iy < 0 || iy >= H) continue;
                  const float* row = xp + (n * H + iy) * W * C_in;
                  for (int64_t a = a0; a < a1; a += 16) __builtin_prefetch(row + a, 0, 1);
                }
                // and the output pixels it writes (a read prefetch: with prefetchw the network's
                // first stages ran 5% slower; with this one 2-3% faster)
                if (oy2 < Ho) {
                  const float* ob = yp + ((n * Ho + oy2) * Wo + at2) * C_out;
                  for (int64_t a = 0; a < c.rp * C_out; a += 16) __builtin_prefetch(ob + a, 0, 1);
                }
              }
              for (int64_t g = g0; g < g0 + per_task; ++g) {
                const int64_t q = g * d + c.f;
                fn(inrows.data(), kh, C_in, ix0, W, gp + g * nk, nk, wp + g * T * nk * d + c.f,
                   d, bp ? bp + q : nullptr, pos.data() + q, whole[g * nch + i], out, res, relu);
              }
            }
            continue;
          }
          for (int64_t ox0 = 0; ox0 < Wo; ox0 += FP) {
            pixels(ox0, FP);
            for (int p = 0; p < FP; ++p)
              for (int64_t t = 0; t < T; ++t) {
                const int64_t ox = ox0 + p, iy = oy * sh + (t / kw) * dh - ph,
                              ix = ox * sw + (t % kw) * dw - pw;
                const bool in = ox < Wo && iy >= 0 && iy < H && ix >= 0 && ix < W;
                px[t * FP + p] = in ? xp + ((n * H + iy) * W + ix) * C_in : nullptr;
              }
            for (int64_t g = g0; g < g0 + per_task; ++g) {
              const int64_t q = g * d + c.f;
              c.fn(px.data(), T, gp + g * nk, nk, wp + g * T * nk * d + c.f, d,
                   bp ? bp + q : nullptr, pos.data() + q, whole[g * nch + i], out, res, relu);
            }
          }
        }
      }
    }
  };
  if (threads == 1)
    run(0, ntask);
  else
    at::parallel_for(0, ntask, 1, run);
  return y;
}

// How many distinct threads ran the tasks of one at::parallel_for over `tasks` items: the check
// that this op was built with OpenMP (without it at::parallel_for silently runs serially).
int64_t threads_used(int64_t tasks) {
  std::vector<int> ran(std::max<int64_t>(tasks, 1), -1);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) ran[i] = at::get_thread_num();
  });
  std::sort(ran.begin(), ran.end());
  return std::unique(ran.begin(), ran.end()) - ran.begin();
}

}  // namespace

TORCH_LIBRARY(gkp_fused, m) {
  m.def("threads_used(int tasks) -> int");
  m.def(
      "grouped_kernel_conv(Tensor x, Tensor weight, Tensor? bias, Tensor gather_index, "
      "Tensor output_index, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "Tensor? residual=None, bool relu=False) -> Tensor");
  m.def(
      "grouped_conv_filters(Tensor x, Tensor packed_weight, Tensor? bias, Tensor gather_index, "
      "Tensor output_index, int[2] stride, int[2] padding, int[2] dilation, "
      "Tensor? residual=None, bool relu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(gkp_fused, CPU, m) {
  m.impl("grouped_kernel_conv", &grouped_kernel_conv_cpu);
  m.impl("grouped_conv_filters", &grouped_conv_filters_cpu);
}

TORCH_LIBRARY_IMPL(gkp_fused, CompositeExplicitAutograd, m) {
  m.impl("threads_used", &threads_used);
}
