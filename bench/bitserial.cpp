// A bit-serial convolution over packed low-bit codes: the "beyond int8" kernel that bench/bitserial.py
// measures against oneDNN's int8 convolution. The input codes (0 .. 2^BA - 1) become BA bit planes,
// 64 input channels to a 64-bit word per pixel; the weight codes (integer = gain * code + offset[n])
// become BW planes. A product of a BA-bit and a BW-bit code is sum_ij 2^(i+j) a_i w_j, so one 64-channel
// dot product is BA * BW AND + popcount pairs:
//   sum_c a_c w_c = gain * sum_ij 2^(i+j) popcount(A_i & W_j) + offset[n] * sum_c a_c.
// The float epilogue applies the steps and the bias, as the student's convolution of its levels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <cstdint>
#if defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t NB = 16;  // output channels per block: two 512-bit vectors of 64-bit lanes

// Bit `bit` of up to 64 uint8 codes as one word (a tail shorter than 64 reads as zeros).
uint64_t plane_word(const uint8_t* codes, int64_t count, int bit) {
  if (count == 64) {
#if defined(__AVX512BW__)
    const __m512i v = _mm512_loadu_si512(codes);
    return _mm512_test_epi8_mask(v, _mm512_set1_epi8(static_cast<char>(1 << bit)));
#elif defined(__AVX2__)
    // shifting 16-bit lanes by 7 - bit moves each byte's bit `bit` to its top bit, which movemask reads
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32));
    const uint64_t a = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(lo, 7 - bit)));
    const uint64_t b = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(hi, 7 - bit)));
    return a | (b << 32);
#endif
  }
  uint64_t word = 0;
  for (int64_t c = 0; c < count; ++c) word |= static_cast<uint64_t>((codes[c] >> bit) & 1) << c;
  return word;
}

struct Layer {
  const uint64_t* planes;   // [B, BA, PH, PW, words]
  const uint64_t* weights;  // [BW, KH * KW, words, NP]
  const float* multiplier;  // [N]: activation step x weight step
  const float* bias;        // [N] or null
  const int32_t* offset;    // [N]
  int64_t gain, N, NP, PH, PW, words, KH, KW, stride, OH, OW;
  float* out;               // [B, OH, OW, N]
};

// Output channels n0 .. n0 + NB of one output row.
template <int BA, int BW>
void conv_row(const Layer& l, int64_t b, int64_t oy, int64_t n0) {
  const int64_t taps = l.KH * l.KW;
  for (int64_t ox = 0; ox < l.OW; ++ox) {
    uint64_t acc[BA][BW][NB] = {};
    int64_t sum_a = 0;  // the window's activation codes, for the weights' offset
#if defined(__AVX512VPOPCNTDQ__)
    __m512i vacc[BA][BW][2];
    for (int i = 0; i < BA; ++i)
      for (int j = 0; j < BW; ++j) vacc[i][j][0] = vacc[i][j][1] = _mm512_setzero_si512();
#endif
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t iy = oy * l.stride + t / l.KW, ix = ox * l.stride + t % l.KW;
      for (int64_t d = 0; d < l.words; ++d) {
        uint64_t a[BA];
        for (int i = 0; i < BA; ++i) {
          a[i] = l.planes[(((b * BA + i) * l.PH + iy) * l.PW + ix) * l.words + d];
          sum_a += static_cast<int64_t>(__builtin_popcountll(a[i])) << i;
        }
        for (int j = 0; j < BW; ++j) {
          const uint64_t* w = l.weights + ((j * taps + t) * l.words + d) * l.NP + n0;
#if defined(__AVX512VPOPCNTDQ__)
          const __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 8);
          for (int i = 0; i < BA; ++i) {
            const __m512i x = _mm512_set1_epi64(static_cast<long long>(a[i]));
            vacc[i][j][0] = _mm512_add_epi64(vacc[i][j][0], _mm512_popcnt_epi64(_mm512_and_si512(x, w0)));
            vacc[i][j][1] = _mm512_add_epi64(vacc[i][j][1], _mm512_popcnt_epi64(_mm512_and_si512(x, w1)));
          }
#else
          for (int i = 0; i < BA; ++i)
            for (int64_t n = 0; n < NB; ++n) acc[i][j][n] += __builtin_popcountll(a[i] & w[n]);
#endif
        }
      }
    }
#if defined(__AVX512VPOPCNTDQ__)
    for (int i = 0; i < BA; ++i)
      for (int j = 0; j < BW; ++j) {
        _mm512_storeu_si512(acc[i][j], vacc[i][j][0]);
        _mm512_storeu_si512(acc[i][j] + 8, vacc[i][j][1]);
      }
