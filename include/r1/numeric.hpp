// r1/numeric.hpp: the low-precision storage types r1 reads and writes.
//
//   bf16      1 sign, 8 exponent, 7 mantissa bits: the top half of a float32.
//   f16       1-5-10, bias 15: IEEE binary16 (torch.float16), largest finite 65504,
//             smallest subnormal 2^-24.
//   fp8_e4m3  1-4-3, bias 7, the "fn" variant of the OCP FP8 spec used by DeepSeek-V3's
//             released weights: no infinities, one NaN pattern per sign (S.1111.111),
//             largest finite 448, smallest subnormal 2^-9.
//   fp8_e5m2  1-5-2, bias 15, IEEE-like: infinities and NaNs at exponent 31, largest
//             finite 57344, smallest subnormal 2^-16.
//
// Conversions from float round to nearest, ties to even. Finite values past a type's
// largest finite value saturate to it (DeepSeek-V3 and DeepGEMM clamp to +-448 before
// casting for the same reason). Infinities stay infinite where the type has them (bf16,
// e5m2) and saturate in e4m3, which has none. NaN stays NaN. bf16 and f16 keep IEEE overflow
// to infinity, exactly as torch.bfloat16 and torch.float16 do, so checkpoints round-trip
// bit for bit.
//
// These are storage types: arithmetic happens in float after to_float().
#pragma once

#include "config.hpp"

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace r1 {

struct bf16 {
  uint16_t bits = 0;

  static bf16 from_bits(uint16_t b) { return bf16{b}; }
  static inline bf16 from_float(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x0040u)};  // quiet NaN
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even on the 16 dropped bits
    return bf16{static_cast<uint16_t>(u >> 16)};
  }
  inline float to_float() const { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
  friend bool operator==(bf16 a, bf16 b) { return a.bits == b.bits; }
};

struct f16 {
  uint16_t bits = 0;

  static f16 from_bits(uint16_t b) { return f16{b}; }
  static inline f16 from_float(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const auto sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t magnitude = u & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u) return f16{static_cast<uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu))};  // quiet NaN
    if (magnitude < 0x38800000u) {
      // Below 2^-14, the smallest normal, the grid is uniform with step 2^-24: scale to
      // units of it (exact, a power of two) and round to an integer, which is the code.
      const float units = std::bit_cast<float>(magnitude) * 0x1p24f;
      return f16{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(units)))};
    }
    // Normal: rebias the exponent (127 -> 15), round the 13 dropped bits to nearest even;
    // a carry bumps the exponent, and past 65504 the code reaches infinity (0x7C00), where
    // larger values and infinity itself are clamped.
    const uint32_t rebiased = magnitude - (112u << 23);
    const uint32_t code = (rebiased + 0x0FFFu + ((rebiased >> 13) & 1u)) >> 13;
    return f16{static_cast<uint16_t>(sign | (code > 0x7C00u ? 0x7C00u : code))};
  }
  inline float to_float() const {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t exponent = (bits >> 10) & 0x1Fu;
    const uint32_t mantissa = bits & 0x3FFu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
      return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(static_cast<float>(mantissa) * 0x1p-24f));
    }
    const uint32_t float_exponent = exponent == 0x1Fu ? 0xFFu : exponent + 112u;  // infinity/NaN stay so
    return std::bit_cast<float>(sign | (float_exponent << 23) | (mantissa << 13));
  }
  friend bool operator==(f16 a, f16 b) { return a.bits == b.bits; }
};

namespace detail {

// A float8 format with ExpBits exponent bits, ManBits mantissa bits and bias Bias.
// MaxCode is the bit pattern (without sign) of the largest finite value.
template <int ExpBits, int ManBits, int Bias, uint8_t MaxCode, bool HasInf>
struct Minifloat {
  // (1.mantissa) * 2^(exponent - Bias), as an integer significand times a power of two.
  static constexpr float max_finite = static_cast<float>((1u << ManBits) | (MaxCode & ((1u << ManBits) - 1u))) *
                                      static_cast<float>(1ull << ((MaxCode >> ManBits) - Bias - ManBits));
  static constexpr uint8_t nan_code = 0x7F;
  static constexpr uint8_t inf_code = static_cast<uint8_t>(((1u << ExpBits) - 1u) << ManBits);

