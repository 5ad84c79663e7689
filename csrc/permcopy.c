/* See permcopy.h.  One loop per (kv, token, head): the head_dim elements of a canonical row are gathered from
 * (pack) or scattered to (unpack) their positions in the block-head through the position map, so partial
 * blocks need no read-modify-write. */
#include "permcopy.h"

#include <stdio.h>
#include <string.h>

int pc_validate(const pc_job *j, char *err, size_t errlen) {
    if (j->elem_size != 1 && j->elem_size != 2 && j->elem_size != 4 && j->elem_size != 8) {
        snprintf(err, errlen, "element size %lld is not 1, 2, 4 or 8 bytes", (long long)j->elem_size);
        return -1;
    }
    if (j->num_blocks < 1 || j->cache_heads < 1 || j->block_size < 1 || j->head_dim < 1 || j->tokens < 0 ||
        j->token_start < 0 || j->chunk_heads < 1) {
        snprintf(err, errlen, "geometry must be positive (blocks %lld, heads %lld, block size %lld, head dim %lld, "
                 "tokens %lld from %lld)", (long long)j->num_blocks, (long long)j->cache_heads,
                 (long long)j->block_size, (long long)j->head_dim, (long long)j->tokens, (long long)j->token_start);
        return -1;
    }
    int64_t per_head = 2 * j->block_size * j->head_dim;
    if (j->region_nbytes < j->num_blocks * j->cache_heads * per_head * j->elem_size) {
        snprintf(err, errlen, "the layer holds %lld bytes, its geometry needs %lld", (long long)j->region_nbytes,
                 (long long)(j->num_blocks * j->cache_heads * per_head * j->elem_size));
        return -1;
    }
    if (j->token_start + j->tokens > j->num_ids * j->block_size) {
        snprintf(err, errlen, "%lld block ids cannot hold tokens up to %lld (block size %lld)", (long long)j->num_ids,
                 (long long)(j->token_start + j->tokens), (long long)j->block_size);
        return -1;
    }
    int64_t last = (j->token_start + j->tokens + j->block_size - 1) / j->block_size;
    for (int64_t i = j->token_start / j->block_size; i < last; i++) {
        if (j->ids[i] < 0 || j->ids[i] >= j->num_blocks) {
            snprintf(err, errlen, "block id %lld is outside [0, %lld)", (long long)j->ids[i], (long long)j->num_blocks);
            return -1;
        }
    }
    for (int64_t i = 0; i < per_head; i++) {
        if (j->perm[i] < 0 || j->perm[i] >= per_head) {
            snprintf(err, errlen, "position map entry %lld = %d is outside [0, %lld)", (long long)i, j->perm[i],
                     (long long)per_head);
            return -1;
        }
    }
    if (j->num_heads < 1 || j->cache_h0 < 0 || j->cache_h0 + j->num_heads > j->cache_heads) {
        snprintf(err, errlen, "cache heads [%lld, %lld) are outside the cache's %lld", (long long)j->cache_h0,
                 (long long)(j->cache_h0 + j->num_heads), (long long)j->cache_heads);
        return -1;
    }
    if (j->chunk_h0 < 0 || j->chunk_h0 + j->num_heads > j->chunk_heads) {
        snprintf(err, errlen, "the chunk's %lld heads cannot hold %lld heads from chunk head %lld",
                 (long long)j->chunk_heads, (long long)j->num_heads, (long long)j->chunk_h0);
        return -1;
    }
    int64_t need = 2 * j->tokens * j->chunk_heads * j->head_dim * j->elem_size;
    if (j->chunk_nbytes < need) {
        snprintf(err, errlen, "the chunk buffer has %lld bytes, %lld tokens need %lld", (long long)j->chunk_nbytes,
                 (long long)j->tokens, (long long)need);
        return -1;
    }
    return 0;
}

#define PC_LOOP(T)                                                                                      \
    do {                                                                                                \
        for (int kv = 0; kv < 2; kv++) {                                                                \
            for (int64_t k = 0; k < j->tokens; k++) {                                                   \
                int64_t p = j->token_start + k;                                                         \
                int64_t id = j->ids[p / bs], t = p % bs;                                                \
                const int32_t *map = j->perm + kv * bs * hd + t * hd;                                   \
                for (int64_t h = 0; h < j->num_heads; h++) {                                            \
                    T *cache = (T *)j->region + (id * H + j->cache_h0 + h) * per_head;                  \
                    T *row = (T *)j->chunk + ((kv * j->tokens + k) * j->chunk_heads + j->chunk_h0 + h) * hd; \
                    if (j->pack)                                                                        \
                        for (int64_t d = 0; d < hd; d++) row[d] = cache[map[d]];                        \
                    else                                                                                \
                        for (int64_t d = 0; d < hd; d++) cache[map[d]] = row[d];                        \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    } while (0)

int64_t pc_run(const pc_job *j) {
    int64_t bs = j->block_size, hd = j->head_dim, H = j->cache_heads, per_head = 2 * bs * hd;
    switch (j->elem_size) {
        case 1: PC_LOOP(uint8_t); break;
        case 2: PC_LOOP(uint16_t); break;
        case 4: PC_LOOP(uint32_t); break;
        default: PC_LOOP(uint64_t); break;
    }
    return 2 * j->tokens * j->num_heads * hd * j->elem_size;
}
