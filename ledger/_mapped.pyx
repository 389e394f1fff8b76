# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Bulk copies out of the journal's LMDB map: GIL released, streaming stores, the source
prefetched across its 4 KiB pages, split across threads.

`Journal.read` gathers the slices of every batch it needs, as memoryviews straight into the map
(a read transaction with buffers=True), and hands them here while that transaction is still
open. On this VM one core copies ≈ 5.8 GB/s into warm pages (bench/README-ledger.md §2): a copy
is bound by the latency of one core's cache misses, not by the memory bus, so a second core
copying the other half of the bytes at the same time raises the rate. The shares are equal in
bytes (a share may start or end inside a batch), each thread copies its share in order with
`memcpy`, and no thread touches Python: the threads are plain pthreads, the caller's thread
does the first share and joins the others.
"""
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    int pthread_create(pthread_t* thread, const pthread_attr_t* attr, void* (*start)(void*) noexcept nogil,
                       void* arg)
    int pthread_join(pthread_t thread, void** retval)

cdef extern from *:
    """
    #include <emmintrin.h>
    #include <stdint.h>
    #include <string.h>
    /* n bytes from src (any alignment) to dst (16-byte aligned, else plain memcpy) with
       streaming stores, prefetching the source `prefetch_bytes` ahead. */
    static inline void yk_copy_streaming(uint8_t* dst, const uint8_t* src, int64_t n, int64_t prefetch_bytes) {
        int64_t i = 0;
        if (((uintptr_t)dst & 15) != 0) { memcpy(dst, src, (size_t)n); return; }
        for (; i + 64 <= n; i += 64) {
            if (prefetch_bytes) _mm_prefetch((const char*)(src + i + prefetch_bytes), _MM_HINT_T0);
            __m128i a = _mm_loadu_si128((const __m128i*)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i*)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i*)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i*)(src + i + 48));
            _mm_stream_si128((__m128i*)(dst + i), a);
            _mm_stream_si128((__m128i*)(dst + i + 16), b);
            _mm_stream_si128((__m128i*)(dst + i + 32), c);
            _mm_stream_si128((__m128i*)(dst + i + 48), d);
        }
        if (i < n) memcpy(dst + i, src + i, (size_t)(n - i));
    }
    """
    void yk_copy_streaming(uint8_t* dst, const uint8_t* src, int64_t n, int64_t prefetch_bytes) nogil
    void _mm_sfence() nogil

cdef enum:
    THREADS_MAX = 8

# Below this many bytes a second thread costs more (≈ 30–60 µs to start and join) than it saves.
cdef enum: SPLIT_BYTES_MIN = 8 << 20
# From this many bytes on, streaming stores: the copy will not fit any cache, so the destination
# lines are written without being read first (no read-for-ownership: a third less memory
# traffic). A smaller copy goes through the cache (memcpy), where its reader will find it.
cdef enum: STREAM_BYTES_MIN = 4 << 20
# How far ahead of the copy the source is prefetched. The source is the LMDB map: 4 KiB file
# pages (no transparent huge pages for the page cache here), and the hardware prefetcher stops at
# each 4 KiB boundary, so every page began with a TLB walk and a demand miss; a software
# prefetch two pages ahead starts both early. Measured (2 M records, warm pages, one thread):
# memcpy 20–22 M records/s, streaming alone 21, streaming + 2–32 KiB prefetch 30–32 M/s.
cdef enum: PREFETCH_BYTES = 8192


cdef struct Share:
    const uint8_t** sources     # every slice's first byte (the map)
    const int64_t* sizes        # every slice's length in bytes
    uint8_t* destination        # where slice 0 lands; slices follow each other
    int64_t begin_bytes         # this share: bytes [begin_bytes, end_bytes) of the concatenation
    int64_t end_bytes
    int64_t slice_index         # the slice holding begin_bytes
    int64_t slice_offset_bytes  # its start within the concatenation
    bint streaming              # streaming stores + source prefetch (STREAM_BYTES_MIN)


cdef void copy_share(Share* share) noexcept nogil:
    """Bytes begin_bytes..end_bytes of the slices' concatenation into destination + begin_bytes."""
    cdef int64_t at = share.begin_bytes
    cdef int64_t k = share.slice_index
    cdef int64_t start = share.slice_offset_bytes      # of slice k in the concatenation
    cdef int64_t lo, hi
    while at < share.end_bytes:
        lo = at - start
        hi = share.sizes[k]
        if start + hi > share.end_bytes:
            hi = share.end_bytes - start
        if share.streaming:
            yk_copy_streaming(share.destination + at, share.sources[k] + lo, hi - lo, PREFETCH_BYTES)
        else:
            memcpy(share.destination + at, share.sources[k] + lo, <size_t>(hi - lo))
        at = start + hi
        start += share.sizes[k]
        k += 1
    if share.streaming:
        _mm_sfence()        # streaming stores are weakly ordered: visible before the join


