/* kvrelay native host library: chunk checksums, optionally fused with the copy that moves the bytes.
 *
 * Owns: the checksum definition shared with kvrelay/transfer/wire.py (`checksum`): for n <= KS_LEAF
 * bytes, xxh3-64 of the bytes; above, xxh3-64 (seeded with n) of the little-endian xxh3-64 of each
 * KS_LEAF-byte leaf (the last one shorter).  Leaves hash in parallel on the worker pool, each beside its
 * copy (see ks_copy_checksum).  Must not touch: Python objects.
 */
#ifndef KVRELAY_CHUNKSUM_H
#define KVRELAY_CHUNKSUM_H

#include <stdint.h>

#ifndef KS_LEAF
#define KS_LEAF (64 * 1024)
#endif

/* The checksum of n bytes at src.  Returns 0 and sets *out, or -1 when out of memory. */
int ks_checksum(const char *src, int64_t n, uint64_t *out);

/* Copy n bytes src -> dst (not overlapping) and return their checksum, reading src from memory once: with
 * stream, each leaf is hashed from src just before it is copied; without, it is copied and then hashed
 * from dst (in cache), so the checksum is of what dst holds even if src changed during the copy.
 * stream: store with non-temporal stores (ntcopy.h), for a destination nobody reads soon (a pool slot);
 * leave it 0 for a destination that is reused and read next (a staging buffer, a pull's output). */
int ks_copy_checksum(char *dst, const char *src, int64_t n, int stream, uint64_t *out);

/* Copy n bytes src -> dst (not overlapping) on the worker pool; stream as above. */
void ks_copy(char *dst, const char *src, int64_t n, int stream);

#endif
