// Host-side emulation of one warp's mma.sync.m16n8k16 (.f32 += .bf16 x .bf16)
// checking the fragment index helpers of kernels/mma_layout.cuh, the same code
// the CUDA attention kernels use. Built with plain g++ by
// tests/test_cuda_mma_layout.py; prints "OK <n checks>" and exits 0 on success.
//
// The reference layout below is transcribed separately from the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type"), written in
// the ISA's own case form, and the emulated instruction uses only it: the
// helpers under test decide which shared-memory elements each lane loads and
// where each lane believes its results are, the reference decides what the
// hardware would do with those registers.
#include "kernels/mma_layout.cuh"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace m = maep_fast::cuda::mma;

static long g_checks = 0;
static int g_fail = 0;
static bool g_wrong_k_loader = false;  // teeth check: load K with the [k][n] loader (must fail)
#define CHECK(cond, ...)                         \
  do {                                           \
    ++g_checks;                                  \
    if (!(cond)) {                               \
      if (g_fail < 20 && !g_wrong_k_loader) {                         \
        std::printf("FAIL line %d: ", __LINE__); \
        std::printf(__VA_ARGS__);                \
        std::printf("\n");                       \
      }                                          \
      ++g_fail;                                  \
    }                                            \
  } while (0)

// ---------------- reference layout (PTX ISA, case form) ----------------
static void ref_a(int lane, int i, int* row, int* col) {
  const int groupID = lane >> 2, t = lane % 4;
  *row = ((0 <= i && i < 2) || (4 <= i && i < 6)) ? groupID : groupID + 8;
  *col = (i < 4) ? t * 2 + (i & 0x1) : t * 2 + (i & 0x1) + 8;
}
static void ref_b(int lane, int i, int* row, int* col) {
  const int groupID = lane >> 2, t = lane % 4;
  *row = (i < 2) ? t * 2 + (i & 0x1) : t * 2 + (i & 0x1) + 8;
  *col = groupID;
}
static void ref_c(int lane, int i, int* row, int* col) {
  const int groupID = lane >> 2, t = lane % 4;
  *row = (i < 2) ? groupID : groupID + 8;
  *col = t * 2 + (i & 0x1);
}

// bf16 <-> float (values used are small integers: exact)
static uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}
static float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static float lo_of(uint32_t r) { return from_bf16(static_cast<uint16_t>(r & 0xffffu)); }
static float hi_of(uint32_t r) { return from_bf16(static_cast<uint16_t>(r >> 16)); }

// One warp's mma.sync m16n8k16: d[lane][i] += sum_k A[row][k] B[k][col] with A, B
// reassembled from every lane's registers by the reference layout.
static void emu_mma(float d[32][4], const uint32_t a[32][4], const uint32_t b[32][2]) {
  float A[16][16], B[16][8];
  int seenA[16][16] = {}, seenB[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {
      int r, c;
      ref_a(lane, i, &r, &c);
      const uint32_t reg = a[lane][i / 2];
      A[r][c] = (i % 2 == 0) ? lo_of(reg) : hi_of(reg);
      ++seenA[r][c];
    }
    for (int i = 0; i < 4; ++i) {
      int r, c;
      ref_b(lane, i, &r, &c);
      const uint32_t reg = b[lane][i / 2];
      B[r][c] = (i % 2 == 0) ? lo_of(reg) : hi_of(reg);
      ++seenB[r][c];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) CHECK(seenA[r][c] == 1, "reference A element (%d,%d) seen %d times", r, c, seenA[r][c]);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) CHECK(seenB[r][c] == 1, "reference B element (%d,%d) seen %d times", r, c, seenB[r][c]);
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      int r, c;
      ref_c(lane, i, &r, &c);
      float acc = d[lane][i];
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][c];
      d[lane][i] = acc;
    }
}

