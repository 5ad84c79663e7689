/* kvrelay native host library: pack/unpack copies between a paged KV cache and a canonical chunk.
 *
 * Owns: bounds checks (nothing is written before every bound holds), the copy plan (contiguous runs
 * merged into single memcpy calls: a full NHD block of one plane is one 32 KiB run; jobs larger than
 * the stream threshold copy with non-temporal stores) and a small persistent worker pool (the caller
 * is worker 0).  Must not touch: Python objects.
 */
#define _GNU_SOURCE
#include "kvcopy.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <emmintrin.h>

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

/* Copy with non-temporal (streaming) stores: no read-for-ownership of the destination lines and no
 * eviction of the cache's working set.  Used for jobs much larger than the last-level cache. */
static void copy_stream(char *dst, const char *src, size_t len) {
    size_t head = (size_t)(-(uintptr_t)dst & 15);
    if (head > len) head = len;
    memcpy(dst, src, head);
    dst += head; src += head; len -= head;
    size_t n64 = len / 64;
    for (size_t i = 0; i < n64; i++, dst += 64, src += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)src), b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32)), d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)dst, a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), c);
        _mm_stream_si128((__m128i *)(dst + 48), d);
    }
    memcpy(dst, src, len % 64);
}

static inline void flush_run(run_t *r) {
    if (!r->len) return;
    if (r->stream && r->len >= 4096) copy_stream(r->dst, r->src, r->len);
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
    if (r.stream) _mm_sfence();
}

/* ---------------------------------------------------------------- worker pool
 *
 * A job is cut into pieces of about PIECE_BYTES; the caller and the workers claim pieces with an atomic
 * counter, so a worker that the OS has descheduled (2 busy cores) does not hold the caller up: the
 * caller simply takes the remaining pieces.  A worker joins a job only while holding `mu` and while the
 * job is posted; the caller waits (under `mu`) until no worker is inside the job, then withdraws it, so
 * no worker ever sees a job after its caller has returned.
 */

#define PIECE_BYTES (256 * 1024)

static pthread_mutex_t submit_mu = PTHREAD_MUTEX_INITIALIZER; /* one pooled job at a time */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_work = PTHREAD_COND_INITIALIZER, cv_idle = PTHREAD_COND_INITIALIZER;
static int want_threads = 2, pool_threads = 0, shutting_down = 0, atfork_done = 0;
static pthread_t *workers = NULL;
static const kv_job *cur_job = NULL;  /* the posted job, NULL when none (guarded by mu) */
static int active = 0;                /* workers inside cur_job (guarded by mu) */
static int64_t piece_flat = 1, num_pieces = 0;
static int64_t next_piece = 0;        /* claimed with __atomic_fetch_add */
static int stream_job = 0;            /* the posted job uses streaming stores */
static uint64_t generation = 0, pool_start_gen = 0; /* workers start from pool_start_gen */
static int64_t parallel_threshold = 1 << 20;
/* Back-off: a worker preempted in the middle of a piece makes the caller wait for a whole scheduler
 * time slice (milliseconds, on busy cores).  When the caller waited longer than a quarter of its own
 * copying time, jobs run on the caller alone until backoff_until (monotonic ns). */
