// The rest of what the model's training step needs on the GPU, on FP32 tensors: causal attention
// (forward keeping the log-sum-exp, backward recomputing the probabilities from it), the RMSNorm
// weight gradient, embedding rows and their table gradient, column and row copies (the heads'
// split/join, MoE gathers and weighted scatters), per-row dot products, y += x and a sum of
// squares, and the BF16 conversions of the mixed-precision linears. Every reduction runs in a
// fixed order (no atomics), so a step is deterministic.

// ---- attention ---------------------------------------------------------------------------------
// q, k: [batch, seq, heads, dk]; v, out, dout: [batch, seq, heads, dv]; lse: [batch, heads, seq].
// Query i attends to keys 0..=i. Each block of ATT_BR warps takes ATT_BR consecutive rows of one
// (batch, head) (grid: batch * heads * ceil(seq / ATT_BR) blocks, see `att_warp`); the other
// side's rows stream through shared memory ATT_BC at a time, loaded once for the block's ATT_BR
// warps, so each K/V (or Q/dO) row is read from global memory once per block rather than once per
// warp. Within a warp, lanes split the head dimensions of each dot product and own output
// dimensions lane, lane + 32, ... (dk <= ATT_MAX_DK, dv <= ATT_MAX_DV). Every warp visits its keys
// (queries) one at a time in increasing order, so the arithmetic, and the result, do not depend on
// the tiling.

#define ATT_BR 8
#define ATT_BC 16
#define ATT_MAX_DK 256
#define ATT_MAX_DV 128

// This warp's place: the block's (batch, head), first and last rows, and the warp's row `row`
// (`first + warp`), which is `active` when inside the sequence (idle warps still load tiles and
// synchronize); `at` indexes the row (clamped into the sequence) in [batch, seq, heads], `bh` the
// (batch, head) in [batch, heads, seq].
struct AttWarp {
  int b, h, first, last, row;
  bool active;
  i64 at, bh;
};
__device__ __forceinline__ AttWarp att_warp(int seq, int heads) {
  const int tiles = (seq + ATT_BR - 1) / ATT_BR;
  AttWarp r;
  r.first = (int)(blockIdx.x % tiles) * ATT_BR;
  r.h = (int)((blockIdx.x / tiles) % heads);
  r.b = (int)(blockIdx.x / ((unsigned)tiles * heads));
  r.last = min(r.first + ATT_BR, seq) - 1;
  r.row = r.first + (int)(threadIdx.x >> 5);
  r.active = r.row < seq;
  r.at = ((i64)r.b * seq + min(r.row, seq - 1)) * heads + r.h;
  r.bh = ((i64)r.b * heads + r.h) * seq;
  return r;
}

// The (sequence, head, position) of warp-row `row`, rows ordered [batch, heads, seq].
struct AttRow {
  int b, h, i;
};
__device__ __forceinline__ AttRow att_row(i64 row, int seq, int heads) {
  AttRow r;
  r.i = (int)(row % seq);
  r.h = (int)((row / seq) % heads);
  r.b = (int)(row / ((i64)seq * heads));
  return r;
}

__device__ __forceinline__ float warp_dot(const float* a, const float* b, int n, int lane) {
  float s = 0.0f;
  for (int i = lane; i < n; i += 32) s += a[i] * b[i];
  return warp_sum(s);
}

// Copies rows first..first+n-1 of (b, h) from x ([batch, seq, heads, d]) into tile [n, d], with
// every thread of the block.
__device__ __forceinline__ void att_load(float* tile, const float* __restrict__ x, int b, int h, int first, int n,
                                         int seq, int heads, int d) {
  for (int t = threadIdx.x; t < n * d; t += blockDim.x) {
    const int r = t / d, c = t - r * d;
    tile[t] = x[(((i64)b * seq + first + r) * heads + h) * d + c];
  }
}