// 1. The helpers agree with the reference and cover each tile exactly once.
static void check_ownership() {
  int cntA[16][16] = {}, cntB[16][8] = {}, cntC[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 8; ++i) {
      int r, c;
      ref_a(lane, i, &r, &c);
      CHECK(m::a_row(lane, i) == r && m::a_col(lane, i) == c, "A lane %d i %d", lane, i);
      ++cntA[m::a_row(lane, i)][m::a_col(lane, i)];
    }
    for (int i = 0; i < 4; ++i) {
      int r, c;
      ref_b(lane, i, &r, &c);
      CHECK(m::b_k(lane, i) == r && m::b_n(lane, i) == c, "B lane %d i %d", lane, i);
      ++cntB[m::b_k(lane, i)][m::b_n(lane, i)];
      ref_c(lane, i, &r, &c);
      CHECK(m::c_row(lane, i) == r && m::c_col(lane, i) == c, "C lane %d i %d", lane, i);
      CHECK(m::c_row(lane, i) == m::group_id(lane) + 8 * m::c_half(i), "c_half lane %d i %d", lane, i);
      ++cntC[m::c_row(lane, i)][m::c_col(lane, i)];
      // quad reduction partners (lane ^ 1, lane ^ 2, lane ^ 3) own the same rows
      for (int x = 1; x < 4; ++x) CHECK(m::c_row(lane ^ x, i) == m::c_row(lane, i), "quad lane %d", lane);
    }
    // register pairs: element 2r+1 is the column (A) / k (B) right after element 2r
    for (int r = 0; r < 4; ++r)
      CHECK(m::a_row(lane, 2 * r + 1) == m::a_row(lane, 2 * r) && m::a_col(lane, 2 * r + 1) == m::a_col(lane, 2 * r) + 1,
            "A pair lane %d r %d", lane, r);
    for (int r = 0; r < 2; ++r)
      CHECK(m::b_n(lane, 2 * r + 1) == m::b_n(lane, 2 * r) && m::b_k(lane, 2 * r + 1) == m::b_k(lane, 2 * r) + 1,
            "B pair lane %d r %d", lane, r);
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) CHECK(cntA[r][c] == 1, "A (%d,%d) owned %d times", r, c, cntA[r][c]);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      CHECK(cntB[r][c] == 1, "B (%d,%d) owned %d times", r, c, cntB[r][c]);
      CHECK(cntC[r][c] == 1, "C (%d,%d) owned %d times", r, c, cntC[r][c]);
    }
  // c2a: A element i of k-chunk kc comes from C tile 2kc + (i >= 4), element (i & 3), same (row, col within chunk)
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) {
        const int i = 2 * r + h;
        const int tile = m::c2a_tile(r), e = m::c2a_elem(r) + h;
        CHECK(m::c_row(lane, e) == m::a_row(lane, i) && tile * 8 + m::c_col(lane, e) == m::a_col(lane, i),
              "c2a lane %d i %d", lane, i);
      }
}

