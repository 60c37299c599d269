// Fused unpack + dequantize + dot kernels for the packed expert format of coel_model/quant.py.
//
// Batch-1 decode is memory-bandwidth bound, so the weight is read once, in packed form, and
// never materialised as fp32: for each output row, codes are unpacked 8 at a time with shifts
// (the "lane-interleaved" layout puts codes j*8..j*8+7 of a 64-code block in bit field j of
// 8 lanes), converted to float and FMA'd against x. With the group scale s and zero z,
//   y = sum_g s_g * (sum_{i in g} q_i x_i) - s_g z_g * (sum_{i in g} x_i)
// so the inner loop is convert + FMA only; the zero term uses per-group sums of x.
// For larger batches the caller dequantizes row tiles with coel_dequant_rows and uses a GEMM.
// Plain C ABI (called through ctypes), AVX2 + FMA + F16C, OpenMP over output rows.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>

namespace {

#ifndef ROW_CHUNK
#define ROW_CHUNK 32  // rows per dynamically scheduled work item
#endif
#ifndef X_BLOCK_BYTES
#define X_BLOCK_BYTES 16384  // x floats per K-block (all NB columns) kept in L1 while rows stream by
#endif

inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

// Packed bytes per row for Kp codes.
inline int64_t row_bytes(int bits, int64_t kp) { return bits == 3 ? kp / 4 : kp * bits / 8; }

// The 8 codes of chunk j (elements j*8..j*8+7) of 64-code block b, as int32 lanes.
template <int BITS>
struct Block {
    __m256i v, vh;
    inline void load(const uint8_t* q, const uint8_t* qh, int64_t b) {
        if constexpr (BITS == 4) {
            v = _mm256_loadu_si256((const __m256i*)(q + b * 32));
        } else if constexpr (BITS == 2 || BITS == 3) {
            v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(q + b * 16)));
            if constexpr (BITS == 3)  // bit 2 of code j*8+i sits at bit j+2 of lane i
                vh = _mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qh + b * 8))), 2);
        }
        (void)q; (void)qh; (void)b;
    }
    template <int J>
    inline __m256 codes(const uint8_t* q, int64_t b) const {
        if constexpr (BITS == 8) {
            return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + b * 64 + J * 8))));
        } else if constexpr (BITS == 4) {
            __m256i c = J == 7 ? _mm256_srli_epi32(v, 28) : _mm256_and_si256(_mm256_srli_epi32(v, J * 4), _mm256_set1_epi32(15));
            return _mm256_cvtepi32_ps(c);
        } else if constexpr (BITS == 2) {
            // vpermps reads only the low 3 bits of each index: a table {0,1,2,3,0,1,2,3} turns the
            // shifted lanes into floats without a mask or an int->float convert
            return _mm256_permutevar8x32_ps(_mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3), _mm256_srli_epi32(v, J * 2));
        } else {
            __m256i lo = _mm256_and_si256(_mm256_srli_epi32(v, J * 2), _mm256_set1_epi32(3));
            __m256i hi = _mm256_and_si256(_mm256_srli_epi32(vh, J), _mm256_set1_epi32(4));
            return _mm256_permutevar8x32_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_or_si256(lo, hi));
        }
    }
};


