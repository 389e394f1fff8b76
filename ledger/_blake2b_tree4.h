/* BLAKE2b in tree mode with four leaves, the leaves compressed side by side in SIMD lanes.
 *
 * The journal's hash chain (docs/ledger.md, "The hash chain's function", chain_hash
 * "blake2b-256-tree4"): the message is the previous header's 32-byte hash followed by the
 * batch's record bytes, n bytes in all. leaf_size L = ceil(n / 4) rounded up to 128 (BLAKE2b's
 * block); leaf i (i = 0..3) is the message's bytes [iL, min((i+1)L, n)) — the last leaf may be
 * shorter, or empty. Every node has digest_length 32, key_length 0, fanout 4, depth 2,
 * leaf_length L, inner_length 32, no salt or personalisation; leaf i has node_offset i,
 * node_depth 0, and leaf 3 is the last node; the root (node_offset 0, node_depth 1, last node)
 * hashes the four 32-byte leaf digests. That is BLAKE2b's own tree mode (the BLAKE2 paper
 * §2.10; RFC 7693's parameter block), so any implementation that exposes the parameter block
 * computes it — tests/unit/test_ledger_chain.py does it with Python's hashlib.
 *
 * Why: one BLAKE2b over a 4,096-record batch (1.2 MB) took 1.6–2 ms of this VM's core, as long
 * as the commit's fsyncs, and it was 60 % of the writer process's CPU. Four equal leaves let one
 * core run four compressions at once: the 64-bit words of the four leaf states sit in the four
 * lanes of a 256-bit vector (GCC vector extensions; compiled for AVX-512VL, AVX2 and the plain
 * x86-64 target, picked at load time by target_clones), and the few blocks where the leaves
 * differ in length are finished one leaf at a time. (YK_B2_NO_CLONES: one version for the
 * compiler's own target — tests/unit/test_ledger_chain.py builds each that way to check it.)
 */
#ifndef YK_BLAKE2B_TREE4_H
#define YK_BLAKE2B_TREE4_H

#include <stdint.h>
#include <string.h>

#define YK_B2_BLOCK 128
#define YK_B2_OUT 32

static const uint64_t yk_b2_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};

static const uint8_t yk_b2_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t yk_b2_load64(const uint8_t *p) {
    uint64_t w;
    memcpy(&w, p, 8);            /* x86 is little-endian, as BLAKE2b's words are */
    return w;
}

/* The same G and round for one state (uint64_t) and for four (yk_v4 lanes). */
#define YK_B2_ROTR(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
#define YK_B2_G(a, b, c, d, x, y)            \
    do {                                     \
        a = a + b + (x);                     \
        d = YK_B2_ROTR(d ^ a, 32);           \
        c = c + d;                           \
        b = YK_B2_ROTR(b ^ c, 24);           \
        a = a + b + (y);                     \
        d = YK_B2_ROTR(d ^ a, 16);           \
        c = c + d;                           \
        b = YK_B2_ROTR(b ^ c, 63);           \
    } while (0)
#define YK_B2_ROUNDS(v, m)                                                              \
    for (int r = 0; r < 12; r++) {                                                      \
        const uint8_t *s = yk_b2_sigma[r];                                              \
        YK_B2_G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);                             \
        YK_B2_G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);                             \
        YK_B2_G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);                            \
        YK_B2_G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);                            \
        YK_B2_G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);                            \
        YK_B2_G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);                          \
        YK_B2_G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);                           \
        YK_B2_G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);                           \
    }

static void yk_b2_compress(uint64_t h[8], const uint8_t *block, uint64_t t, int final, int last_node) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = yk_b2_load64(block + 8 * i);
    for (int i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = yk_b2_iv[i]; }
    v[12] ^= t;                                   /* messages below 2^64 bytes: t1 = 0 */
    if (final) v[14] = ~v[14];
    if (last_node) v[15] = ~v[15];
    YK_B2_ROUNDS(v, m)
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

static void yk_b2_init(uint64_t h[8], uint32_t leaf_bytes, uint64_t node_offset, uint8_t node_depth) {
    /* parameter block words: digest 32, key 0, fanout 4, depth 2, leaf_length; node_offset;
       node_depth, inner_length 32; the rest zero */
    uint64_t p0 = (uint64_t)YK_B2_OUT | (0ULL << 8) | (4ULL << 16) | (2ULL << 24) | ((uint64_t)leaf_bytes << 32);
    uint64_t p2 = (uint64_t)node_depth | ((uint64_t)YK_B2_OUT << 8);
    for (int i = 0; i < 8; i++) h[i] = yk_b2_iv[i];
    h[0] ^= p0;
    h[1] ^= node_offset;
    h[2] ^= p2;
}

/* The message: `prev` (32 bytes) then `rec` (rec_bytes). A 128-byte block at message offset
   `at`, `len` bytes of it real (the rest zero): a pointer into `rec` when it lies there whole,
   else assembled in `scratch`. */
static inline const uint8_t *yk_b2_block(const uint8_t *prev, const uint8_t *rec, uint64_t at, uint64_t len,
                                         uint8_t *scratch) {
    if (at >= 32 && len == YK_B2_BLOCK) return rec + (at - 32);
    memset(scratch, 0, YK_B2_BLOCK);
    for (uint64_t k = 0; k < len; k++) {
        uint64_t x = at + k;
        scratch[k] = x < 32 ? prev[x] : rec[x - 32];
    }
    return scratch;
}

