/* DES in C for protocols/_des.pyx: the FIPS 46-3 tables, a table-driven one-block-at-a-time DES
 * (small batches, single keys), and the bitsliced kernels for 64, 128, 256 and 512 lanes with a
 * run-time choice of the widest one the CPU has (the build baseline is x86-64-v2, so the 256- and
 * 512-lane kernels are compiled under `#pragma GCC target` and only called after
 * __builtin_cpu_supports says so).
 *
 * Nothing here allocates, takes the GIL or fails: the drivers work in chunks on the stack.
 */
#pragma once
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* ---- FIPS 46-3 tables (1-based bit numbers, bit 1 = most significant) ---- */
static const uint8_t DES_IP[64] = {
    58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
    62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
    57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
    61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7};
static uint8_t DES_FP[64];                       /* IP^-1, computed by des_init */
static const uint8_t DES_PC1[56] = {
    57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2, 59, 51, 43, 35, 27, 19, 11, 3,
    60, 52, 44, 36, 63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22, 14, 6, 61, 53, 45, 37,
    29, 21, 13, 5, 28, 20, 12, 4};
static const uint8_t DES_PC2[48] = {
    14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2,
    41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32};
static const uint8_t DES_SHIFTS[16] = {1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1};
static const uint8_t DES_P[32] = {
    16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
    2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25};
static const uint8_t DES_S[8][64] = {
    {14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7, 0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
     4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0, 15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13},
    {15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10, 3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
     0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15, 13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9},
    {10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8, 13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
     13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7, 1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12},
    {7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15, 13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
     10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4, 3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14},
    {2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9, 14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
     4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14, 11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3},
    {12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11, 10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
     9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6, 4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13},
    {4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1, 13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
     1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2, 6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12},
    {13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7, 1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
     7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8, 2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11}};

/* des_ks[r][k]: which key bit (0-based, 0 = most significant bit of key byte 0) is bit k of the
 * round-r subkey. The whole key schedule is this fixed bit selection, which is why bitsliced
 * lanes can each have their own key at no cost: subkey slice k of round r IS key slice des_ks[r][k]. */
static uint8_t des_ks[16][48];
/* one-block path: S-box + P combined per S-box (SP tables), IP and FP byte-wise */
static uint32_t des_sp[8][64];
static uint64_t des_ip_tab[8][256], des_fp_tab[8][256];

static inline uint64_t des_load_be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

static inline void des_store_be64(uint8_t *p, uint64_t v)
{
    v = __builtin_bswap64(v);
    memcpy(p, &v, 8);
}

static void des_permutation_table(uint64_t tab[8][256], const uint8_t *perm)
{
    /* output bit o (1-based) = input bit perm[o-1]: tabulate each input byte's contribution */
    memset(tab, 0, 8 * 256 * sizeof(uint64_t));
    for (int o = 1; o <= 64; o++) {
        const int i = perm[o - 1] - 1;
        for (int v = 0; v < 256; v++)
            if (v & (0x80 >> (i & 7)))
                tab[i >> 3][v] |= 1ull << (64 - o);
    }
}

static int des_ready = 0;

/* Fill the derived tables; idempotent; called once from the module's import (under the GIL). */
static void des_init(void)
{
    if (des_ready)
        return;
    for (int o = 0; o < 64; o++)
        DES_FP[DES_IP[o] - 1] = (uint8_t)(o + 1);
    int shift = 0;
    for (int r = 0; r < 16; r++) {
        shift += DES_SHIFTS[r];
        for (int k = 0; k < 48; k++) {
            const int p = DES_PC2[k] - 1;                   /* position in C||D, 0..55 */
            const int cd = p < 28 ? (p + shift) % 28 : 28 + (p - 28 + shift) % 28;
            des_ks[r][k] = (uint8_t)(DES_PC1[cd] - 1);
        }
    }
    for (int s = 0; s < 8; s++)
        for (int x = 0; x < 64; x++) {
            const int row = ((x >> 4) & 2) | (x & 1), col = (x >> 1) & 15;
            const uint32_t w = (uint32_t)DES_S[s][row * 16 + col] << (28 - 4 * s);
            uint32_t f = 0;
            for (int j = 1; j <= 32; j++)
                f |= ((w >> (32 - DES_P[j - 1])) & 1u) << (32 - j);
            des_sp[s][x] = f;
        }
    des_permutation_table(des_ip_tab, DES_IP);
    des_permutation_table(des_fp_tab, DES_FP);
    des_ready = 1;
}

