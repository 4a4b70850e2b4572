// The CPU value head (contract in value_head.h): norm rows, one skinny GEMM, then silu and the output dot per row.
#include "value_head.h"

#include <vector>

#include "decode_ops.h"
#include "linear.h"

namespace lenvm {

void value_head(const float* x, const float* norm, float eps, const float* w1, const float* b1, const float* w2,
                float b2, float* z, std::int64_t rows, std::int64_t d, std::int64_t hidden, ThreadPool& pool) {
    thread_local std::vector<float> normed, act;
    normed.resize(static_cast<std::size_t>(rows * d));
    act.resize(static_cast<std::size_t>(rows * hidden));
    rms_norm(x, norm, eps, normed.data(), rows, d);
    linear(normed.data(), w1, b1, act.data(), rows, hidden, d, pool);
    for (std::int64_t r = 0; r < rows; ++r) {
        double sum = 0.0;
        for (std::int64_t j = 0; j < hidden; ++j) sum += static_cast<double>(silu_times(act[r * hidden + j], w2[j]));
        z[r] = static_cast<float>(sum + static_cast<double>(b2));
    }
}

}  // namespace lenvm
