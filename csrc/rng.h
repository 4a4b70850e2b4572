// Counter-based Philox4x32-10 with no hidden state, bit-compatible with Triton's `tl.rand`.
//
// Key   = (low 32 bits of seed, high 32 bits of seed).
// Counter = (offset, stream, 0, 0).
// uniform(seed, offset, stream) takes the first output word and maps it to a float in [0, 1) the way
// triton.language.random.uint_to_uniform_float does: reinterpret as int32, fold negatives with -x - 1
// (== ~x), convert to float32 (round to nearest) and multiply by the float32 scale 4.6566127342e-10.
// With stream == 0 this equals `tl.rand(seed, offset)` for a 32-bit offset.
// The decoder uses seed = request seed, offset = index of the generated token, stream = draw index.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace lenvm::rng {

using Counter = std::array<std::uint32_t, 4>;
using Key = std::array<std::uint32_t, 2>;

inline constexpr std::uint32_t kRoundA = 0xD2511F53u;  // multiplies counter word 0
inline constexpr std::uint32_t kRoundB = 0xCD9E8D57u;  // multiplies counter word 2
inline constexpr std::uint32_t kBumpA = 0x9E3779B9u;   // golden ratio, added to key word 0
inline constexpr std::uint32_t kBumpB = 0xBB67AE85u;   // sqrt(3) - 1, added to key word 1
inline constexpr int kRounds = 10;
inline constexpr float kUniformScale = 4.6566127342e-10f;  // largest scale with INT32_MAX * scale < 1

constexpr Counter philox4x32_10(Counter c, Key k) {
    for (int round = 0; round < kRounds; ++round) {
        const std::uint64_t prod_a = std::uint64_t{kRoundA} * c[0];
        const std::uint64_t prod_b = std::uint64_t{kRoundB} * c[2];
        c = Counter{static_cast<std::uint32_t>(prod_b >> 32) ^ c[1] ^ k[0], static_cast<std::uint32_t>(prod_b),
                    static_cast<std::uint32_t>(prod_a >> 32) ^ c[3] ^ k[1], static_cast<std::uint32_t>(prod_a)};
        k = Key{k[0] + kBumpA, k[1] + kBumpB};
    }
    return c;
}

// Random123 known-answer vector (kat_vectors, philox4x32 10), checked at compile time.
inline constexpr Counter kKnownAnswer = philox4x32_10(Counter{0u, 0u, 0u, 0u}, Key{0u, 0u});
static_assert(kKnownAnswer[0] == 0x6627E8D5u && kKnownAnswer[1] == 0xE169C58Du &&
              kKnownAnswer[2] == 0xBC57AC4Cu && kKnownAnswer[3] == 0x9B00DBD8u);

inline float uint_to_uniform(std::uint32_t bits) {
    const auto folded = static_cast<std::int32_t>((bits & 0x80000000u) ? ~bits : bits);
    return static_cast<float>(folded) * kUniformScale;
}

inline float uniform(std::uint64_t seed, std::uint32_t offset, std::uint32_t stream) {
    const Key key{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)};
    return uint_to_uniform(philox4x32_10(Counter{offset, stream, 0u, 0u}, key)[0]);
}

inline void uniform_batch(const std::uint64_t* seeds, const std::uint32_t* offsets, std::size_t n,
                          std::uint32_t stream, float* out) {
    for (std::size_t i = 0; i < n; ++i) out[i] = uniform(seeds[i], offsets[i], stream);
}

}  // namespace lenvm::rng
