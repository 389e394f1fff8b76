/* Bitsliced DES kernel, included once per vector width by _des_kernel.h (a poor man's template).
 *
 * Before including, define:
 *   V          the lane-word type: uint64_t (64 lanes) or a gcc vector of BS_WORDS uint64_t
 *   BS_WORDS   uint64_t words per V (1, 2, 4, 8); lanes = 64 * BS_WORDS
 *   BS_NAME(x) the function name for this width (x ## _w128 ...)
 *
 * Layout: a "row" block r of word m (lane 64*m + r) is the block as a big-endian uint64_t
 * (DES bit 1 = bit 63). rows[r] holds the BS_WORDS rows r of each 64-lane word. After
 * BS_NAME(transpose), slice[i] (i = DES bit i+1) holds that bit of every lane: lane 64*m + r at
 * bit 63 - r of word m. The transpose is an involution, so the same call goes back.
 */

#define BS_LANES (64 * BS_WORDS)

/* 64x64 bit-matrix transpose of each of the BS_WORDS words at once (H. S. Warren, Hacker's
 * Delight, 2nd ed., 7-3 "Transposing a bit matrix", widened from 32 to 64): six stages of
 * swapping j x j blocks, j = 32..1, 32 masked swaps each. */
static inline void BS_NAME(transpose)(V a[64])
{
    uint64_t m = 0x00000000FFFFFFFFull;
    for (int j = 32; j != 0; j >>= 1, m ^= (m << j)) {
        const V mask = BS_SPLAT(m);
        for (int k = 0; k < 64; k = (k + j + 1) & ~j) {
            const V t = (a[k] ^ (a[k + j] >> j)) & mask;
            a[k] ^= t;
            a[k + j] ^= (t << j);
        }
    }
}

/* One DES pass over all lanes, in place on the 64 slices of `blk` (plain block bit order in and
 * out: IP and FP are index renamings here, they cost only the copies). key[64] are the key-bit
 * slices of each lane's 8-byte key; decrypt runs the subkeys in reverse. */
static void BS_NAME(des)(V blk[64], const V key[64], int decrypt)
{
    V L[32], R[32];
    for (int i = 0; i < 32; i++) {
        L[i] = blk[DES_IP[i] - 1];
        R[i] = blk[DES_IP[32 + i] - 1];
    }
    for (int r = 0; r < 16; r += 2) {
        /* L ^= f(R, K_r); then R ^= f(L, K_r+1): the halves swap roles instead of places */
        const uint8_t *ks0 = des_ks[decrypt ? 15 - r : r];
        const uint8_t *ks1 = des_ks[decrypt ? 14 - r : r + 1];
        DES_BS_ROUND(R, L, key, ks0);
        DES_BS_ROUND(L, R, key, ks1);
    }
    /* pre-output R16 L16: after an even number of rounds R holds R16 and L holds L16 */
    for (int j = 0; j < 64; j++) {
        const int p = DES_FP[j] - 1;
        blk[j] = p < 32 ? R[p] : L[p - 32];
    }
}

/* Rows of lanes [0, count) from 8-byte blocks at `in` (count <= BS_LANES), rest zero. */
static inline void BS_NAME(load_rows)(V rows[64], const uint8_t *in, ptrdiff_t stride, int count)
{
    uint64_t *w = (uint64_t *)rows;
    memset(rows, 0, 64 * sizeof(V));
    for (int lane = 0; lane < count; lane++)
        w[(lane & 63) * BS_WORDS + (lane >> 6)] = des_load_be64(in + lane * stride);
}

static inline void BS_NAME(store_rows)(const V rows[64], uint8_t *out, int count)
{
    const uint64_t *w = (const uint64_t *)rows;
    for (int lane = 0; lane < count; lane++)
        des_store_be64(out + 8 * lane, w[(lane & 63) * BS_WORDS + (lane >> 6)]);
}

/* Key slices of the left (half 0) or right (half 1) 8 bytes of each lane's 16-byte key. */
static inline void BS_NAME(load_keys)(V ks[64], const uint8_t *keys, ptrdiff_t key_stride, int count,
                                      int half)
{
    uint64_t *w = (uint64_t *)ks;
    memset(ks, 0, 64 * sizeof(V));
    for (int lane = 0; lane < count; lane++)
        w[(lane & 63) * BS_WORDS + (lane >> 6)] = des_load_be64(keys + lane * key_stride + 8 * half);
    BS_NAME(transpose)(ks);
}