typedef uint64_t yk_v4 __attribute__((vector_size(32)));

/* gcc cannot see through YK_B2_ROUNDS's table-driven indexes that v[8..15] are set before use */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
/* `rounds` blocks of each of the four leaves (none of them a leaf's last), all four leaves at
   once; h[w][lane] in and out. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(YK_B2_NO_CLONES)
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
static void yk_b2_lanes4(uint64_t h[8][4], const uint8_t *prev, const uint8_t *rec, uint64_t leaf_bytes,
                         uint64_t rounds) {
    yk_v4 hv[8], m[16], v[16];
    uint8_t scratch[4][YK_B2_BLOCK];
    for (int i = 0; i < 8; i++) hv[i] = (yk_v4){h[i][0], h[i][1], h[i][2], h[i][3]};
    for (uint64_t r = 0; r < rounds; r++) {
        const uint8_t *p[4];
        for (int lane = 0; lane < 4; lane++)
            p[lane] = yk_b2_block(prev, rec, lane * leaf_bytes + r * YK_B2_BLOCK, YK_B2_BLOCK, scratch[lane]);
        for (int w = 0; w < 16; w++)
            m[w] = (yk_v4){yk_b2_load64(p[0] + 8 * w), yk_b2_load64(p[1] + 8 * w), yk_b2_load64(p[2] + 8 * w),
                           yk_b2_load64(p[3] + 8 * w)};
        uint64_t t = (r + 1) * YK_B2_BLOCK;
        for (int i = 0; i < 8; i++) { v[i] = hv[i]; v[i + 8] = (yk_v4){yk_b2_iv[i], yk_b2_iv[i], yk_b2_iv[i], yk_b2_iv[i]}; }
        v[12] ^= (yk_v4){t, t, t, t};
        YK_B2_ROUNDS(v, m)
        for (int i = 0; i < 8; i++) hv[i] ^= v[i] ^ v[i + 8];
    }
    for (int i = 0; i < 8; i++)
        for (int lane = 0; lane < 4; lane++) h[i][lane] = hv[i][lane];
}
#pragma GCC diagnostic pop

/* The chain hash of one batch into out[32]. rec_bytes > 0. */
static void yk_b2_tree4(const uint8_t prev[32], const uint8_t *rec, uint64_t rec_bytes, uint8_t out[32]) {
    uint64_t n = 32 + rec_bytes;
    uint64_t quarter = (n + 3) / 4;
    uint64_t leaf_bytes = (quarter + YK_B2_BLOCK - 1) / YK_B2_BLOCK * YK_B2_BLOCK;
    uint64_t len[4], blocks[4], shared = UINT64_MAX;
    uint64_t h4[8][4];
    uint8_t scratch[YK_B2_BLOCK], digests[4 * YK_B2_OUT];
    for (int i = 0; i < 4; i++) {
        uint64_t lo = i * leaf_bytes < n ? i * leaf_bytes : n;
        uint64_t hi = (i + 1) * leaf_bytes < n ? (i + 1) * leaf_bytes : n;
        len[i] = hi - lo;
        blocks[i] = len[i] ? (len[i] + YK_B2_BLOCK - 1) / YK_B2_BLOCK : 1;
        if (blocks[i] - 1 < shared) shared = blocks[i] - 1;     /* blocks before each leaf's last */
    }
    for (int i = 0; i < 4; i++) {
        uint64_t h[8];
        yk_b2_init(h, (uint32_t)leaf_bytes, (uint64_t)i, 0);
        for (int w = 0; w < 8; w++) h4[w][i] = h[w];
    }
    yk_b2_lanes4(h4, prev, rec, leaf_bytes, shared);
    for (int i = 0; i < 4; i++) {                               /* each leaf's remaining blocks */
        uint64_t h[8], at = i * leaf_bytes, b;
        for (int w = 0; w < 8; w++) h[w] = h4[w][i];
        for (b = shared; b + 1 < blocks[i]; b++)
            yk_b2_compress(h, yk_b2_block(prev, rec, at + b * YK_B2_BLOCK, YK_B2_BLOCK, scratch),
                           (b + 1) * YK_B2_BLOCK, 0, 0);
        uint64_t tail = len[i] - b * YK_B2_BLOCK;               /* 0 for an empty leaf */
        yk_b2_compress(h, yk_b2_block(prev, rec, at + b * YK_B2_BLOCK, tail, scratch), len[i], 1, i == 3);
        for (int w = 0; w < 4; w++) memcpy(digests + YK_B2_OUT * i + 8 * w, &h[w], 8);
    }
    uint64_t root[8];
    yk_b2_init(root, (uint32_t)leaf_bytes, 0, 1);
    memset(scratch, 0, YK_B2_BLOCK);
    memcpy(scratch, digests, 4 * YK_B2_OUT);                    /* 128 bytes: exactly one block */
    yk_b2_compress(root, scratch, 4 * YK_B2_OUT, 1, 1);
    for (int w = 0; w < 4; w++) memcpy(out + 8 * w, &root[w], 8);
}

#endif
