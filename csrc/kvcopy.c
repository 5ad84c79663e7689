/* kvrelay native host library: pack/unpack copies between a paged KV cache and a canonical chunk.
 *
 * Owns: bounds checks (nothing is written before every bound holds), the copy plan (contiguous runs
 * merged into single memcpy calls: a full NHD block of one plane is one 32 KiB run; jobs larger than
 * the stream threshold copy with non-temporal stores), cut into pieces for the worker pool (pool.c).
 * Must not touch: Python objects.
 */
#define _GNU_SOURCE
#include "kvcopy.h"
#include "ntcopy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- validation */

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); return -1; } while (0)

int kv_validate(const kv_job *j, char *err, size_t errlen) {
    if (j->num_kv != 1 && j->num_kv != 2) FAIL("num_kv must be 1 or 2, got %lld", (long long)j->num_kv);
    if (j->row_bytes <= 0) FAIL("row_bytes must be positive, got %lld", (long long)j->row_bytes);
    if (j->block_size <= 0 || j->num_blocks <= 0 || j->cache_heads <= 0)
        FAIL("cache geometry must be positive (num_blocks=%lld, block_size=%lld, heads=%lld)",
             (long long)j->num_blocks, (long long)j->block_size, (long long)j->cache_heads);
    if (j->block_stride < 0 || j->token_stride < 0 || j->head_stride < 0)
        FAIL("negative cache strides are not supported");
    if (j->token_start < 0 || j->token_end <= j->token_start)
        FAIL("token range [%lld, %lld) is empty or negative", (long long)j->token_start, (long long)j->token_end);
    __int128 need_ids = ((__int128)j->token_end + j->block_size - 1) / j->block_size;
    if (need_ids > j->num_ids)
        FAIL("token range [%lld, %lld) needs %lld blocks of %lld tokens, only %lld block ids given",
             (long long)j->token_start, (long long)j->token_end, (long long)need_ids,
             (long long)j->block_size, (long long)j->num_ids);
    if (j->num_heads <= 0 || j->cache_h0 < 0 || j->cache_h0 + j->num_heads > j->cache_heads)
        FAIL("cache heads [%lld, %lld) outside the cache's %lld heads", (long long)j->cache_h0,
             (long long)(j->cache_h0 + j->num_heads), (long long)j->cache_heads);
    if (j->chunk_h0 < 0 || j->chunk_h0 + j->num_heads > j->chunk_heads)
        FAIL("chunk heads [%lld, %lld) outside the chunk's %lld heads", (long long)j->chunk_h0,
             (long long)(j->chunk_h0 + j->num_heads), (long long)j->chunk_heads);
    __int128 chunk_need = (__int128)j->num_kv * (j->token_end - j->token_start) * j->chunk_heads * j->row_bytes;
    if (chunk_need > j->chunk_nbytes)
        FAIL("chunk buffer holds %lld bytes, %lld needed", (long long)j->chunk_nbytes, (long long)chunk_need);
    /* The farthest byte any (block, slot, head) row of a plane can reach must lie inside its tensor. */
    for (int kv = 0; kv < j->num_kv; kv++) {
        __int128 reach = (__int128)j->offset[kv] + (__int128)(j->num_blocks - 1) * j->block_stride +
                         (__int128)(j->block_size - 1) * j->token_stride +
                         (__int128)(j->cache_heads - 1) * j->head_stride + j->row_bytes;
        if (j->offset[kv] < 0 || reach > j->extent[kv])
            FAIL("plane %d reaches byte %lld of a %lld-byte tensor", kv, (long long)reach, (long long)j->extent[kv]);
    }
    int64_t first = j->token_start / j->block_size, last = (j->token_end - 1) / j->block_size;
    for (int64_t b = first; b <= last; b++) {
        int64_t id = j->ids[b];
        if (id < 0 || id >= j->num_blocks)
            FAIL("block id %lld (request block %lld) out of range [0, %lld)", (long long)id, (long long)b,
                 (long long)j->num_blocks);
    }
    return 0;
}

/* ---------------------------------------------------------------- copy plan */

typedef struct { char *dst; const char *src; size_t len; int stream; } run_t;

static inline void flush_run(run_t *r) {
    if (!r->len) return;
    if (r->stream && r->len >= 4096) nt_copy(r->dst, r->src, r->len);
    else memcpy(r->dst, r->src, r->len);
}

