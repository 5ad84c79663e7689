/* kvrelay native host library: the persistent worker pool shared by every parallel copy.
 *
 * Owns: the worker threads, piece claiming and the back-off for preempted workers.
 * Must not touch: what a piece does (kvcopy.c, chunksum.c pass a function and its context).
 */
#ifndef KVRELAY_POOL_H
#define KVRELAY_POOL_H

#include <stdint.h>

/* Work for piece p of a job (0 <= p < num_pieces); runs on the caller or a worker, without the GIL. */
typedef void (*pool_fn)(void *ctx, int64_t piece);

/* Run fn over pieces [0, num_pieces): on the pool when `bytes` >= the parallel threshold and the pool is
 * free, else on the caller alone.  Returns when every piece has run.  Call without the GIL. */
void pool_run(pool_fn fn, void *ctx, int64_t num_pieces, int64_t bytes);

/* Threads including the caller, clamped so small jobs still give each thread a piece. */
int pool_threads_for(int64_t num_pieces);

/* Pool size (threads including the caller); n >= 1.  Restarts the pool lazily. */
int kv_set_threads(int n);
int kv_get_threads(void);
void kv_set_parallel_threshold(int64_t nbytes);
int64_t kv_get_parallel_threshold(void);
/* How often the pool backed off to caller-only copies because a worker lagged (preempted). */
uint64_t kv_get_backoffs(void);
/* How long a back-off lasts (default 50 ms); 0 disables backing off. */
void kv_set_backoff_ns(int64_t ns);

#endif