extern "C" __global__ void attention_forward(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, float* __restrict__ out,
                                             float* __restrict__ lse, int batch, int seq, int heads,
                                             int dk, int dv, float scale) {
  __shared__ float ks[ATT_BC * ATT_MAX_DK];
  __shared__ float vs[ATT_BC * ATT_MAX_DV];
  const int lane = threadIdx.x & 31;
  const AttWarp w = att_warp(seq, heads);
  const int b = w.b, h = w.h, i = w.row, last = w.last;
  const bool active = w.active;
  const float* qi = q + w.at * dk;
  float acc[ATT_MAX_DV / 32];
  for (int c = 0; c < ATT_MAX_DV / 32; c++) acc[c] = 0.0f;
  float m = -1.0f / 0.0f, l = 0.0f;
  for (int j0 = 0; j0 <= last; j0 += ATT_BC) {
    const int n = min(ATT_BC, last + 1 - j0);
    att_load(ks, k, b, h, j0, n, seq, heads, dk);
    att_load(vs, v, b, h, j0, n, seq, heads, dv);
    __syncthreads();
    if (active) {
      for (int jj = 0; jj < n && j0 + jj <= i; jj++) {
        const float s = warp_dot(qi, ks + jj * dk, dk, lane) * scale;
        const float m2 = fmaxf(m, s);
        const float corr = expf(m - m2);
        const float p = expf(s - m2);
        l = l * corr + p;
        const float* vj = vs + jj * dv;
        for (int c = 0; c * 32 + lane < dv; c++) acc[c] = acc[c] * corr + p * vj[c * 32 + lane];
        m = m2;
      }
    }
    __syncthreads();
  }
  if (!active) return;
  float* oi = out + (((i64)b * seq + i) * heads + h) * dv;
  for (int c = 0; c * 32 + lane < dv; c++) oi[c * 32 + lane] = acc[c] / l;
  if (lane == 0) lse[((i64)b * heads + h) * seq + i] = m + logf(l);
}

// delta[b, h, i] = <dout_i, out_i> (the rowsum of P * dP), one warp per row.
extern "C" __global__ void attention_delta(const float* __restrict__ dout, const float* __restrict__ out,
                                           float* __restrict__ delta, int batch, int seq, int heads,
                                           int dv) {
  const int lane = threadIdx.x & 31;
  const i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (row >= (i64)batch * heads * seq) return;
  const AttRow at = att_row(row, seq, heads);
  const int i = at.i, h = at.h, b = at.b;
  const i64 o = (((i64)b * seq + i) * heads + h) * dv;
  const float d = warp_dot(dout + o, out + o, dv, lane);
  if (lane == 0) delta[((i64)b * heads + h) * seq + i] = d;
}

// dq_i = scale * sum_{j <= i} P_ij (dP_ij - delta_i) k_j, a warp per query row, the keys and
// values streaming through shared memory.
extern "C" __global__ void attention_backward_q(const float* __restrict__ dout, const float* __restrict__ q,
                                                const float* __restrict__ k, const float* __restrict__ v,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                float* __restrict__ dq, int batch, int seq, int heads,
                                                int dk, int dv, float scale) {
  __shared__ float ks[ATT_BC * ATT_MAX_DK];
  __shared__ float vs[ATT_BC * ATT_MAX_DV];
  const int lane = threadIdx.x & 31;
  const AttWarp w = att_warp(seq, heads);
  const int b = w.b, h = w.h, i = w.row, last = w.last;
  const bool active = w.active;
  const i64 qi = w.at, bh = w.bh;
  const float li = active ? lse[bh + i] : 0.0f, di = active ? delta[bh + i] : 0.0f;
  float acc[ATT_MAX_DK / 32];
  for (int c = 0; c < ATT_MAX_DK / 32; c++) acc[c] = 0.0f;
  for (int j0 = 0; j0 <= last; j0 += ATT_BC) {
    const int n = min(ATT_BC, last + 1 - j0);
    att_load(ks, k, b, h, j0, n, seq, heads, dk);
    att_load(vs, v, b, h, j0, n, seq, heads, dv);
    __syncthreads();
    if (active) {
      for (int jj = 0; jj < n && j0 + jj <= i; jj++) {
        const float* kj = ks + jj * dk;
        const float p = expf(warp_dot(q + qi * dk, kj, dk, lane) * scale - li);
        const float dp = warp_dot(dout + qi * dv, vs + jj * dv, dv, lane);
        const float ds = p * (dp - di);
        for (int c = 0; c * 32 + lane < dk; c++) acc[c] += ds * kj[c * 32 + lane];
      }
    }
    __syncthreads();
  }
  if (!active) return;
  for (int c = 0; c * 32 + lane < dk; c++) dq[qi * dk + c * 32 + lane] = acc[c] * scale;
}