#endif
    float* out = l.out + ((b * l.OH + oy) * l.OW + ox) * l.N;
    for (int64_t n = n0; n < std::min(n0 + NB, l.N); ++n) {
      int64_t codes = 0;
      for (int i = 0; i < BA; ++i)
        for (int j = 0; j < BW; ++j) codes += static_cast<int64_t>(acc[i][j][n - n0]) << (i + j);
      const int64_t integer = l.gain * codes + l.offset[n] * sum_a;
      out[n] = static_cast<float>(integer) * l.multiplier[n] + (l.bias ? l.bias[n] : 0.0f);
    }
  }
}

}  // namespace

// uint8 codes [B, C, H, W] (any memory format) -> int64 bit planes [B, bits, H + 2 pad, W + 2 pad, words]
at::Tensor pack_planes(const at::Tensor& codes, int64_t bits, int64_t pad) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4, "pack_planes: uint8 codes [B, C, H, W]");
  TORCH_CHECK(bits >= 1 && bits <= 8, "pack_planes: 1 to 8 bits");
  const at::Tensor nhwc = codes.permute({0, 2, 3, 1}).contiguous();
  const int64_t B = nhwc.size(0), H = nhwc.size(1), W = nhwc.size(2), C = nhwc.size(3);
  const int64_t words = (C + 63) / 64, PH = H + 2 * pad, PW = W + 2 * pad;
  at::Tensor planes = at::zeros({B, bits, PH, PW, words}, codes.options().dtype(at::kLong));
  const uint8_t* src = nhwc.data_ptr<uint8_t>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(planes.data_ptr<int64_t>());
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      for (int64_t x = 0; x < W; ++x) {
        const uint8_t* pixel = src + (row * W + x) * C;
        for (int64_t bit = 0; bit < bits; ++bit) {
          uint64_t* word = dst + (((b * bits + bit) * PH + y + pad) * PW + x + pad) * words;
          for (int64_t d = 0; d < words; ++d)
            word[d] = plane_word(pixel + 64 * d, std::min<int64_t>(64, C - 64 * d), static_cast<int>(bit));
        }
      }
    }
  });
  return planes;
}

// planes from pack_planes; weights: int64 bit planes [BW, KH * KW, words, NP] of the weight codes (NP: the
// output channels padded to a multiple of 16 with zero codes). Returns float32 [B, N, OH, OW], channels-last.
at::Tensor conv2d(const at::Tensor& planes, const at::Tensor& weights, const at::Tensor& multiplier,
                  const std::optional<at::Tensor>& bias, const at::Tensor& offset, int64_t gain, int64_t N,
                  int64_t KH, int64_t KW, int64_t stride) {
  TORCH_CHECK(planes.dim() == 5 && weights.dim() == 4, "conv2d: planes [B, BA, PH, PW, words], weights [BW, T, words, NP]");
  const int64_t B = planes.size(0), BA = planes.size(1), BW = weights.size(0);
  TORCH_CHECK(BA >= 1 && BA <= 2 && BW >= 1 && BW <= 2, "conv2d: 1 or 2 bit planes each");
  TORCH_CHECK(weights.size(1) == KH * KW && weights.size(2) == planes.size(4) && weights.size(3) % NB == 0,
              "conv2d: the weight planes do not match the input planes");
  TORCH_CHECK(multiplier.scalar_type() == at::kFloat && offset.scalar_type() == at::kInt, "conv2d: float multiplier, int32 offset");
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  Layer l{reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>()),
          reinterpret_cast<const uint64_t*>(weights.data_ptr<int64_t>()), multiplier.data_ptr<float>(),
          bias_c.defined() ? bias_c.data_ptr<float>() : nullptr, offset.data_ptr<int32_t>(), gain, N,
          weights.size(3), planes.size(2), planes.size(3), planes.size(4), KH, KW, stride,
          (planes.size(2) - KH) / stride + 1, (planes.size(3) - KW) / stride + 1, nullptr};
  at::Tensor out = at::empty({B, l.OH, l.OW, N}, planes.options().dtype(at::kFloat));
  l.out = out.data_ptr<float>();
  const int64_t blocks = l.NP / NB;
  at::parallel_for(0, B * l.OH * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t row = k / blocks, n0 = (k % blocks) * NB, b = row / l.OH, oy = row % l.OH;
      if (BA == 2 && BW == 2) conv_row<2, 2>(l, b, oy, n0);
      else if (BA == 2) conv_row<2, 1>(l, b, oy, n0);
      else if (BW == 2) conv_row<1, 2>(l, b, oy, n0);
      else conv_row<1, 1>(l, b, oy, n0);
    }
  });
  return out.permute({0, 3, 1, 2});
}

TORCH_LIBRARY(cmtkd_bitserial, m) {
  m.def("pack_planes(Tensor codes, int bits, int pad) -> Tensor");
  m.def("conv2d(Tensor planes, Tensor weights, Tensor multiplier, Tensor? bias, Tensor offset, int gain, int N, "
        "int KH, int KW, int stride) -> Tensor");
  m.impl("pack_planes", c10::DispatchKey::CPU, TORCH_FN(pack_planes));
  m.impl("conv2d", c10::DispatchKey::CPU, TORCH_FN(conv2d));
}