static inline uint64_t des_permute(const uint64_t tab[8][256], uint64_t x)
{
    uint64_t y = 0;
    for (int j = 0; j < 8; j++)
        y |= tab[j][(x >> (56 - 8 * j)) & 0xFF];
    return y;
}

/* ---- one block at a time ---- */

typedef struct {
    uint8_t k[16][8];      /* round r, S-box s: the 6 subkey bits that meet it */
} des_subkeys;

static void des_key_schedule(uint64_t key, des_subkeys *sk)
{
    for (int r = 0; r < 16; r++)
        for (int s = 0; s < 8; s++) {
            uint8_t v = 0;
            for (int b = 0; b < 6; b++)
                v = (uint8_t)((v << 1) | ((key >> (63 - des_ks[r][6 * s + b])) & 1));
            sk->k[r][s] = v;
        }
}

static inline uint32_t des_rotl32(uint32_t x, int n) { return n ? (x << n) | (x >> (32 - n)) : x; }

static uint64_t des_block(const des_subkeys *sk, uint64_t block, int decrypt)
{
    const uint64_t x = des_permute(des_ip_tab, block);
    uint32_t l = (uint32_t)(x >> 32), r = (uint32_t)x;
    for (int round = 0; round < 16; round++) {
        const uint8_t *k = sk->k[decrypt ? 15 - round : round];
        uint32_t f = 0;
        /* E: S-box s sees R bits 4s .. 4s+5 (1-based, cyclic; bit 0 is bit 32) */
        f |= des_sp[0][((des_rotl32(r, 31) >> 26) & 63) ^ k[0]];
        for (int s = 1; s < 8; s++)
            f |= des_sp[s][((des_rotl32(r, 4 * s - 1) >> 26) & 63) ^ k[s]];
        const uint32_t t = l ^ f;
        l = r;
        r = t;
    }
    return des_permute(des_fp_tab, ((uint64_t)r << 32) | l);
}

static uint64_t des_tdes_block(const des_subkeys *kl, const des_subkeys *kr, uint64_t block,
                               int decrypt)
{
    block = des_block(kl, block, decrypt);
    block = des_block(kr, block, !decrypt);
    return des_block(kl, block, decrypt);
}

static void des_x919_one(const uint8_t *data, uint32_t length, const uint8_t *key16, uint8_t *mac8)
{
    des_subkeys kl, kr;
    des_key_schedule(des_load_be64(key16), &kl);
    des_key_schedule(des_load_be64(key16 + 8), &kr);
    uint64_t chain = 0;
    const uint32_t blocks = length == 0 ? 1 : (length + 7) / 8;
    for (uint32_t b = 0; b < blocks; b++) {
        uint64_t v;
        if (8 * (size_t)b + 8 <= length) {
            v = des_load_be64(data + 8 * (size_t)b);
        } else {
            uint8_t tail[8] = {0};
            memcpy(tail, data + 8 * (size_t)b, length - 8 * b);
            v = des_load_be64(tail);
        }
        chain = des_block(&kl, chain ^ v, 0);
    }
    chain = des_block(&kr, chain, 1);
    des_store_be64(mac8, des_block(&kl, chain, 0));
}

/* ---- bitsliced kernels, one per width ---- */

#include "_des_sboxes.h"

typedef uint64_t des_v64;
#define V des_v64
#define BS_WORDS 1
#define BS_SPLAT(x) ((des_v64)(x))
#define BS_NAME(x) x##_w64
#include "_des_bitslice.h"
#undef V
#undef BS_WORDS
#undef BS_SPLAT
#undef BS_NAME

typedef uint64_t des_v128 __attribute__((vector_size(16)));
#define V des_v128
#define BS_WORDS 2
#define BS_SPLAT(x) ((des_v128){(x), (x)})
#define BS_NAME(x) x##_w128
#include "_des_bitslice.h"
#undef V
#undef BS_WORDS
#undef BS_SPLAT
#undef BS_NAME

