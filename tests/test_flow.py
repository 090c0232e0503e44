"""Flow convention and ODE samplers against closed forms.  Run: pytest tests/test_flow.py"""

import math

import pytest
import torch

from repforce import flow


def test_interpolate_endpoints_and_x_v_round_trip():
    x, e = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert torch.equal(flow.interpolate(x, e, torch.ones(4)), x)  # t = 1 is data
    assert torch.equal(flow.interpolate(x, e, torch.zeros(4)), e)  # t = 0 is noise
    t = torch.tensor([0.0, 0.3, 0.9, 0.99])  # 0.99: below the t_eps floor, still invertible
    z = flow.interpolate(x, e, t)
    assert torch.allclose(flow.v_to_x(flow.x_to_v(x, z, t), z, t), x, atol=1e-5)
    # for the true x and t < 1 - t_eps, x -> v gives exactly the target velocity x - e
    assert torch.allclose(flow.x_to_v(x[:3], z[:3], t[:3]), (x - e)[:3], atol=1e-5)


def test_fm_loss_is_velocity_mse():
    x, e, x_pred = torch.randn(5, 16, 12), torch.randn(5, 16, 12), torch.randn(5, 16, 12)
    t = torch.tensor([0.1, 0.5, 0.9, 0.96, 0.999])
    assert flow.fm_loss(x[:3], x[:3], e[:3], t[:3]) < 1e-10  # exact x -> exact v while 1 - t >= t_eps
    z = t[:, None, None] * x + (1 - t[:, None, None]) * e
    denom = (1 - t).clamp(min=0.05)[:, None, None]
    expected = (((x_pred - z) / denom - (x - e)) ** 2).mean()
    assert torch.allclose(flow.fm_loss(x_pred, x, e, t), expected, rtol=1e-5)


def test_capped_fm_loss_is_the_velocity_loss_below_the_cap_and_stops_growing_above():
    x, e, x_pred = torch.randn(4, 16, 12), torch.randn(4, 16, 12), torch.randn(4, 16, 12)
    low = torch.tensor([0.1, 0.3, 0.5, 0.6])  # 1 - t > 0.3: the weight is 1 / (1 - t)^2 exactly
    assert torch.allclose(flow.fm_loss_capped(x_pred, x, low, 0.3), flow.fm_loss(x_pred, x, e, low), rtol=1e-5)
    high = torch.full((4,), 0.95)  # 1 - t = 0.05 < 0.3: weight 1 / 0.3^2, not 1 / 0.05^2
    err = ((x_pred - x) ** 2).mean()
    assert torch.allclose(flow.fm_loss_capped(x_pred, x, high, 0.3), err / 0.09, rtol=1e-5)
    assert flow.fm_loss(x_pred, x, e, high) > 30 * flow.fm_loss_capped(x_pred, x, high, 0.3)


def test_sample_t_is_logit_normal():
    t = flow.sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() + 0.8) < 0.03 and abs(logit.std() - 0.8) < 0.03


def test_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(flow.shift_t(t, 1.0), t)
    s = flow.shift_t(t, 1 / 3)
    assert s[0] == 0 and abs(s[-1] - 1) < 1e-6 and (s[1:-1] < t[1:-1]).all()  # s < 1: more steps near noise
    # SD3's shift a on sigma = 1 - t equals ours with s = 1 / a
    a, sigma = 3.0, 1 - t
    assert torch.allclose(1 - a * sigma / (1 + (a - 1) * sigma), s, atol=1e-6)


def test_resolution_shift_follows_sd3():
    """Ours is s = 1 / a for SD3's a; log a is linear in 16 px tokens (diffusers' calculate_shift) from
    1 at 32 px (the small worlds unchanged) to SD3's 3.0 at 1024 px, held outside that range."""
    a = {side: 1 / flow.resolution_shift(side) for side in (16, 32, 64, 128, 256, 512, 1024, 2048)}
    assert a[16] == a[32] == 1.0 and a[1024] == pytest.approx(3.0) and a[2048] == a[1024]
    assert a[256] == pytest.approx(math.exp(math.log(3) * (256 - 4) / (4096 - 4)))  # 1.07
    assert 1.0 <= a[256] <= 1.65  # between SD3's 256^2 base (1) and Flux's value there (1.65)
    sides = sorted(a)
    assert all(a[lo] < a[hi] for lo, hi in zip(sides, sides[1:]) if 32 <= lo and hi <= 1024)  # more pixels, more noise
    assert flow.resolution_shift(256, 1024) == flow.resolution_shift(512)  # by pixel count: same tokens, same shift
    grid = flow.time_grid(25, flow.resolution_shift(1024))
    assert (grid[1:-1] < torch.linspace(0, 1, 26)[1:-1]).all()  # at 1024 px the steps move toward noise

@pytest.mark.parametrize("shift", [1.0, 0.5])
def test_euler_heun_on_linear_field(shift):
    """dz/dt = a z: Euler multiplies by (1 + a dt) per step, Heun by (1 + a dt + (a dt)^2 / 2)
    (its last step Euler); both converge to exp(a)."""
    a, z0 = -1.3, torch.randn(3, 2)
    v_fn = lambda z, t: a * z  # noqa: E731
    ts = flow.time_grid(10, shift).double()
    dts = (ts[1:] - ts[:-1]).tolist()
    euler_gain = math.prod(1 + a * d for d in dts)
    heun_gain = math.prod(1 + a * d + (a * d) ** 2 / 2 for d in dts[:-1]) * (1 + a * dts[-1])
    assert torch.allclose(flow.euler(v_fn, z0, 10, shift), z0 * euler_gain, rtol=1e-5)
    assert torch.allclose(flow.heun(v_fn, z0, 10, shift), z0 * heun_gain, rtol=1e-5)
    assert abs(euler_gain - math.exp(a)) < 0.1  # first order
    assert abs(heun_gain - math.exp(a)) < abs(euler_gain - math.exp(a))  # Heun is closer


def test_heun_transports_gaussian_exactly():
    """Data x ~ N(mu, s^2): the marginal velocity E[x - e | z_t] is linear in z and its flow
    maps noise z0 to mu + s z0 (closed form). The samplers must reproduce that map."""
    mu, s = 0.7, 0.4

    def v_fn(z, t):
        t = t[:, None]
        var = t ** 2 * s ** 2 + (1 - t) ** 2
        return mu + (t * s ** 2 - (1 - t)) / var * (z - t * mu)

    z0 = torch.randn(256, 1, dtype=torch.float64)
    heun_err = (flow.heun(v_fn, z0, 40) - (mu + s * z0)).abs().max()
    euler_err = (flow.euler(v_fn, z0, 200) - (mu + s * z0)).abs().max()
    assert heun_err < 5e-3 and euler_err < 2e-2 and heun_err < euler_err  # second order beats first


def test_guidance_pair_and_interval():
    """v_fn returning (c, u) = (1, 0): guided velocity is w inside the interval, 1 outside."""
    v_fn = lambda z, t: (torch.ones_like(z), torch.zeros_like(z))  # noqa: E731
    w, lo, hi, steps = 3.0, 0.0, 0.5, 10
    ts = flow.time_grid(steps)
    expected = sum(((ts[i + 1] - ts[i]) * (w if lo <= ts[i] <= hi else 1.0)).item() for i in range(steps))
    z1 = flow.euler(v_fn, torch.zeros(2, 1), steps, w=w, interval=(lo, hi))
    assert torch.allclose(z1, torch.full((2, 1), expected))
    assert torch.equal(flow.cfg(torch.zeros(1), torch.ones(1), 2.5), torch.full((1,), 2.5))