/* 3DES (EDE, double-length key) of `count` <= BS_LANES blocks: the three passes share the slices. */
static void BS_NAME(tdes_group)(const uint8_t *keys, ptrdiff_t key_stride, const uint8_t *in,
                                uint8_t *out, int count, int decrypt)
{
    V kl[64], kr[64], blk[64];
    BS_NAME(load_keys)(kl, keys, key_stride, count, 0);
    BS_NAME(load_keys)(kr, keys, key_stride, count, 1);
    BS_NAME(load_rows)(blk, in, 8, count);
    BS_NAME(transpose)(blk);
    /* encrypt: E_KL D_KR E_KL; decrypt: D_KL E_KR D_KL */
    BS_NAME(des)(blk, kl, decrypt);
    BS_NAME(des)(blk, kr, !decrypt);
    BS_NAME(des)(blk, kl, decrypt);
    BS_NAME(transpose)(blk);
    BS_NAME(store_rows)(blk, out, count);
}

/* X9.19 MACs of `count` <= BS_LANES messages, lane i = message order[i] (the caller sorts by
 * length so that the lanes of a group finish together). All lanes run in lockstep for the longest
 * message's block count; a lane whose message has ended keeps (freezes) its chaining value, so the
 * state after the last step is every lane's CBC result. Then D_KR, E_KL on all lanes at once. */
static void BS_NAME(x919_group)(const uint8_t *const *data, const uint32_t *length,
                                const uint8_t *keys, ptrdiff_t key_stride, const int32_t *order,
                                int count, uint8_t *mac_out)
{
    V kl[64], kr[64], state[64], rows[64], kept[64];
    uint64_t *w = (uint64_t *)rows;
    uint32_t blocks[BS_LANES];
    uint32_t steps = 0;
    uint64_t keybuf[2 * BS_LANES];

    /* keys: gather this group's 16-byte keys, then slice both halves */
    for (int lane = 0; lane < count; lane++) {
        const uint8_t *k = keys + (ptrdiff_t)order[lane] * key_stride;
        memcpy(&keybuf[2 * lane], k, 16);
        /* padding method 1: an empty MAB is one zero block */
        const uint32_t n = length[order[lane]];
        blocks[lane] = n == 0 ? 1 : (n + 7) / 8;
        if (blocks[lane] > steps)
            steps = blocks[lane];
    }
    BS_NAME(load_keys)(kl, (const uint8_t *)keybuf, 16, count, 0);
    BS_NAME(load_keys)(kr, (const uint8_t *)keybuf, 16, count, 1);
    memset(state, 0, sizeof(state));

    for (uint32_t step = 0; step < steps; step++) {
        /* rows: this step's block of every live lane (zero-padded at the end of its message) */
        V active = BS_SPLAT(0);
        uint64_t *act = (uint64_t *)&active;
        int frozen = 0;
        memset(rows, 0, sizeof(rows));
        for (int lane = 0; lane < count; lane++) {
            if (step >= blocks[lane]) {
                frozen = 1;
                continue;
            }
            const uint32_t n = length[order[lane]];
            const uint8_t *p = data[order[lane]] + 8 * (size_t)step;
            uint64_t v;
            if (8 * (size_t)step + 8 <= n) {
                v = des_load_be64(p);
            } else {
                uint8_t tail[8] = {0};
                memcpy(tail, p, n - 8 * step);
                v = des_load_be64(tail);
            }
            w[(lane & 63) * BS_WORDS + (lane >> 6)] = v;
            act[lane >> 6] |= 1ull << (63 - (lane & 63));
        }
        /* lanes >= count carry nothing: their state may run on unmasked */
        BS_NAME(transpose)(rows);
        if (frozen)
            memcpy(kept, state, sizeof(state));
        for (int i = 0; i < 64; i++)
            state[i] ^= rows[i];
        BS_NAME(des)(state, kl, 0);
        if (frozen)
            for (int i = 0; i < 64; i++)
                state[i] = (state[i] & active) | (kept[i] & ~active);
    }
    /* ISO 9797-1 alg. 3 output transformation: decrypt under KR, encrypt under KL */
    BS_NAME(des)(state, kr, 1);
    BS_NAME(des)(state, kl, 0);
    BS_NAME(transpose)(state);
    {
        const uint64_t *sw = (const uint64_t *)state;
        for (int lane = 0; lane < count; lane++)
            des_store_be64(mac_out + 8 * (ptrdiff_t)order[lane],
                           sw[(lane & 63) * BS_WORDS + (lane >> 6)]);
    }
}

#undef BS_LANES