cdef void* copy_share_thread(void* arg) noexcept nogil:
    copy_share(<Share*>arg)
    return NULL


def copy_slices(uint8_t[::1] destination, list slices, int threads=2):
    """Copy `slices` (buffers: memoryviews into the LMDB map, numpy arrays, bytes) one after
    another into `destination`, on up to `threads` threads with the GIL released. Returns the
    number of bytes copied. The slices must stay valid for the call (for map memory: the read
    transaction stays open), and `destination` must hold them all.

    >>> copy_slices(out.view(np.uint8), [view_a, view_b], threads=2)    # doctest: +SKIP
    """
    cdef Py_ssize_t count = len(slices)
    cdef int64_t total_bytes = 0
    cdef int64_t k, t, at, start
    cdef const uint8_t[::1] view
    cdef const uint8_t** sources = NULL
    cdef int64_t* sizes = NULL
    cdef Share shares[THREADS_MAX]
    cdef pthread_t handles[THREADS_MAX]
    cdef bint started[THREADS_MAX]
    cdef int share_count
    if count == 0:
        return 0
    sources = <const uint8_t**>malloc(count * sizeof(uint8_t*))
    sizes = <int64_t*>malloc(count * sizeof(int64_t))
    if sources == NULL or sizes == NULL:
        free(sources)
        free(sizes)
        raise MemoryError()
    try:
        for k in range(count):
            view = slices[k]
            sizes[k] = view.shape[0]
            sources[k] = &view[0] if view.shape[0] else NULL
            total_bytes += view.shape[0]
        if total_bytes > destination.shape[0]:
            raise ValueError(f"copy_slices: {total_bytes} bytes of slices, the destination holds "
                             f"{destination.shape[0]}")
        share_count = max(1, min(threads, THREADS_MAX))
        while share_count > 1 and total_bytes < SPLIT_BYTES_MIN * share_count:
            share_count -= 1
        # equal shares of the bytes, each cut at a 4 KiB multiple so that no two threads write
        # into the same destination page (nor cache line)
        k = 0
        start = 0
        for t in range(share_count):
            shares[t].sources = sources
            shares[t].sizes = sizes
            shares[t].destination = &destination[0]
            shares[t].begin_bytes = 0 if t == 0 else shares[t - 1].end_bytes
            shares[t].end_bytes = total_bytes if t == share_count - 1 else \
                min(total_bytes, (total_bytes * (t + 1) // share_count) & ~(<int64_t>4095))
            if shares[t].end_bytes < shares[t].begin_bytes:
                shares[t].end_bytes = shares[t].begin_bytes
            while k < count - 1 and start + sizes[k] <= shares[t].begin_bytes:
                start += sizes[k]
                k += 1
            shares[t].slice_index = k
            shares[t].slice_offset_bytes = start
            shares[t].streaming = total_bytes >= STREAM_BYTES_MIN
            started[t] = False
        with nogil:
            for t in range(1, share_count):
                started[t] = pthread_create(&handles[t], NULL, copy_share_thread, &shares[t]) == 0
                if not started[t]:
                    copy_share(&shares[t])         # no thread to be had: copy it here
            copy_share(&shares[0])
            for t in range(1, share_count):
                if started[t]:
                    pthread_join(handles[t], NULL)
        return total_bytes
    finally:
        free(sources)
        free(sizes)
