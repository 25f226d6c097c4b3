// Expert-parallel dispatch and combine: one warp-specialized kernel moves rows between ranks in two
// hops over fixed-size ring buffers in peer-visible memory, as DeepEP's normal kernels do.
//
// Ranks are numbered node-major (rank = node * local + local_index). A row from rank s to rank d
//  * dispatch: first to the proxy (node(d), local(s)) - the one inter-node hop - then to d over the
//    node's NVLink domain, so a row crosses each node boundary once even when it goes to several
//    ranks of that node (the proxy fans it out);
//  * combine: first to the proxy (node(s), local(d)) inside the sender's node, then across to d.
//
// Every block (one per SM given to the transfer, per rank) owns a contiguous range of its rank's
// rows and its own channels. Its warps have fixed roles:
//   warp 0      sender     reads its rows and pushes them into the hop-0 rings of their proxies;
//   warp 1      forwarder  drains this rank's inbound hop-0 rings and pushes into hop-1 rings;
//   warps 2..   receivers  drain this rank's inbound hop-1 rings into the output rows.
// Each ring has one producer warp and one consumer warp: the producer writes a slot, then publishes
// the tail with a release store; the consumer acquires the tail, copies the slot out, and publishes
// the head. End-of-stream is a slot with the done flag. A wait longer than spin_limit clock cycles
// records an error and ends the kernel instead of hanging.
//
// Output row positions are computed on the host from the routing (source-major order), so the
// result does not depend on timing: a dispatch equals the CPU transport's row for row.

#define RING_HDR 256
#define SLOT_HDR 128
#define MAX_ENTRIES 8

struct TwoHopRank {
  const u8* in0;      // [rows, len0] bytes (dispatch: FP8 codes; combine: BF16 rows)
  const u8* in1;      // [rows, len1] bytes (dispatch: FP32 tile scales; combine: unused)
  const int* dest;    // [rows, maxd] final destination rank of each entry, -1 unused
  const int* pos;     // [rows, maxd] row index at that destination
  int rows;
  int pad_;
  u8* out0;           // [received, len0]
  u8* out1;           // [received, len1]
  int* out_meta;      // [received, 3]: source rank, source row, entry index (dispatch), or null
  u8* rings;          // this rank's inbound rings (peer-visible)
};

struct SlotHeader {
  int src_rank;
  int src_row;
  int count;  // entries that follow
  int done;   // end of stream
  int entry[MAX_ENTRIES][3];  // (destination rank, position, entry index)
};

