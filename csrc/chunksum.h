/* kvrelay native host library: chunk checksums, optionally fused with the copy that moves the bytes.
 *
 * Owns: the checksum definition shared with kvrelay/transfer/wire.py (`checksum`): for n <= KS_LEAF
 * bytes, xxh3-64 of the bytes; above, xxh3-64 (seeded with n) of the little-endian xxh3-64 of each
 * KS_LEAF-byte leaf (the last one shorter).  Leaves hash in parallel and right behind their copy, while
 * the leaf is still in cache.  Must not touch: Python objects.
 */
#ifndef KVRELAY_CHUNKSUM_H
#define KVRELAY_CHUNKSUM_H

#include <stdint.h>

#ifndef KS_LEAF
#define KS_LEAF (64 * 1024)
#endif

/* The checksum of n bytes at src.  Returns 0 and sets *out, or -1 when out of memory. */
int ks_checksum(const char *src, int64_t n, uint64_t *out);

/* Copy n bytes src -> dst (not overlapping) and return the checksum of what landed in dst. */
int ks_copy_checksum(char *dst, const char *src, int64_t n, uint64_t *out);

/* Copy n bytes src -> dst (not overlapping) on the worker pool. */
void ks_copy(char *dst, const char *src, int64_t n);

#endif
