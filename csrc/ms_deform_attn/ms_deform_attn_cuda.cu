// CUDA kernels of the multi-scale deformable attention op (see ms_deform_attn.h for the shapes).
//
// This file is the scheduling only: thread mapping, vector loads, atomics and warp shuffles. The
// sampling arithmetic (pixel coordinates, clamping, corners and bilinear weights, the gradient of
// the location, the level table's validity) is the one the CPU kernel uses too, in sampling.h.
//
// Work split (VEC = 4 channels a thread for float32/float16/bfloat16, 2 for float64, when D is a
// multiple of VEC and the pointers are aligned; otherwise VEC = 1, which handles any D):
//   forward:  one thread per (n, q, head, chunk of VEC channels). The threads of one head share
//             their sampling locations and weights (broadcast loads) and read VEC consecutive
//             channels of each corner with one vector load, so a head's D channels are one
//             coalesced row per corner. No atomics.
//   backward: a group of G lanes (the smallest power of two >= D / VEC, at most 32; 8 for D = 32)
//             inside one warp per (n, q, head); lane i handles the channel chunks i, i + G, ... .
//             For each sampling point every lane
//             - scatters attn * bilinear_weight * grad_out into grad_value with atomics (one
//               float4 atomic per corner on sm_90+, scalar float/double atomics otherwise), and
//             - computes its partial dot products grad_out . corner_value; the gradients of the
//               location and of the attention weight are linear in those, so they are summed over
//               the group with xor shuffles (no shared memory, no atomics) and written by lane 0.
//   grad_value is accumulated in the op-math type (float for float16/bfloat16, in a float32
//   buffer that is cast at the end; double for double).
//
// Everything is computed in at::opmath_type<scalar_t> (float for the half types). Kernels run on
// the current stream (c10::cuda::getCurrentCUDAStream, the stream at::cuda::getCurrentCUDAStream
// returns; c10's header avoids ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers).
// spatial_shapes / level_start_index are read on the device (no host synchronisation). A level
// whose (start, h, w) does not fit inside S is treated as empty (sampling::usable_level: it samples
// zeros) rather than raising, since checking it on the host would need a sync: inconsistent shapes
// can never read or write out of bounds. Non-finite coordinates are clamped before their integer
// conversion (sampling::clamp_to_index) and all their corners then fail the bounds checks; their
// (NaN) bilinear weights still multiply the zero padding, so NaN propagates to the outputs as in
// grid_sample.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "ms_deform_attn/ms_deform_attn.h"
#include "ms_deform_attn/sampling.h"

namespace rankdetr {
namespace {

constexpr int kThreadsPerBlock = 256;  // a multiple of the warp size (the backward relies on it)
// Resident blocks per SM asked of the compiler: 4 caps the kernels at 64 registers (50% occupancy
// on sm_80/sm_90; the gathers are latency-bound). Double keeps more registers (fewer spills).
template <typename scalar_t>
constexpr int min_blocks_per_sm() {
  return sizeof(scalar_t) == 8 ? 3 : 4;
}
constexpr int64_t kMaxLevels = 1024;   // the level table lives in shared memory (16 bytes a level)
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

using LevelInfo = sampling::Level<int>;
static_assert(sizeof(LevelInfo) == 16, "LevelInfo is expected to be 16 bytes");

// Copies the level table into shared memory, inconsistent levels made empty.
__device__ __forceinline__ void load_levels(
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    int L,
    int64_t S,
    LevelInfo* levels) {
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    levels[l] = sampling::usable_level<int>(
        level_start_index[l], spatial_shapes[2 * l], spatial_shapes[2 * l + 1], S);
  }
}

// Element offset of corner (y0, x0) from the level's first key; key_stride: elements between
// consecutive keys (H * D). The kernels read or write there only where the corner is in bounds.
template <typename acc_t>
__device__ __forceinline__ int64_t corner_offset(
    const sampling::Footprint<acc_t, int>& b, int w, int64_t key_stride) {
  return (static_cast<int64_t>(b.y0) * w + b.x0) * key_stride;
}

// Raw integer type of a vector of BYTES bytes, for single-instruction loads and stores.
template <int BYTES>
struct RawVec;
template <>
struct RawVec<16> {
  using type = uint4;
};
template <>
struct RawVec<8> {
  using type = uint2;
};
template <>
struct RawVec<4> {
  using type = unsigned int;
};
template <>
struct RawVec<2> {
  using type = unsigned short;
};

// out[j] = p[j], j < VEC; p is aligned to VEC * sizeof(scalar_t) when VEC > 1.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<acc_t>(p[0]);
  } else {
    using raw_t = typename RawVec<VEC * sizeof(scalar_t)>::type;
    const raw_t raw = __ldg(reinterpret_cast<const raw_t*>(p));
    const scalar_t* s = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      out[j] = static_cast<acc_t>(s[j]);
    }
  }
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&v)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = static_cast<scalar_t>(v[0]);
  } else {
    using raw_t = typename RawVec<VEC * sizeof(scalar_t)>::type;
    raw_t raw;
    scalar_t* s = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s[j] = static_cast<scalar_t>(v[j]);
    }
    *reinterpret_cast<raw_t*>(p) = raw;
  }
}

