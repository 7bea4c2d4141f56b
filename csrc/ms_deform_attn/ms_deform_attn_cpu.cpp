// CPU kernels of multi-scale deformable attention (shapes and semantics: ms_deform_attn.h).
//
// Layout notes that drive the design:
//  * value is (N, S, H, D): the D channels of one head at one key are contiguous, so every bilinear
//    corner is one contiguous run of D scalars and the loops over D vectorise. The four corners
//    of a point go through one fused, branch-free loop; common D are compile-time constants.
//  * Points are located in batches whose corner rows are prefetched before the arithmetic: the
//    reads (and backward's writes) are scattered over a large tensor, and issuing them together
//    hides much of the memory latency.
//  * Forward parallelises over (batch, query): every task writes its own output rows.
//  * Backward scatters into grad_value, which would race across queries. It parallelises over
//    (batch, level, group of heads) instead: each such item owns a disjoint slice of grad_value
//    (one level's keys, its heads' channels) and disjoint entries of the other two gradients, so
//    no locks, atomics or per-thread copies of grad_value are needed, and every item costs the
//    same (Lq * P points per head), which keeps the threads balanced. Heads are kept together
//    unless there are fewer (batch, level) pairs than threads (see heads_per_item). Per-thread
//    copies of grad_value, over (batch, query) items, measured slower on 2 threads (~1.3x at the
//    encoder size, ~2.5x at the decoder size, where zeroing and summing the copies dominates) and
//    their memory grows with the thread count.
//  * On x86 the hot loops are compiled twice, for the baseline ISA and for AVX2+FMA, and the AVX2
//    copy is picked at run time, because the build passes no -march flag (AVX2 is ~25% faster).
//    RANKDETR_NO_AVX2=1 in the environment forces the baseline copy (read once per process).
//  * The sampling arithmetic (pixel coordinates, clamping, corners and weights, the gradient of
//    the location, the level table's validity) is the CUDA kernel's too: sampling.h. This file
//    keeps the scheduling (batching, prefetching, the loops over D, the threads).
//
// Non-finite locations: as with grid_sample, a NaN or infinite location makes that sample NaN (so
// its output row, and that point's location and weight gradients, become NaN) but never reads
// memory: its pixel coordinates are clamped before their integer conversion, so that no corner is
// inside the map, and a point with no corner inside is skipped.
//
// Borders follow grid_sample: a point at exactly -1 in pixel space (the centre of the padding
// pixel left of or above the map) has its other corners inside the map with weight 0, so its
// sample is 0 but its location gradient is not. A point at w or h (or beyond) has no corner
// inside: sample and gradients 0.
//
// Non-finite attention weights propagate as in weight * sample: a point off the map samples 0, so
// a NaN or infinite weight there makes the output row NaN (inf * 0) and the point's location
// gradient NaN; its weight gradient is grad_output . 0 = 0. CUDA and the reference agree.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/sampling.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__AVX2__)
#define RANKDETR_AVX2_CLONE 1
#define RANKDETR_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define RANKDETR_AVX2_CLONE 0
#endif

#if defined(__GNUC__)
#define RANKDETR_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RANKDETR_ALWAYS_INLINE inline
#endif