static inline void emit(run_t *r, char *dst, const char *src, size_t len) {
    if (r->len && r->dst + r->len == dst && r->src + r->len == src) { r->len += len; return; }
    flush_run(r);
    r->dst = dst; r->src = src; r->len = len;
}

static inline void copy_pair(run_t *r, int pack, char *cache, char *chunk, size_t len) {
    if (pack) emit(r, chunk, cache, len); else emit(r, cache, chunk, len);
}

/* Jobs this large write with streaming stores.  Below it the chunk is likely still cached when it is
 * read next (checksum, transport), and a repeated copy may stay in the last-level cache (32 MiB here;
 * sysconf's figure is unreliable in VMs, so this is a fixed default, configurable). */
static int64_t stream_threshold = (int64_t)16 << 20;

/* Copy flat (kv, token) indexes [lo, hi) of the job, where flat = kv * T + (token - token_start). */
static void run_range(const kv_job *j, int64_t lo, int64_t hi, int stream) {
    const int64_t T = j->token_end - j->token_start, bs = j->block_size, row = j->row_bytes;
    const int64_t nh = j->num_heads, ch = j->chunk_heads;
    const int64_t chunk_tok = ch * row;                           /* chunk bytes per token */
    const int heads_dense = j->head_stride == row;                /* a token's heads are one run */
    const int tokens_dense = heads_dense && j->token_stride == nh * row && (ch == nh);
    run_t r = {0};
    r.stream = stream;
    int64_t flat = lo;
    while (flat < hi) {
        int64_t kv = flat / T, i = flat % T;
        int64_t stop = (kv + 1) * T < hi ? (kv + 1) * T : hi;     /* stay within this plane */
        int64_t t = j->token_start + i, b = t / bs, slot = t % bs;
        int64_t n = bs - slot;                                    /* tokens left in this block */
        if (n > stop - flat) n = stop - flat;
        char *cache = j->base[kv] + j->offset[kv] + j->ids[b] * j->block_stride + slot * j->token_stride +
                      j->cache_h0 * j->head_stride;
        char *chunk = j->chunk + (kv * T + i) * chunk_tok + j->chunk_h0 * row;
        if (tokens_dense) {
            copy_pair(&r, j->pack, cache, chunk, (size_t)(n * nh * row));
        } else if (heads_dense) {
            for (int64_t s = 0; s < n; s++)
                copy_pair(&r, j->pack, cache + s * j->token_stride, chunk + s * chunk_tok, (size_t)(nh * row));
        } else {
            for (int64_t s = 0; s < n; s++)
                for (int64_t h = 0; h < nh; h++)
                    copy_pair(&r, j->pack, cache + s * j->token_stride + h * j->head_stride,
                              chunk + s * chunk_tok + h * row, (size_t)row);
        }
        flat += n;
    }
    flush_run(&r);
    if (r.stream) nt_fence();
}

/* ---------------------------------------------------------------- pieces for the pool */

#define PIECE_BYTES (256 * 1024)

typedef struct { const kv_job *j; int64_t piece_flat, total; int stream; } kv_ctx;

static void kv_piece(void *arg, int64_t p) {
    const kv_ctx *c = arg;
    int64_t lo = p * c->piece_flat, hi = lo + c->piece_flat < c->total ? lo + c->piece_flat : c->total;
    run_range(c->j, lo, hi, c->stream);
}

int64_t kv_run(const kv_job *j) {
    const int64_t total = j->num_kv * (j->token_end - j->token_start);
    const int64_t bytes = total * j->num_heads * j->row_bytes;
    const int threads = kv_get_threads();
    int64_t pf = PIECE_BYTES / (j->num_heads * j->row_bytes);
    if (pf < 1) pf = 1;
    if (pf * threads > total) pf = (total + threads - 1) / threads; /* small jobs: one piece each */
    kv_ctx c = {j, pf, total, bytes >= stream_threshold};
    pool_run(kv_piece, &c, (total + pf - 1) / pf, bytes);
    return bytes;
}

void kv_set_stream_threshold(int64_t nbytes) { stream_threshold = nbytes < 0 ? 0 : nbytes; }
int64_t kv_get_stream_threshold(void) { return stream_threshold; }
