// Length-guided token selection for a batch of decoding rows: a fixed-capacity slot table of per-request
// state plus one `step` call per decode step for the whole batch (LENVM.md §4.5-§4.6).
//
// Specification: lenvm_rt/select_ref.py (`select_row`). `step` reproduces it choice for choice: scores in
// float32 (csrc/value_math.h), EOS candidates get u = l̂ = 0, ties go to the lower slot, AT_MOST forces EOS
// (slot -1, token eos_ids[0]) once t + 1 >= T, AT_LEAST skips EOS while t + 1 < T, TILT draws by inverse CDF
// with rng::uniform(seed, offset = t, stream = kGuidanceStream) or takes the argmax when greedy. EQUAL_BAND (the
// tolerance band) keeps the candidates with |l̂ - ρ| <= max(kBandAbs, kBandRel·ρ) while ρ > 0 (EOS only once
// ρ = 0), computed as EQUAL computes |l̂ - ρ|, and draws among them by exp(logp - max in-band logp) with the same uniform and inverse CDF (the last
// in-band slot when no running sum exceeds U·total), or takes their argmax logp when greedy; with none in band it
// makes EQUAL's choice. Its stop rules are EQUAL's. EQUAL_SOFT (the soft Equal To, reference `eq_soft`) works in
// double on the float u: target u* = 1 - exp(-ρ·nlg); u* <= min u or u* >= max u makes EQUAL's choice; otherwise
// p' ∝ exp(a + λ·d) (a = logp - max logp, d = u - min u) with λ from exactly kSoftIterations safeguarded Newton
// steps in [-kSoftBound, kSoftBound] (select_ref.soft_lambda, the same double operations in the same order), then
// argmax(a + λ·d) when greedy or the inverse CDF over the double weights with TILT's uniform. Stop rules as EQUAL.
// AT_MOST_BAND and AT_LEAST_BAND choose as EQUAL_BAND does within their own band: before the target, the candidates
// with l̂ <= ρ (At Most: they fit the budget) or the non-EOS ones with l̂ >= ρ (At Least: they reach it), with
// AT_MOST's or AT_LEAST's choice when none is in band; at the target AT_MOST_BAND forces EOS as AT_MOST does and
// AT_LEAST_BAND's band is every candidate.
//
// Shapes: B batch rows, K candidate slots per row, C capacity (slots of the table), E EOS ids.
//   rows       int32 [B]     slot of each batch row; distinct, each slot admitted and not retired
//   cand_ids   int32 [B, K]  candidate token ids, most probable first; -1 marks an empty slot. Slot 0 of
//                            every row is filled and empty slots only follow filled ones.
//   cand_logp  float32 [B, K] base log-probabilities; finite in filled slots (empty slots are not read)
//   cand_z     float32 [B, K] value-head logits of the state each candidate leads to; not NaN in filled slots
//   out_slot   int32 [B]     chosen slot, or -1 for a forced EOS
//   out_token  int32 [B]     chosen token id
//   out_done   uint8 [B]     1 when the token is EOS or t + 1 >= max_new, else 0
// All arrays are row-major and contiguous; the outputs must not overlap the inputs (the binding checks both).
//
// Contract:
//   - After a successful step every row's generated count t has grown by one (done rows included: the caller
//     retires them). A step that throws has written no output and advanced nothing.
//   - Errors: std::invalid_argument (bad value, naming the argument and the row) or std::out_of_range (slot
//     outside the table). Nothing exits or aborts.
//   - No allocation after construction; O(B·K·E) work per step. Not thread-safe: one caller at a time.
#pragma once

#include <cstdint>
#include <vector>