  static uint8_t encode(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
    const uint32_t magnitude = u & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u) return sign | nan_code;
    if (magnitude == 0x7F800000u) return sign | (HasInf ? inf_code : MaxCode);
    constexpr uint32_t float_min_normal_field = static_cast<uint32_t>(128 - Bias);  // float exponent field of 2^(1-Bias)
    if ((magnitude >> 23) < float_min_normal_field) {
      // Below the format's smallest normal: the grid is uniform with step 2^(1-Bias-ManBits),
      // so scale to units of that step (exact: a power of two) and round to an integer.
      // A result of 2^ManBits is the smallest normal, whose code is that same integer.
      const float units = std::bit_cast<float>(magnitude) * std::ldexp(1.0f, Bias - 1 + ManBits);
      return sign | static_cast<uint8_t>(std::nearbyint(units));
    }
    // Normal: rebias the exponent field, then round away the low mantissa bits to nearest
    // even; a mantissa carry correctly bumps the exponent.
    constexpr int shift = 23 - ManBits;
    const uint32_t rebiased = magnitude - (static_cast<uint32_t>(127 - Bias) << 23);
    const uint32_t rounding = (1u << (shift - 1)) - 1u + ((rebiased >> shift) & 1u);
    const uint32_t code = (rebiased + rounding) >> shift;
    return sign | static_cast<uint8_t>(code > MaxCode ? MaxCode : code);
  }

  static float decode(uint8_t code) {
    const bool negative = code & 0x80u;
    const uint32_t exponent = (code >> ManBits) & ((1u << ExpBits) - 1u);
    const uint32_t mantissa = code & ((1u << ManBits) - 1u);
    float magnitude;
    if (HasInf && exponent == (1u << ExpBits) - 1u) {
      magnitude = mantissa == 0 ? INFINITY : NAN;
    } else if (!HasInf && (code & 0x7Fu) == nan_code) {
      magnitude = NAN;
    } else if (exponent == 0) {
      magnitude = std::ldexp(static_cast<float>(mantissa), 1 - Bias - ManBits);
    } else {
      magnitude = std::ldexp(static_cast<float>((1u << ManBits) | mantissa), static_cast<int>(exponent) - Bias - ManBits);
    }
    return negative ? -magnitude : magnitude;
  }
};

using E4M3 = Minifloat<4, 3, 7, 0x7E, false>;
using E5M2 = Minifloat<5, 2, 15, 0x7B, true>;
static_assert(E4M3::max_finite == 448.0f && E5M2::max_finite == 57344.0f);

}  // namespace detail

// An FP8 value in the given format: 8 bits of storage, converted through float.
template <class Format>
struct float8 {
  uint8_t bits = 0;
  static constexpr float max_finite = Format::max_finite;
  static float8 from_bits(uint8_t b) { return float8{b}; }
  static float8 from_float(float f) { return float8{Format::encode(f)}; }
  float to_float() const { return Format::decode(bits); }
  friend bool operator==(float8 a, float8 b) { return a.bits == b.bits; }
};

using fp8_e4m3 = float8<detail::E4M3>;
using fp8_e5m2 = float8<detail::E5M2>;

// Storage types convert through float; float and double convert with a plain cast.
template <class T>
inline constexpr bool is_storage_type_v =
    std::is_same_v<T, bf16> || std::is_same_v<T, f16> || std::is_same_v<T, fp8_e4m3> || std::is_same_v<T, fp8_e5m2>;

template <class To, class From>
To convert_scalar(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (is_storage_type_v<From>) {
    return convert_scalar<To>(x.to_float());
  } else if constexpr (is_storage_type_v<To>) {
    return To::from_float(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

}  // namespace r1