#ifdef SHOAL_EMU
__device__ __forceinline__ u64 ld_acquire(const u64* p) {
  std::this_thread::yield();
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
__device__ __forceinline__ void st_release(u64* p, u64 v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
__device__ __forceinline__ uint4 ld_cg4(const void* p) {
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
__device__ __forceinline__ u32 ld_cg1(const void* p) {
  u32 v;
  std::memcpy(&v, p, 4);
  return v;
}
#else
__device__ __forceinline__ u64 ld_acquire(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint4 ld_cg4(const void* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ u32 ld_cg1(const void* p) {
  u32 v;
  asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
#endif

// Copies `bytes` (a multiple of 4) with the whole warp; 16-byte words when everything is aligned.
// `coherent` reads bypass L1 (for ring slots another GPU or block has written).
__device__ __forceinline__ void warp_copy(u8* dst, const u8* src, int bytes, bool coherent) {
  const int lane = threadIdx.x & 31;
  if ((((u64)dst | (u64)src | (u64)bytes) & 15u) == 0) {
    for (int o = lane * 16; o < bytes; o += 32 * 16) {
      *(uint4*)(dst + o) = coherent ? ld_cg4(src + o) : *(const uint4*)(src + o);
    }
  } else {
    for (int o = lane * 4; o < bytes; o += 32 * 4) {
      *(u32*)(dst + o) = coherent ? ld_cg1(src + o) : *(const u32*)(src + o);
    }
  }
}

struct Ring {
  u64* tail;  // written by the producer
  u64* head;  // written by the consumer
  u8* slots;
};

struct Geometry {
  int ranks, local, ctas, slots, slot_bytes, len0, len1;
  i64 ring_bytes;
};

// The ring of hop `hop`, channel `cta`, from `sender`, in the buffer of `owner`.
__device__ __forceinline__ Ring ring_of(const TwoHopRank* ranks, const Geometry& g, int owner,
                                        int hop, int cta, int sender) {
  u8* base = ranks[owner].rings + ((i64)(hop * g.ctas + cta) * g.ranks + sender) * g.ring_bytes;
  Ring r;
  r.tail = (u64*)base;
  r.head = (u64*)(base + 128);
  r.slots = base + RING_HDR;
  return r;
}

// Waits (lane 0 spins, the warp follows) until the ring has a free slot; returns the slot index
// to write, or -1 on timeout.
__device__ int wait_free(const Ring& r, u64 tail, int slots, i64 spin_limit, int* error) {
  const int lane = threadIdx.x & 31;
  int ok = 1;
  if (lane == 0) {
    const i64 start = clock64();
    while (tail - ld_acquire(r.head) >= (u64)slots) {
      if (clock64() - start > spin_limit || *(volatile int*)error != 0) {
        atomicCAS(error, 0, 1);
        ok = 0;
        break;
      }
    }
  }
  ok = __shfl_sync(0xffffffffu, ok, 0);
  // Orders lane 0's acquire before the other lanes' writes to the slot (a shuffle alone does not).
  __syncwarp();
  return ok ? (int)(tail % (u64)slots) : -1;
}

// Lane 0 publishes `tail` after the warp's writes to the slot.
__device__ __forceinline__ void publish(u64* p, u64 v) {
  __syncwarp();
  if ((threadIdx.x & 31) == 0) {
    __threadfence_system();
    st_release(p, v);
  }
  __syncwarp();
}

__device__ __forceinline__ int proxy_of(int src, int dst, int local, int combine) {
  return combine ? (src / local) * local + dst % local : (dst / local) * local + src % local;
}

// Pushes one slot: header `h` (already in registers of every lane) and the payload rows.
__device__ bool push(const Ring& r, u64* tail, const Geometry& g, const SlotHeader& h,
                     const u8* p0, const u8* p1, bool coherent, i64 spin_limit, int* error) {
  const int s = wait_free(r, *tail, g.slots, spin_limit, error);
  if (s < 0) return false;
  u8* slot = r.slots + (i64)s * g.slot_bytes;
  const int lane = threadIdx.x & 31;
  if (lane < (int)(sizeof(SlotHeader) / 4)) ((int*)slot)[lane] = ((const int*)&h)[lane];
  if (!h.done) {
    warp_copy(slot + SLOT_HDR, p0, g.len0, coherent);
    if (g.len1 > 0) warp_copy(slot + SLOT_HDR + ((g.len0 + 15) & ~15), p1, g.len1, coherent);
  }
  *tail += 1;
  publish(r.tail, *tail);
  return true;
}

// Reads the header of the slot at `head` if one is published; returns false if the ring is empty.
__device__ __forceinline__ bool peek(const Ring& r, u64 head, const Geometry& g, SlotHeader* h,
                                     const u8** payload) {
  const int lane = threadIdx.x & 31;
  int ready = 0;
  if (lane == 0) ready = ld_acquire(r.tail) > head;
  ready = __shfl_sync(0xffffffffu, ready, 0);
  if (!ready) return false;
  // Orders lane 0's acquire before the other lanes' reads of the slot.
  __syncwarp();
  const u8* slot = r.slots + (i64)(head % (u64)g.slots) * g.slot_bytes;
  int v = 0;
  if (lane < (int)(sizeof(SlotHeader) / 4)) v = (int)ld_cg1(slot + lane * 4);
  for (int i = 0; i < (int)(sizeof(SlotHeader) / 4); i++) ((int*)h)[i] = __shfl_sync(0xffffffffu, v, i);
  *payload = slot + SLOT_HDR;
  return true;
}

extern "C" __global__ void two_hop(const TwoHopRank* __restrict__ ranks, int rank_base, int nranks,
                                   int local, int len0, int len1, int maxd, int slots,
                                   int slot_bytes, i64 ring_bytes, int combine, i64 spin_limit,
                                   int* error) {
  Geometry g;
  g.ranks = nranks;
  g.local = local;
  g.ctas = gridDim.x;
  g.slots = slots;
  g.slot_bytes = slot_bytes;
  g.len0 = len0;
  g.len1 = len1;
  g.ring_bytes = ring_bytes;
  const int me = rank_base + blockIdx.y;
  const int cta = blockIdx.x;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int nodes = nranks / local;
  const int off1 = (len0 + 15) & ~15;
  const TwoHopRank mine = ranks[me];

  if (warp == 0) {
    // Sender: this block's rows, one slot per (row, proxy) with every entry behind that proxy.
    const int per = (mine.rows + g.ctas - 1) / g.ctas;
    const int r0 = min(mine.rows, cta * per);
    const int r1 = min(mine.rows, r0 + per);
    u64 tails[64];  // per proxy; proxies of one sender number at most max(nodes, local) <= 64
    for (int i = 0; i < 64; i++) tails[i] = 0;
    for (int row = r0; row < r1; row++) {
      for (int j = 0; j < maxd; j++) {
        const int d = mine.dest[(i64)row * maxd + j];
        if (d < 0) continue;
        const int p = proxy_of(me, d, local, combine);
        bool seen = false;
        for (int i = 0; i < j; i++) {
          const int di = mine.dest[(i64)row * maxd + i];
          if (di >= 0 && proxy_of(me, di, local, combine) == p) seen = true;
        }
        if (seen) continue;
        // Every entry behind proxy p, at most MAX_ENTRIES per slot.
        int i = j;
        while (i < maxd) {
          SlotHeader h;
          h.src_rank = me;
          h.src_row = row;
          h.done = 0;
          h.count = 0;
          for (; i < maxd && h.count < MAX_ENTRIES; i++) {
            const int di = mine.dest[(i64)row * maxd + i];
            if (di >= 0 && proxy_of(me, di, local, combine) == p) {
              h.entry[h.count][0] = di;
              h.entry[h.count][1] = mine.pos[(i64)row * maxd + i];
              h.entry[h.count][2] = i;
              h.count++;
            }
          }
          if (h.count == 0) break;
          const int slot_of_p = combine ? p % local : p / local;
          const Ring r = ring_of(ranks, g, p, 0, cta, me);
          if (!push(r, &tails[slot_of_p], g, h, mine.in0 + (i64)row * len0,
                    mine.in1 + (i64)row * len1, false, spin_limit, error))
            return;
        }
      }
    }
    // End of stream to every proxy this rank can use.
    const int np = combine ? local : nodes;
    for (int i = 0; i < np; i++) {
      const int p = combine ? (me / local) * local + i : i * local + me % local;
      SlotHeader h;
      h.src_rank = me;
      h.src_row = -1;
      h.count = 0;
      h.done = 1;
      const Ring r = ring_of(ranks, g, p, 0, cta, me);
      if (!push(r, &tails[i], g, h, nullptr, nullptr, false, spin_limit, error)) return;
    }
  } else if (warp == 1) {
    // Forwarder: inbound hop-0 rings from this rank's senders, out to the final ranks.
    const int nin = combine ? local : nodes;
    const int nout = combine ? nodes : local;
    u64 heads[64];
    u64 tails[64];
    bool done[64];
    for (int i = 0; i < 64; i++) {
      heads[i] = 0;
      tails[i] = 0;
      done[i] = false;
    }
    int remaining = nin;
    i64 start = clock64();
    while (remaining > 0) {
      bool progress = false;
      for (int i = 0; i < nin; i++) {
        if (done[i]) continue;
        const int s = combine ? (me / local) * local + i : i * local + me % local;
        const Ring r = ring_of(ranks, g, me, 0, cta, s);
        SlotHeader h;
        const u8* payload;
        if (!peek(r, heads[i], g, &h, &payload)) continue;
        progress = true;
        if (h.done) {
          done[i] = true;
          remaining--;
        } else {
          for (int e = 0; e < h.count; e++) {
            const int d = h.entry[e][0];
            SlotHeader o;
            o.src_rank = h.src_rank;
            o.src_row = h.src_row;
            o.count = 1;
            o.done = 0;
            o.entry[0][0] = d;
            o.entry[0][1] = h.entry[e][1];
            o.entry[0][2] = h.entry[e][2];
            const int out_i = combine ? d / local : d % local;
            const Ring w = ring_of(ranks, g, d, 1, cta, me);
            if (!push(w, &tails[out_i], g, o, payload, payload + off1, true, spin_limit, error))
              return;
          }
        }
        heads[i] += 1;
        publish(r.head, heads[i]);
      }
      if (progress) start = clock64();
      if (!progress && lane == 0 && clock64() - start > spin_limit) atomicCAS(error, 0, 2);
      if (__shfl_sync(0xffffffffu, lane == 0 ? *(volatile int*)error : 0, 0) != 0) return;
    }
    for (int i = 0; i < nout; i++) {
      const int d = combine ? i * local + me % local : (me / local) * local + i;
      SlotHeader h;
      h.src_rank = me;
      h.src_row = -1;
      h.count = 0;
      h.done = 1;
      const Ring w = ring_of(ranks, g, d, 1, cta, me);
      if (!push(w, &tails[i], g, h, nullptr, nullptr, false, spin_limit, error)) return;
    }
  } else {
    // Receivers: inbound hop-1 rings, split among the receiver warps.
    const int nrecv = (blockDim.x >> 5) - 2;
    const int rw = warp - 2;
    const int nin = combine ? nodes : local;
    u64 heads[64];
    bool done[64];
    int remaining = 0;
    for (int i = 0; i < 64; i++) {
      heads[i] = 0;
      done[i] = !(i < nin && i % nrecv == rw);
      if (!done[i]) remaining++;
    }
    i64 start = clock64();
    while (remaining > 0) {
      bool progress = false;
      for (int i = rw; i < nin; i += nrecv) {
        if (done[i]) continue;
        const int s = combine ? i * local + me % local : (me / local) * local + i;
        const Ring r = ring_of(ranks, g, me, 1, cta, s);
        SlotHeader h;
        const u8* payload;
        if (!peek(r, heads[i], g, &h, &payload)) continue;
        progress = true;
        if (h.done) {
          done[i] = true;
          remaining--;
        } else {
          const i64 p = h.entry[0][1];
          warp_copy(mine.out0 + p * len0, payload, len0, true);
          if (len1 > 0) warp_copy(mine.out1 + p * len1, payload + off1, len1, true);
          if (mine.out_meta != nullptr && lane == 0) {
            mine.out_meta[p * 3 + 0] = h.src_rank;
            mine.out_meta[p * 3 + 1] = h.src_row;
            mine.out_meta[p * 3 + 2] = h.entry[0][2];
          }
        }
        heads[i] += 1;
        publish(r.head, heads[i]);
      }
      if (progress) start = clock64();
      if (!progress && lane == 0 && clock64() - start > spin_limit) atomicCAS(error, 0, 3);
      if (__shfl_sync(0xffffffffu, lane == 0 ? *(volatile int*)error : 0, 0) != 0) return;
    }
  }
}

// The combine's last step on the source rank: out[row] = sum over the row's entries j (in entry
// order, FP32) of staged[row * maxd + j], BF16 rows of `hidden` values. Entries with dest < 0 are
// skipped. One block per row.
extern "C" __global__ void combine_reduce(const u16* __restrict__ staged, const int* __restrict__ dest,
                                          float* __restrict__ out, int rows, int maxd, int hidden) {
  const i64 row = blockIdx.x;
  if (row >= rows) return;
  for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
    float s = 0.0f;
    for (int j = 0; j < maxd; j++) {
      if (dest[row * maxd + j] < 0) continue;
      s += bf16_to_f32(staged[(row * maxd + j) * hidden + h]);
    }
    out[row * hidden + h] = s;
  }
}