namespace rankdetr {
namespace {

constexpr const char* kOp = "ms_deform_attn";  // starts the error messages

// Sizes shared by both kernels, in elements, and the level table.
struct Geometry : Sizes {
  std::vector<int64_t> level_h, level_w, level_start;
  bool levels_disjoint;  // no key belongs to two levels
  bool levels_tile;      // ... and every key belongs to one (as the Python wrapper enforces)
};

enum class Where { kInside, kOutside, kNonFinite };

// The four bilinear corners of one sampling point, in the order (x0, y0), (x0 + 1, y0),
// (x0, y0 + 1), (x0 + 1, y0 + 1). A corner outside the map has valid == false and contributes
// zero, which is grid_sample's padding_mode="zeros".
template <typename scalar_t>
struct Corners {
  int64_t row[4];  // key index inside the level
  scalar_t weight[4];
  bool valid[4];
  scalar_t fx, fy;  // fractional parts, kept for the location gradient
};

// Locates one point with the shared sampling core. Off the map (no corner inside, which includes
// every non-finite location) the kernels skip the point, so they need to know only whether it is
// finite; on it, the corners are resolved to key indices inside the level.
template <typename scalar_t>
RANKDETR_ALWAYS_INLINE Where locate(
    scalar_t loc_x, scalar_t loc_y, int64_t h, int64_t w, Corners<scalar_t>& c) {
  const auto f = sampling::footprint<scalar_t, int64_t>(loc_x, loc_y, h, w);
  if (!sampling::touches_map(f)) {
    return (std::isfinite(f.x) && std::isfinite(f.y)) ? Where::kOutside : Where::kNonFinite;
  }
  // Touching the map puts x0 in [-1, w - 1] and y0 in [-1, h - 1]: no clamp moved them.
  const sampling::PerCorner<scalar_t> weights = sampling::bilinear_weights(f.fx, f.fy);
  c.fx = f.fx;
  c.fy = f.fy;
  c.weight[0] = weights.c00;
  c.weight[1] = weights.c01;
  c.weight[2] = weights.c10;
  c.weight[3] = weights.c11;
  c.valid[0] = f.in00;
  c.valid[1] = f.in01;
  c.valid[2] = f.in10;
  c.valid[3] = f.in11;
  c.row[0] = f.y0 * w + f.x0;
  c.row[1] = c.row[0] + 1;
  c.row[2] = c.row[0] + w;
  c.row[3] = c.row[2] + 1;
  return Where::kInside;
}

// kD > 0: D is that compile-time constant; kD == 0: D is read at run time.
template <int kD>
RANKDETR_ALWAYS_INLINE int64_t channels(int64_t runtime_d) {
  return kD > 0 ? kD : runtime_d;
}

// Per-thread scratch rows. The four corners of a point are processed in one fused, branch-free
// loop over D; a corner outside the map reads `zeros` (with weight 0) instead of value and, in
// backward, writes its gradient into its own `sink` row instead of grad_value.
template <typename scalar_t>
struct Scratch {
  explicit Scratch(int64_t D) : zeros(D, 0), sinks(4 * D, 0) {}
  std::vector<scalar_t> zeros;
  std::vector<scalar_t> sinks;
};

// Issues prefetches for the cache lines of one row of D channels.
template <typename scalar_t, int kWrite>
RANKDETR_ALWAYS_INLINE void prefetch_row(const scalar_t* row, int64_t D) {
#if defined(__GNUC__)
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset, kWrite);
#endif
}

// One sampling point, located and with its corner rows resolved (outside corners -> zeros row).
template <typename scalar_t>
struct ForwardPoint {
  const scalar_t* row[4];
  scalar_t weight[4];
  scalar_t attn;
};

// acc += a * (sample of the four corner rows). __restrict__ lets the compiler vectorise; it only
// honours it on function parameters. Sample first, then weight it, as grid_sample + multiply do.
template <typename scalar_t, int kD>
RANKDETR_ALWAYS_INLINE void forward_corners(
    int64_t runtime_d,
    scalar_t* __restrict__ acc,
    const scalar_t* __restrict__ r0,
    const scalar_t* __restrict__ r1,
    const scalar_t* __restrict__ r2,
    const scalar_t* __restrict__ r3,
    scalar_t w0,
    scalar_t w1,
    scalar_t w2,
    scalar_t w3,
    scalar_t a) {
  const int64_t D = channels<kD>(runtime_d);
  for (int64_t d = 0; d < D; ++d) {
    acc[d] += a * (w0 * r0[d] + w1 * r1[d] + w2 * r2[d] + w3 * r3[d]);
  }
}

// Forward for the (batch * query) items [begin, end). Each item first locates all its H * L * P
// points and prefetches their corner rows, then accumulates: the gathers are scattered over a
// large value tensor and issuing them together hides much of their memory latency.
template <typename scalar_t, int kD>
RANKDETR_ALWAYS_INLINE void forward_range(
    const Geometry& g,
    const scalar_t* value,
    const scalar_t* loc,
    const scalar_t* attn,
    scalar_t* out,
    int64_t begin,
    int64_t end) {
  const int64_t D = channels<kD>(g.D);
  const int64_t H = g.H, L = g.L, P = g.P;
  const int64_t row_stride = H * D;  // between consecutive keys of value
  Scratch<scalar_t> scratch(D);
  const scalar_t* zeros = scratch.zeros.data();
  std::vector<ForwardPoint<scalar_t>> points(H * L * P);
  std::vector<int64_t> head_end(H);  // points of head h are [head_end[h - 1], head_end[h])
  std::vector<char> poisoned(H);
  constexpr int64_t kBuf = kD > 0 ? kD : 1;
  scalar_t acc_fixed[kBuf];
  std::vector<scalar_t> acc_dynamic(kD > 0 ? 0 : D);
  scalar_t* __restrict__ acc = kD > 0 ? acc_fixed : acc_dynamic.data();
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();

  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / g.Lq;
    const scalar_t* value_n = value + n * g.S * row_stride;
    const scalar_t* loc_p = loc + item * H * L * P * 2;
    const scalar_t* attn_p = attn + item * H * L * P;
    int64_t count = 0;
    for (int64_t h = 0; h < H; ++h) {
      poisoned[h] = 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t lh = g.level_h[l], lw = g.level_w[l];
        const scalar_t* base = value_n + g.level_start[l] * row_stride + h * D;
        for (int64_t p = 0; p < P; ++p, loc_p += 2, ++attn_p) {
          Corners<scalar_t> c;
          const Where where = locate(loc_p[0], loc_p[1], lh, lw, c);
          if (where != Where::kInside) {
            // Off the map the sample is 0: only a non-finite location or weight changes the
            // output (to NaN, as weight * sample would).
            poisoned[h] |= where == Where::kNonFinite || !std::isfinite(*attn_p);
            continue;
          }
          ForwardPoint<scalar_t>& point = points[count++];
          for (int k = 0; k < 4; ++k) {
            if (c.valid[k]) {
              point.row[k] = base + c.row[k] * row_stride;
              point.weight[k] = c.weight[k];
              prefetch_row<scalar_t, 0>(point.row[k], D);
            } else {
              point.row[k] = zeros;
              point.weight[k] = 0;
            }
          }
          point.attn = *attn_p;
        }
      }
      head_end[h] = count;
    }