// Fast path: group size is a multiple of 64. NB batch columns share each unpacked chunk;
// 8/NB accumulators per column keep the FMA pipes busy.
template <int BITS, int NB>
void rows_fast(const float* x, int64_t xs, int64_t kp, const uint8_t* q, const uint8_t* qh,
               const uint16_t* sc, const uint16_t* zr, int64_t G, int64_t gs, const float* xsum,
               float* y, int64_t ys, int64_t o0, int64_t o1, int64_t g0, int64_t g1) {
    constexpr int A = NB >= 8 ? 1 : 8 / NB;  // independent accumulators per column
    const int64_t rb = row_bytes(BITS, kp), rbh = kp / 8, bpg = gs / 64;
    for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* qr = q + o * rb;
        const uint8_t* hr = BITS == 3 ? qh + o * rbh : nullptr;
        __m256 tot[NB];
        float mt[NB];
        for (int n = 0; n < NB; ++n) { tot[n] = _mm256_setzero_ps(); mt[n] = 0.f; }
        for (int64_t g = g0; g < g1; ++g) {
            __m256 acc[NB][A];
            for (int n = 0; n < NB; ++n)
                for (int a = 0; a < A; ++a) acc[n][a] = _mm256_setzero_ps();
            for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
                Block<BITS> blk;
                blk.load(qr, hr, b);
                _mm_prefetch((const char*)(qr + rb + b * (BITS == 3 ? 16 : 8 * BITS)), _MM_HINT_T0);
                const float* xb = x + b * 64;
#define COEL_STEP(J)                                                                  \
                {                                                                      \
                    __m256 f = blk.template codes<J>(qr, b);                          \
                    for (int n = 0; n < NB; ++n)                                       \
                        acc[n][J % A] = _mm256_fmadd_ps(f, _mm256_loadu_ps(xb + n * xs + J * 8), acc[n][J % A]); \
                }
                COEL_STEP(0) COEL_STEP(1) COEL_STEP(2) COEL_STEP(3)
                COEL_STEP(4) COEL_STEP(5) COEL_STEP(6) COEL_STEP(7)
#undef COEL_STEP
            }
            const float s = h2f(sc[o * G + g]), m = -s * h2f(zr[o * G + g]);
            const __m256 sv = _mm256_set1_ps(s);
            for (int n = 0; n < NB; ++n) {
                __m256 a = acc[n][0];
                for (int i = 1; i < A; ++i) a = _mm256_add_ps(a, acc[n][i]);
                tot[n] = _mm256_fmadd_ps(sv, a, tot[n]);
                mt[n] += m * xsum[n * G + g];
            }
        }
        for (int n = 0; n < NB; ++n) y[n * ys + o] += hsum(tot[n]) + mt[n];
    }
}

#ifdef __AVX512F__
// AVX-512 variant of rows_fast: one 64-code block is broadcast to both 256-bit halves and shifted
// by a per-half amount (srlv), so each 512-bit step yields chunks j and j+1 = 16 consecutive codes;
// codes become floats through a 16-entry permute table (no mask, no int->float convert).
template <int BITS, int NB>
void rows_fast512(const float* x, int64_t xs, int64_t kp, const uint8_t* q, const uint8_t* qh,
                  const uint16_t* sc, const uint16_t* zr, int64_t G, int64_t gs, const float* xsum,
                  float* y, int64_t ys, int64_t o0, int64_t o1, int64_t g0, int64_t g1) {
    constexpr int A = 1;  // one accumulator per column: measured 6-9 % faster than 4 (fewer flush ops per group)
    const int64_t rb = row_bytes(BITS, kp), rbh = kp / 8, bpg = gs / 64;
    constexpr int CB = BITS == 4 ? 4 : 2;  // bits per code in the shifted plane
    __m512i sh[4], shh[4];
    for (int p = 0; p < 4; ++p) {
        sh[p] = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * p * CB), _mm512_set1_epi32((2 * p + 1) * CB));
        shh[p] = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * p), _mm512_set1_epi32(2 * p + 1));
    }
    alignas(64) float tab[16];
    for (int i = 0; i < 16; ++i) tab[i] = (float)(BITS == 4 ? i : (BITS == 3 ? (i & 7) : (i & 3)));
    const __m512 lut = _mm512_load_ps(tab);
    const __m512i low2 = _mm512_set1_epi32(3);
    for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* qr = q + o * rb;
        const uint8_t* hr = BITS == 3 ? qh + o * rbh : nullptr;
        __m512 tot[NB];
        float mt[NB];
        for (int n = 0; n < NB; ++n) { tot[n] = _mm512_setzero_ps(); mt[n] = 0.f; }
        for (int64_t g = g0; g < g1; ++g) {
            __m512 acc[NB][A];
            for (int n = 0; n < NB; ++n)
                for (int a = 0; a < A; ++a) acc[n][a] = _mm512_setzero_ps();
            for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
                _mm_prefetch((const char*)(qr + rb + b * (BITS == 3 ? 16 : 8 * BITS)), _MM_HINT_T0);
                const float* xb = x + b * 64;
                __m512i v, vh;
                if constexpr (BITS == 4) {
                    v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(qr + b * 32)));
                } else if constexpr (BITS == 2 || BITS == 3) {
                    v = _mm512_cvtepu16_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(qr + b * 16))));
                    if constexpr (BITS == 3) {
                        int64_t hv;
                        memcpy(&hv, hr + b * 8, 8);
                        vh = _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_set1_epi64x(hv)), 2);
                    }
                }
                (void)v; (void)vh;