#if defined(__GNUC__) && defined(__x86_64__) && !defined(DES_NO_WIDE)
#define DES_HAVE_WIDE 1
#pragma GCC push_options
#pragma GCC target("avx2")
typedef uint64_t des_v256 __attribute__((vector_size(32)));
#define V des_v256
#define BS_WORDS 4
#define BS_SPLAT(x) ((des_v256){(x), (x), (x), (x)})
#define BS_NAME(x) x##_w256
#include "_des_bitslice.h"
#undef V
#undef BS_WORDS
#undef BS_SPLAT
#undef BS_NAME
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl")
typedef uint64_t des_v512 __attribute__((vector_size(64)));
#define V des_v512
#define BS_WORDS 8
#define BS_SPLAT(x) ((des_v512){(x), (x), (x), (x), (x), (x), (x), (x)})
#define BS_NAME(x) x##_w512
#include "_des_bitslice.h"
#undef V
#undef BS_WORDS
#undef BS_SPLAT
#undef BS_NAME
#pragma GCC pop_options
#else
#define DES_HAVE_WIDE 0
#endif

/* ---- dispatch ---- */

enum { DES_PATH_AUTO = 0, DES_PATH_SCALAR = 1, DES_PATH_W64 = 2, DES_PATH_W128 = 3,
       DES_PATH_W256 = 4, DES_PATH_W512 = 5 };

/* Widest kernel allowed: set by des_select_path (tests force each one; the default is the widest
 * the CPU runs). Batches of fewer than des_scalar_below items take the one-block path. */
static int des_path_max = DES_PATH_W128;
static int des_path_forced = DES_PATH_AUTO;
static int des_scalar_below = 8;
/* 1: sort each chunk by block count before grouping (the default); 0: input order (measurement) */
static int des_sort_lanes = 1;

static int des_cpu_path(void)
{
#if DES_HAVE_WIDE
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
        return DES_PATH_W512;
    if (__builtin_cpu_supports("avx2"))
        return DES_PATH_W256;
#endif
    return DES_PATH_W128;
}

/* Which path runs a batch of n items: forced, else scalar below the threshold, else the
 * narrowest width whose lanes hold all n (a half-empty wide group costs nearly a full one),
 * capped at the widest the CPU has. */
static int des_path_for(ptrdiff_t n)
{
    if (des_path_forced != DES_PATH_AUTO)
        return des_path_forced;
    if (n < des_scalar_below)
        return DES_PATH_SCALAR;
    int path = n <= 64 ? DES_PATH_W64 : n <= 128 ? DES_PATH_W128 : n <= 256 ? DES_PATH_W256
                                                                             : DES_PATH_W512;
    return path < des_path_max ? path : des_path_max;
}

static int des_lanes(int path) { return 64 << (path - DES_PATH_W64); }

static void des_tdes_group(int path, const uint8_t *keys, ptrdiff_t key_stride, const uint8_t *in,
                           uint8_t *out, int count, int decrypt)
{
    switch (path) {
    case DES_PATH_W64: tdes_group_w64(keys, key_stride, in, out, count, decrypt); break;
    case DES_PATH_W128: tdes_group_w128(keys, key_stride, in, out, count, decrypt); break;
#if DES_HAVE_WIDE
    case DES_PATH_W256: tdes_group_w256(keys, key_stride, in, out, count, decrypt); break;
    case DES_PATH_W512: tdes_group_w512(keys, key_stride, in, out, count, decrypt); break;
#endif
    default: break;
    }
}

/* 3DES-ECB of n blocks, block i under the key at keys + i * key_stride. */
static void des_tdes_many(const uint8_t *keys, ptrdiff_t key_stride, const uint8_t *in, uint8_t *out,
                          ptrdiff_t n, int decrypt)
{
    ptrdiff_t done = 0;
    while (done < n) {
        const int path = des_path_for(n - done);
        if (path == DES_PATH_SCALAR) {
            /* key_stride 0: one schedule for the whole run */
            des_subkeys kl, kr;
            for (ptrdiff_t i = done; i < n; i++) {
                if (i == done || key_stride != 0) {
                    des_key_schedule(des_load_be64(keys + i * key_stride), &kl);
                    des_key_schedule(des_load_be64(keys + i * key_stride + 8), &kr);
                }
                des_store_be64(out + 8 * i, des_tdes_block(&kl, &kr, des_load_be64(in + 8 * i), decrypt));
            }
            return;
        }
        const ptrdiff_t lanes = des_lanes(path);
        const int count = (int)(n - done < lanes ? n - done : lanes);
        des_tdes_group(path, keys + done * key_stride, key_stride, in + 8 * done, out + 8 * done,
                       count, decrypt);
        done += count;
    }
}