    int64_t first = 0;
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < D; ++d) acc[d] = 0;
      for (int64_t i = first; i < head_end[h]; ++i) {
        const ForwardPoint<scalar_t>& point = points[i];
        forward_corners<scalar_t, kD>(
            D, acc, point.row[0], point.row[1], point.row[2], point.row[3], point.weight[0],
            point.weight[1], point.weight[2], point.weight[3], point.attn);
#if defined(__GNUC__)
        // An empty volatile asm keeps GCC's unroll-and-jam off this nest: jamming two points
        // turned the vectorised loop over D into a scalar one (2x slower).
        __asm__ volatile("");
#endif
      }
      first = head_end[h];
      scalar_t* o = out + (item * H + h) * D;
      if (poisoned[h]) {
        for (int64_t d = 0; d < D; ++d) o[d] = nan;
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d];
      }
    }
  }
}

// Horizontal sum of kLanes partial sums, pairwise.
template <typename scalar_t, int kLanes>
RANKDETR_ALWAYS_INLINE scalar_t sum_lanes(const scalar_t* part) {
  scalar_t s[kLanes];
  for (int j = 0; j < kLanes; ++j) s[j] = part[j];
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) s[j] += s[j + width];
  }
  return s[0];
}

// The four corners of one point in one pass over D: dot[k] = <r_k, go> and g_k += w_k * go.
// The rows never overlap (distinct keys, or distinct scratch rows), which __restrict__ tells the
// compiler so that it can vectorise; it only honours that on function parameters. The dot products
// keep kLanes independent partial sums: one running sum is a serial dependency chain the compiler
// may not vectorise (that would reorder floating-point additions).
template <typename scalar_t, int kD>
RANKDETR_ALWAYS_INLINE void backward_corners(
    int64_t runtime_d,
    const scalar_t* __restrict__ go,
    // Per corner k: the row read, the gradient row written, the weight.
    const scalar_t* __restrict__ r0, scalar_t* __restrict__ g0, scalar_t w0,
    const scalar_t* __restrict__ r1, scalar_t* __restrict__ g1, scalar_t w1,
    const scalar_t* __restrict__ r2, scalar_t* __restrict__ g2, scalar_t w2,
    const scalar_t* __restrict__ r3, scalar_t* __restrict__ g3, scalar_t w3,
    scalar_t* dot) {
  constexpr int kLanes = 8;
  const int64_t D = channels<kD>(runtime_d);
  scalar_t p0[kLanes] = {}, p1[kLanes] = {}, p2[kLanes] = {}, p3[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const scalar_t gd = go[d + j];
      p0[j] += r0[d + j] * gd;
      p1[j] += r1[d + j] * gd;
      p2[j] += r2[d + j] * gd;
      p3[j] += r3[d + j] * gd;
      g0[d + j] += w0 * gd;
      g1[d + j] += w1 * gd;
      g2[d + j] += w2 * gd;
      g3[d + j] += w3 * gd;
    }
  }
  for (int j = 0; d < D; ++d, ++j) {  // the last D % kLanes channels
    const scalar_t gd = go[d];
    p0[j] += r0[d] * gd;
    p1[j] += r1[d] * gd;
    p2[j] += r2[d] * gd;
    p3[j] += r3[d] * gd;
    g0[d] += w0 * gd;
    g1[d] += w1 * gd;
    g2[d] += w2 * gd;
    g3[d] += w3 * gd;
  }
  dot[0] = sum_lanes<scalar_t, kLanes>(p0);
  dot[1] = sum_lanes<scalar_t, kLanes>(p1);
  dot[2] = sum_lanes<scalar_t, kLanes>(p2);
  dot[3] = sum_lanes<scalar_t, kLanes>(p3);
}

