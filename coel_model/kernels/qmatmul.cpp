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
#include <omp.h>

namespace {

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
            if constexpr (BITS == 3)
                vh = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(qh + b * 8)));
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
            __m256i c = _mm256_and_si256(_mm256_srli_epi32(v, J * 2), _mm256_set1_epi32(3));
            return _mm256_cvtepi32_ps(c);
        } else {
            __m256i lo = _mm256_and_si256(_mm256_srli_epi32(v, J * 2), _mm256_set1_epi32(3));
            __m256i hi = _mm256_and_si256(_mm256_slli_epi32(_mm256_srli_epi32(vh, J), 2), _mm256_set1_epi32(4));
            return _mm256_cvtepi32_ps(_mm256_or_si256(lo, hi));
        }
    }
};


// Fast path: group size is a multiple of 64. NB batch columns share each unpacked chunk;
// 8/NB accumulators per column keep the FMA pipes busy.
template <int BITS, int NB>
void rows_fast(const float* x, int64_t xs, int64_t kp, const uint8_t* q, const uint8_t* qh,
               const uint16_t* sc, const uint16_t* zr, int64_t G, int64_t gs, const float* xsum,
               float* y, int64_t ys, int64_t o0, int64_t o1) {
    constexpr int A = NB == 1 ? 8 : (NB == 2 ? 4 : 2);
    const int64_t rb = row_bytes(BITS, kp), rbh = kp / 8, bpg = gs / 64;
    for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* qr = q + o * rb;
        const uint8_t* hr = BITS == 3 ? qh + o * rbh : nullptr;
        __m256 tot[NB];
        float mt[NB];
        for (int n = 0; n < NB; ++n) { tot[n] = _mm256_setzero_ps(); mt[n] = 0.f; }
        for (int64_t g = 0; g < G; ++g) {
            __m256 acc[NB][A];
            for (int n = 0; n < NB; ++n)
                for (int a = 0; a < A; ++a) acc[n][a] = _mm256_setzero_ps();
            for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
                Block<BITS> blk;
                blk.load(qr, hr, b);
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
        for (int n = 0; n < NB; ++n) y[n * ys + o] = hsum(tot[n]) + mt[n];
    }
}

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
    const int64_t work = O * kp * (N < 4 ? N : 4);
    if (work < (1 << 17)) nthreads = 1;  // a fork/join costs more than a tiny matmul
#pragma omp parallel num_threads(nthreads)
    {
        float* sf = fast ? nullptr : new float[2 * G];
        float* mf = fast ? nullptr : sf + G;
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        // contiguous row ranges, multiples of 8 rows, one per thread
        const int64_t per = ((O + nt - 1) / nt + 7) / 8 * 8;
        const int64_t o0 = t * per < O ? t * per : O, o1 = (t + 1) * per < O ? (t + 1) * per : O;
        if (o0 < o1) {
            if (!fast) {
                rows_general<BITS>(x, kp, N, kp, q, qh, sc, zr, G, gs, y, O, o0, o1, sf, mf);
            } else {
                int64_t n = 0;
                for (; n + 4 <= N; n += 4)
                    rows_fast<BITS, 4>(x + n * kp, kp, kp, q, qh, sc, zr, G, gs, xsum + n * G, y + n * O, O, o0, o1);
                switch (N - n) {
                    case 3: rows_fast<BITS, 3>(x + n * kp, kp, kp, q, qh, sc, zr, G, gs, xsum + n * G, y + n * O, O, o0, o1); break;
                    case 2: rows_fast<BITS, 2>(x + n * kp, kp, kp, q, qh, sc, zr, G, gs, xsum + n * G, y + n * O, O, o0, o1); break;
                    case 1: rows_fast<BITS, 1>(x + n * kp, kp, kp, q, qh, sc, zr, G, gs, xsum + n * G, y + n * O, O, o0, o1); break;
                    default: break;
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
            for (int64_t c = 0; c < nc; ++c) _mm256_storeu_ps(d + c * 8, dq_chunk<BITS>(qr, hr, c, sf, mf, gs));
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
    if (O * K < (1 << 17)) nthreads = 1;
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

int coel_abi_version() { return 1; }

// x (N, kp) fp32 zero-padded; q/qh packed codes; scales/zeros fp16 (O, G); y (N, O) fp32.
int coel_qgemv(const float* x, int64_t N, int64_t kp, const void* q, const void* qh,
               const void* scales, const void* zeros, int64_t O, int64_t G, int64_t gs, int bits,
               float* y, int nthreads) {
    if (gs % 8 || kp % 64 || kp != G * gs) return -1;
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

// y (N, O) = x (N, K) @ w^T for a 16-bit float weight w (O, K): fp16 (bf16 = 0) or bf16 (1).
int coel_hgemv(const float* x, int64_t N, int64_t K, const void* w, int64_t O, int bf16,
               float* y, int nthreads) {
    if (bf16) hgemv<true>(x, N, K, (const uint16_t*)w, O, y, nthreads);
    else hgemv<false>(x, N, K, (const uint16_t*)w, O, y, nthreads);
    return 0;
}

}  // extern "C"
