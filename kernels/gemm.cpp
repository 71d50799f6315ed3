// GEMM/GEMV over fp32 / int8 / fp8 / int4 weights (placeholder: plain loops).
#include <cstring>

#include "internal.h"

namespace ns::NS_ISA {

namespace {
float fp8_to_float(uint8_t b) {
    uint32_t bits = uint32_t(b & 0x7F) << 20;
    float f;
    std::memcpy(&f, &bits, 4);
    f *= 0x1p120f;
    return (b & 0x80) ? -f : f;
}
float weight(const LinearArgs& a, int64_t n, int64_t k) {
    switch (a.wtype) {
        case W_I8: return float(static_cast<const int8_t*>(a.w)[n * a.K + k]) * a.scale[n];
        case W_FP8: return fp8_to_float(static_cast<const uint8_t*>(a.w)[n * a.K + k]) * a.scale[n];
        case W_I4: {
            const uint8_t byte = static_cast<const uint8_t*>(a.w)[n * (a.K / 2) + k / 2];
            const int q = (k & 1) ? (byte >> 4) : (byte & 0xF);
            const int64_t g = n * (a.K / a.group_size) + k / a.group_size;
            return q * a.scale[g] + a.minimum[g];
        }
        default: return static_cast<const float*>(a.w)[n * a.K + k];
    }
}
}  // namespace

void linear(const LinearArgs& a) {
    for (int64_t m = 0; m < a.M; ++m)
        for (int64_t n = 0; n < a.N; ++n) {
            float s = a.bias ? a.bias[n] : 0.f;
            for (int64_t k = 0; k < a.K; ++k) s += a.x[m * a.K + k] * weight(a, n, k);
            a.y[m * a.N + n] = s;
        }
}

}  // namespace ns::NS_ISA