static int64_t backoff_ns = 50 * 1000 * 1000LL;
static int64_t backoff_until = 0;
static uint64_t backoffs = 0;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void claim_pieces(const kv_job *j) {
    const int64_t total = j->num_kv * (j->token_end - j->token_start);
    for (;;) {
        int64_t p = __atomic_fetch_add(&next_piece, 1, __ATOMIC_RELAXED);
        if (p >= num_pieces) return;
        int64_t lo = p * piece_flat, hi = lo + piece_flat < total ? lo + piece_flat : total;
        run_range(j, lo, hi, stream_job);
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&mu);
    uint64_t seen = pool_start_gen; /* not `generation`: a job may already have been posted */
    for (;;) {
        while (generation == seen && !shutting_down) pthread_cond_wait(&cv_work, &mu);
        if (shutting_down) break;
        seen = generation;
        const kv_job *j = cur_job;
        if (!j) continue; /* woke after the job was withdrawn: its caller did the work */
        active++;
        pthread_mutex_unlock(&mu);
        claim_pieces(j);
        pthread_mutex_lock(&mu);
        if (--active == 0) pthread_cond_signal(&cv_idle);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

/* fork(): the child has no workers; hold the locks across fork and reset the pool in the child. */
static void atfork_prepare(void) { pthread_mutex_lock(&submit_mu); pthread_mutex_lock(&mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&mu); pthread_mutex_unlock(&submit_mu); }
static void atfork_child(void) {
    pthread_mutex_init(&mu, NULL);
    pthread_mutex_init(&submit_mu, NULL);
    pthread_cond_init(&cv_work, NULL);
    pthread_cond_init(&cv_idle, NULL);
    free(workers);
    workers = NULL;
    pool_threads = 0;
    shutting_down = 0;
    active = 0;
    cur_job = NULL;
}

static void pool_stop_locked(void) { /* submit_mu held */
    if (!pool_threads) return;
    pthread_mutex_lock(&mu);
    shutting_down = 1;
    pthread_cond_broadcast(&cv_work);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < pool_threads - 1; i++) pthread_join(workers[i], NULL);
    free(workers);
    workers = NULL;
    pool_threads = 0;
    shutting_down = 0;
}

static int pool_start_locked(void) { /* submit_mu held */
    if (!atfork_done) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); atfork_done = 1; }
    int n = want_threads;
    pool_start_gen = generation;
    workers = calloc((size_t)(n > 1 ? n - 1 : 1), sizeof(pthread_t));
    if (!workers) return -1;
    int started = 0;
    for (int i = 1; i < n; i++) {
        if (pthread_create(&workers[i - 1], NULL, worker_main, NULL) != 0) break;
        started++;
    }
    pool_threads = started + 1;
    return 0;
}

int64_t kv_run(const kv_job *j) {
    const int64_t total = j->num_kv * (j->token_end - j->token_start);
    const int64_t flat_bytes = j->num_heads * j->row_bytes;
    int64_t bytes = total * flat_bytes;
    const int stream = bytes >= stream_threshold;
    if (want_threads <= 1 || bytes < parallel_threshold || now_ns() < __atomic_load_n(&backoff_until, __ATOMIC_RELAXED) ||
        pthread_mutex_trylock(&submit_mu) != 0) {
        run_range(j, 0, total, stream);
        return bytes;
    }
    if (pool_threads != want_threads) {
        pool_stop_locked();
        if (pool_start_locked() != 0 || pool_threads == 1) {
            pthread_mutex_unlock(&submit_mu);
            run_range(j, 0, total, stream);
            return bytes;
        }
    }
    int64_t pf = PIECE_BYTES / flat_bytes;
    if (pf < 1) pf = 1;
    if (pf * pool_threads > total) pf = (total + pool_threads - 1) / pool_threads; /* small jobs: one piece each */
    pthread_mutex_lock(&mu);
    piece_flat = pf;
    stream_job = stream;
    num_pieces = (total + pf - 1) / pf;
    __atomic_store_n(&next_piece, 0, __ATOMIC_RELAXED);
    cur_job = j;
    generation++;
    pthread_cond_broadcast(&cv_work);
    pthread_mutex_unlock(&mu);
    int64_t t0 = now_ns();
    claim_pieces(j);
    int64_t t1 = now_ns();
    pthread_mutex_lock(&mu);
    while (active > 0) pthread_cond_wait(&cv_idle, &mu);
    cur_job = NULL;
    pthread_mutex_unlock(&mu);
    int64_t t2 = now_ns();
    if (backoff_ns > 0 && t2 - t1 > (t1 - t0) / 4 + 200000) { /* waited > 1/4 of own work (+0.2 ms) */
        __atomic_store_n(&backoff_until, t2 + backoff_ns, __ATOMIC_RELAXED);
        backoffs++;
    }
    pthread_mutex_unlock(&submit_mu);
    return bytes;
}

int kv_set_threads(int n) {
    if (n < 1) return -1;
    pthread_mutex_lock(&submit_mu);
    want_threads = n;
    if (pool_threads && pool_threads != n) pool_stop_locked();
    pthread_mutex_unlock(&submit_mu);
    return 0;
}

int kv_get_threads(void) { return want_threads; }
void kv_set_parallel_threshold(int64_t nbytes) { parallel_threshold = nbytes < 0 ? 0 : nbytes; }
int64_t kv_get_parallel_threshold(void) { return parallel_threshold; }
uint64_t kv_get_backoffs(void) { return backoffs; }
void kv_set_backoff_ns(int64_t ns) {
    backoff_ns = ns < 0 ? 0 : ns;
    __atomic_store_n(&backoff_until, 0, __ATOMIC_RELAXED);
}
void kv_set_stream_threshold(int64_t nbytes) { stream_threshold = nbytes < 0 ? 0 : nbytes; }
int64_t kv_get_stream_threshold(void) { return stream_threshold; }