// p[j] += scale * v[j] atomically (element-wise); p is aligned to VEC * sizeof(float).
template <int VEC>
__device__ __forceinline__ void atomic_add_scaled(float* p, float scale, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + j),
                make_float4(scale * v[j], scale * v[j + 1], scale * v[j + 2], scale * v[j + 3]));
    }
  } else if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 2) {
      atomicAdd(reinterpret_cast<float2*>(p + j), make_float2(scale * v[j], scale * v[j + 1]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      atomicAdd(p + j, scale * v[j]);
    }
  }
#else
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    atomicAdd(p + j, scale * v[j]);
  }
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_scaled(double* p, double scale, const double (&v)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    atomicAdd(p + j, scale * v[j]);
  }
}

// Sum over the `group` consecutive lanes (a power of two <= 32, aligned inside the warp) holding v.
// Every lane of the warp must call it (full-mask shuffles); every lane of a group gets the sum.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock, min_blocks_per_sm<scalar_t>())
    ms_deform_attn_forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights,
    scalar_t* __restrict__ output,
    int64_t num_threads,  // N * Lq * H * (D / VEC)
    int64_t S,
    int H,
    int D,
    int Lq,
    int L,
    int P) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  LevelInfo* levels = reinterpret_cast<LevelInfo*>(shared_bytes);
  load_levels(spatial_shapes, level_start_index, L, S, levels);
  __syncthreads();

  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= num_threads) {
    return;
  }
  const int chunks_per_head = D / VEC;
  const int64_t g = tid / chunks_per_head;  // flat (n, q, head)
  const int c = static_cast<int>(tid - g * chunks_per_head) * VEC;  // first channel
  const int head = static_cast<int>(g % H);
  const int64_t n = g / (static_cast<int64_t>(Lq) * H);
  const int64_t key_stride = static_cast<int64_t>(H) * D;

  const scalar_t* value_nh = value + n * S * key_stride + static_cast<int64_t>(head) * D + c;
  const scalar_t* loc = sampling_locations + g * L * P * 2;
  const scalar_t* attn = attention_weights + g * L * P;

  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    acc[j] = acc_t(0);
  }

  for (int l = 0; l < L; ++l) {
    const LevelInfo level = levels[l];
    const scalar_t* value_l = value_nh + level.start * key_stride;
    const int64_t row_stride = static_cast<int64_t>(level.w) * key_stride;
    // Kept rolled: nvcc's choice to unroll it flips with small changes elsewhere and costs
    // registers (unrolled by two, the float64 VEC = 2 kernel took 80 instead of 60). Rolled, the
    // VEC = 1 kernels, which nvcc used to unroll, take 46-52 registers instead of 56-78
    // (README.md, "Building for a GPU").
#pragma unroll 1
    for (int p = 0; p < P; ++p, loc += 2, ++attn) {
      const acc_t a = static_cast<acc_t>(attn[0]);
      const auto b = sampling::footprint<acc_t, int>(
          static_cast<acc_t>(loc[0]), static_cast<acc_t>(loc[1]), level.h, level.w);

      acc_t v00[VEC], v01[VEC], v10[VEC], v11[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v00[j] = v01[j] = v10[j] = v11[j] = acc_t(0);
      }
      const scalar_t* p00 = value_l + corner_offset(b, level.w, key_stride);
      if (b.in00) load_vec<VEC>(p00, v00);
      if (b.in01) load_vec<VEC>(p00 + key_stride, v01);
      if (b.in10) load_vec<VEC>(p00 + row_stride, v10);
      if (b.in11) load_vec<VEC>(p00 + row_stride + key_stride, v11);

      const sampling::PerCorner<acc_t> w = sampling::scaled_bilinear_weights(a, b.fx, b.fy);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] += w.c00 * v00[j] + w.c01 * v01[j] + w.c10 * v10[j] + w.c11 * v11[j];
      }
    }
  }
  store_vec<VEC>(output + g * D + c, acc);
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Per-lane contribution of one chunk of VEC channels (starting at channel c) of one sampling point:
// accumulates the dot products t_ab = grad_out . value(corner ab) and scatters
// attn * bilinear_weight(corner) * grad_out into grad_value.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void backward_chunk(
    const scalar_t* __restrict__ value_p00,  // corner (y0, x0) of the level, channel 0 of the head
    acc_t* __restrict__ grad_value_p00,
    int64_t key_stride,
    int64_t row_stride,
    const sampling::Footprint<acc_t, int>& b,
    acc_t a00, acc_t a01, acc_t a10, acc_t a11,  // attn * bilinear weight of each corner
    const acc_t (&go)[VEC],
    int c,
    bool write,
    acc_t& t00, acc_t& t01, acc_t& t10, acc_t& t11) {
  acc_t v00[VEC], v01[VEC], v10[VEC], v11[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    v00[j] = v01[j] = v10[j] = v11[j] = acc_t(0);
  }
  const scalar_t* p00 = value_p00 + c;  // dereferenced only where in bounds
  if (b.in00) load_vec<VEC>(p00, v00);
  if (b.in01) load_vec<VEC>(p00 + key_stride, v01);
  if (b.in10) load_vec<VEC>(p00 + row_stride, v10);
  if (b.in11) load_vec<VEC>(p00 + row_stride + key_stride, v11);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    t00 += go[j] * v00[j];
    t01 += go[j] * v01[j];
    t10 += go[j] * v10[j];
    t11 += go[j] * v11[j];
  }
  if (write) {
    acc_t* g00 = grad_value_p00 + c;
    if (b.in00) atomic_add_scaled<VEC>(g00, a00, go);
    if (b.in01) atomic_add_scaled<VEC>(g00 + key_stride, a01, go);
    if (b.in10) atomic_add_scaled<VEC>(g00 + row_stride, a10, go);
    if (b.in11) atomic_add_scaled<VEC>(g00 + row_stride + key_stride, a11, go);
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock, min_blocks_per_sm<scalar_t>())
    ms_deform_attn_backward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index,
    const scalar_t* __restrict__ sampling_locations,
    const scalar_t* __restrict__ attention_weights,
    const scalar_t* __restrict__ grad_output,
    at::opmath_type<scalar_t>* __restrict__ grad_value,  // zero-initialised, shape of value
    scalar_t* __restrict__ grad_sampling_locations,
    scalar_t* __restrict__ grad_attention_weights,
    int64_t num_heads,  // N * Lq * H: one group of lanes each
    int64_t S,
    int H,
    int D,
    int Lq,
    int L,
    int P,
    int log2_group) {  // lanes per head = 1 << log2_group <= 32
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  LevelInfo* levels = reinterpret_cast<LevelInfo*>(shared_bytes);
  load_levels(spatial_shapes, level_start_index, L, S, levels);
  __syncthreads();

  const int group = 1 << log2_group;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Blocks are whole warps and groups never straddle warps: retire a warp only when it holds no
  // head at all, so that every lane of a working warp reaches the full-mask shuffles.
  if (((tid & ~int64_t(31)) >> log2_group) >= num_heads) {
    return;
  }
  const int64_t g_raw = tid >> log2_group;
  const bool active = g_raw < num_heads;
  // Idle lanes of the last warp replay the last head (reads only) and write nothing.
  const int64_t g = active ? g_raw : num_heads - 1;
  const int lane = static_cast<int>(tid & (group - 1));
  const int head = static_cast<int>(g % H);
  const int64_t n = g / (static_cast<int64_t>(Lq) * H);
  const int64_t key_stride = static_cast<int64_t>(H) * D;

  const int64_t nh_offset = n * S * key_stride + static_cast<int64_t>(head) * D;
  const scalar_t* value_nh = value + nh_offset;
  // grad_value == nullptr: only the locations and weights need a gradient.
  acc_t* grad_value_nh = grad_value != nullptr ? grad_value + nh_offset : nullptr;
  const bool write_value = active && grad_value != nullptr;
  const scalar_t* grad_out = grad_output + g * D;
  const int64_t point_base = g * L * P;  // index of (g, level 0, point 0)

  const int chunk_stride = group * VEC;  // channels covered by one pass of the group
  const int num_chunks = (D + chunk_stride - 1) / chunk_stride;
  const int c0 = lane * VEC;

  // grad_out of the first chunk stays in registers (the only chunk when D <= 32 * VEC).
  acc_t go0[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    go0[j] = acc_t(0);
  }
  if (c0 < D) load_vec<VEC>(grad_out + c0, go0);

  for (int l = 0; l < L; ++l) {
    const LevelInfo level = levels[l];
    const int64_t level_offset = level.start * key_stride;
    const int64_t row_stride = static_cast<int64_t>(level.w) * key_stride;
    const acc_t w_f = static_cast<acc_t>(level.w);
    const acc_t h_f = static_cast<acc_t>(level.h);
    for (int p = 0; p < P; ++p) {
      const int64_t idx = point_base + l * P + p;
      const acc_t a = static_cast<acc_t>(attention_weights[idx]);
      const auto b = sampling::footprint<acc_t, int>(
          static_cast<acc_t>(sampling_locations[2 * idx]),
          static_cast<acc_t>(sampling_locations[2 * idx + 1]), level.h, level.w);
      const sampling::PerCorner<acc_t> w = sampling::bilinear_weights(b.fx, b.fy);

      const int64_t off00 = corner_offset(b, level.w, key_stride);
      const scalar_t* value_p00 = value_nh + level_offset + off00;
      acc_t* grad_value_p00 =
          grad_value_nh != nullptr ? grad_value_nh + level_offset + off00 : nullptr;
      acc_t t00 = acc_t(0), t01 = acc_t(0), t10 = acc_t(0), t11 = acc_t(0);
      if (c0 < D) {
        backward_chunk<scalar_t, acc_t, VEC>(
            value_p00, grad_value_p00, key_stride, row_stride, b, a * w.c00, a * w.c01,
            a * w.c10, a * w.c11, go0, c0, write_value, t00, t01, t10, t11);
      }
      for (int k = 1; k < num_chunks; ++k) {
        const int c = c0 + k * chunk_stride;
        if (c < D) {
          acc_t go[VEC];
          load_vec<VEC>(grad_out + c, go);
          backward_chunk<scalar_t, acc_t, VEC>(
              value_p00, grad_value_p00, key_stride, row_stride, b, a * w.c00, a * w.c01,
              a * w.c10, a * w.c11, go, c, write_value, t00, t01, t10, t11);
        }
      }

      // Both gradients are linear in this lane's partial dot products t_ab, so they are formed
      // per lane and summed over the group; the chain-rule factor attn * size comes after.
      const sampling::Gradient2d<acc_t> g_f =
          sampling::fraction_gradient(b.fx, b.fy, t00, t01, t10, t11);
      const acc_t g_attn = group_sum(sampling::corner_dot(w, t00, t01, t10, t11), group);
      const acc_t g_x = group_sum(g_f.x, group);
      const acc_t g_y = group_sum(g_f.y, group);
      if (active && lane == 0) {
        grad_attention_weights[idx] = static_cast<scalar_t>(g_attn);
        grad_sampling_locations[2 * idx] = static_cast<scalar_t>(a * g_x * w_f);
        grad_sampling_locations[2 * idx + 1] = static_cast<scalar_t>(a * g_y * h_f);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

constexpr const char* kOp = "ms_deform_attn (CUDA)";  // starts the error messages

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& value) {
  TORCH_CHECK(t.device() == value.device(), kOp, ": ", name,
              " must be on the same device as value (", value.device(), "), got ", t.device());
}

// The shared shape checks, plus what this kernel needs: one device, its dtypes, sizes that fit
// its int indices and its shared-memory level table.
Sizes check_inputs(const Inputs& in) {
  TORCH_CHECK(in.value.is_cuda(), kOp, ": value must be a CUDA tensor, got ", in.value.device());
  check_same_device(in.spatial_shapes, "spatial_shapes", in.value);
  check_same_device(in.level_start_index, "level_start_index", in.value);
  check_same_device(in.sampling_locations, "sampling_locations", in.value);
  check_same_device(in.attention_weights, "attention_weights", in.value);
  const auto dtype = in.value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              kOp, ": value must be float32, float16, bfloat16 or float64, got ", dtype);
  const Sizes s = check_shapes(in, kOp);

  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(s.L <= kMaxLevels, kOp, ": at most ", kMaxLevels, " levels are supported, got ",
              s.L);
  TORCH_CHECK(s.S <= kIntMax && s.H * s.D <= kIntMax && s.Lq <= kIntMax && s.L * s.P <= kIntMax,
              kOp, ": sizes too large for the kernel (S=", s.S, ", H*D=", s.H * s.D, ", Lq=",
              s.Lq, ", L*P=", s.L * s.P, ")");
  return s;
}

bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % static_cast<std::uintptr_t>(bytes) == 0;
}

int64_t num_blocks(int64_t num_threads) {
  const int64_t blocks = (num_threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(),
              kOp, ": problem too large (", num_threads, " threads)");
  return blocks;
}

// Channels a thread handles in the vectorised kernels: 4 (one 16-byte load for float32, 8 bytes
// for the half types, whose 8-wide variant needs too many registers), 2 for double (16 bytes).
template <typename scalar_t>
constexpr int vec_width() {
  return sizeof(scalar_t) >= 8 ? 2 : 4;
}

// The inputs as the kernels read them: contiguous, with int64 level tables (converted on the
// device, without a sync), on the current device.
struct DeviceInputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
};