// One sampling point of backward, located, with its corner rows resolved: outside corners read
// the zeros row and write into their own sink row, so the pass over D needs no branches.
template <typename scalar_t>
struct BackwardPoint {
  const scalar_t* row[4];
  scalar_t* grad_row[4];
  const scalar_t* grad_out;
  scalar_t weight[4];
  scalar_t fx, fy, attn;
  int64_t index;  // into attention_weights (and, times 2, sampling_locations)
};

// Backward for the items [begin, end) of (batch, level, head group). Item (n, l, group) reads every
// query and writes only grad_value[n, level l's keys, the group's heads, :] and the matching
// (n, :, heads, l, :) entries of the other two gradients, so items never race. Points are
// handled in batches: locate a batch and prefetch its rows, then do the arithmetic, which hides
// much of the latency of the scattered reads and writes.
template <typename scalar_t, int kD>
RANKDETR_ALWAYS_INLINE void backward_range(
    const Geometry& g,
    int64_t heads_per_item,
    const scalar_t* value,
    const scalar_t* loc,
    const scalar_t* attn,
    const scalar_t* grad_out,
    scalar_t* grad_value,
    scalar_t* grad_loc,
    scalar_t* grad_attn,
    int64_t begin,
    int64_t end) {
  const int64_t D = channels<kD>(g.D);
  const int64_t H = g.H, L = g.L, P = g.P, Lq = g.Lq;
  const bool write_value = grad_value != nullptr;  // else only locations and weights
  const int64_t groups = (H + heads_per_item - 1) / heads_per_item;
  const int64_t row_stride = H * D;
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  Scratch<scalar_t> scratch(D);
  const scalar_t* zeros = scratch.zeros.data();
  scalar_t* sinks = scratch.sinks.data();
  const int64_t points_per_query = heads_per_item * P;
  const int64_t capacity = std::max<int64_t>(64, points_per_query);
  std::vector<BackwardPoint<scalar_t>> batch(capacity);

  // Levels that share keys (only possible through direct torch.ops calls) would race as separate
  // items: then one item takes all levels.
  const int64_t level_slots = g.levels_disjoint ? L : 1;

  for (int64_t item = begin; item < end; ++item) {
    const int64_t group = item % groups;
    const int64_t slot = (item / groups) % level_slots;
    const int64_t n = item / (groups * level_slots);
    const int64_t h_begin = group * heads_per_item;
    const int64_t h_end = std::min(H, h_begin + heads_per_item);
    const int64_t l_begin = g.levels_disjoint ? slot : 0;
    const int64_t l_end = g.levels_disjoint ? slot + 1 : L;
    for (int64_t l = l_begin; l < l_end; ++l) {
      const int64_t lh = g.level_h[l], lw = g.level_w[l];
      const scalar_t scale_x = static_cast<scalar_t>(lw), scale_y = static_cast<scalar_t>(lh);
      const int64_t level_offset = (n * g.S + g.level_start[l]) * row_stride;
      if (g.levels_tile && write_value) {
        // This item owns these rows, so it zeroes them: in parallel, and just before use, rather
        // than in a separate single pass over the whole of grad_value.
        for (int64_t key = 0; key < lh * lw; ++key) {
          scalar_t* row = grad_value + level_offset + key * row_stride;
          std::fill(row + h_begin * D, row + h_end * D, static_cast<scalar_t>(0));
        }
      }

      int64_t count = 0;
      for (int64_t q = 0; q < Lq; ++q) {
        for (int64_t h = h_begin; h < h_end; ++h) {
          const int64_t nqh = (n * Lq + q) * H + h;
          const scalar_t* base = value + level_offset + h * D;
          scalar_t* grad_base = write_value ? grad_value + level_offset + h * D : nullptr;
          const int64_t point0 = (nqh * L + l) * P;
          for (int64_t index = point0; index < point0 + P; ++index) {
            Corners<scalar_t> c;
            const Where where = locate(loc[2 * index], loc[2 * index + 1], lh, lw, c);
            if (where != Where::kInside) {
              // Off the map: d/d weight = grad_output . 0 = 0, d/d location = weight * 0 (NaN
              // for a non-finite weight); a non-finite location makes both NaN.
              const bool bad_location = where == Where::kNonFinite;
              const scalar_t location_fill = bad_location ? nan : attn[index] * scalar_t(0);
              grad_loc[2 * index] = location_fill;
              grad_loc[2 * index + 1] = location_fill;
              grad_attn[index] = bad_location ? nan : static_cast<scalar_t>(0);
              continue;
            }
            BackwardPoint<scalar_t>& point = batch[count++];
            for (int k = 0; k < 4; ++k) {
              if (c.valid[k]) {
                point.row[k] = base + c.row[k] * row_stride;
                prefetch_row<scalar_t, 0>(point.row[k], D);
                if (write_value) {
                  point.grad_row[k] = grad_base + c.row[k] * row_stride;
                  prefetch_row<scalar_t, 1>(point.grad_row[k], D);
                } else {
                  point.grad_row[k] = sinks + k * D;
                }
              } else {
                point.row[k] = zeros;
                point.grad_row[k] = sinks + k * D;
              }
              point.weight[k] = c.weight[k];
            }
            point.grad_out = grad_out + nqh * D;
            point.fx = c.fx;
            point.fy = c.fy;
            point.attn = attn[index];
            point.index = index;
          }
        }
        if (count + points_per_query <= capacity && q + 1 < Lq) continue;

        for (int64_t i = 0; i < count; ++i) {
          const BackwardPoint<scalar_t>& point = batch[i];
          const scalar_t a = point.attn;
          // d(sample)/d(corner row k) = weight k; d(loss)/d(sample) = a * grad_output.
          scalar_t dot[4];
          backward_corners<scalar_t, kD>(
              D, point.grad_out,
              point.row[0], point.grad_row[0], a * point.weight[0],
              point.row[1], point.grad_row[1], a * point.weight[1],
              point.row[2], point.grad_row[2], a * point.weight[2],
              point.row[3], point.grad_row[3], a * point.weight[3], dot);
          // Outside corners read zeros, so their dot is 0 and they drop out of both gradients.
          const sampling::PerCorner<scalar_t> w = {
              point.weight[0], point.weight[1], point.weight[2], point.weight[3]};
          grad_attn[point.index] = sampling::corner_dot(w, dot[0], dot[1], dot[2], dot[3]);
          const sampling::Gradient2d<scalar_t> g_f =
              sampling::fraction_gradient(point.fx, point.fy, dot[0], dot[1], dot[2], dot[3]);
          // Times attn and d(pixel)/d(normalised) = w or h.
          grad_loc[2 * point.index] = a * scale_x * g_f.x;
          grad_loc[2 * point.index + 1] = a * scale_y * g_f.y;
        }
        count = 0;
      }
    }
  }
}