#define COEL_STEP512(P)                                                                        \
                {                                                                               \
                    __m512 f;                                                                   \
                    if constexpr (BITS == 8) {                                                  \
                        f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(                            \
                            _mm_loadu_si128((const __m128i*)(qr + b * 64 + P * 16))));          \
                    } else {                                                                    \
                        __m512i idx = _mm512_srlv_epi32(v, sh[P]);                              \
                        if constexpr (BITS == 3)                                                \
                            idx = _mm512_ternarylogic_epi32(idx, _mm512_srlv_epi32(vh, shh[P]), low2, 0xE4); \
                        f = _mm512_permutexvar_ps(idx, lut);                                    \
                    }                                                                           \
                    for (int n = 0; n < NB; ++n)                                                \
                        acc[n][P % A] = _mm512_fmadd_ps(f, _mm512_loadu_ps(xb + n * xs + P * 16), acc[n][P % A]); \
                }
                COEL_STEP512(0) COEL_STEP512(1) COEL_STEP512(2) COEL_STEP512(3)
#undef COEL_STEP512
            }
            const float s = h2f(sc[o * G + g]), m = -s * h2f(zr[o * G + g]);
            const __m512 sv = _mm512_set1_ps(s);
            for (int n = 0; n < NB; ++n) {
                __m512 a = acc[n][0];
                for (int i = 1; i < A; ++i) a = _mm512_add_ps(a, acc[n][i]);
                tot[n] = _mm512_fmadd_ps(sv, a, tot[n]);
                mt[n] += m * xsum[n * G + g];
            }
        }
        for (int n = 0; n < NB; ++n) y[n * ys + o] += _mm512_reduce_add_ps(tot[n]) + mt[n];
    }
}
#define ROWS_FAST rows_fast512
#else
#define ROWS_FAST rows_fast
#endif

// Dequantize the 8 weights of chunk c (elements c*8..c*8+7) of one row.
template <int BITS>
inline __m256 dq_chunk(const uint8_t* qr, const uint8_t* hr, int64_t c, const float* sf, const float* mf, int64_t gs) {
    const int64_t b = c >> 3, j = c & 7, g = (c * 8) / gs;
    __m256i ci;
    if constexpr (BITS == 8) {
        ci = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qr + c * 8)));
    } else if constexpr (BITS == 4) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(qr + b * 32));
        ci = _mm256_and_si256(_mm256_srl_epi32(v, _mm_cvtsi64_si128(j * 4)), _mm256_set1_epi32(15));
    } else {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(qr + b * 16)));
        ci = _mm256_and_si256(_mm256_srl_epi32(v, _mm_cvtsi64_si128(j * 2)), _mm256_set1_epi32(3));
        if constexpr (BITS == 3) {
            __m256i vh = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(hr + b * 8)));
            vh = _mm256_and_si256(_mm256_srl_epi32(vh, _mm_cvtsi64_si128(j)), _mm256_set1_epi32(1));
            ci = _mm256_or_si256(ci, _mm256_slli_epi32(vh, 2));
        }
    }
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(ci), _mm256_set1_ps(sf[g]), _mm256_set1_ps(mf[g]));
}