DeviceInputs device_inputs(const Inputs& in) {
  return {in.value.contiguous(), in.spatial_shapes.to(at::kLong).contiguous(),
          in.level_start_index.to(at::kLong).contiguous(), in.sampling_locations.contiguous(),
          in.attention_weights.contiguous()};
}

template <typename scalar_t, int VEC>
void launch_forward(const DeviceInputs& in, at::Tensor& output, const Sizes& s,
                    cudaStream_t stream) {
  const int64_t num_threads = s.N * s.Lq * s.H * (s.D / VEC);
  ms_deform_attn_forward_kernel<scalar_t, VEC>
      <<<num_blocks(num_threads), kThreadsPerBlock, s.L * sizeof(LevelInfo), stream>>>(
          in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
          in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr<scalar_t>(),
          in.attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), num_threads,
          s.S, static_cast<int>(s.H), static_cast<int>(s.D), static_cast<int>(s.Lq),
          static_cast<int>(s.L), static_cast<int>(s.P));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The backward's outputs; grad_value_acc is in the op-math type, empty when not computed.
struct GradientBuffers {
  at::Tensor grad_value_acc, grad_sampling_locations, grad_attention_weights;
};

template <typename scalar_t, int VEC>
void launch_backward(const DeviceInputs& in, const at::Tensor& grad_output, GradientBuffers& out,
                     const Sizes& s, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* grad_value_p =
      out.grad_value_acc.numel() > 0 ? out.grad_value_acc.data_ptr<acc_t>() : nullptr;
  // Lanes per head: enough for one chunk of VEC channels each, a power of two, at most a warp.
  const int64_t chunks = (s.D + VEC - 1) / VEC;
  int log2_group = 0;
  while (log2_group < 5 && (int64_t(1) << log2_group) < chunks) {
    ++log2_group;
  }
  const int64_t num_heads = s.N * s.Lq * s.H;
  const int64_t num_threads = num_heads << log2_group;
  ms_deform_attn_backward_kernel<scalar_t, VEC>
      <<<num_blocks(num_threads), kThreadsPerBlock, s.L * sizeof(LevelInfo), stream>>>(
          in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
          in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr<scalar_t>(),
          in.attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
          grad_value_p, out.grad_sampling_locations.data_ptr<scalar_t>(),
          out.grad_attention_weights.data_ptr<scalar_t>(), num_heads, s.S,
          static_cast<int>(s.H), static_cast<int>(s.D), static_cast<int>(s.Lq),
          static_cast<int>(s.L), static_cast<int>(s.P), log2_group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const Inputs& inputs) {
  const Sizes s = check_inputs(inputs);
  const c10::cuda::CUDAGuard device_guard(inputs.value.device());
  const DeviceInputs in = device_inputs(inputs);

  at::Tensor output = at::empty({s.N, s.Lq, s.H * s.D}, in.value.options());
  if (output.numel() == 0) {
    return output;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        constexpr int kVec = vec_width<scalar_t>();
        const bool vectorised = s.D % kVec == 0 &&
            is_aligned(in.value.data_ptr(), kVec * sizeof(scalar_t)) &&
            is_aligned(output.data_ptr(), kVec * sizeof(scalar_t));
        if (vectorised) {
          launch_forward<scalar_t, kVec>(in, output, s, stream);
        } else {
          launch_forward<scalar_t, 1>(in, output, s, stream);
        }
      });
  return output;
}