// One instantiation per (dtype, D, ISA); the AVX2 copies are compiled with AVX2+FMA enabled,
// which always_inline carries into the inlined loops above.
template <typename scalar_t, int kD>
void forward_baseline(
    const Geometry& g, const scalar_t* v, const scalar_t* loc, const scalar_t* a, scalar_t* out,
    int64_t b, int64_t e) {
  forward_range<scalar_t, kD>(g, v, loc, a, out, b, e);
}

template <typename scalar_t, int kD>
void backward_baseline(
    const Geometry& g, int64_t hpi, const scalar_t* v, const scalar_t* loc, const scalar_t* a,
    const scalar_t* go, scalar_t* gv, scalar_t* gl, scalar_t* ga, int64_t b, int64_t e) {
  backward_range<scalar_t, kD>(g, hpi, v, loc, a, go, gv, gl, ga, b, e);
}

#if RANKDETR_AVX2_CLONE
template <typename scalar_t, int kD>
RANKDETR_TARGET_AVX2 void forward_avx2(
    const Geometry& g, const scalar_t* v, const scalar_t* loc, const scalar_t* a, scalar_t* out,
    int64_t b, int64_t e) {
  forward_range<scalar_t, kD>(g, v, loc, a, out, b, e);
}

template <typename scalar_t, int kD>
RANKDETR_TARGET_AVX2 void backward_avx2(
    const Geometry& g, int64_t hpi, const scalar_t* v, const scalar_t* loc, const scalar_t* a,
    const scalar_t* go, scalar_t* gv, scalar_t* gl, scalar_t* ga, int64_t b, int64_t e) {
  backward_range<scalar_t, kD>(g, hpi, v, loc, a, go, gv, gl, ga, b, e);
}