// General path (any group size that is a multiple of 8): dequantize each chunk, then FMA.
template <int BITS>
void rows_general(const float* x, int64_t xs, int64_t N, int64_t kp, const uint8_t* q, const uint8_t* qh,
                  const uint16_t* sc, const uint16_t* zr, int64_t G, int64_t gs,
                  float* y, int64_t ys, int64_t o0, int64_t o1, float* sf, float* mf) {
    const int64_t rb = row_bytes(BITS, kp), rbh = kp / 8, nc = kp / 8;
    for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* qr = q + o * rb;
        const uint8_t* hr = BITS == 3 ? qh + o * rbh : nullptr;
        for (int64_t g = 0; g < G; ++g) { sf[g] = h2f(sc[o * G + g]); mf[g] = -sf[g] * h2f(zr[o * G + g]); }
        for (int64_t n = 0; n < N; ++n) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            const float* xn = x + n * xs;
            int64_t c = 0;
            for (; c + 1 < nc; c += 2) {
                a0 = _mm256_fmadd_ps(dq_chunk<BITS>(qr, hr, c, sf, mf, gs), _mm256_loadu_ps(xn + c * 8), a0);
                a1 = _mm256_fmadd_ps(dq_chunk<BITS>(qr, hr, c + 1, sf, mf, gs), _mm256_loadu_ps(xn + c * 8 + 8), a1);
            }
            for (; c < nc; ++c)
                a0 = _mm256_fmadd_ps(dq_chunk<BITS>(qr, hr, c, sf, mf, gs), _mm256_loadu_ps(xn + c * 8), a0);
            y[n * ys + o] = hsum(_mm256_add_ps(a0, a1));
        }
    }
}

template <int BITS>
void qgemv_bits(const float* x, int64_t N, int64_t kp, const uint8_t* q, const uint8_t* qh,
                const uint16_t* sc, const uint16_t* zr, int64_t O, int64_t G, int64_t gs,
                const float* xsum, float* y, int nthreads) {
    const bool fast = gs % 64 == 0;
    const int64_t work = O * kp * (N < 8 ? N : 8);
    // below ~1M multiply-adds a fork/join costs more than it saves, and on a shared machine a
    // descheduled helper thread can stall the call for a whole time slice
    if (work < (1 << 20)) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        float* sf = fast ? nullptr : new float[2 * G];
        float* mf = fast ? nullptr : sf + G;
        // dynamic chunks of rows: on a shared machine a descheduled thread must not hold up the rest
#pragma omp for schedule(dynamic, 1)
        for (int64_t ch = 0; ch < (O + ROW_CHUNK - 1) / ROW_CHUNK; ++ch) {
            const int64_t o0 = ch * ROW_CHUNK, o1 = o0 + ROW_CHUNK < O ? o0 + ROW_CHUNK : O;
            if (!fast) {
                rows_general<BITS>(x, kp, N, kp, q, qh, sc, zr, G, gs, y, O, o0, o1, sf, mf);
            } else {
                // columns in passes of 8, then 4, 2, 1; within a pass, K in blocks whose slice of
                // x stays in L1 while the chunk's rows stream through (packed rows read once per pass)
                int64_t n = 0;
                while (n < N) {
                    const int nb = N - n >= 8 ? 8 : N - n >= 4 ? 4 : N - n >= 2 ? 2 : 1;
                    int64_t gpb = X_BLOCK_BYTES / (4 * nb * gs);
                    if (gpb < 1) gpb = 1;
                    for (int64_t g0 = 0; g0 < G; g0 += gpb) {
                        const int64_t g1 = g0 + gpb < G ? g0 + gpb : G;
                        const float* xn = x + n * kp;
                        const float* xsn = xsum + n * G;
                        float* yn = y + n * O;
                        switch (nb) {
                            case 8: ROWS_FAST<BITS, 8>(xn, kp, kp, q, qh, sc, zr, G, gs, xsn, yn, O, o0, o1, g0, g1); break;
                            case 4: ROWS_FAST<BITS, 4>(xn, kp, kp, q, qh, sc, zr, G, gs, xsn, yn, O, o0, o1, g0, g1); break;
                            case 2: ROWS_FAST<BITS, 2>(xn, kp, kp, q, qh, sc, zr, G, gs, xsn, yn, O, o0, o1, g0, g1); break;
                            default: ROWS_FAST<BITS, 1>(xn, kp, kp, q, qh, sc, zr, G, gs, xsn, yn, O, o0, o1, g0, g1); break;
                        }
                    }
                    n += nb;
                }
            }
        }
        delete[] sf;
    }
}

