// NEON kernels for arm64 (NEON is baseline there, so no extra flags).
#include <arm_neon.h>

#include "hnswcache/kernels.hpp"

namespace hnswcache {
namespace {

float dot_neon(const float* a, const float* b, std::size_t n) {
    float32x4_t s0 = vdupq_n_f32(0), s1 = vdupq_n_f32(0), s2 = vdupq_n_f32(0), s3 = vdupq_n_f32(0);
    std::size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

float l2sq_neon(const float* a, const float* b, std::size_t n) {
    float32x4_t s0 = vdupq_n_f32(0), s1 = vdupq_n_f32(0);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float32x4_t d0 = vsubq_f32(vld1q_f32(a + i), vld1q_f32(b + i));
        const float32x4_t d1 = vsubq_f32(vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s0 = vfmaq_f32(s0, d0, d0);
        s1 = vfmaq_f32(s1, d1, d1);
    }
    for (; i + 4 <= n; i += 4) {
        const float32x4_t d = vsubq_f32(vld1q_f32(a + i), vld1q_f32(b + i));
        s0 = vfmaq_f32(s0, d, d);
    }
    float s = vaddvq_f32(vaddq_f32(s0, s1));
    for (; i < n; ++i) {
        const float d = a[i] - b[i];
        s += d * d;
    }
    return s;
}

void dot_batch_neon(const float* q, const float* const* xs, std::size_t count, std::size_t n,
                    float* out) {
    for (std::size_t j = 0; j < count; ++j) out[j] = dot_neon(q, xs[j], n);
}

void l2sq_batch_neon(const float* q, const float* const* xs, std::size_t count, std::size_t n,
                     float* out) {
    for (std::size_t j = 0; j < count; ++j) out[j] = l2sq_neon(q, xs[j], n);
}

// The two 16-bit row formats: float16 (fcvtl widens 4 halves per load) and bfloat16 (the
// high half of a float32, widened by a shift: ushll #16). One kernel body serves both.
struct half_fmt {
    static float32x4_t load(const half_t* p) {
        return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
    }
    static float one(half_t h) { return half_to_float(h); }
};
struct bf16_fmt {
    static float32x4_t load(const half_t* p) {
        return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
    }
    static float one(half_t h) { return bf16_to_float(h); }
};

template <class F>
void dot_batch16_neon(const float* q, const half_t* const* xs, std::size_t count, std::size_t n,
                      float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        float32x4_t s0 = vdupq_n_f32(0), s1 = vdupq_n_f32(0);
        std::size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            s0 = vfmaq_f32(s0, vld1q_f32(q + i), F::load(xs[j] + i));
            s1 = vfmaq_f32(s1, vld1q_f32(q + i + 4), F::load(xs[j] + i + 4));
        }
        for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(q + i), F::load(xs[j] + i));
        float r = vaddvq_f32(vaddq_f32(s0, s1));
        for (; i < n; ++i) r += q[i] * F::one(xs[j][i]);
        out[j] = r;
    }
}

template <class F>
void l2sq_batch16_neon(const float* q, const half_t* const* xs, std::size_t count,
                       std::size_t n, float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        float32x4_t s0 = vdupq_n_f32(0);
        std::size_t i = 0;
        for (; i + 4 <= n; i += 4) {
            const float32x4_t d = vsubq_f32(vld1q_f32(q + i), F::load(xs[j] + i));
            s0 = vfmaq_f32(s0, d, d);
        }
        float r = vaddvq_f32(s0);
        for (; i < n; ++i) {
            const float d = q[i] - F::one(xs[j][i]);
            r += d * d;
        }
        out[j] = r;
    }
}

void join_b_neon(const half_t* high, const half_t* low, float* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const uint32x4_t u = vorrq_u32(vshll_n_u16(vld1_u16(high + i), 16), vmovl_u16(vld1_u16(low + i)));
        vst1q_f32(out + i, vreinterpretq_f32_u32(u));
    }
    for (; i < n; ++i) out[i] = join_halves(high[i], low[i]);
}

void encode_h_neon(const float* in, half_t* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1_u16(out + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(in + i))));
    for (; i < n; ++i) out[i] = float_to_half(in[i]);
}

void decode_h_neon(const half_t* in, float* out, std::size_t n) {
    std::size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, half_fmt::load(in + i));
    for (; i < n; ++i) out[i] = half_to_float(in[i]);
}

void dot_batch_i8_neon(const float* q, const std::int8_t* const* xs, std::size_t count,
                       std::size_t n, float* out) {
    for (std::size_t j = 0; j < count; ++j) {
        const std::int8_t* x = xs[j];
        float32x4_t s0 = vdupq_n_f32(0), s1 = vdupq_n_f32(0);
        std::size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const int16x8_t w = vmovl_s8(vld1_s8(x + i));  // 8 codes widened to 16 bits
            s0 = vfmaq_f32(s0, vld1q_f32(q + i), vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))));
            s1 = vfmaq_f32(s1, vld1q_f32(q + i + 4), vcvtq_f32_s32(vmovl_s16(vget_high_s16(w))));
        }
        float r = vaddvq_f32(vaddq_f32(s0, s1));
        for (; i < n; ++i) r += q[i] * static_cast<float>(x[i]);
        out[j] = r;
    }
}

const kernels_t table{isa_t::neon,
                      "neon",
                      dot_neon,
                      l2sq_neon,
                      dot_batch_neon,
                      l2sq_batch_neon,
                      dot_batch16_neon<half_fmt>,
                      l2sq_batch16_neon<half_fmt>,
                      encode_h_neon,
                      decode_h_neon,
                      dot_batch_i8_neon,
                      dot_batch16_neon<bf16_fmt>,
                      l2sq_batch16_neon<bf16_fmt>,
                      join_b_neon,
                      hamming8_portable,  // (arm64's popcount is one instruction: cnt)
                      below_portable};

}  // namespace

const kernels_t* neon_kernels() { return &table; }

}  // namespace hnswcache
