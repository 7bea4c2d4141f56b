// The sampling arithmetic of multi-scale deformable attention, shared by the CPU kernel
// (ms_deform_attn_cpu.cpp) and the CUDA kernel (ms_deform_attn_cuda.cu), which keep only their
// scheduling: loops, threads, vector loads, atomics, shuffles.
//
// Sampling is bilinear with zero padding, as grid_sample(align_corners=False) on the grid 2*loc-1:
// the pixel coordinates of a normalised location (lx, ly) on a level of size (h, w) are
// x = lx * w - 0.5, y = ly * h - 0.5, and corners outside the map read as zero.
//
// Both kernels call these functions, so that every backend (and, on x86, both compiled copies of
// the CPU kernel) computes a location's corners, weights and gradient with the same operations in
// the same order. Templates: T is the op-math type (float or double); index_t is the integer type
// of pixel indices and level sizes (int on the GPU, where S <= INT_MAX is checked on the host;
// int64_t on the CPU).
#pragma once

#include <cmath>
#include <cstdint>

// Callable from host and device code; empty for the C++ compiler.
#ifdef __CUDACC__
#define RANKDETR_HOST_DEVICE __host__ __device__
#else
#define RANKDETR_HOST_DEVICE
#endif

// Always inlined: the CUDA kernels are tuned for their register count with this code inside them,
// and the CPU kernel's AVX2 copy only gets AVX2 code for what is inlined into it.
#if defined(__CUDACC__)
#define RANKDETR_CORE_INLINE __forceinline__
#elif defined(__GNUC__)
#define RANKDETR_CORE_INLINE inline __attribute__((always_inline))
#else
#define RANKDETR_CORE_INLINE inline
#endif

#define RANKDETR_CORE RANKDETR_HOST_DEVICE RANKDETR_CORE_INLINE

