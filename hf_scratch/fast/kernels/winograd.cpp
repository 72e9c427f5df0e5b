// Tile transforms of Winograd's minimal filtering F(m x m, 3x3) for m = 2 and 4 (Lavin & Gray, "Fast Algorithms for
// Convolutional Neural Networks", CVPR 2016, Eq. 8 and Sections 4.1-4.2):  Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A.
//
// The element-wise product summed over input channels is a batched matrix product done by torch.bmm, and the filter
// transform G g G^T is done once in Python (hf_scratch/winograd.py). These two kernels do the transforms of the
// input and output tiles in one pass each over channels-last memory: the innermost loops run over contiguous
// channels and vectorise, and B^T and A^T are compile-time constants, so their zeros and ones cost nothing.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

constexpr int64_t kChannelBlock = 64;
// F(2x2, 3x3): 2 x 2 outputs from 4 x 4 inputs (Section 4.1).
struct F2 {
  static constexpr int64_t m = 2;
  static constexpr int A = 4;
  static constexpr float BT[A][A] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float AT[m][A] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

// F(4x4, 3x3): 4 x 4 outputs from 6 x 6 inputs (Section 4.2).
struct F4 {
  static constexpr int64_t m = 4;
  static constexpr int A = 6;
  static constexpr float BT[A][A] = {
      {4, 0, -5, 0, 1, 0}, {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
      {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1},
  };
  static constexpr float AT[m][A] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1},
  };
};

// The m x m output tiles of an (N, H_out, W_out) output, numbered t = (n * tiles_h + tile_y) * tiles_w + tile_x.
struct Tiling {
  int64_t tiles_h, tiles_w, count;
  Tiling(int64_t batch, int64_t out_height, int64_t out_width, int64_t m)
      : tiles_h((out_height + m - 1) / m), tiles_w((out_width + m - 1) / m), count(batch * tiles_h * tiles_w) {}

  struct Position {
    int64_t n, tile_y, tile_x;
  };
  Position locate(int64_t t) const { return {t / (tiles_h * tiles_w), (t / tiles_w) % tiles_h, t % tiles_w}; }
};
template <typename F>
void input_tiles(const float* x, float* v, int64_t padding, int64_t H, int64_t W, int64_t C, const Tiling& tiling) {
  constexpr int64_t m = F::m;
  constexpr int A = F::A;
  const int64_t T = tiling.count;
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float d[A][A][kChannelBlock];
    alignas(64) float rows[A][A][kChannelBlock];
    for (int64_t t = begin; t < end; ++t) {
      const auto [n, tile_y, tile_x] = tiling.locate(t);
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
        const int64_t cb = std::min(kChannelBlock, C - c0);
        for (int k = 0; k < A; ++k) {  // d: the tile, zero outside the image
          for (int l = 0; l < A; ++l) {
            const int64_t h = tile_y * m + k - padding, w = tile_x * m + l - padding;
            if (h < 0 || h >= H || w < 0 || w >= W) {
              std::fill(d[k][l], d[k][l] + cb, 0.f);
            } else {
              const float* in = x + ((n * H + h) * W + w) * C + c0;
              std::copy(in, in + cb, d[k][l]);
            }
          }
        }
        for (int i = 0; i < A; ++i) {  // rows = B^T d
          for (int l = 0; l < A; ++l) {
            for (int64_t c = 0; c < cb; ++c) {
              float sum = 0.f;
              for (int k = 0; k < A; ++k) sum += F::BT[i][k] * d[k][l][c];
              rows[i][l][c] = sum;
            }
          }
        }
        for (int i = 0; i < A; ++i) {  // V = rows B
          for (int j = 0; j < A; ++j) {
            float* out = v + ((i * A + j) * T + t) * C + c0;
            for (int64_t c = 0; c < cb; ++c) {
              float sum = 0.f;
              for (int l = 0; l < A; ++l) sum += F::BT[j][l] * rows[i][l][c];
              out[c] = sum;
            }
          }
        }
      }
    }
  });
}

