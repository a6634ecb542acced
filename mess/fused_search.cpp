// The CPU twin of mess/fused.py's fused_residual_argmin, by hand: vectors of LANES bank rows (GCC/Clang
// vector extensions, lowered to AVX-512, AVX2, NEON...), L unrolled for the usual lengths, the running
// minimum and its index kept per lane. Built with -ffp-contract=off: every product and sum rounds on its
// own, in the order of mess/search.py's block_alpha and residual_argmin, so that it picks the plain path's
// k bit for bit (for finite weights: a NaN residual never wins here, while torch.min would return it).
// Built and loaded at run time by mess/fused.py (_build_cpu_kernel); LANES must equal its _CPU_LANES.
#include <stdint.h>
#define LANES 16
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf load(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline vf bcast(float x) { vf v = {}; return v + x; }
static inline vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }
static inline vf pick(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }  // m ? a : b
static inline vi pick(vi m, vi a, vi b) { return (a & m) | (b & ~m); }

// rows b0..b1-1 of c_w (M, len) against the bank c_r_t (len, np) and div (np,), np a multiple of
// LANES, n real rows; L > 0: len == L, known at compile time
template <int L>
static void rows(const float* cw, const float* crt, const float* dv, int64_t b0, int64_t b1, int64_t n,
                 int64_t np, int64_t len, int nan1, float* best, int64_t* kout) {
    const int64_t ll = L > 0 ? L : len;
    vi lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    const vf inf = bcast(__builtin_inff());
    for (int64_t b = b0; b < b1; b++) {
        const float* w = cw + b * ll;
        vf bv = inf;
        vi bk = {};
        for (int64_t n0 = 0; n0 < np; n0 += LANES) {
            const vf r0 = load(crt + n0);
            vf dot = bcast(w[0]) * r0;
            for (int64_t l = 1; l < ll; l++) dot = dot + bcast(w[l]) * load(crt + l * np + n0);
            vf a = dot / load(dv + n0);
            if (nan1) a = pick(a != a, bcast(1.0f), a);
            vf res = vabs(a * r0 - bcast(w[0]));
            for (int64_t l = 1; l < ll; l++) res = res + vabs(a * load(crt + l * np + n0) - bcast(w[l]));
            const vi idx = lane + (int32_t)n0;
            if (n0 + LANES > n) res = pick(idx < (int32_t)n, res, inf);  // padding lanes never win
            const vi better = res < bv;  // strict: a lane keeps its earliest index among equals
            bv = pick(better, res, bv);
            bk = pick(better, idx, bk);
        }
        float r = bv[0];
        int32_t k = bk[0];
        for (int i = 1; i < LANES; i++)
            if (bv[i] < r || (bv[i] == r && bk[i] < k)) { r = bv[i]; k = bk[i]; }
        best[b] = r;
        kout[b] = k;
    }
}

extern "C" int mess_fused_search(const float* cw, const float* crt, const float* dv, int64_t b0, int64_t b1,
                                 int64_t n, int64_t np, int64_t len, int nan1, float* best, int64_t* kout) {
    if (np % LANES || n > np || n >= (int64_t)1 << 31 || len < 1) return 1;
    switch (len) {
        case 8: rows<8>(cw, crt, dv, b0, b1, n, np, len, nan1, best, kout); break;
        case 9: rows<9>(cw, crt, dv, b0, b1, n, np, len, nan1, best, kout); break;
        case 18: rows<18>(cw, crt, dv, b0, b1, n, np, len, nan1, best, kout); break;
        default: rows<0>(cw, crt, dv, b0, b1, n, np, len, nan1, best, kout);
    }
    return 0;
}