// RANKDETR_NO_AVX2=1 forces the baseline copy, so that the tests can cover it on AVX2 machines.
bool use_avx2() {
  static const bool use = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      std::getenv("RANKDETR_NO_AVX2") == nullptr;
  return use;
}
#endif

template <typename scalar_t>
using ForwardFn = void (*)(
    const Geometry&, const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, int64_t,
    int64_t);

template <typename scalar_t>
using BackwardFn = void (*)(
    const Geometry&, int64_t, const scalar_t*, const scalar_t*, const scalar_t*, const scalar_t*,
    scalar_t*, scalar_t*, scalar_t*, int64_t, int64_t);

template <typename scalar_t, int kD>
ForwardFn<scalar_t> pick_forward() {
#if RANKDETR_AVX2_CLONE
  if (use_avx2()) return &forward_avx2<scalar_t, kD>;
#endif
  return &forward_baseline<scalar_t, kD>;
}

template <typename scalar_t, int kD>
BackwardFn<scalar_t> pick_backward() {
#if RANKDETR_AVX2_CLONE
  if (use_avx2()) return &backward_avx2<scalar_t, kD>;
#endif
  return &backward_baseline<scalar_t, kD>;
}

// Specialised channel counts: 32 is Rank-DETR's (256 channels / 8 heads).
template <typename scalar_t>
ForwardFn<scalar_t> select_forward(int64_t D) {
  switch (D) {
    case 16:
      return pick_forward<scalar_t, 16>();
    case 32:
      return pick_forward<scalar_t, 32>();
    case 64:
      return pick_forward<scalar_t, 64>();
    default:
      return pick_forward<scalar_t, 0>();
  }
}

