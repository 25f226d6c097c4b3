// Fine-grained FP8 quantization (shoal_kernels::quant on the GPU): 1x128 tiles for activations,
// 128x128 blocks for weights, and the 128x1 tiles of a transposed activation that backward needs,
// fused with the transpose. Scales and codes equal the CPU reference's bit for bit.
// `bad` is set to 1 when a non-finite input is seen (the caller then reports the operand).

// One warp per 1x128 tile; tiles are visited with a grid-stride loop.
extern "C" __global__ void quantize_tiles(const float* __restrict__ x, u8* __restrict__ codes,
                                          float* __restrict__ scales, int rows, int cols, int fmt,
                                          int pow2, int* __restrict__ bad) {
  const int kb = (cols + SHOAL_QBLOCK - 1) / SHOAL_QBLOCK;
  const i64 tiles = (i64)rows * kb;
  const int lane = threadIdx.x & 31;
  const i64 nwarps = ((i64)gridDim.x * blockDim.x) >> 5;
  for (i64 t = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < tiles; t += nwarps) {
    const i64 r = t / kb;
    const int c0 = (int)(t % kb) * SHOAL_QBLOCK;
    const int len = min(SHOAL_QBLOCK, cols - c0);
    const float* src = x + r * cols + c0;
    float v[4];
    u32 m = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int c = lane + 32 * i;
      v[i] = c < len ? src[c] : 0.0f;
      m = max(m, __float_as_uint(v[i]) & 0x7FFFFFFFu);
    }
    m = warp_max_u32(m);
    if (m >= 0x7F800000u && lane == 0) atomicOr(bad, 1);
    float s, mul;
    fp8_scale_for(__uint_as_float(m), fmt, pow2, &s, &mul);
    u8* dst = codes + r * cols + c0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int c = lane + 32 * i;
      if (c < len) dst[c] = fp8_encode(__fmul_rn(v[i], mul), fmt);
    }
    if (lane == 0) scales[r * kb + t % kb] = s;
  }
}

// The transpose of row-major x[rows, cols], quantized in 1x128 tiles: codes[cols, rows] with
// scales[cols, ceil(rows / 128)]. One block of 256 threads per 128-row x 32-column patch: the patch
// is staged in shared memory, then each warp quantizes four of its columns.
extern "C" __global__ void __launch_bounds__(256)
quantize_tiles_transposed(const float* __restrict__ x, u8* __restrict__ codes,
                          float* __restrict__ scales, int rows, int cols, int fmt, int pow2,
                          int* __restrict__ bad) {
  __shared__ float tile[SHOAL_QBLOCK][33];
  const int r0 = blockIdx.y * SHOAL_QBLOCK;
  const int c0 = blockIdx.x * 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int rr = warp; rr < SHOAL_QBLOCK; rr += 8) {
    const int r = r0 + rr;
    const int c = c0 + lane;
    tile[rr][lane] = (r < rows && c < cols) ? x[(i64)r * cols + c] : 0.0f;
  }
  __syncthreads();
  const int kbr = (rows + SHOAL_QBLOCK - 1) / SHOAL_QBLOCK;
  const int len = min(SHOAL_QBLOCK, rows - r0);
  for (int cc = warp * 4; cc < warp * 4 + 4; cc++) {
    const int c = c0 + cc;
    if (c >= cols) break;
    float v[4];
    u32 m = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      v[i] = tile[lane + 32 * i][cc];
      m = max(m, __float_as_uint(v[i]) & 0x7FFFFFFFu);
    }
    m = warp_max_u32(m);
    if (m >= 0x7F800000u && lane == 0) atomicOr(bad, 1);
    float s, mul;
    fp8_scale_for(__uint_as_float(m), fmt, pow2, &s, &mul);
    u8* dst = codes + (i64)c * rows + r0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int r = lane + 32 * i;
      if (r < len) dst[r] = fp8_encode(__fmul_rn(v[i], mul), fmt);
    }
    if (lane == 0) scales[(i64)c * kbr + blockIdx.y] = s;
  }
}

