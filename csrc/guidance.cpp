// GuidanceBatch: slot table and per-step selection (contract in guidance.h, rules in lenvm_rt/select_ref.py).
//
// Compiled with -ffp-contract=off (CMakeLists.txt): every float32 operation rounds separately, as numpy does,
// so `logp + beta * u` is never fused into one multiply-add.
#include "guidance.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

#include "errors.h"
#include "rng.h"
#include "value_math.h"

namespace lenvm {
namespace {

std::string at(const char* array, std::int64_t row) { return std::string(array) + "[" + std::to_string(row) + "]"; }

std::string at(const char* array, std::int64_t row, std::int64_t slot) {
    return std::string(array) + "[" + std::to_string(row) + ", " + std::to_string(slot) + "]";
}

template <class Expected, class Got>
[[noreturn]] void fail(const std::string& name, const Expected& expected, const Got& got) {
    throw std::invalid_argument(describe_failure(name.c_str(), expected, got));
}

// Index of the best key under `better` (less: smallest, greater: largest); the first one wins ties.
template <class Key, class Better>
std::int64_t best_slot(std::int64_t n, Key key, Better better) {
    std::int64_t best = 0;
    float best_key = key(0);
    for (std::int64_t j = 1; j < n; ++j) {
        const float candidate = key(j);
        if (better(candidate, best_key)) {
            best = j;
            best_key = candidate;
        }
    }
    return best;
}

bool less(float a, float b) { return a < b; }
bool greater(float a, float b) { return a > b; }

// The band rules' choice among the candidates where `in_band` holds (select_ref.band_slot): the first in-band
// argmax of logp when the row is greedy, else the inverse CDF over p = exp(logp - max in-band logp), 0 outside the
// band, with the row's guidance uniform (the last in-band slot when no running sum exceeds U·total). -1 when no
// candidate is in band. Membership is recomputed (same operations, same bits) rather than stored: no per-step
// buffer.
template <class InBand>
std::int64_t band_choice(const GuidanceRow& row, const float* logp, std::int64_t n, InBand in_band) {
    std::int64_t top = -1;
    std::int64_t last = -1;
    for (std::int64_t j = 0; j < n; ++j) {
        if (!in_band(j)) continue;
        if (top < 0 || logp[j] > logp[top]) top = j;
        last = j;
    }
    if (top < 0 || row.greedy) return top;
    float total = 0.0f;
    for (std::int64_t j = 0; j < n; ++j) {
        if (in_band(j)) total += std::exp(logp[j] - logp[top]);
    }
    const float r = rng::uniform(row.seed, static_cast<std::uint32_t>(row.generated), kGuidanceStream) * total;
    float cdf = 0.0f;
    for (std::int64_t j = 0; j < n; ++j) {
        if (!in_band(j)) continue;
        cdf += std::exp(logp[j] - logp[top]);
        if (cdf > r) return j;
    }
    return last;
}

}  // namespace

GuidanceBatch::GuidanceBatch(std::int64_t capacity, std::vector<std::int32_t> eos_ids) {
    check(capacity >= 1 && capacity <= kMaxCapacity, "capacity", "an integer in [1, 2**24]", capacity);
    check(!eos_ids.empty(), "eos_ids", "at least one token id", "an empty list");
    for (std::size_t e = 0; e < eos_ids.size(); ++e) {
        if (eos_ids[e] < 0) fail(at("eos_ids", static_cast<std::int64_t>(e)), "a token id >= 0", eos_ids[e]);
    }
    rows_.resize(static_cast<std::size_t>(capacity));
    seen_.assign(static_cast<std::size_t>(capacity), 0);
    eos_ids_ = std::move(eos_ids);
}

const GuidanceRow& GuidanceBatch::checked_row(std::int64_t slot) const {
    if (slot < 0 || slot >= capacity()) {
        throw std::out_of_range(describe_failure("slot", "a slot in [0, " + std::to_string(capacity()) + ")", slot));
    }
    return rows_[static_cast<std::size_t>(slot)];
}

void GuidanceBatch::admit(std::int64_t slot, std::int32_t rule, std::int64_t target, std::int64_t max_new,
                          double gamma, double beta, std::uint64_t seed, bool greedy) {
    if (checked_row(slot).active) {
        fail("slot", "a free slot (retire it first)", std::to_string(slot) + ", which is active");
    }
    check(rule >= kEqual && rule <= kAtLeastBand, "rule",
          "1 (equal), 2 (at_most), 3 (at_least), 4 (tilt), 5 (equal_band), 6 (equal_soft), 7 (at_most_band) or "
          "8 (at_least_band)", rule);
    check(rule == kTilt || target >= 1, "target", "an integer >= 1 for every rule but tilt", target);
    check(max_new >= 1, "max_new", "an integer >= 1", max_new);
    check(gamma > 0.0 && gamma < 1.0, "gamma", "a number in (0, 1)", gamma);
    check(std::isfinite(beta) && std::fabs(beta) <= kMaxAbsBeta, "beta", "a finite number with |beta| <= 1e30",
          beta);

    GuidanceRow& row = rows_[static_cast<std::size_t>(slot)];
    row = GuidanceRow{rule, target, 0, max_new, neg_log_gamma(gamma), static_cast<float>(beta), seed, greedy, true};
    ++active_count_;
}

void GuidanceBatch::retire(std::int64_t slot) {
    if (!checked_row(slot).active) fail("slot", "an active slot", std::to_string(slot) + ", which is free");
    rows_[static_cast<std::size_t>(slot)].active = false;
    --active_count_;
}

bool GuidanceBatch::is_active(std::int64_t slot) const { return checked_row(slot).active; }

std::int64_t GuidanceBatch::generated(std::int64_t slot) const {
    const GuidanceRow& row = checked_row(slot);
    if (!row.active) fail("slot", "an active slot", std::to_string(slot) + ", which is free");
    return row.generated;
}

bool GuidanceBatch::is_eos(std::int32_t token) const {
    for (const std::int32_t eos : eos_ids_) {
        if (token == eos) return true;
    }
    return false;
}

void GuidanceBatch::validate(const StepArgs& args) {
    check(args.batch >= 0, "rows", "a batch size >= 0", args.batch);
    check(args.batch == 0 || args.k >= 1, "cand_ids", "at least one candidate slot per row (K >= 1)", args.k);
    ++stamp_;  // a new stamp per step: slots named by an earlier (even a failed) step never look duplicated
    for (std::int64_t b = 0; b < args.batch; ++b) {
        const std::int32_t slot = args.rows[b];
        if (slot < 0 || slot >= capacity()) {
            throw std::out_of_range(
                describe_failure(at("rows", b).c_str(), "a slot in [0, " + std::to_string(capacity()) + ")", slot));
        }
        const auto s = static_cast<std::size_t>(slot);
        if (!rows_[s].active) fail(at("rows", b), "an active slot", std::to_string(slot) + ", which is free");
        if (seen_[s] == stamp_) fail(at("rows", b), "distinct slots", std::to_string(slot) + " a second time");
        seen_[s] = stamp_;

        const std::int64_t base = b * args.k;
        if (args.cand_ids[base] < 0) {
            fail(at("cand_ids", b, 0), "a token id >= 0 (slot 0 is never empty)", args.cand_ids[base]);
        }
        bool empty_seen = false;
        for (std::int64_t j = 0; j < args.k; ++j) {
            const std::int32_t id = args.cand_ids[base + j];
            if (id == -1) {
                empty_seen = true;
                continue;
            }
            if (id < -1) fail(at("cand_ids", b, j), "a token id >= 0 or -1 (empty)", id);
            if (empty_seen) fail(at("cand_ids", b, j), "-1: filled slots precede empty ones", id);
            const float logp = args.cand_logp[base + j];
            if (!std::isfinite(logp)) fail(at("cand_logp", b, j), "a finite log-probability", logp);
            if (std::isnan(args.cand_z[base + j])) fail(at("cand_z", b, j), "a value-head logit, not NaN", "NaN");
        }
    }
}

std::int64_t GuidanceBatch::tilt_slot(const GuidanceRow& row, const std::int32_t* ids, const float* logp,
                                      const float* z, std::int64_t n) const {
    // w = logp + β·u is finite: logp is finite and |β·u| <= 1e30 is below half an ulp of FLT_MAX.
    const auto weight = [&](std::int64_t j) {
        return logp[j] + row.beta * (is_eos(ids[j]) ? 0.0f : value_of_logit(z[j]));
    };
    // The first kCached weights and probabilities stay on the stack (no allocation); later ones, beyond any
    // k_max of LENVM.md §4.2, are recomputed: the same operations give the same bits.
    constexpr std::int64_t kCached = 64;
    float w_cache[kCached] = {};
    float p_cache[kCached] = {};
    for (std::int64_t j = 0; j < std::min(n, kCached); ++j) w_cache[j] = weight(j);
    const auto w = [&](std::int64_t j) { return j < kCached ? w_cache[j] : weight(j); };
    if (row.greedy) return best_slot(n, w, greater);

    const float w_max = w(best_slot(n, w, greater));
    float total = 0.0f;
    for (std::int64_t j = 0; j < n; ++j) {
        const float p = std::exp(w(j) - w_max);
        if (j < kCached) p_cache[j] = p;
        total += p;
    }
    // Inverse CDF: the first slot whose running sum exceeds r (numpy searchsorted side="right"). The running
    // sums repeat the additions of `total` in the same order, so the last one equals it bit for bit.
    const float r = rng::uniform(row.seed, static_cast<std::uint32_t>(row.generated), kGuidanceStream) * total;
    float cdf = 0.0f;
    for (std::int64_t j = 0; j < n; ++j) {
        cdf += j < kCached ? p_cache[j] : std::exp(w(j) - w_max);
        if (cdf > r) return j;
    }
    return n - 1;
}

std::int64_t GuidanceBatch::equal_slot(const GuidanceRow& row, const std::int32_t* ids, const float* logp,
                                       const float* z, std::int64_t n) const {
    const auto rho = static_cast<float>(std::max<std::int64_t>(row.target - row.generated - 1, 0));
    const auto distance = [&](std::int64_t j) {
        const float remaining = is_eos(ids[j]) ? 0.0f : remaining_from_logit(z[j], row.neg_log_gamma);
        return std::fabs(remaining - rho);
    };
    const std::int64_t closest = best_slot(n, distance, less);
    if (row.rule == kEqualSoft) return soft_slot(row, ids, logp, z, n, closest);
    const float band = rho > 0.0f ? std::max(kBandAbs, kBandRel * rho) : 0.0f;  // at the target: EOS only
    // The closest candidate is in band whenever any is; otherwise EQUAL_BAND makes EQUAL's choice.
    if (row.rule == kEqual || !(distance(closest) <= band)) return closest;
    return band_choice(row, logp, n, [&](std::int64_t j) { return distance(j) <= band; });
}

std::int64_t GuidanceBatch::soft_slot(const GuidanceRow& row, const std::int32_t* ids, const float* logp,
                                      const float* z, std::int64_t n, std::int64_t closest) const {
    // select_ref.soft_target / soft_tilt / soft_lambda / soft_slot, operation for operation in double. The float
    // scores are recomputed where needed (same operations, same bits): no per-step buffer.
    const auto u = [&](std::int64_t j) {
        return static_cast<double>(is_eos(ids[j]) ? 0.0f : value_of_logit(z[j]));
    };
    const double rho = static_cast<double>(std::max<std::int64_t>(row.target - row.generated - 1, 0));
    const double u_star = 1.0 - std::exp(-rho * static_cast<double>(row.neg_log_gamma));
    double u_min = u(0);
    double u_max = u_min;
    double top = static_cast<double>(logp[0]);
    for (std::int64_t j = 1; j < n; ++j) {
        u_min = std::min(u_min, u(j));
        u_max = std::max(u_max, u(j));
        top = std::max(top, static_cast<double>(logp[j]));
    }
    if (!(u_min < u_star && u_star < u_max)) return closest;  // outside the range: EQUAL's choice

    const auto a = [&](std::int64_t j) { return static_cast<double>(logp[j]) - top; };
    const auto d = [&](std::int64_t j) { return u(j) - u_min; };
    const auto score = [&](std::int64_t j, double lam) { return a(j) + lam * d(j); };
    const auto max_score = [&](double lam) {
        double m = score(0, lam);
        for (std::int64_t j = 1; j < n; ++j) m = std::max(m, score(j, lam));
        return m;
    };
    const double g = u_star - u_min;
    double lo = -kSoftBound;
    double hi = kSoftBound;
    double lam = 0.0;
    for (int it = 0; it < kSoftIterations; ++it) {
        const double s_max = max_score(lam);
        double s0 = 0.0, s1 = 0.0, s2 = 0.0;
        for (std::int64_t j = 0; j < n; ++j) {
            const double w = std::exp(score(j, lam) - s_max);
            const double dj = d(j);
            s0 += w;
            s1 += w * dj;
            s2 += w * dj * dj;
        }
        const double m = s1 / s0;
        const double v = s2 / s0 - m * m;
        const double f = m - g;
        if (f > 0.0) {
            hi = lam;
        } else if (f < 0.0) {
            lo = lam;
        }
        const double step = v > 0.0 ? lam - f / v : std::nan("");
        lam = (lo <= step && step <= hi) ? step : 0.5 * (lo + hi);
    }

    if (row.greedy) {
        std::int64_t best = 0;
        double best_score = score(0, lam);
        for (std::int64_t j = 1; j < n; ++j) {
            const double sj = score(j, lam);
            if (sj > best_score) {
                best = j;
                best_score = sj;
            }
        }
        return best;
    }
    const double s_max = max_score(lam);
    double total = 0.0;
    for (std::int64_t j = 0; j < n; ++j) total += std::exp(score(j, lam) - s_max);
    const double r =
        static_cast<double>(rng::uniform(row.seed, static_cast<std::uint32_t>(row.generated), kGuidanceStream)) * total;
    double cdf = 0.0;
    for (std::int64_t j = 0; j < n; ++j) {
        cdf += std::exp(score(j, lam) - s_max);
        if (cdf > r) return j;
    }
    return n - 1;
}

Choice GuidanceBatch::select(const GuidanceRow& row, const std::int32_t* ids, const float* logp, const float* z,
                             std::int64_t k) const {
    std::int64_t n = 1;  // filled slots form a prefix (validated)
    while (n < k && ids[n] >= 0) ++n;
    const auto u = [&](std::int64_t j) { return is_eos(ids[j]) ? 0.0f : value_of_logit(z[j]); };
    const auto remaining = [&](std::int64_t j) {
        return is_eos(ids[j]) ? 0.0f : remaining_from_logit(z[j], row.neg_log_gamma);
    };
    const std::int64_t t = row.generated;
    const bool budget_met = t + 1 >= row.target;

    std::int64_t slot = 0;
    switch (row.rule) {
        case kEqual:
        case kEqualBand:
        case kEqualSoft:
            slot = equal_slot(row, ids, logp, z, n);
            break;
        case kAtMost:
        case kAtMostBand:
            if (budget_met) {
                slot = -1;
                for (std::int64_t j = 0; j < n && slot < 0; ++j) {
                    if (is_eos(ids[j])) slot = j;
                }
            } else {
                slot = best_slot(n, u, less);
                if (row.rule == kAtMostBand) {
                    const auto rho = static_cast<float>(row.target - t - 1);  // > 0 here
                    const std::int64_t fit =
                        band_choice(row, logp, n, [&](std::int64_t j) { return remaining(j) <= rho; });
                    if (fit >= 0) slot = fit;
                }
            }
            break;
        case kAtLeast:
        case kAtLeastBand:
            if (budget_met) {
                slot = row.rule == kAtLeastBand
                           ? band_choice(row, logp, n, [](std::int64_t) { return true; })
                           : best_slot(n, u, less);
            } else {
                // EOS scores -1, below every u in [0, 1]; a row of only EOS candidates takes slot 0, like the
                // reference's unmasked argmax over all-zero scores.
                slot = best_slot(n, [&](std::int64_t j) { return is_eos(ids[j]) ? -1.0f : value_of_logit(z[j]); },
                                 greater);
                if (row.rule == kAtLeastBand) {
                    const auto rho = static_cast<float>(row.target - t - 1);
                    const std::int64_t reach = band_choice(
                        row, logp, n, [&](std::int64_t j) { return !is_eos(ids[j]) && remaining(j) >= rho; });
                    if (reach >= 0) slot = reach;
                }
            }
            break;
        default:  // kTilt; admit() accepts no other rule
            slot = tilt_slot(row, ids, logp, z, n);
            break;
    }
    const std::int32_t token = slot >= 0 ? ids[slot] : eos_ids_[0];
    return Choice{static_cast<std::int32_t>(slot), token, is_eos(token) || t + 1 >= row.max_new};
}

void GuidanceBatch::step(const StepArgs& args) {
    validate(args);
    for (std::int64_t b = 0; b < args.batch; ++b) {
        GuidanceRow& row = rows_[static_cast<std::size_t>(args.rows[b])];
        const std::int64_t base = b * args.k;
        const Choice choice = select(row, args.cand_ids + base, args.cand_logp + base, args.cand_z + base, args.k);
        args.out_slot[b] = choice.slot;
        args.out_token[b] = choice.token;
        args.out_done[b] = choice.done ? 1 : 0;
        ++row.generated;
    }
}

}  // namespace lenvm
