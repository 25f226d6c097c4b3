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
// accurate, but without the FP8 throughput: `fp8_gemm_wgmma` below is the Hopper kernel.
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

// ---------------------------------------------------------------------------------------------
// Hopper: the same GEMM on WGMMA (sm_90a), the instruction that gives FP8 its tensor-core
// throughput there. One block of 256 threads = two warpgroups computes a 128x128 tile of C; each
// warpgroup owns 64 rows and issues `wgmma.mma_async m64n128k32` (E4M3 x E4M3 -> FP32) four
// times per 128-deep K block, the first with scale-d = 0 so every K block starts a fresh FP32
// fragment. After each K block the fragment is promoted on the CUDA cores (times sa * sb, added
// into the FP32 accumulator): the paper's promotion every 128 K-elements.
//
// Operands reach shared memory through a WG_STAGES-deep cp.async pipeline (16-byte copies, zero
// fill outside the matrix), in the no-swizzle canonical K-major layout WGMMA reads through its
// matrix descriptors: core matrices of 8 rows x 16 bytes (128 contiguous bytes), LBO = 128 bytes
// between core matrices along K, SBO = 1024 bytes between groups of 8 rows.
//
// Without sm_90a (other architectures, and the host emulation in CI) `wgmma_e4m3` computes the
// same fragment on the CUDA cores, reading the operands through the descriptors exactly as the PTX
// ISA defines them: what the emulated test checks is the kernel's layouts, descriptors, fragment
// indexing, pipeline and promotion.
#define WG_STAGES 4
#define WG_TILE_BYTES (128 * 128)
#define WG_STAGE_BYTES (2 * WG_TILE_BYTES)
#define WG_SMEM_BYTES (WG_STAGES * WG_STAGE_BYTES)
#define WG_LBO 128
#define WG_SBO 1024

// Byte (r, kk) of a 128-row, 128-byte-deep operand tile in the canonical layout above.
__device__ __forceinline__ int wg_offset(int r, int kk) {
  return (r >> 3) * WG_SBO + (kk >> 4) * WG_LBO + (r & 7) * 16 + (kk & 15);
}

// The shared-memory address of a generic pointer into shared memory, and back.
__device__ __forceinline__ u32 smem_u32(const void* p) {
#ifdef SHOAL_EMU
  return (u32)((const u8*)p - emu::dynamic_smem());
#else
  u64 a;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
  return (u32)a;
#endif
}
__device__ __forceinline__ const u8* smem_ptr(u32 addr) {
#ifdef SHOAL_EMU
  return emu::dynamic_smem() + addr;
#else
  u64 p;
  asm("cvta.shared.u64 %0, %1;" : "=l"(p) : "l"((u64)addr));
  return (const u8*)p;
#endif
}

// A WGMMA matrix descriptor: start address, LBO and SBO (each >> 4), no swizzle, base offset 0.
__device__ __forceinline__ u64 wg_desc(u32 addr) {
  return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(WG_LBO >> 4) << 16) | ((u64)(WG_SBO >> 4) << 32);
}