// One 128x128 block per thread block of 256 threads: the block's amax, then its codes.
extern "C" __global__ void __launch_bounds__(256)
quantize_blocks(const float* __restrict__ x, u8* __restrict__ codes, float* __restrict__ scales,
                int rows, int cols, int fmt, int pow2, int* __restrict__ bad) {
  __shared__ u32 warp_amax[8];
  const int r0 = blockIdx.y * SHOAL_QBLOCK;
  const int c0 = blockIdx.x * SHOAL_QBLOCK;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int kb = (cols + SHOAL_QBLOCK - 1) / SHOAL_QBLOCK;
  u32 m = 0;
  for (int rr = warp; rr < SHOAL_QBLOCK; rr += 8) {
    const int r = r0 + rr;
    if (r >= rows) break;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int c = c0 + lane + 32 * i;
      if (c < cols) m = max(m, __float_as_uint(x[(i64)r * cols + c]) & 0x7FFFFFFFu);
    }
  }
  m = warp_max_u32(m);
  if (lane == 0) warp_amax[warp] = m;
  __syncthreads();
  m = lane < 8 ? warp_amax[lane] : 0u;
  m = warp_max_u32(m);
  if (m >= 0x7F800000u && threadIdx.x == 0) atomicOr(bad, 1);
  float s, mul;
  fp8_scale_for(__uint_as_float(m), fmt, pow2, &s, &mul);
  for (int rr = warp; rr < SHOAL_QBLOCK; rr += 8) {
    const int r = r0 + rr;
    if (r >= rows) break;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int c = c0 + lane + 32 * i;
      if (c < cols) codes[(i64)r * cols + c] = fp8_encode(__fmul_rn(x[(i64)r * cols + c], mul), fmt);
    }
  }
  if (threadIdx.x == 0) scales[blockIdx.y * kb + blockIdx.x] = s;
}

// Dequantizes codes[rows, cols] with tile (scale_rows_per = 1) or block (128) scales into FP32.
extern "C" __global__ void dequantize(const u8* __restrict__ codes, const float* __restrict__ scales,
                                      float* __restrict__ out, int rows, int cols, int fmt,
                                      int scale_rows_per) {
  const int kb = (cols + SHOAL_QBLOCK - 1) / SHOAL_QBLOCK;
  const i64 n = (i64)rows * cols;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / cols;
    const int c = (int)(i % cols);
    out[i] = fp8_decode(codes[i], fmt) * scales[(r / scale_rows_per) * kb + c / SHOAL_QBLOCK];
  }
}

// out[cols, rows] = in[rows, cols]^T for bytes (the exact transpose of block-quantized weights,
// whose 128x128 scale grid the caller transposes alongside).
extern "C" __global__ void transpose_u8(const u8* __restrict__ in, u8* __restrict__ out, int rows,
                                        int cols) {
  __shared__ u8 tile[32][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int r = blockIdx.y * 32 + i;
    if (r < rows && c < cols) tile[i][threadIdx.x] = in[(i64)r * cols + c];
  }
  __syncthreads();
  const int r = blockIdx.y * 32 + threadIdx.x;
  for (int i = threadIdx.y; i < 32; i += blockDim.y) {
    const int cc = blockIdx.x * 32 + i;
    if (r < rows && cc < cols) out[(i64)cc * rows + r] = tile[threadIdx.x][i];
  }
}

// out[cols, rows] = in[rows, cols]^T for FP32 (scale grids).
extern "C" __global__ void transpose_f32(const float* __restrict__ in, float* __restrict__ out,
                                         int rows, int cols) {
  const i64 n = (i64)rows * cols;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / cols;
    const i64 c = i % cols;
    out[c * rows + r] = in[i];
  }
}

// out[r * ld + c] = in[r * cols + c] for c < cols: rows of a scale grid copied into rows of `ld`
// (the 16-byte-aligned rows cuBLASLt's 128x128 block scales are read in); `out` is pre-zeroed.
extern "C" __global__ void pad_rows_f32(const float* __restrict__ in, float* __restrict__ out,
                                        int rows, int cols, int ld) {
  const i64 n = (i64)rows * cols;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    out[(i / cols) * ld + i % cols] = in[i];
  }
}
