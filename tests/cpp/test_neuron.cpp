// C++ test of the CPU neuron kernel through the dispatcher (run by ctest).
// Exercises spikingir::neuron_fwd / neuron_bwd on a hand-computed MPRN example
// and checks an IF gradient against a finite-free closed form.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>

namespace {
int failures = 0;

void expect_near(const char* what, double got, double want, double tol = 1e-6) {
  if (std::fabs(got - want) > tol) {
    std::printf("FAIL %s: got %.8g, expected %.8g\n", what, got, want);
    ++failures;
  }
}
}  // namespace

int main() {
  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("spikingir::neuron_fwd", "")
                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const std::optional<at::Tensor>&, const at::Tensor&, int64_t, double, bool,
                     bool, bool, int64_t, int64_t)>();
  auto bwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("spikingir::neuron_bwd", "")
                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                     const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                     bool, bool, bool, int64_t, bool, bool)>();

  // MPRN, theta = 1, beta = 0.5, reuse_alpha = 0.75, x = [.625, .625, .5] for one neuron:
  // step 0: h = .625, no spike; step 1: h = 1.25, spike 1, v = .25;
  // reuse: h = .75 >= .75 -> spike of size .5, v_final = -.25.
  auto x = at::tensor({0.625f, 0.625f, 0.5f}).reshape({3, 1});
  auto theta = at::tensor({1.0f});
  auto beta = at::tensor({0.5f});
  auto alpha = at::tensor({4.0f});
  auto [y, vT, saved] = fwd.call(x, theta, beta, std::nullopt, alpha, /*sigmoid*/ 0, 0.75,
                                 /*reuse_step=*/true, /*scale_output=*/true,
                                 /*detach_reset=*/false, /*inner=*/1, /*save_bytes=*/4);
  expect_near("y[0]", y[0][0].item<float>(), 0.0);
  expect_near("y[1]", y[1][0].item<float>(), 1.0);
  expect_near("y[2]", y[2][0].item<float>(), 0.5);
  expect_near("v_final", vT[0].item<float>(), -0.25);
  expect_near("saved u[1]", saved[1][0].item<float>(), 0.25);

  // IF, one step, dL/dy = 1: gx = theta * sg(u), sg = a e / (1 + e)^2 at u = x - theta.
  auto x1 = at::tensor({0.8f}).reshape({1, 1});
  auto [y1, v1, s1] = fwd.call(x1, theta, theta, std::nullopt, alpha, 0, 0.75, false, true,
                               false, 1, 4);
  auto [gx, gv0, gth, gbe] = bwd.call(at::ones_like(y1), std::nullopt, s1, theta, theta, alpha, 0,
                                      0.75, false, true, false, 1, true, false);
  const double u = 0.8 - 1.0, e = std::exp(-std::fabs(4.0 * u));
  const double sg = 4.0 * e / ((1 + e) * (1 + e));
  expect_near("grad_x", gx[0][0].item<float>(), sg, 1e-5);
  expect_near("grad_theta", gth[0].item<float>(), -sg, 1e-5);  // y = theta s, s = 0: -theta sg
  if (failures == 0) std::printf("neuron_cpu: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