template <int BITS>
void dequant_bits(const uint8_t* q, const uint8_t* qh, const uint16_t* sc, const uint16_t* zr,
                  int64_t kp, int64_t G, int64_t gs, int64_t o0, int64_t o1, float* dst, int nthreads) {
    const int64_t rb = row_bytes(BITS, kp), rbh = kp / 8, nc = kp / 8;
    if ((o1 - o0) * kp < (1 << 18)) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
        float* sf = new float[2 * G];
        float* mf = sf + G;
#pragma omp for schedule(static)
        for (int64_t o = o0; o < o1; ++o) {
            for (int64_t g = 0; g < G; ++g) { sf[g] = h2f(sc[o * G + g]); mf[g] = -sf[g] * h2f(zr[o * G + g]); }
            const uint8_t* qr = q + o * rb;
            const uint8_t* hr = BITS == 3 ? qh + o * rbh : nullptr;
            float* d = dst + (o - o0) * kp;
            if (gs % 64 == 0) {  // a 64-code block lies in one group: constant shifts, one s/m per block
                for (int64_t b = 0; b < kp / 64; ++b) {
                    Block<BITS> blk;
                    blk.load(qr, hr, b);
                    const int64_t g = b * 64 / gs;
                    const __m256 sv = _mm256_set1_ps(sf[g]), mv = _mm256_set1_ps(mf[g]);
                    float* db = d + b * 64;
                    _mm256_storeu_ps(db + 0, _mm256_fmadd_ps(blk.template codes<0>(qr, b), sv, mv));
                    _mm256_storeu_ps(db + 8, _mm256_fmadd_ps(blk.template codes<1>(qr, b), sv, mv));
                    _mm256_storeu_ps(db + 16, _mm256_fmadd_ps(blk.template codes<2>(qr, b), sv, mv));
                    _mm256_storeu_ps(db + 24, _mm256_fmadd_ps(blk.template codes<3>(qr, b), sv, mv));
                    _mm256_storeu_ps(db + 32, _mm256_fmadd_ps(blk.template codes<4>(qr, b), sv, mv));
                    _mm256_storeu_ps(db + 40, _mm256_fmadd_ps(blk.template codes<5>(qr, b), sv, mv));
                    _mm256_storeu_ps(db + 48, _mm256_fmadd_ps(blk.template codes<6>(qr, b), sv, mv));
                    _mm256_storeu_ps(db + 56, _mm256_fmadd_ps(blk.template codes<7>(qr, b), sv, mv));
                }
            } else {
                for (int64_t c = 0; c < nc; ++c) _mm256_storeu_ps(d + c * 8, dq_chunk<BITS>(qr, hr, c, sf, mf, gs));
            }
        }
        delete[] sf;
    }
}

// y[n, o] = sum_k w[o, k] x[n, k] for an fp16 (bf16=0) or bf16 (bf16=1) weight (O, K).
template <bool BF16>
inline __m256 load_half8(const uint16_t* p) {
    __m128i h = _mm_loadu_si128((const __m128i*)p);
    if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
}
template <bool BF16>
inline float half1(uint16_t h) {
    if constexpr (BF16) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
    else return _cvtsh_ss(h);
}

template <bool BF16>
void hgemv(const float* x, int64_t N, int64_t K, const uint16_t* w, int64_t O, float* y, int nthreads) {
    if (O * K * (N < 8 ? N : 8) < (1 << 20)) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t o = 0; o < O; ++o) {
        const uint16_t* wr = w + o * K;
        for (int64_t n = 0; n < N; ++n) {
            const float* xn = x + n * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                a0 = _mm256_fmadd_ps(load_half8<BF16>(wr + k), _mm256_loadu_ps(xn + k), a0);
                a1 = _mm256_fmadd_ps(load_half8<BF16>(wr + k + 8), _mm256_loadu_ps(xn + k + 8), a1);
                a2 = _mm256_fmadd_ps(load_half8<BF16>(wr + k + 16), _mm256_loadu_ps(xn + k + 16), a2);
                a3 = _mm256_fmadd_ps(load_half8<BF16>(wr + k + 24), _mm256_loadu_ps(xn + k + 24), a3);
            }
            for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load_half8<BF16>(wr + k), _mm256_loadu_ps(xn + k), a0);
            float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for (; k < K; ++k) s += half1<BF16>(wr[k]) * xn[k];
            y[n * O + o] = s;
        }
    }
}

}  // namespace

