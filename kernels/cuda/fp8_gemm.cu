// FP8 GEMM with fine-grained scales, C[m, n] = A[m, k] . B[n, k]^T (DeepGEMM's NT layout), dense
// or grouped over contiguous per-expert row segments (the MoE layout: tokens sorted by expert).
//
// A has 1x128 tile scales sa[m, kb]; B has 128x128 block scales (b_scale_rows = 128) or 1x128
// tile scales (b_scale_rows = 1), sb[g][ceil(n / b_scale_rows), kb]. Each 128-deep K block is
// multiplied on the tensor cores (mma.sync m16n8k32 E4M3 on sm_89 and later) into a fresh FP32
// fragment, which is then promoted: multiplied by sa * sb and added into the FP32 accumulator on the
// CUDA cores. That is the paper's promotion every N_C = 128 K-elements, with the scale applied at
// promotion time.
//
// Where the tensor cores run it: sm_89 (Ada) has native FP8 mma.sync, whose accumulator keeps about
// 13-14 mantissa bits (the precision the promotion exists for); on sm_90 (Hopper) FP8 runs on the
// tensor cores only through wgmma, so this mma.sync is lowered to FP8->FP16 unpacks plus FP16 HMMA:
// accurate, but without the FP8 throughput. A wgmma kernel is the Hopper follow-up.
//
// Tiles: 128x128 of C per block of 256 threads (8 warps, 4 along M x 2 along N, 32x64 per warp).
// Requires k % 16 == 0 (16-byte loads); the host checks it.

#define GB_M 128
#define GB_N 128
#define GB_K 128
#define GB_LD (GB_K + 16)

__device__ __forceinline__ void mma_e4m3(float* d, const u32* a, const u32* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  // No FP8 tensor cores: the same fragment product on the CUDA cores, exactly as the mma defines it
  // (the thread's four outputs from the fragments of its quad, gathered with shuffles).
  const int lane = threadIdx.x & 31;
  const int grp = lane >> 2;
  const int tig = lane & 3;
  for (int out = 0; out < 4; out++) {
    const int row_hi = out >> 1;  // 0: row grp, 1: row grp + 8
    const int col = tig * 2 + (out & 1);
    float s = 0.0f;
    for (int q = 0; q < 4; q++) {  // the quad lanes holding k = q*4.. (+16)
      const u32 a_lo = __shfl_sync(0xffffffffu, a[row_hi], grp * 4 + q);
      const u32 a_hi = __shfl_sync(0xffffffffu, a[2 + row_hi], grp * 4 + q);
      const u32 b_lo = __shfl_sync(0xffffffffu, b[0], col * 4 + q);
      const u32 b_hi = __shfl_sync(0xffffffffu, b[1], col * 4 + q);
      for (int j = 0; j < 4; j++) {
        s += fp8_decode((u8)(a_lo >> (8 * j)), SHOAL_E4M3) * fp8_decode((u8)(b_lo >> (8 * j)), SHOAL_E4M3);
        s += fp8_decode((u8)(a_hi >> (8 * j)), SHOAL_E4M3) * fp8_decode((u8)(b_hi >> (8 * j)), SHOAL_E4M3);
      }
    }
    d[out] += s;
  }
#endif
}