static void des_x919_group(int path, const uint8_t *const *data, const uint32_t *length,
                           const uint8_t *keys, ptrdiff_t key_stride, const int32_t *order, int count,
                           uint8_t *mac_out)
{
    switch (path) {
    case DES_PATH_W64: x919_group_w64(data, length, keys, key_stride, order, count, mac_out); break;
    case DES_PATH_W128: x919_group_w128(data, length, keys, key_stride, order, count, mac_out); break;
#if DES_HAVE_WIDE
    case DES_PATH_W256: x919_group_w256(data, length, keys, key_stride, order, count, mac_out); break;
    case DES_PATH_W512: x919_group_w512(data, length, keys, key_stride, order, count, mac_out); break;
#endif
    default: break;
    }
}

/* Messages are sorted by block count in chunks of this many (on the stack: 8 KiB), so that the lanes of a group finish
 * together (a frozen lane is a wasted lane): a counting sort, buckets capped at DES_SORT_BLOCKS. */
#define DES_CHUNK 2048
#define DES_SORT_BLOCKS 512

/* X9.19 MACs of the messages listed in `which` (count of them; NULL = 0..count-1). */
static void des_x919_many(const uint8_t *const *data, const uint32_t *length, const uint8_t *keys,
                          ptrdiff_t key_stride, const int32_t *which, ptrdiff_t count, uint8_t *mac_out)
{
    int32_t order[DES_CHUNK];
    uint16_t bucket_start[DES_SORT_BLOCKS + 2];
    for (ptrdiff_t base = 0; base < count; base += DES_CHUNK) {
        const int chunk = (int)(count - base < DES_CHUNK ? count - base : DES_CHUNK);
        const int path = des_path_for(chunk);
        if (path == DES_PATH_SCALAR) {
            for (int i = 0; i < chunk; i++) {
                const int32_t m = which ? which[base + i] : (int32_t)(base + i);
                des_x919_one(data[m], length[m], keys + m * key_stride, mac_out + 8 * (ptrdiff_t)m);
            }
            continue;
        }
        if (!des_sort_lanes) {
            for (int i = 0; i < chunk; i++)
                order[i] = which ? which[base + i] : (int32_t)(base + i);
            goto grouped;
        }
        /* counting sort of the chunk by block count */
        memset(bucket_start, 0, sizeof(bucket_start));
        for (int i = 0; i < chunk; i++) {
            const int32_t m = which ? which[base + i] : (int32_t)(base + i);
            const uint32_t b = (length[m] + 7) / 8;
            bucket_start[(b < DES_SORT_BLOCKS ? b : DES_SORT_BLOCKS) + 1]++;
        }
        for (int b = 1; b < DES_SORT_BLOCKS + 2; b++)
            bucket_start[b] += bucket_start[b - 1];
        for (int i = 0; i < chunk; i++) {
            const int32_t m = which ? which[base + i] : (int32_t)(base + i);
            const uint32_t b = (length[m] + 7) / 8;
            order[bucket_start[b < DES_SORT_BLOCKS ? b : DES_SORT_BLOCKS]++] = m;
        }
    grouped:;
        int done = 0;
        while (done < chunk) {
            const int p = des_path_for(chunk - done);
            if (p == DES_PATH_SCALAR) {       /* a short tail: one block at a time is cheaper */
                for (; done < chunk; done++) {
                    const int32_t m = order[done];
                    des_x919_one(data[m], length[m], keys + m * key_stride, mac_out + 8 * (ptrdiff_t)m);
                }
                break;
            }
            const int lanes = des_lanes(p);
            const int n = chunk - done < lanes ? chunk - done : lanes;
            des_x919_group(p, data, length, keys, key_stride, order + done, n, mac_out);
            done += n;
        }
    }
}
