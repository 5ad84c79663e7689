/* kvrelay native host library: paged-cache <-> canonical chunk copies (pack / unpack).
 *
 * Owns: the copy plan (run merging), its bounds checks and the persistent worker pool.
 * Must not touch: Python objects (kvcopy.c is plain C; native.c is the CPython binding).
 */
#ifndef KVRELAY_KVCOPY_H
#define KVRELAY_KVCOPY_H

#include <stddef.h>
#include <stdint.h>

#include "pool.h"

typedef struct {
    int pack;                 /* 1: cache -> chunk (pack); 0: chunk -> cache (unpack) */
    int num_kv;               /* planes per token: 2 (K, V) or 1 (MLA) */
    char *base[2];            /* start of each plane's tensor storage (data_ptr) */
    int64_t extent[2];        /* bytes addressable from base[kv] (the tensor's span) */
    int64_t offset[2];        /* byte offset of plane kv from base[kv] */
    int64_t block_stride, token_stride, head_stride, row_bytes;
    int64_t num_blocks, block_size, cache_heads;
    const int64_t *ids;       /* the request's block ids, in order */
    int64_t num_ids;
    int64_t token_start, token_end;
    int64_t cache_h0;         /* first head to copy, index within the cache's heads */
    int64_t num_heads;        /* heads copied */
    char *chunk;              /* canonical chunk [kv, tokens, chunk_heads, row] */
    int64_t chunk_nbytes;     /* bytes available at chunk */
    int64_t chunk_heads;      /* heads the chunk holds */
    int64_t chunk_h0;         /* first copied head, index within the chunk's heads */
} kv_job;

/* Check every bound; on failure write a message into err (size errlen) and return -1. */
int kv_validate(const kv_job *job, char *err, size_t errlen);

/* Run a validated job over the worker pool (or inline when small or the pool is busy).
 * Call without the GIL.  Returns bytes of chunk touched. */
int64_t kv_run(const kv_job *job);

/* Jobs of at least this many bytes write with non-temporal (streaming) stores; default 16 MiB. */
void kv_set_stream_threshold(int64_t nbytes);
int64_t kv_get_stream_threshold(void);

#endif