template <typename scalar_t>
BackwardFn<scalar_t> select_backward(int64_t D) {
  switch (D) {
    case 16:
      return pick_backward<scalar_t, 16>();
    case 32:
      return pick_backward<scalar_t, 32>();
    case 64:
      return pick_backward<scalar_t, 64>();
    default:
      return pick_backward<scalar_t, 0>();
  }
}

// Heads handled by one backward item. All heads of a key share one row of value, so an item that
// owns every head touches whole rows and reads its queries' inputs in whole cache lines. Splitting
// heads costs a lot (single-threaded encoder-size backward, H = 8: 1.4x slower with 2 groups,
// 1.8x with one head per item: strided partial-line streaming, and the rows' stride maps one head
// onto a fraction of the cache sets), so heads are split only as far as needed to give every
// thread an item.
int64_t heads_per_item(const Geometry& g) {
  const int64_t threads = static_cast<int64_t>(at::get_num_threads());
  int64_t groups = 1;
  const int64_t level_slots = g.levels_disjoint ? g.L : 1;
  while (groups < g.H && g.N * level_slots * groups < threads) groups *= 2;
  groups = std::min(groups, g.H);
  return (g.H + groups - 1) / groups;
}

// Checks the inputs (the shared shape checks, the device, the level table; the Python wrapper gives
// friendlier messages, these keep direct torch.ops calls memory-safe) and reads the level table.
Geometry check_inputs(const Inputs& in) {
  Geometry g;
  static_cast<Sizes&>(g) = check_shapes(in, kOp);
  for (const at::Tensor* t : {&in.value, &in.spatial_shapes, &in.level_start_index,
                              &in.sampling_locations, &in.attention_weights}) {
    TORCH_CHECK(t->device().is_cpu(), kOp, ": all inputs must be on the CPU");
  }

  const at::Tensor shapes = in.spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = in.level_start_index.to(at::kLong).contiguous();
  const int64_t* shapes_p = shapes.data_ptr<int64_t>();
  const int64_t* starts_p = starts.data_ptr<int64_t>();
  g.level_h.resize(g.L);
  g.level_w.resize(g.L);
  g.level_start.resize(g.L);
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t h = shapes_p[2 * l], w = shapes_p[2 * l + 1], start = starts_p[l];
    // Every key a level can index must lie inside value: this is what keeps reads in bounds.
    TORCH_CHECK(
        sampling::level_fits(start, h, w, g.S),
        kOp, ": level ", l, " (h=", h, ", w=", w, ", start=", start,
        ") does not fit in value's S = ", g.S);
    g.level_h[l] = h;
    g.level_w[l] = w;
    g.level_start[l] = start;
  }
  // Sort the levels' key ranges [start, start + h * w) to see whether they overlap or leave gaps.
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t size = g.level_h[l] * g.level_w[l];
    if (size > 0) ranges.emplace_back(g.level_start[l], g.level_start[l] + size);
  }
  std::sort(ranges.begin(), ranges.end());
  g.levels_disjoint = true;
  int64_t covered = 0;  // keys [0, covered) belong to a level, when levels_tile
  bool contiguous = true;
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (i > 0 && ranges[i].first < ranges[i - 1].second) g.levels_disjoint = false;
    contiguous = contiguous && ranges[i].first == covered;
    covered = ranges[i].second;
  }
  g.levels_tile = g.levels_disjoint && contiguous && covered == g.S;
  return g;
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const Inputs& in) {
  const Geometry g = check_inputs(in);
  const at::Tensor value_c = in.value.contiguous();
  const at::Tensor loc_c = in.sampling_locations.contiguous();
  const at::Tensor attn_c = in.attention_weights.contiguous();
  at::Tensor out = at::empty({g.N, g.Lq, g.H * g.D}, value_c.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(value_c.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const ForwardFn<scalar_t> fn = select_forward<scalar_t>(g.D);
    const scalar_t* v = value_c.data_ptr<scalar_t>();
    const scalar_t* loc = loc_c.data_ptr<scalar_t>();
    const scalar_t* a = attn_c.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // A query costs H * L * P samples; ~16 queries per task amortise the scheduling.
    at::parallel_for(0, g.N * g.Lq, 16, [&](int64_t begin, int64_t end) {
      fn(g, v, loc, a, o, begin, end);
    });
  });
  return out;
}