Gradients ms_deform_attn_backward_cuda(
    const Inputs& inputs, const at::Tensor& grad_output_in, bool compute_grad_value) {
  const Sizes s = check_inputs(inputs);
  check_same_device(grad_output_in, "grad_output", inputs.value);
  if (compute_grad_value) {
    // Float atomics make the sum order, and so the last bits of grad_value, vary between runs.
    at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  }
  TORCH_CHECK(grad_output_in.scalar_type() == inputs.value.scalar_type(), kOp,
              ": grad_output must have value's dtype (", inputs.value.scalar_type(), "), got ",
              grad_output_in.scalar_type());
  check_grad_output_shape(grad_output_in, s, kOp);

  const c10::cuda::CUDAGuard device_guard(inputs.value.device());
  const DeviceInputs in = device_inputs(inputs);
  const at::Tensor grad_output = grad_output_in.contiguous();

  const auto dtype = in.value.scalar_type();
  // grad_value is accumulated in the op-math type (float32 for the half types, cast at the end).
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = in.value.options().dtype(acc_dtype);
  at::Tensor grad_value_acc = compute_grad_value ? at::zeros(in.value.sizes(), acc_options)
                                                 : at::empty({0}, acc_options);
  if (s.N * s.Lq * s.H == 0 || s.D == 0) {
    // No head, or no channel: the gradients are all zero.
    return std::make_tuple(grad_value_acc.to(dtype), at::zeros_like(in.sampling_locations),
                           at::zeros_like(in.attention_weights));
  }
  GradientBuffers out{grad_value_acc, at::empty_like(in.sampling_locations),
                      at::empty_like(in.attention_weights)};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_backward_cuda", [&] {
        constexpr int kVec = vec_width<scalar_t>();
        const bool vectorised = s.D % kVec == 0 &&
            is_aligned(in.value.data_ptr(), kVec * sizeof(scalar_t)) &&
            is_aligned(grad_output.data_ptr(), kVec * sizeof(scalar_t)) &&
            (!compute_grad_value ||
             is_aligned(grad_value_acc.data_ptr(), kVec * grad_value_acc.element_size()));
        if (vectorised) {
          launch_backward<scalar_t, kVec>(in, grad_output, out, s, stream);
        } else {
          launch_backward<scalar_t, 1>(in, grad_output, out, s, stream);
        }
      });
  at::Tensor grad_value = dtype == acc_dtype ? grad_value_acc : grad_value_acc.to(dtype);
  return std::make_tuple(grad_value, out.grad_sampling_locations, out.grad_attention_weights);
}

}  // namespace rankdetr
