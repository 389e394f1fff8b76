/* The memory traffic of one medical settlement, and nothing else: how fast can this machine move
 * the lines the engine's apply loop touches, before any settlement arithmetic? (bench/README.md,
 * issue 2: where the time goes.)
 *
 *     gcc -O2 -mavx2 -o /tmp/memmodel tools/settlement_memory_model.c
 *     for m in 0 1 2 3 4; do /tmp/memmodel $m; done          # memory only
 *     /tmp/memmodel 9 60; /tmp/memmodel 0 60                  # ~90 ns of ALU work per row alone, and with the memory
 *
 * Sizes as the engine with the demo's 100,000 generated cards and 2^20 retained transactions
 * (engine.arrays): per row it reads the request row (160 B, sequential), the PAN index bucket
 * (4 B of 1 MB), the card line (64 B of 6.4 MB) and side record (16 B of 1.6 MB) read and
 * written, the idempotency and reversal buckets (16 B of 32 MB each) read and written, and writes
 * the result row (128 B, sequential) and the ring entry (160 B, sequential). Prefetches as the
 * engine's loop: index buckets, result row and ring entry 64 rows ahead, card lines 48 ahead,
 * request rows 128 ahead. Mode 0: all of it; 1: result and ring with non-temporal stores; 2: no
 * ring entry; 3: no index buckets; 4: no card lines; 9: no memory at all (the ALU work only).
 * The optional second argument adds a dependent chain of ALU work per row (WORK iterations of
 * 4 operations) to see how much of it the memory traffic hides. Best of 5 passes of 1 M rows. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include <immintrin.h>
#include <sys/mman.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static inline uint64_t mix(uint64_t x) { x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL; x ^= x >> 27; x *= 0x94d049bb133111ebULL; return x ^ (x >> 31); }

typedef struct { uint64_t pan, idem, rev, pad[17]; } Req;   /* 160 B, as Request */
typedef struct { uint64_t w[16]; } Res;                      /* 128 B, as Result */
typedef struct { uint64_t w[20]; } Txn;                      /* 160 B, as the ring entry */
typedef struct { uint64_t key; int64_t pos; } Bucket;        /* 16 B, as the index buckets */

#define PF(p)  __asm__ __volatile__("prefetcht0 %0" : : "m"(*(const char*)(p)))
#define PFW(p) __asm__ __volatile__("prefetchw %0" : : "m"(*(const char*)(p)))

/* As numpy allocates the engine's arrays: buffers of 4 MiB and more are madvised for transparent
 * huge pages (numpy's default on Linux; /proc/PID/smaps of the engine shows its index tables and
 * ring on 2 MiB pages). Without it this model overstated the index buckets' cost (TLB misses the
 * engine does not have). NOHUGE=1 in the environment leaves them on 4 KiB pages. */
static void* zeroed(size_t n) {
    size_t m = (n + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1);
    void* p = aligned_alloc(2u << 20, m);
    if (n >= (4u << 20) && !getenv("NOHUGE")) madvise(p, m, MADV_HUGEPAGE);
    memset(p, 0, n);
    return p;
}

static inline uint64_t work_on(uint64_t v, uint64_t b, uint64_t c, uint64_t d, int work) {
    uint64_t a = v | 1;
    for (int k = 0; k < work; k++) {
        __asm__ volatile("" : "+r"(a), "+r"(b), "+r"(c), "+r"(d));
        a = a * 3 + b; b ^= c >> 3; c += d; d = (d << 1) ^ a;
    }
    return a ^ b ^ c ^ d;
}

int main(int argc, char** argv) {
    int mode = argc > 1 ? atoi(argv[1]) : 0, work = argc > 2 ? atoi(argv[2]) : 0;
    const size_t N = 1000000, CARDS = 100000, PANB = 1 << 18, IDX = 1 << 21, RING = 1 << 20;
    Req* rq = zeroed(N * sizeof(Req)); Res* rs = zeroed(N * sizeof(Res)); Txn* ring = zeroed(RING * sizeof(Txn));
    uint8_t (*cards)[64] = zeroed(CARDS * 64); uint8_t (*side)[16] = zeroed(CARDS * 16);
    int32_t* pan = zeroed(PANB * 4); Bucket* idem = zeroed(IDX * 16); Bucket* rev = zeroed(IDX * 16);
    for (size_t i = 0; i < PANB; i++) pan[i] = (int32_t)(mix(i) % CARDS);
    for (size_t i = 0; i < N; i++) { rq[i].pan = mix(3 * i + 1); rq[i].idem = mix(3 * i + 2); rq[i].rev = mix(3 * i + 3); }
    double best = 1e9; uint64_t check = 0;
    for (int pass = 0; pass < 5; pass++) {
        double t = now();
        for (size_t i = 0; i < N; i++) {
            uint64_t v = i;
            if (mode == 9) { check += work_on(v, rq[i & 1023].idem, rq[i & 1023].rev, i, work); continue; }
            if (i + 64 < N) {
                const Req* a = &rq[i + 64];
                if (mode != 3) { PF(&idem[a->idem & (IDX - 1)]); PF(&rev[a->rev & (IDX - 1)]); }
                PF(&pan[a->pan & (PANB - 1)]);
                if (i + 128 < N) { PF(&rq[i + 128]); PF((char*)&rq[i + 128] + 64); PF((char*)&rq[i + 128] + 159); }
                if (mode != 1) {
                    PFW(&rs[i + 64]); PFW((char*)&rs[i + 64] + 127);
                    if (mode != 2) { Txn* e = &ring[(i + 64) & (RING - 1)]; PFW(e); PFW((char*)e + 64); PFW((char*)e + 159); }
                }
            }
            if (i + 48 < N && mode != 4) { int32_t s = pan[rq[i + 48].pan & (PANB - 1)]; PF(cards[s]); PF(side[s]); }
            const Req* q = &rq[i];
            int32_t s = pan[q->pan & (PANB - 1)];
            if (mode != 4) { v += *(uint64_t*)cards[s]; *(uint64_t*)cards[s] = v; *(uint64_t*)side[s] += 1; }
            if (mode != 3) {
                Bucket* b = &idem[q->idem & (IDX - 1)]; v += b->key; b->key = q->idem; b->pos = (int64_t)i;
                Bucket* c = &rev[q->rev & (IDX - 1)]; v += c->key; c->key = q->rev; c->pos = (int64_t)i;
            }
            if (work) v += work_on(v, q->idem, q->rev, i, work);
            __m256i x = _mm256_set1_epi64x((long long)v);
            Txn* e = &ring[i & (RING - 1)];
            if (mode == 1) {
                for (int k = 0; k < 4; k++) _mm256_stream_si256((__m256i*)&rs[i] + k, x);
                for (int k = 0; k < 20; k += 2) _mm_stream_si128((__m128i*)&e->w[k], _mm_set1_epi64x((long long)v));
            } else {
                for (int k = 0; k < 4; k++) _mm256_storeu_si256((__m256i*)&rs[i] + k, x);
                if (mode != 2) for (int k = 0; k + 4 <= 20; k += 4) _mm256_storeu_si256((__m256i*)&e->w[k], x);
            }
            check += v;
        }
        t = now() - t;
        if (t < best) best = t;
    }
    printf("mode %d work %d: %.2f M rows/s (%.1f ns per row), check %llu\n", mode, work, N / best / 1e6, best / N * 1e9,
           (unsigned long long)check);
    return 0;
}