Gradients ms_deform_attn_backward_cpu(
    const Inputs& in, const at::Tensor& grad_output, bool compute_grad_value) {
  const Geometry g = check_inputs(in);
  check_grad_output_shape(grad_output, g, kOp);
  TORCH_CHECK(grad_output.device().is_cpu(), kOp, ": grad_output must be on the CPU");
  const at::Tensor value_c = in.value.contiguous();
  const at::Tensor loc_c = in.sampling_locations.contiguous();
  const at::Tensor attn_c = in.attention_weights.contiguous();
  const at::Tensor grad_out_c = grad_output.to(value_c.scalar_type()).contiguous();
  // grad_value is accumulated into: zeroed by the items that own its rows when the levels tile S,
  // else here. The other two are written entry by entry.
  at::Tensor grad_value =
      compute_grad_value ? at::empty_like(value_c) : at::empty({0}, value_c.options());
  at::Tensor grad_loc = at::empty_like(loc_c);
  at::Tensor grad_attn = at::empty_like(attn_c);
  if (g.N * g.Lq * g.H * g.L * g.P == 0 || g.D == 0) {
    grad_value.zero_();
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  if (!g.levels_tile && compute_grad_value) grad_value.zero_();

  AT_DISPATCH_FLOATING_TYPES(value_c.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const BackwardFn<scalar_t> fn = select_backward<scalar_t>(g.D);
    const scalar_t* v = value_c.data_ptr<scalar_t>();
    const scalar_t* loc = loc_c.data_ptr<scalar_t>();
    const scalar_t* a = attn_c.data_ptr<scalar_t>();
    const scalar_t* go = grad_out_c.data_ptr<scalar_t>();
    scalar_t* gv = compute_grad_value ? grad_value.data_ptr<scalar_t>() : nullptr;
    scalar_t* gl = grad_loc.data_ptr<scalar_t>();
    scalar_t* ga = grad_attn.data_ptr<scalar_t>();
    const int64_t hpi = heads_per_item(g);
    const int64_t groups = (g.H + hpi - 1) / hpi;
    const int64_t level_slots = g.levels_disjoint ? g.L : 1;
    // One item is a whole pass over the queries: grain 1.
    at::parallel_for(0, g.N * level_slots * groups, 1, [&](int64_t begin, int64_t end) {
      fn(g, hpi, v, loc, a, go, gv, gl, ga, begin, end);
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace rankdetr
