/* kvrelay native host library: chunk checksums (see chunksum.h for the definition) and pooled copies.
 *
 * Owns: leaf hashing and the fused copy+hash.  Must not touch: Python objects, the pool's internals.
 */
#define XXH_INLINE_ALL
#include "third_party/xxhash/xxhash.h"
#if defined(__x86_64__) || defined(_M_X64)
#include "third_party/xxhash/xxh_x86dispatch.h"
#define LEAF_HASH XXH3_64bits_dispatch /* AVX2/AVX-512 when the CPU has it, checked once at run time */
#else
#define LEAF_HASH XXH3_64bits
#endif

#include "chunksum.h"
#include "ntcopy.h"
#include "pool.h"

#include <stdlib.h>
#include <string.h>

#define PIECE_LEAVES (256 * 1024 / KS_LEAF) /* leaves per unit of work a pool thread claims */

typedef struct { char *dst; const char *src; int64_t n, m; uint64_t *leaves; int stream; } ks_ctx;

static void leaf_piece(void *arg, int64_t p) {
    const ks_ctx *c = arg;
    int64_t last = (p + 1) * PIECE_LEAVES < c->m ? (p + 1) * PIECE_LEAVES : c->m;
    for (int64_t l = p * PIECE_LEAVES; l < last; l++) {
        int64_t off = l * KS_LEAF, len = c->n - off < KS_LEAF ? c->n - off : KS_LEAF;
        /* into a destination that stays in cache: copy the leaf, then hash the copy (from cache), so the
         * checksum is of the bytes the destination holds even if the source changed meanwhile (a pull
         * through the store's shared directory races evictions: the checksum must judge what it got) */
        if (c->dst && !c->stream) {
            memcpy(c->dst + off, c->src + off, (size_t)len);
            if (c->leaves) c->leaves[l] = LEAF_HASH(c->dst + off, (size_t)len);
            continue;
        }
        /* streaming (a pool slot nobody reads soon): hash the leaf first (one read from memory), then copy
         * it from cache with non-temporal stores */
        if (c->leaves) c->leaves[l] = LEAF_HASH(c->src + off, (size_t)len);
        if (c->dst) nt_copy(c->dst + off, c->src + off, (size_t)len);
    }
    if (c->stream) nt_fence();
}

static int run(char *dst, const char *src, int64_t n, int stream, uint64_t *out) {
    int64_t m = (n + KS_LEAF - 1) / KS_LEAF;
    if (n <= KS_LEAF) { /* one leaf: copied (ordinary stores), then hashed from the copy (see leaf_piece) */
        if (dst && n > 0) memcpy(dst, src, (size_t)n);
        if (out) *out = LEAF_HASH(dst && n > 0 ? dst : src, (size_t)n);
        return 0;
    }
    uint64_t stack[256], *leaves = NULL;
    if (out) {
        leaves = m <= 256 ? stack : malloc((size_t)m * sizeof(uint64_t));
        if (!leaves) return -1;
    }
    ks_ctx c = {dst, src, n, m, leaves, dst != NULL && stream};
    pool_run(leaf_piece, &c, (m + PIECE_LEAVES - 1) / PIECE_LEAVES, n);
    if (out) {
        unsigned char *le = (unsigned char *)leaves;
        for (int64_t i = 0; i < m; i++) { /* serialize little-endian in place */
            uint64_t v = leaves[i];
            for (int b = 0; b < 8; b++) le[i * 8 + b] = (unsigned char)(v >> (8 * b));
        }
        *out = XXH3_64bits_withSeed(le, (size_t)m * 8, (uint64_t)n);
        if (leaves != stack) free(leaves);
    }
    return 0;
}

int ks_checksum(const char *src, int64_t n, uint64_t *out) { return run(NULL, src, n, 0, out); }

int ks_copy_checksum(char *dst, const char *src, int64_t n, int stream, uint64_t *out) {
    return run(dst, src, n, stream, out);
}

void ks_copy(char *dst, const char *src, int64_t n, int stream) { (void)run(dst, src, n, stream, NULL); }