template <typename F>
void output_tiles(const float* mp, const float* bias, float* y, int64_t H_out, int64_t W_out, int64_t K,
                  const Tiling& tiling) {
  constexpr int64_t m = F::m;
  constexpr int A = F::A;
  const int64_t T = tiling.count;
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float rows[m][A][kChannelBlock];
    for (int64_t t = begin; t < end; ++t) {
      const auto [n, tile_y, tile_x] = tiling.locate(t);
      for (int64_t k0 = 0; k0 < K; k0 += kChannelBlock) {
        const int64_t kb = std::min(kChannelBlock, K - k0);
        for (int64_t p = 0; p < m; ++p) {  // rows = A^T M
          for (int j = 0; j < A; ++j) {
            for (int64_t c = 0; c < kb; ++c) {
              float sum = 0.f;
              for (int i = 0; i < A; ++i) sum += F::AT[p][i] * mp[((i * A + j) * T + t) * K + k0 + c];
              rows[p][j][c] = sum;
            }
          }
        }
        for (int64_t p = 0; p < m; ++p) {  // Y = rows A (+ bias), cropped at the image edge
          const int64_t h = tile_y * m + p;
          if (h >= H_out) break;
          for (int64_t q = 0; q < m; ++q) {
            const int64_t w = tile_x * m + q;
            if (w >= W_out) break;
            float* out = y + ((n * H_out + h) * W_out + w) * K + k0;
            for (int64_t c = 0; c < kb; ++c) {
              float sum = bias != nullptr ? bias[k0 + c] : 0.f;
              for (int j = 0; j < A; ++j) sum += F::AT[q][j] * rows[p][j][c];
              out[c] = sum;
            }
          }
        }
      }
    }
  });
}

void check_float(const torch::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == torch::kFloat && tensor.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

}  // namespace

// x: (N, H, W, C), implicit zero padding of `padding` pixels on every side; m = 2 or 4 outputs per tile side.
// Returns V: (a*a, T, C), T the number of m x m output tiles, with V[i*a + j, t] = (B^T d_t B)[i, j].
torch::Tensor input_transform(const torch::Tensor& x, int64_t m, int64_t padding) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 4, "x must be (N, H, W, C), got ", x.sizes());
  TORCH_CHECK(m == 2 || m == 4, "tiles of 2x2 or 4x4 outputs are supported, got ", m);
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), a = m + 2;
  const int64_t H_out = H + 2 * padding - 2, W_out = W + 2 * padding - 2;
  TORCH_CHECK(H_out > 0 && W_out > 0, "a ", H, "x", W, " image with padding ", padding, " is smaller than 3x3");
  const Tiling tiling(N, H_out, W_out, m);
  auto V = torch::empty({a * a, tiling.count, C}, x.options());
  if (m == 2) {
    input_tiles<F2>(x.data_ptr<float>(), V.data_ptr<float>(), padding, H, W, C, tiling);
  } else {
    input_tiles<F4>(x.data_ptr<float>(), V.data_ptr<float>(), padding, H, W, C, tiling);
  }
  return V;
}

// M: (a*a, T, K), the per-tile products. Returns Y: (N, H_out, W_out, K) with Y_tile = A^T M_tile A + bias.
torch::Tensor output_transform(const torch::Tensor& M, const c10::optional<torch::Tensor>& bias, int64_t N,
                               int64_t H_out, int64_t W_out) {
  check_float(M, "M");
  TORCH_CHECK(M.dim() == 3 && (M.size(0) == 16 || M.size(0) == 36), "M must be (16 or 36, T, K), got ", M.sizes());
  const int64_t m = M.size(0) == 16 ? 2 : 4, K = M.size(2);
  const Tiling tiling(N, H_out, W_out, m);
  TORCH_CHECK(M.size(1) == tiling.count, "M has ", M.size(1), " tiles, expected ", tiling.count, " for a ", N, "x",
              H_out, "x", W_out, " output");
  const float* b_data = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_float(*bias, "bias");
    TORCH_CHECK(bias->numel() == K, "bias has ", bias->numel(), " values for ", K, " output channels");
    b_data = bias->data_ptr<float>();
  }
  auto Y = torch::empty({N, H_out, W_out, K}, M.options());
  if (m == 2) {
    output_tiles<F2>(M.data_ptr<float>(), b_data, Y.data_ptr<float>(), H_out, W_out, K, tiling);
  } else {
    output_tiles<F4>(M.data_ptr<float>(), b_data, Y.data_ptr<float>(), H_out, W_out, K, tiling);
  }
  return Y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("input_transform", &input_transform, "V = B^T d B for every tile of a channels-last image");
  module.def("output_transform", &output_transform, "Y = A^T M A (+ bias) for every tile, channels last");
}