// dk_j = scale * sum_{i >= j} dS_ij q_i and dv_j = sum_{i >= j} P_ij dout_i, a warp per key row,
// the queries, output gradients, log-sum-exps and deltas streaming through shared memory.
extern "C" __global__ void attention_backward_kv(const float* __restrict__ dout, const float* __restrict__ q,
                                                 const float* __restrict__ k, const float* __restrict__ v,
                                                 const float* __restrict__ lse, const float* __restrict__ delta,
                                                 float* __restrict__ dk_out, float* __restrict__ dv_out,
                                                 int batch, int seq, int heads, int dk, int dv, float scale) {
  __shared__ float qs[ATT_BC * ATT_MAX_DK];
  __shared__ float os[ATT_BC * ATT_MAX_DV];
  __shared__ float ls[ATT_BC], ds_[ATT_BC];
  const int lane = threadIdx.x & 31;
  const AttWarp w = att_warp(seq, heads);
  const int b = w.b, h = w.h, j = w.row;
  const bool active = w.active;
  const i64 kj = w.at, bh = w.bh;
  float ak[ATT_MAX_DK / 32], av[ATT_MAX_DV / 32];
  for (int c = 0; c < ATT_MAX_DK / 32; c++) ak[c] = 0.0f;
  for (int c = 0; c < ATT_MAX_DV / 32; c++) av[c] = 0.0f;
  // Queries before the block's first key attend to none of its keys.
  for (int i0 = w.first; i0 < seq; i0 += ATT_BC) {
    const int n = min(ATT_BC, seq - i0);
    att_load(qs, q, b, h, i0, n, seq, heads, dk);
    att_load(os, dout, b, h, i0, n, seq, heads, dv);
    for (int t = threadIdx.x; t < n; t += blockDim.x) {
      ls[t] = lse[bh + i0 + t];
      ds_[t] = delta[bh + i0 + t];
    }
    __syncthreads();
    if (active) {
      for (int ii = (j > i0 ? j - i0 : 0); ii < n; ii++) {
        const float* qi = qs + ii * dk;
        const float* oi = os + ii * dv;
        const float p = expf(warp_dot(qi, k + kj * dk, dk, lane) * scale - ls[ii]);
        const float dp = warp_dot(oi, v + kj * dv, dv, lane);
        const float ds = p * (dp - ds_[ii]);
        for (int c = 0; c * 32 + lane < dk; c++) ak[c] += ds * qi[c * 32 + lane];
        for (int c = 0; c * 32 + lane < dv; c++) av[c] += p * oi[c * 32 + lane];
      }
    }
    __syncthreads();
  }
  if (!active) return;
  for (int c = 0; c * 32 + lane < dk; c++) dk_out[kj * dk + c * 32 + lane] = ak[c] * scale;
  for (int c = 0; c * 32 + lane < dv; c++) dv_out[kj * dv + c * 32 + lane] = av[c];
}

// ---- norms, embeddings, copies -------------------------------------------------------------------

// rstd[r] = 1 / sqrt(mean(x_r^2) + eps), one warp per row (sums in FP64).
extern "C" __global__ void row_rstd(const float* __restrict__ x, float* __restrict__ rstd, int rows, int d,
                                    double eps) {
  const int lane = threadIdx.x & 31;
  const i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (row >= rows) return;
  double s = 0.0;
  for (int i = lane; i < d; i += 32) s += (double)x[row * d + i] * (double)x[row * d + i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) rstd[row] = (float)(1.0 / sqrt(s / d + eps));
}

// dw[c] += sum over rows (in order) of dy[r, c] * x[r, c] * rstd[r]; one thread per column.
extern "C" __global__ void rmsnorm_backward_weight(const float* __restrict__ x, const float* __restrict__ dy,
                                                   const float* __restrict__ rstd, float* __restrict__ dw,
                                                   int rows, int d) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= d) return;
  double s = 0.0;
  for (int r = 0; r < rows; r++) s += (double)dy[(i64)r * d + c] * (double)x[(i64)r * d + c] * (double)rstd[r];
  dw[c] += (float)s;
}

// out[i] = table[ids[i]]; one thread per element.
extern "C" __global__ void embedding_gather(const float* __restrict__ table, const unsigned* __restrict__ ids,
                                            float* __restrict__ out, i64 n, int d) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n * d; e += (i64)gridDim.x * blockDim.x) {
    out[e] = table[(i64)ids[e / d] * d + e % d];
  }
}

