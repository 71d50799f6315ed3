// int8 GEMM with activations quantized on the fly (placeholder: plain loops).
#include <cmath>
#include <algorithm>

#include "internal.h"

namespace ns::avx512vnni {

void linear_int8(const LinearVnniArgs& v) {
    const LinearArgs& a = v.base;
    const int64_t nb = a.K / 32;
    for (int64_t m = 0; m < a.M; ++m)
        for (int64_t n = 0; n < a.N; ++n) {
            float s = 0;
            for (int64_t blk = 0; blk < nb; ++blk) {
                const float* x = a.x + m * a.K + blk * 32;
                float amax = 0;
                for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
                const float xs = amax / 127.f;
                int32_t acc = 0;
                for (int i = 0; i < 32; ++i) {
                    const int q = xs > 0 ? int(std::nearbyint(x[i] / xs)) : 0;
                    acc += q * static_cast<const int8_t*>(a.w)[n * a.K + blk * 32 + i];
                }
                s += float(acc) * xs;
            }
            a.y[m * a.N + n] = s * a.scale[n] + (a.bias ? a.bias[n] : 0.f);
        }
}

}  // namespace ns::avx512vnni