extern "C" {

int coel_hgemv(const float* x, int64_t N, int64_t K, const void* w, int64_t O, int bf16, float* y, int nthreads);
int coel_dequant_rows(const void* q, const void* qh, const void* scales, const void* zeros,
                      int64_t kp, int64_t G, int64_t gs, int bits, int64_t o0, int64_t o1,
                      float* dst, int nthreads);

int coel_abi_version() { return 2; }

// Which instruction set the fused GEMV was compiled for (reported by the benchmark).
const char* coel_isa() {
#ifdef __AVX512F__
    return "avx512";
#else
    return "avx2";
#endif
}

// x (N, kp) fp32 zero-padded; q/qh packed codes; scales/zeros fp16 (O, G); y (N, O) fp32.
int coel_qgemv(const float* x, int64_t N, int64_t kp, const void* q, const void* qh,
               const void* scales, const void* zeros, int64_t O, int64_t G, int64_t gs, int bits,
               float* y, int nthreads) {
    if (gs % 8 || kp % 64 || kp != G * gs) return -1;
    memset(y, 0, sizeof(float) * N * O);
    float* xsum = new float[N * G];
    for (int64_t n = 0; n < N; ++n)
        for (int64_t g = 0; g < G; ++g) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t i = 0; i < gs; i += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(x + n * kp + g * gs + i));
            xsum[n * G + g] = hsum(a);
        }
    const uint8_t* qb = (const uint8_t*)q;
    const uint8_t* hb = (const uint8_t*)qh;
    const uint16_t* sc = (const uint16_t*)scales;
    const uint16_t* zr = (const uint16_t*)zeros;
    int rc = 0;
    switch (bits) {
        case 2: qgemv_bits<2>(x, N, kp, qb, hb, sc, zr, O, G, gs, xsum, y, nthreads); break;
        case 3: qgemv_bits<3>(x, N, kp, qb, hb, sc, zr, O, G, gs, xsum, y, nthreads); break;
        case 4: qgemv_bits<4>(x, N, kp, qb, hb, sc, zr, O, G, gs, xsum, y, nthreads); break;
        case 8: qgemv_bits<8>(x, N, kp, qb, hb, sc, zr, O, G, gs, xsum, y, nthreads); break;
        default: rc = -2;
    }
    delete[] xsum;
    return rc;
}

// Dequantize rows [o0, o1) into dst ((o1 - o0), kp) fp32.
int coel_dequant_rows(const void* q, const void* qh, const void* scales, const void* zeros,
                      int64_t kp, int64_t G, int64_t gs, int bits, int64_t o0, int64_t o1,
                      float* dst, int nthreads) {
    if (gs % 8 || kp % 64 || kp != G * gs) return -1;
    const uint8_t* qb = (const uint8_t*)q;
    const uint8_t* hb = (const uint8_t*)qh;
    const uint16_t* sc = (const uint16_t*)scales;
    const uint16_t* zr = (const uint16_t*)zeros;
    switch (bits) {
        case 2: dequant_bits<2>(qb, hb, sc, zr, kp, G, gs, o0, o1, dst, nthreads); break;
        case 3: dequant_bits<3>(qb, hb, sc, zr, kp, G, gs, o0, o1, dst, nthreads); break;
        case 4: dequant_bits<4>(qb, hb, sc, zr, kp, G, gs, o0, o1, dst, nthreads); break;
        case 8: dequant_bits<8>(qb, hb, sc, zr, kp, G, gs, o0, o1, dst, nthreads); break;
        default: return -2;
    }
    return 0;
}

