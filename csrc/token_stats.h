// Log-probability and rank of each row's chosen token under softmax(logits), for the decode loop's
// per-token quality record (one call per step instead of a log-sum-exp and a comparison pass in torch).
//
// Contract: token_stats(logits, tokens, rows, width, vocab, logp, rank), logits float32 [rows, vocab] row-major,
// tokens int64 [rows, width] in [0, vocab) (the caller checks), outputs logp float64 [rows, width], rank int64
// [rows, width]; for each of a row's `width` chosen tokens t (all read in one pass over the row):
//   logp[r, i] = x_t - m - ln(sum_v exp(x_v - m)),  x = logits[r], t = tokens[r, i], m = max_v x_v
//   rank[r, i] = 1 + #{v : x_v > x_t}
// The exponentials run as a vectorised polynomial when linear() uses its AVX2 + FMA kernel (so
// LENVM_RT_LINEAR_KERNEL=scalar selects the portable path, std::exp in double, for both): relative error below
// 5e-7 per term, a term below e^-87.3 counts as e^-87.3 = 1.2e-38 (the sum is at least 1), float partial sums
// over blocks of 512 entries are added in double. Within 1e-7 of a float64 log-softmax for vocabularies up to
// 150k. A row holding a NaN or +inf gets logp = NaN for every token (rank still counts the strictly larger entries).
// Runs on the calling thread; throws only for a bad LENVM_RT_LINEAR_KERNEL, as linear() does.
#pragma once

#include <cstdint>

namespace lenvm {

void token_stats(const float* logits, const std::int64_t* tokens, std::int64_t rows, std::int64_t width,
                 std::int64_t vocab, double* logp, std::int64_t* rank);

}  // namespace lenvm