// The byte a descriptor places at (row, kk) of its operand (K-major, no swizzle): the PTX ISA's
// canonical layout, decoded field by field.
__device__ __forceinline__ u8 desc_byte(u64 desc, int row, int kk) {
  const u32 start = (u32)(desc & 0x3FFFu) << 4;
  const u32 lbo = (u32)((desc >> 16) & 0x3FFFu) << 4;
  const u32 sbo = (u32)((desc >> 32) & 0x3FFFu) << 4;
  return *smem_ptr(start + (u32)(row >> 3) * sbo + (u32)(kk >> 4) * lbo + (u32)(row & 7) * 16 + (u32)(kk & 15));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
#ifdef SHOAL_EMU
  emu::cp_async16(dst, src, bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef SHOAL_EMU
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef SHOAL_EMU
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SHOAL_WGMMA 1
#endif

// Keeps the compiler from moving accumulator registers across the asynchronous WGMMA.
__device__ __forceinline__ void fence_fragment(float* d) {
#ifdef SHOAL_WGMMA
  asm volatile("" : "+f"(d[0]) :: "memory");
  asm volatile("" : "+f"(d[1]) :: "memory");
  asm volatile("" : "+f"(d[2]) :: "memory");
  asm volatile("" : "+f"(d[3]) :: "memory");
  asm volatile("" : "+f"(d[4]) :: "memory");
  asm volatile("" : "+f"(d[5]) :: "memory");
  asm volatile("" : "+f"(d[6]) :: "memory");
  asm volatile("" : "+f"(d[7]) :: "memory");
  asm volatile("" : "+f"(d[8]) :: "memory");
  asm volatile("" : "+f"(d[9]) :: "memory");
  asm volatile("" : "+f"(d[10]) :: "memory");
  asm volatile("" : "+f"(d[11]) :: "memory");
  asm volatile("" : "+f"(d[12]) :: "memory");
  asm volatile("" : "+f"(d[13]) :: "memory");
  asm volatile("" : "+f"(d[14]) :: "memory");
  asm volatile("" : "+f"(d[15]) :: "memory");
  asm volatile("" : "+f"(d[16]) :: "memory");
  asm volatile("" : "+f"(d[17]) :: "memory");
  asm volatile("" : "+f"(d[18]) :: "memory");
  asm volatile("" : "+f"(d[19]) :: "memory");
  asm volatile("" : "+f"(d[20]) :: "memory");
  asm volatile("" : "+f"(d[21]) :: "memory");
  asm volatile("" : "+f"(d[22]) :: "memory");
  asm volatile("" : "+f"(d[23]) :: "memory");
  asm volatile("" : "+f"(d[24]) :: "memory");
  asm volatile("" : "+f"(d[25]) :: "memory");
  asm volatile("" : "+f"(d[26]) :: "memory");
  asm volatile("" : "+f"(d[27]) :: "memory");
  asm volatile("" : "+f"(d[28]) :: "memory");
  asm volatile("" : "+f"(d[29]) :: "memory");
  asm volatile("" : "+f"(d[30]) :: "memory");
  asm volatile("" : "+f"(d[31]) :: "memory");
  asm volatile("" : "+f"(d[32]) :: "memory");
  asm volatile("" : "+f"(d[33]) :: "memory");
  asm volatile("" : "+f"(d[34]) :: "memory");
  asm volatile("" : "+f"(d[35]) :: "memory");
  asm volatile("" : "+f"(d[36]) :: "memory");
  asm volatile("" : "+f"(d[37]) :: "memory");
  asm volatile("" : "+f"(d[38]) :: "memory");
  asm volatile("" : "+f"(d[39]) :: "memory");
  asm volatile("" : "+f"(d[40]) :: "memory");
  asm volatile("" : "+f"(d[41]) :: "memory");
  asm volatile("" : "+f"(d[42]) :: "memory");
  asm volatile("" : "+f"(d[43]) :: "memory");
  asm volatile("" : "+f"(d[44]) :: "memory");
  asm volatile("" : "+f"(d[45]) :: "memory");
  asm volatile("" : "+f"(d[46]) :: "memory");
  asm volatile("" : "+f"(d[47]) :: "memory");
  asm volatile("" : "+f"(d[48]) :: "memory");
  asm volatile("" : "+f"(d[49]) :: "memory");
  asm volatile("" : "+f"(d[50]) :: "memory");
  asm volatile("" : "+f"(d[51]) :: "memory");
  asm volatile("" : "+f"(d[52]) :: "memory");
  asm volatile("" : "+f"(d[53]) :: "memory");
  asm volatile("" : "+f"(d[54]) :: "memory");
  asm volatile("" : "+f"(d[55]) :: "memory");
  asm volatile("" : "+f"(d[56]) :: "memory");
  asm volatile("" : "+f"(d[57]) :: "memory");
  asm volatile("" : "+f"(d[58]) :: "memory");
  asm volatile("" : "+f"(d[59]) :: "memory");
  asm volatile("" : "+f"(d[60]) :: "memory");
  asm volatile("" : "+f"(d[61]) :: "memory");
  asm volatile("" : "+f"(d[62]) :: "memory");
  asm volatile("" : "+f"(d[63]) :: "memory");
#endif
}

// d[64] (+)= A[64 x 32] . B[128 x 32]^T for the calling thread's fragment (`scale_d` = 0: d = A.B).
__device__ __forceinline__ void wgmma_e4m3(float* d, u64 da, u64 db, int scale_d) {
#ifdef SHOAL_WGMMA
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
#else
  const int t = threadIdx.x & 127;
  const int wq = t >> 5;
  const int lane = t & 31;
  for (int j = 0; j < 16; j++)
    for (int h = 0; h < 2; h++)
      for (int e = 0; e < 2; e++) {
        const int row = wq * 16 + (lane >> 2) + 8 * h;
        const int col = j * 8 + (lane & 3) * 2 + e;
        float s = 0.0f;
        for (int kk = 0; kk < 32; kk++)
          s += fp8_decode(desc_byte(da, row, kk), SHOAL_E4M3) * fp8_decode(desc_byte(db, col, kk), SHOAL_E4M3);
        float& out = d[j * 4 + h * 2 + e];
        out = scale_d ? out + s : s;
      }
#endif
}
__device__ __forceinline__ void wgmma_begin() {
#ifdef SHOAL_WGMMA
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_end() {
#ifdef SHOAL_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#endif
}
// Orders this thread's completed shared-memory writes before the tensor cores (the async proxy)
// read them.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef SHOAL_WGMMA
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// The same contract as fp8_gemm_grouped; launched with WG_SMEM_BYTES of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(256, 1)
fp8_gemm_wgmma(const u8* __restrict__ A, const float* __restrict__ sa, const u8* __restrict__ B,
               const float* __restrict__ sb, float* __restrict__ C,
               const int* __restrict__ seg_end, const int* __restrict__ tile_group,
               const int* __restrict__ tile_row0, int n, int k, int b_scale_rows) {
#ifdef SHOAL_EMU
  u8* const smem = emu::dynamic_smem();
#else
  extern __shared__ __align__(1024) u8 wg_smem[];
  u8* const smem = wg_smem;
#endif
  const int t = blockIdx.y;
  const int g = tile_group[t];
  const int row0 = tile_row0[t];
  const int row_end = min(row0 + 128, seg_end[g]);
  const int n0 = blockIdx.x * 128;
  const int kb = (k + 127) / 128;
  const int sb_rows = (n + b_scale_rows - 1) / b_scale_rows;
  const u8* Bg = B + (i64)g * n * k;
  const float* sbg = sb + (i64)g * sb_rows * kb;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = tid >> 7;        // warpgroup: rows 64 * wg ..
  const int wq = warp & 3;        // warp within the warpgroup: 16 rows each

  // Copies K block `kbi` into stage `s`: each warp request covers 8 rows x 64 contiguous bytes
  // (whole sectors), each 8-lane phase one 128-byte core matrix (no bank conflicts).
  auto load = [&](int s, int kbi) {
    u8* st = smem + s * WG_STAGE_BYTES;
    const int k0 = kbi * 128;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int q = warp * 4 + i;
      const int r = (q >> 1) * 8 + (lane & 7);
      const int c = ((q & 1) * 4 + (lane >> 3)) * 16;
      const bool kin = k0 + c < k;
      const bool ain = kin && row0 + r < row_end;
      const bool bin = kin && n0 + r < n;
      cp_async16(st + wg_offset(r, c), ain ? A + (i64)(row0 + r) * k + k0 + c : A, ain ? 16 : 0);
      cp_async16(st + WG_TILE_BYTES + wg_offset(r, c), bin ? Bg + (i64)(n0 + r) * k + k0 + c : Bg, bin ? 16 : 0);
    }
  };

  float acc[64];
  float part[64];
#pragma unroll
  for (int i = 0; i < 64; i++) {
    acc[i] = 0.0f;
    part[i] = 0.0f;
  }

#pragma unroll
  for (int s = 0; s < WG_STAGES - 1; s++) {
    if (s < kb) load(s, s);
    cp_async_commit();
  }
  const int r_lo = row0 + wg * 64 + wq * 16 + (lane >> 2);
  for (int kbi = 0; kbi < kb; kbi++) {
    cp_async_wait<WG_STAGES - 2>();
    fence_proxy_async();
    __syncthreads();
    // Refill the stage every warpgroup finished with in the previous iteration.
    if (kbi + WG_STAGES - 1 < kb) load((kbi + WG_STAGES - 1) % WG_STAGES, kbi + WG_STAGES - 1);
    cp_async_commit();

    const u8* st = smem + (kbi % WG_STAGES) * WG_STAGE_BYTES;
    const u32 a_addr = smem_u32(st) + wg * 8 * WG_SBO;
    const u32 b_addr = smem_u32(st + WG_TILE_BYTES);
    // The register fence first (the previous block's promotion read `part`), then WGMMA's own.
    fence_fragment(part);
    wgmma_begin();
#pragma unroll
    for (int s = 0; s < 4; s++) wgmma_e4m3(part, wg_desc(a_addr + s * 2 * WG_LBO), wg_desc(b_addr + s * 2 * WG_LBO), s);
    wgmma_end();
    fence_fragment(part);

    // Promotion.
    const float s_lo = r_lo < row_end ? sa[(i64)r_lo * kb + kbi] : 0.0f;
    const float s_hi = r_lo + 8 < row_end ? sa[(i64)(r_lo + 8) * kb + kbi] : 0.0f;
    const float s_blk = b_scale_rows == 128 ? sbg[(i64)(n0 / 128) * kb + kbi] : 0.0f;
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int c = n0 + j * 8 + (lane & 3) * 2 + e;
        const float s_b = b_scale_rows == 128 ? s_blk : (c < n ? sbg[(i64)(c / b_scale_rows) * kb + kbi] : 0.0f);
        acc[j * 4 + e] += part[j * 4 + e] * (s_lo * s_b);
        acc[j * 4 + 2 + e] += part[j * 4 + 2 + e] * (s_hi * s_b);
      }
  }

#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int r = r_lo + 8 * h;
    if (r >= row_end) continue;
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int c = n0 + j * 8 + (lane & 3) * 2 + e;
        if (c < n) C[(i64)r * n + c] = acc[j * 4 + h * 2 + e];
      }
  }
}