namespace lenvm {

enum Rule : std::int32_t {
    kEqual = 1, kAtMost = 2, kAtLeast = 3, kTilt = 4, kEqualBand = 5, kEqualSoft = 6, kAtMostBand = 7, kAtLeastBand = 8
};

inline constexpr std::uint32_t kGuidanceStream = 1;  // Philox stream of guided draws; 0 is plain sampling
inline constexpr double kMaxAbsBeta = 1e30;           // keeps logp + β·u finite for every finite logp
inline constexpr float kBandRel = 0.25f;  // EQUAL_BAND half-width max(kBandAbs, kBandRel·ρ) in tokens, as
inline constexpr float kBandAbs = 2.0f;   // BAND_REL / BAND_ABS of lenvm_rt/select_ref.py
inline constexpr int kSoftIterations = 20;      // EQUAL_SOFT's solver: SOFT_ITERATIONS / SOFT_BOUND of
inline constexpr double kSoftBound = 1e5;        // lenvm_rt/select_ref.py (no early exit)
inline constexpr std::int64_t kMaxCapacity = std::int64_t{1} << 24;

// One slot of the table.
struct GuidanceRow {
    std::int32_t rule = 0;
    std::int64_t target = 0;     // T: generated tokens including EOS (unused by TILT)
    std::int64_t generated = 0;  // t: tokens generated so far, EOS included
    std::int64_t max_new = 0;
    float neg_log_gamma = 0.0f;  // float32(-ln γ)
    float beta = 0.0f;           // float32(β)
    std::uint64_t seed = 0;
    bool greedy = false;
    bool active = false;
};

// Borrowed views of one step's arrays (shapes in the file header).
struct StepArgs {
    const std::int32_t* rows;
    const std::int32_t* cand_ids;
    const float* cand_logp;
    const float* cand_z;
    std::int32_t* out_slot;
    std::int32_t* out_token;
    std::uint8_t* out_done;
    std::int64_t batch;  // B
    std::int64_t k;      // K
};

struct Choice {
    std::int32_t slot;  // index into the row's candidates; -1 for a forced EOS
    std::int32_t token;
    bool done;
};

class GuidanceBatch {
public:
    // capacity in [1, kMaxCapacity]; eos_ids non-empty, each >= 0 (eos_ids[0] is the forced EOS token).
    GuidanceBatch(std::int64_t capacity, std::vector<std::int32_t> eos_ids);

    // Start a request in a free slot with t = 0. rule in {1, ..., 8}; target >= 1 unless rule is TILT;
    // max_new >= 1; 0 < gamma < 1; beta finite with |beta| <= kMaxAbsBeta.
    void admit(std::int64_t slot, std::int32_t rule, std::int64_t target, std::int64_t max_new, double gamma,
               double beta, std::uint64_t seed, bool greedy);
    // Free an active slot.
    void retire(std::int64_t slot);
    // One decode step for the batch (see the file header).
    void step(const StepArgs& args);

    std::int64_t capacity() const { return static_cast<std::int64_t>(rows_.size()); }
    std::int64_t active_count() const { return active_count_; }
    bool is_active(std::int64_t slot) const;
    std::int64_t generated(std::int64_t slot) const;  // t of an active slot
    const std::vector<std::int32_t>& eos_ids() const { return eos_ids_; }

private:
    const GuidanceRow& checked_row(std::int64_t slot) const;
    void validate(const StepArgs& args);
    bool is_eos(std::int32_t token) const;
    Choice select(const GuidanceRow& row, const std::int32_t* ids, const float* logp, const float* z,
                  std::int64_t k) const;
    std::int64_t equal_slot(const GuidanceRow& row, const std::int32_t* ids, const float* logp, const float* z,
                            std::int64_t n) const;
    std::int64_t soft_slot(const GuidanceRow& row, const std::int32_t* ids, const float* logp, const float* z,
                           std::int64_t n, std::int64_t closest) const;
    std::int64_t tilt_slot(const GuidanceRow& row, const std::int32_t* ids, const float* logp, const float* z,
                           std::int64_t n) const;

    std::vector<GuidanceRow> rows_;     // [C]
    std::vector<std::uint64_t> seen_;   // [C] step stamp of the last step that named the slot (duplicate check)
    std::vector<std::int32_t> eos_ids_;  // [E]
    std::uint64_t stamp_ = 0;
    std::int64_t active_count_ = 0;
};

}  // namespace lenvm
