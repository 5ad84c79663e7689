/* kvrelay native host library: pack / unpack for caches whose blocks keep K and V in an engine-specific
 * element order (vLLM's CPU attention: AMX tiles, VNNI pairs, transposed K), given as a position map.
 *
 * Owns: the per-element gather/scatter between such a cache and the canonical chunk order
 * [kv, tokens, chunk_heads, head_dim], and its bounds checks.  Must not touch: Python objects (the binding is
 * native.c; kvrelay/kernels/permuted.py derives and checks the map).
 */
#ifndef KVRELAY_PERMCOPY_H
#define KVRELAY_PERMCOPY_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int pack;                 /* 1: cache -> chunk; 0: chunk -> cache */
    char *region;             /* the layer: [num_blocks, cache_heads, 2 * block_size * head_dim] elements */
    int64_t region_nbytes;
    int64_t num_blocks, cache_heads, block_size, head_dim, elem_size;
    const int32_t *perm;      /* canonical (kv, t, d) -> position in a block-head, 2 * block_size * head_dim */
    const int64_t *ids;       /* the request's block ids from the block holding token_start */
    int64_t num_ids;
    int64_t token_start;      /* first token, counted from the start of ids[0] */
    int64_t tokens;
    char *chunk;              /* canonical [2, tokens, chunk_heads, head_dim] */
    int64_t chunk_nbytes, chunk_heads;
    int64_t chunk_h0;         /* chunk head that holds cache head cache_h0 */
    int64_t cache_h0;         /* first cache head copied (tensor parallelism: a slice of the rank's heads) */
    int64_t num_heads;        /* heads copied: cache heads [cache_h0, +num_heads) <-> chunk heads [chunk_h0, +num_heads) */
} pc_job;

/* Check every bound (ids, perm, token range, chunk size, heads); on failure write err and return -1. */
int pc_validate(const pc_job *job, char *err, size_t errlen);

/* Run a validated job on the calling thread (call without the GIL).  Returns the chunk bytes touched. */
int64_t pc_run(const pc_job *job);

#endif