namespace rankdetr {
namespace sampling {

// ---------------------------------------------------------------------------------------------
// Scalar primitives, per type (the C functions exist on the host and the device alike)
// ---------------------------------------------------------------------------------------------

RANKDETR_CORE float fused_multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
RANKDETR_CORE double fused_multiply_add(double a, double b, double c) { return fma(a, b, c); }
RANKDETR_CORE float floor_of(float v) { return floorf(v); }
RANKDETR_CORE double floor_of(double v) { return floor(v); }

RANKDETR_CORE float max_of(float a, float b) { return fmaxf(a, b); }
RANKDETR_CORE double max_of(double a, double b) { return fmax(a, b); }
RANKDETR_CORE float min_of(float a, float b) { return fminf(a, b); }
RANKDETR_CORE double min_of(double a, double b) { return fmin(a, b); }

// v clamped into [lo, hi]; NaN gives lo.
template <typename T>
RANKDETR_CORE T clamp_nan_low(T v, T lo, T hi) {
#ifdef __CUDA_ARCH__
  // fmax/fmin are single instructions on the GPU (and fmax(NaN, lo) = lo).
  return min_of(max_of(v, lo), hi);
#else
  // The same values, but fmax/fmin are library calls on the host: comparisons are false for NaN.
  return v >= lo ? (v <= hi ? v : hi) : lo;
#endif
}

// ---------------------------------------------------------------------------------------------
// Where a location falls
// ---------------------------------------------------------------------------------------------

// Pixel coordinate of normalised coordinate l on an axis of `size` pixels: l * size - 0.5, with a
// single rounding. The explicit fused multiply-add is what the CUDA compiler and the CPU kernel's
// AVX2 copy contract this expression into anyway; spelling it out makes the CPU's baseline copy
// land on the same pixel, which matters for points exactly on a pixel boundary.
template <typename T, typename index_t>
RANKDETR_CORE T pixel_coordinate(T l, index_t size) {
  return fused_multiply_add(l, static_cast<T>(size), static_cast<T>(-0.5));
}

// floor(v) (v already floored) as an index in [-2, size]: a value clamped there has its two corners
// outside [0, size) exactly when the unclamped one has, so NaN (-> -2) and +-inf (-> an end) read
// nothing, and the integer conversion never overflows. The float is clamped to [-2, kMax] first
// (kMax is exact in float and fits index_t), converted, and only then clamped to `size` in
// integers: clamping to float(size) would round sizes above 2^24 and could land a far-right point
// on the last column.
template <typename index_t, typename T>
RANKDETR_CORE index_t clamp_to_index(T v, index_t size) {
  constexpr T kMax = sizeof(index_t) >= 8 ? static_cast<T>(4611686018427387904.0)  // 2^62
                                          : static_cast<T>(1073741824.0);          // 2^30
  const index_t i = static_cast<index_t>(clamp_nan_low(v, static_cast<T>(-2), kMax));
  return i < size ? i : size;
}

// Bilinear footprint of one location on one level: corner (y0 + dy, x0 + dx) is `in{dy}{dx}` when
// it lies inside the map. A point at exactly -1 keeps its corner at 0 (weight 0, non-zero location
// gradient), as grid_sample does; a point at w or h (or beyond) has no corner inside.
template <typename T, typename index_t>
struct Footprint {
  T x, y;           // pixel coordinates (non-finite for a non-finite location)
  T fx, fy;         // fractional parts x - floor(x), y - floor(y)
  index_t x0, y0;   // floor(x), floor(y), clamped into [-2, size]
  bool in00, in01, in10, in11;
};

template <typename T, typename index_t>
RANKDETR_CORE Footprint<T, index_t> footprint(T lx, T ly, index_t h, index_t w) {
  Footprint<T, index_t> f;
  f.x = pixel_coordinate(lx, w);
  f.y = pixel_coordinate(ly, h);
  const T x0f = floor_of(f.x);
  const T y0f = floor_of(f.y);
  f.fx = f.x - x0f;
  f.fy = f.y - y0f;
  f.x0 = clamp_to_index(x0f, w);
  f.y0 = clamp_to_index(y0f, h);
  const bool x0_in = f.x0 >= 0 && f.x0 < w;
  const bool x1_in = f.x0 >= -1 && f.x0 < w - 1;
  const bool y0_in = f.y0 >= 0 && f.y0 < h;
  const bool y1_in = f.y0 >= -1 && f.y0 < h - 1;
  f.in00 = y0_in && x0_in;
  f.in01 = y0_in && x1_in;
  f.in10 = y1_in && x0_in;
  f.in11 = y1_in && x1_in;
  return f;
}

// Whether any corner is inside, i.e. the point lies in [-1, w) x [-1, h): false for NaN.
template <typename T, typename index_t>
RANKDETR_CORE bool touches_map(const Footprint<T, index_t>& f) {
  return f.in00 || f.in01 || f.in10 || f.in11;
}

// ---------------------------------------------------------------------------------------------
// Weights and gradients
// ---------------------------------------------------------------------------------------------

// One value per corner, named like Footprint's flags.
template <typename T>
struct PerCorner {
  T c00, c01, c10, c11;
};

// The bilinear weight of each corner.
template <typename T>
RANKDETR_CORE PerCorner<T> bilinear_weights(T fx, T fy) {
  const T gx = static_cast<T>(1) - fx;
  const T gy = static_cast<T>(1) - fy;
  return {gy * gx, gy * fx, fy * gx, fy * fx};
}

// The bilinear weights times a, as (a * row weight) * column weight: one multiply fewer than
// a * bilinear_weights(), for the forward that needs no unscaled weight.
template <typename T>
RANKDETR_CORE PerCorner<T> scaled_bilinear_weights(T a, T fx, T fy) {
  const T gx = static_cast<T>(1) - fx;
  const T gy = static_cast<T>(1) - fy;
  return {a * gy * gx, a * gy * fx, a * fy * gx, a * fy * fx};
}

// sum over the corners of w * t. With t = grad_out . corner value this is the gradient of the
// attention weight: sampled = sum w * value, so d(attn * sampled)/d attn = sum w * t.
template <typename T>
RANKDETR_CORE T corner_dot(const PerCorner<T>& w, T t00, T t01, T t10, T t11) {
  return w.c00 * t00 + w.c01 * t01 + w.c10 * t10 + w.c11 * t11;
}

template <typename T>
struct Gradient2d {
  T x, y;
};

// Gradient of sum_ab w_ab * t_ab with respect to (fx, fy), t_ab = grad_out . corner value ab:
//   d/d fx = (1 - fy) (t01 - t00) + fy (t11 - t10),
//   d/d fy = (1 - fx) (t10 - t00) + fx (t11 - t01).
// Linear in the t, so a kernel may sum it over partial dot products. The location gradient is
// this times attn * w (resp. attn * h), d fx / d lx = w; the kernels apply that factor, the CUDA
// one only after summing over its lanes.
template <typename T>
RANKDETR_CORE Gradient2d<T> fraction_gradient(T fx, T fy, T t00, T t01, T t10, T t11) {
  const T gx = static_cast<T>(1) - fx;
  const T gy = static_cast<T>(1) - fy;
  return {(t01 - t00) * gy + (t11 - t10) * fy, (t10 - t00) * gx + (t11 - t01) * fx};
}

// ---------------------------------------------------------------------------------------------
// Levels
// ---------------------------------------------------------------------------------------------

// Whether h * w keys starting at `start` fit inside [0, S).
RANKDETR_CORE bool level_fits(int64_t start, int64_t h, int64_t w, int64_t S) {
  if (!(h >= 0 && w >= 0 && h <= S && w <= S && start >= 0 && start <= S)) {
    return false;
  }
#ifdef __CUDA_ARCH__
  // S <= INT_MAX (checked by the CUDA host code), so h * w cannot overflow once h, w <= S.
  return h * w <= S - start;
#else
  // The CPU takes any S: the same test without the product, which could overflow.
  return h == 0 || w <= (S - start) / h;
#endif
}

template <typename index_t>
struct Level {
  int64_t start;  // offset of the level inside S
  index_t h;
  index_t w;
};

// The level as the kernels use it: an inconsistent one (not fitting inside [0, S)) is made empty
// (h = w = 0), so that no corner of it is ever in bounds and it samples zeros. The CUDA kernel
// does this rather than raise, since checking on the host would need a device sync.
template <typename index_t>
RANKDETR_CORE Level<index_t> usable_level(int64_t start, int64_t h, int64_t w, int64_t S) {
  const bool ok = level_fits(start, h, w, S);
  Level<index_t> level;
  level.start = ok ? start : 0;
  level.h = ok ? static_cast<index_t>(h) : 0;
  level.w = ok ? static_cast<index_t>(w) : 0;
  return level;
}

}  // namespace sampling
}  // namespace rankdetr