// 2. A warp-level attention-like pipeline exactly as the kernels run it:
//    S[16 x N] = Q[16 x DP] K^T (K stored [n][k], padded stride), then
//    O[16 x DP] = S V (S re-used as the A operand through c2a, V stored [k][n]).
static void check_pipeline(int DP, int N, int stride, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> val(-1, 1);
  const int rows_q = 16;
  // padded storage with a non-zero origin, as the kernels' shared-memory tiles
  const int origin_row = 16, origin_col = 0;
  std::vector<uint16_t> sQ((origin_row + rows_q) * stride, to_bf16(7.f));
  std::vector<uint16_t> sK((N + 4) * stride, to_bf16(7.f));
  std::vector<uint16_t> sV((N + 4) * stride, to_bf16(7.f));
  std::vector<float> Q(rows_q * DP), K(N * DP), V(N * DP);
  for (int i = 0; i < rows_q; ++i)
    for (int d = 0; d < DP; ++d) {
      Q[i * DP + d] = static_cast<float>(val(rng));
      sQ[(origin_row + i) * stride + origin_col + d] = to_bf16(Q[i * DP + d]);
    }
  for (int j = 0; j < N; ++j)
    for (int d = 0; d < DP; ++d) {
      K[j * DP + d] = static_cast<float>(val(rng));
      V[j * DP + d] = static_cast<float>(val(rng));
      sK[j * stride + d] = to_bf16(K[j * DP + d]);
      sV[j * stride + d] = to_bf16(V[j * DP + d]);
    }
  const int KCH = DP / 16, NT = N / 8, DT = DP / 8;
  // Q fragments: qa[kk][lane][r]
  std::vector<uint32_t> qa(KCH * 32 * 4);
  for (int kk = 0; kk < KCH; ++kk)
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 4; ++r)
        qa[(kk * 32 + lane) * 4 + r] =
            m::load_a_reg(sQ.data() + origin_row * stride + origin_col + kk * 16, stride, lane, r);
  // S = Q K^T
  std::vector<float> s(NT * 32 * 4, 0.f);
  for (int kk = 0; kk < KCH; ++kk)
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t a[32][4], b[32][2];
      float d[32][4];
      for (int lane = 0; lane < 32; ++lane) {
        for (int r = 0; r < 4; ++r) a[lane][r] = qa[(kk * 32 + lane) * 4 + r];
        for (int r = 0; r < 2; ++r)
          b[lane][r] = g_wrong_k_loader ? m::load_b_reg_kn(sK.data() + nt * 8 * stride + kk * 16, stride, lane, r)
                                        : m::load_b_reg_nk(sK.data() + nt * 8 * stride + kk * 16, stride, lane, r);
        for (int i = 0; i < 4; ++i) d[lane][i] = s[(nt * 32 + lane) * 4 + i];
      }
      emu_mma(d, a, b);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) s[(nt * 32 + lane) * 4 + i] = d[lane][i];
    }
  for (int nt = 0; nt < NT; ++nt)
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        const int row = m::c_row(lane, i), col = nt * 8 + m::c_col(lane, i);
        float ref = 0.f;
        for (int d = 0; d < DP; ++d) ref += Q[row * DP + d] * K[col * DP + d];
        CHECK(s[(nt * 32 + lane) * 4 + i] == ref, "S DP %d (%d,%d): %g vs %g", DP, row, col,
              s[(nt * 32 + lane) * 4 + i], ref);
      }
  // O = S V, S through c2a as the A operand
  std::vector<float> o(DT * 32 * 4, 0.f);
  for (int kc = 0; kc < N / 16; ++kc)
    for (int dt = 0; dt < DT; ++dt) {
      uint32_t a[32][4], b[32][2];
      float d[32][4];
      for (int lane = 0; lane < 32; ++lane) {
        for (int r = 0; r < 4; ++r) {
          const float* src = &s[((2 * kc + m::c2a_tile(r)) * 32 + lane) * 4];
          a[lane][r] = m::pack_u16(to_bf16(src[m::c2a_elem(r)]), to_bf16(src[m::c2a_elem(r) + 1]));
        }
        for (int r = 0; r < 2; ++r)
          b[lane][r] = m::load_b_reg_kn(sV.data() + kc * 16 * stride + dt * 8, stride, lane, r);
        for (int i = 0; i < 4; ++i) d[lane][i] = o[(dt * 32 + lane) * 4 + i];
      }
      emu_mma(d, a, b);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) o[(dt * 32 + lane) * 4 + i] = d[lane][i];
    }
  for (int dt = 0; dt < DT; ++dt)
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 4; ++i) {
        const int row = m::c_row(lane, i), col = dt * 8 + m::c_col(lane, i);
        float ref = 0.f;
        for (int j = 0; j < N; ++j) {
          float sij = 0.f;
          for (int d = 0; d < DP; ++d) sij += Q[row * DP + d] * K[j * DP + d];
          ref += sij * V[j * DP + col];
        }
        CHECK(o[(dt * 32 + lane) * 4 + i] == ref, "O DP %d (%d,%d): %g vs %g", DP, row, col,
              o[(dt * 32 + lane) * 4 + i], ref);
      }
  // every (row, col) of S and O is owned exactly once across lanes and tiles
  std::vector<int> ownS(16 * N, 0), ownO(16 * DP, 0);
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      for (int nt = 0; nt < NT; ++nt) ++ownS[m::c_row(lane, i) * N + nt * 8 + m::c_col(lane, i)];
      for (int dt = 0; dt < DT; ++dt) ++ownO[m::c_row(lane, i) * DP + dt * 8 + m::c_col(lane, i)];
    }
  for (int x : ownS) CHECK(x == 1, "S ownership %d", x);
  for (int x : ownO) CHECK(x == 1, "O ownership %d", x);
}

int main() {
  // the emulation must notice a wrong operand layout
  g_wrong_k_loader = true;
  check_pipeline(32, 16, 40, 12345u);
  const int caught = g_fail;
  g_fail = 0;
  g_checks = 0;
  g_wrong_k_loader = false;
  if (caught == 0) {
    std::printf("FAILED: a wrong K loader went unnoticed\n");
    return 1;
  }
  check_ownership();
  unsigned seed = 1;
  for (int DP = 16; DP <= 128; DP += 16)
    for (int N : {16, 32, 64}) check_pipeline(DP, N, DP + 8, seed++);
  if (g_fail) {
    std::printf("FAILED %d of %ld checks\n", g_fail, g_checks);
    return 1;
  }
  std::printf("OK %ld checks\n", g_checks);
  return 0;
}
