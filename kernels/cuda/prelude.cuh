// Shoal's CUDA prelude: prepended to every kernel source before NVRTC compiles it, so the sources
// need no CUDA headers (NVRTC from PyPI ships none). Fixed-width types, warp reductions and the
// FP8/BF16 conversions, which match the CPU reference of shoal-kernels bit for bit.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define SHOAL_E4M3 0
#define SHOAL_E5M2 1
#define SHOAL_QBLOCK 128

__device__ __forceinline__ u32 warp_max_u32(u32 v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max_f(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float fp8_max(int fmt) { return fmt == SHOAL_E4M3 ? 448.0f : 57344.0f; }

// The CPU reference's integer encoder (round to nearest even, saturating), for devices without
// FP8 conversion instructions and for cross-checking the hardware path.
__device__ __forceinline__ u8 fp8_encode_soft(float x, int fmt) {
  const u32 man_bits = fmt == SHOAL_E4M3 ? 3u : 2u;
  const int bias = fmt == SHOAL_E4M3 ? 7 : 15;
  const u32 max_code = fmt == SHOAL_E4M3 ? 0x7Eu : 0x7Bu;
  const u32 bits = __float_as_uint(x);
  const u32 sign = (bits >> 24) & 0x80u;
  const u32 abs = bits & 0x7FFFFFFFu;
  const u32 shift = 23u - man_bits;
  const u32 rounded = abs + ((1u << (shift - 1u)) - 1u) + ((abs >> shift) & 1u);
  const u32 normal = (rounded >> shift) - ((u32)(127 - bias) << man_bits);
  const u32 magic_bits = (u32)(127 + 24 - bias - (int)man_bits) << 23;
  const float magic = __uint_as_float(magic_bits);
  const u32 sub = __float_as_uint(__fadd_rn(__uint_as_float(abs), magic)) - magic_bits;
  const u32 min_normal_bits = (u32)(127 + 1 - bias) << 23;
  const u32 code = abs < min_normal_bits ? sub : min(normal, max_code);
  return (u8)(sign | code);
}

// Encodes one value: the hardware conversion (cvt.rn.satfinite, sm_89 and later) unless the
// source was compiled with SHOAL_SOFT_FP8 or for an older architecture.
__device__ __forceinline__ u8 fp8_encode(float x, int fmt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && !defined(SHOAL_SOFT_FP8)
  u16 r;
  if (fmt == SHOAL_E4M3) {
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(x));
  } else {
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(x));
  }
  return (u8)(r & 0xFFu);
#else
  return fp8_encode_soft(x, fmt);
#endif
}

// Decodes a code exactly (FP8 values are FP32 values), NaN and infinities included.
__device__ __forceinline__ float fp8_decode(u8 c, int fmt) {
  const u32 man_bits = fmt == SHOAL_E4M3 ? 3u : 2u;
  const int bias = fmt == SHOAL_E4M3 ? 7 : 15;
  const u32 abs = c & 0x7Fu;
  const u32 man = abs & ((1u << man_bits) - 1u);
  const u32 exp = abs >> man_bits;
  float v;
  if (fmt == SHOAL_E4M3 && abs == 0x7Fu) {
    v = __uint_as_float(0x7FC00000u);
  } else if (fmt == SHOAL_E5M2 && exp == 31u) {
    v = __uint_as_float(man == 0u ? 0x7F800000u : 0x7FC00000u);
  } else if (exp == 0u) {
    v = (float)man * __uint_as_float((u32)(127 + 1 - bias - (int)man_bits) << 23);
  } else {
    v = __uint_as_float(((u32)((int)exp - bias + 127) << 23) | (man << (23u - man_bits)));
  }
  return (c & 0x80u) ? -v : v;
}

// FP32 -> BF16, round to nearest even, NaN kept quiet (as the `half` crate does).
__device__ __forceinline__ u16 bf16_from_f32(float x) {
  const u32 b = __float_as_uint(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((b >> 16) | 0x0040u);
  return (u16)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// The scale of a tile or block of maximum magnitude `amax`, and the multiplier into FP8.
__device__ __forceinline__ void fp8_scale_for(float amax, int fmt, int pow2, float* scale, float* mul) {
  amax = fmaxf(amax, 1e-4f);
  const float fmax = fp8_max(fmt);
  if (pow2) {
    const float s = __uint_as_float((__float_as_uint(__fdiv_rn(amax, fmax)) + 0x007FFFFFu) & 0xFF800000u);
    *scale = s;
    *mul = __fdiv_rn(1.0f, s);
  } else {
    *scale = __fdiv_rn(amax, fmax);
    *mul = __fdiv_rn(fmax, amax);
  }
}