// One whole SwiGLU expert, y (N, d) = down(silu(gate(x)) * up(x)), in one call (small batches:
// saves the per-matmul Python/ctypes overhead, which dominates for small experts).
// p: int64 params {bits, group, d, hidden, kp_d, kp_h, bf16,
//                  then per projection (gate, up, down): qweight|weight, qweight_hi, scales, zeros}.
// work: at least N * (kp_d + 3 * kp_h) floats.
int coel_qexpert(const int64_t* p, const float* x, int64_t N, float* y, float* work, int nthreads) {
    const int bits = (int)p[0];
    const int64_t gs = p[1], d = p[2], h = p[3], kpd = p[4], kph = p[5];
    const int bf16 = (int)p[6];
    const void* const* t = (const void* const*)(p + 7);  // 12 pointers
    float* xp = work;                  // (N, kpd) x padded
    float* g = xp + N * kpd;           // (N, h)
    float* u = g + N * h;              // (N, h)
    float* a = u + N * h;              // (N, kph) silu(g) * u, padded
    const float* xin = x;
    if (bits != 16 && kpd != d) {
        for (int64_t n = 0; n < N; ++n) {
            memcpy(xp + n * kpd, x + n * d, sizeof(float) * d);
            memset(xp + n * kpd + d, 0, sizeof(float) * (kpd - d));
        }
        xin = xp;
    }
    int rc;
    if (bits == 16) {
        rc = coel_hgemv(x, N, d, t[0], h, bf16, g, nthreads);
        if (!rc) rc = coel_hgemv(x, N, d, t[4], h, bf16, u, nthreads);
    } else {
        rc = coel_qgemv(xin, N, kpd, t[0], t[1], t[2], t[3], h, kpd / gs, gs, bits, g, nthreads);
        if (!rc) rc = coel_qgemv(xin, N, kpd, t[4], t[5], t[6], t[7], h, kpd / gs, gs, bits, u, nthreads);
    }
    if (rc) return rc;
    const int64_t kin = bits == 16 ? h : kph;
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t i = 0; i < h; ++i) {
            const float gv = g[n * h + i];
            a[n * kin + i] = gv / (1.0f + expf(-gv)) * u[n * h + i];
        }
        for (int64_t i = h; i < kin; ++i) a[n * kin + i] = 0.f;
    }
    if (bits == 16) return coel_hgemv(a, N, h, t[8], d, bf16, y, nthreads);
    return coel_qgemv(a, N, kph, t[8], t[9], t[10], t[11], d, kph / gs, gs, bits, y, nthreads);
}

// Dequantize a whole (small) expert for the GEMM path: dst = gate (h, kp_d) | up (h, kp_d) |
// down (d, kp_h), fp32, padding columns included. p as for coel_qexpert (integer formats only).
int coel_qexpert_dequant(const int64_t* p, float* dst, int nthreads) {
    const int bits = (int)p[0];
    const int64_t gs = p[1], d = p[2], h = p[3], kpd = p[4], kph = p[5];
    const void* const* t = (const void* const*)(p + 7);
    if (bits == 16) return -2;
    int rc = coel_dequant_rows(t[0], t[1], t[2], t[3], kpd, kpd / gs, gs, bits, 0, h, dst, nthreads);
    if (!rc) rc = coel_dequant_rows(t[4], t[5], t[6], t[7], kpd, kpd / gs, gs, bits, 0, h, dst + h * kpd, nthreads);
    if (!rc) rc = coel_dequant_rows(t[8], t[9], t[10], t[11], kph, kph / gs, gs, bits, 0, d, dst + 2 * h * kpd, nthreads);
    return rc;
}

// y (N, O) = x (N, K) @ w^T for a 16-bit float weight w (O, K): fp16 (bf16 = 0) or bf16 (1).
int coel_hgemv(const float* x, int64_t N, int64_t K, const void* w, int64_t O, int bf16,
               float* y, int nthreads) {
    if (bf16) hgemv<true>(x, N, K, (const uint16_t*)w, O, y, nthreads);
    else hgemv<false>(x, N, K, (const uint16_t*)w, O, y, nthreads);
    return 0;
}

}  // extern "C"