// dtable[uniq[u]] += sum of dy[rows[off[u]..off[u+1]]] in that order: the rows of each id, found
// on the host, summed without atomics. One thread per (id, column).
extern "C" __global__ void embedding_scatter(const float* __restrict__ dy, const unsigned* __restrict__ uniq,
                                             const unsigned* __restrict__ off, const unsigned* __restrict__ rows,
                                             float* __restrict__ dtable, int n_uniq, int d) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < (i64)n_uniq * d; e += (i64)gridDim.x * blockDim.x) {
    const int u = (int)(e / d);
    const int c = (int)(e % d);
    // Added into the gradient one row at a time, in order: the host's sums, bit for bit.
    float* o = dtable + (i64)uniq[u] * d + c;
    float s = *o;
    for (unsigned r = off[u]; r < off[u + 1]; r++) s += dy[(i64)rows[r] * d + c];
    *o = s;
  }
}

// dst[r, dst_off + g * dst_gs + c] (+)= src[r, src_off + g * src_gs + c] for c < width, g < groups:
// column blocks of row-major matrices (the heads' split, join and repeat; summing over heads is a
// sequence of accumulating copies).
extern "C" __global__ void copy_cols(const float* __restrict__ src, float* __restrict__ dst, int rows,
                                     int groups, int width, int src_ld, int src_off, int src_gs, int dst_ld,
                                     int dst_off, int dst_gs, int accumulate) {
  const i64 n = (i64)rows * groups * width;
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x) {
    const int c = (int)(e % width);
    const int g = (int)((e / width) % groups);
    const i64 r = e / ((i64)width * groups);
    const float v = src[r * src_ld + src_off + g * src_gs + c];
    float* o = dst + r * dst_ld + dst_off + g * dst_gs + c;
    *o = accumulate ? *o + v : v;
  }
}

// dst[i] = src[idx[i]] * (scale ? scale[i] : 1), rows of `width`.
extern "C" __global__ void gather_rows(const float* __restrict__ src, const unsigned* __restrict__ idx,
                                       const float* __restrict__ scale, float* __restrict__ dst, i64 n, int width) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n * width; e += (i64)gridDim.x * blockDim.x) {
    const i64 i = e / width;
    const float v = src[(i64)idx[i] * width + e % width];
    dst[e] = scale ? v * scale[i] : v;
  }
}

// dst[idx[i]] += src[i] * (scale ? scale[i] : 1); the indices of one call are distinct, so no two
// threads write one element.
extern "C" __global__ void scatter_add_rows(const float* __restrict__ src, const unsigned* __restrict__ idx,
                                            const float* __restrict__ scale, float* __restrict__ dst, i64 n,
                                            int width) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n * width; e += (i64)gridDim.x * blockDim.x) {
    const i64 i = e / width;
    const float v = src[e];
    dst[(i64)idx[i] * width + e % width] += scale ? v * scale[i] : v;
  }
}

// out[i] = <a[idx[i]], b[i]>, one warp per row.
extern "C" __global__ void row_dots(const float* __restrict__ a, const unsigned* __restrict__ idx,
                                    const float* __restrict__ b, float* __restrict__ out, int n, int width) {
  const int lane = threadIdx.x & 31;
  const i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (i >= n) return;
  const float d = warp_dot(a + (i64)idx[i] * width, b + i * width, width, lane);
  if (lane == 0) out[i] = d;
}

// y += x.
extern "C" __global__ void add_into(float* __restrict__ y, const float* __restrict__ x, i64 n) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x) y[e] += x[e];
}

// partial[block] = sum of x^2 over the block's grid-stride elements, in FP64 (the host adds the
// partials in order: deterministic for a fixed grid).
extern "C" __global__ void sum_sq_partial(const float* __restrict__ x, double* __restrict__ partial, i64 n) {
  __shared__ double red[32];
  double s = 0.0;
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x)
    s += (double)x[e] * (double)x[e];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) partial[blockIdx.x] = s;
  }
}

// ---- BF16 operands -----------------------------------------------------------------------------
// The mixed-precision linear layers' conversions (round to nearest even, as the CPU reference).

// y = x as BF16.
extern "C" __global__ void to_bf16(const float* __restrict__ x, u16* __restrict__ y, i64 n) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x)
    y[e] = bf16_from_f32(x[e]);
}

// x = x rounded to a BF16 value (kept in FP32).
extern "C" __global__ void round_bf16(float* __restrict__ x, i64 n) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x)
    x[e] = bf16_to_f32(bf16_from_f32(x[e]));
}