// One thread block computes one 128x128 tile of C. Tile `blockIdx.y` of the M dimension covers rows
// [tile_row0[t], min(tile_row0[t] + 128, seg_end[tile_group[t]])) of A and C, multiplied by
// group tile_group[t] of B.
extern "C" __global__ void __launch_bounds__(256)
fp8_gemm_grouped(const u8* __restrict__ A, const float* __restrict__ sa, const u8* __restrict__ B,
                 const float* __restrict__ sb, float* __restrict__ C,
                 const int* __restrict__ seg_end, const int* __restrict__ tile_group,
                 const int* __restrict__ tile_row0, int n, int k, int b_scale_rows) {
  __shared__ __align__(16) u8 As[GB_M * GB_LD];
  __shared__ __align__(16) u8 Bs[GB_N * GB_LD];
  const int t = blockIdx.y;
  const int g = tile_group[t];
  const int row0 = tile_row0[t];
  const int row_end = min(row0 + GB_M, seg_end[g]);
  const int n0 = blockIdx.x * GB_N;
  const int kb = (k + GB_K - 1) / GB_K;
  const int sb_rows = (n + b_scale_rows - 1) / b_scale_rows;
  const u8* Bg = B + (i64)g * n * k;
  const float* sbg = sb + (i64)g * sb_rows * kb;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wm = warp & 3;   // 32-row slice
  const int wn = warp >> 2;  // 64-column slice
  const int grp = lane >> 2;
  const int tig = lane & 3;

  float acc[2][8][4];
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

  for (int kbi = 0; kbi < kb; kbi++) {
    const int k0 = kbi * GB_K;
    // Stage the A and B tiles: 128 rows x 128 bytes each, 16 bytes per load, zero outside.
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int idx = threadIdx.x + 256 * i;
      const int r = idx >> 3;
      const int c = (idx & 7) * 16;
      uint4 va = make_uint4(0u, 0u, 0u, 0u);
      uint4 vb = make_uint4(0u, 0u, 0u, 0u);
      if (row0 + r < row_end && k0 + c < k) va = *(const uint4*)(A + (i64)(row0 + r) * k + k0 + c);
      if (n0 + r < n && k0 + c < k) vb = *(const uint4*)(Bg + (i64)(n0 + r) * k + k0 + c);
      *(uint4*)(As + r * GB_LD + c) = va;
      *(uint4*)(Bs + r * GB_LD + c) = vb;
    }
    __syncthreads();

    float part[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
      for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) part[i][j][e] = 0.0f;

#pragma unroll
    for (int ks = 0; ks < GB_K; ks += 32) {
      u32 af[2][4];
      u32 bfr[8][2];
#pragma unroll
      for (int mi = 0; mi < 2; mi++) {
        const int r = wm * 32 + mi * 16 + grp;
        af[mi][0] = *(const u32*)(As + r * GB_LD + ks + tig * 4);
        af[mi][1] = *(const u32*)(As + (r + 8) * GB_LD + ks + tig * 4);
        af[mi][2] = *(const u32*)(As + r * GB_LD + ks + 16 + tig * 4);
        af[mi][3] = *(const u32*)(As + (r + 8) * GB_LD + ks + 16 + tig * 4);
      }
#pragma unroll
      for (int ni = 0; ni < 8; ni++) {
        const int c = wn * 64 + ni * 8 + grp;
        bfr[ni][0] = *(const u32*)(Bs + c * GB_LD + ks + tig * 4);
        bfr[ni][1] = *(const u32*)(Bs + c * GB_LD + ks + 16 + tig * 4);
      }
#pragma unroll
      for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 8; ni++) mma_e4m3(part[mi][ni], af[mi], bfr[ni]);
    }

    // Promotion: scale this K block's partial sums and add them into FP32.
#pragma unroll
    for (int mi = 0; mi < 2; mi++) {
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int r = row0 + wm * 32 + mi * 16 + grp + 8 * h;
        const float s_a = r < row_end ? sa[(i64)r * kb + kbi] : 0.0f;
#pragma unroll
        for (int ni = 0; ni < 8; ni++) {
#pragma unroll
          for (int e = 0; e < 2; e++) {
            const int c = n0 + wn * 64 + ni * 8 + tig * 2 + e;
            const float s_b = c < n ? sbg[(i64)(c / b_scale_rows) * kb + kbi] : 0.0f;
            acc[mi][ni][2 * h + e] += part[mi][ni][2 * h + e] * (s_a * s_b);
          }
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int mi = 0; mi < 2; mi++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int r = row0 + wm * 32 + mi * 16 + grp + 8 * h;
      if (r >= row_end) continue;
#pragma unroll
      for (int ni = 0; ni < 8; ni++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int c = n0 + wn * 64 + ni * 8 + tig * 2 + e;
          if (c < n) C[(i64)r * n + c] = acc[mi][ni][2 * h + e];
        }
    }
}
