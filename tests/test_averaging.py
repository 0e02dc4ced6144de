"""Averaged Adam (dogkit.training.averaging): the promise of docs/averaging.md checked against a brute-force
reference that keeps every iterate, over thousands of random plans (early stop, extension on resume, fp16 skips).

Everything runs in float64 on the CPU with hand-made batches, so exact and near-exact comparisons are meaningful.
"""

from __future__ import annotations

import copy
import io
import random

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

import dogkit.training.averaging as averaging
from dogkit.training.averaging import RESERVE, Averager, chunk_bound, prepare_for_eval

DTYPE = torch.float64
LR = 1e-2


def make_mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(DTYPE)


def make_batches(n: int, seed: int = 1, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def adam(model: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> None:
    x, y = batch
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def flat(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


def trajectory(steps: int, window: int, ema_decays=(0.99, 0.999), period: int | None = -1):
    """θ_0..θ_N of an averaged run (stacked rows) and the Averager after N steps (one epoch of N steps unless
    ``period`` says)."""
    model = make_mlp()
    opt = adam(model)
    avg = Averager(model, window=window, ema_decays=ema_decays, period=steps if period == -1 else period)
    thetas = [flat(model)]
    for batch in make_batches(steps):
        sgd_step(model, opt, batch)
        avg.update(model)
        thetas.append(flat(model))
    return torch.stack(thetas), avg


# 1 ------------------------------------------------------------------------------------------------------------------
def test_raw_iterates_are_bit_identical_to_plain_adam():
    batches = make_batches(300)
    plain, averaged = make_mlp(), make_mlp()
    plain_opt, averaged_opt = adam(plain), adam(averaged)
    avg = Averager(averaged, window=50)
    for batch in batches:
        sgd_step(plain, plain_opt, batch)
        sgd_step(averaged, averaged_opt, batch)
        avg.update(averaged)
        for p, q in zip(plain.parameters(), averaged.parameters()):
            assert torch.equal(p, q)
    # The averages really are different weights, held apart from the raw model.
    for name in avg.names:
        assert not torch.equal(flat(avg.model(name)), flat(averaged)), name
        assert all(a.data_ptr() != r.data_ptr() for a, r in zip(avg.model(name).parameters(), averaged.parameters()))


# 2 ------------------------------------------------------------------------------------------------------------------
def test_window_average_is_the_exact_mean_of_the_last_m_iterates():
    m, n = 50, 300
    thetas, avg = trajectory(n, window=m)
    p = flat(avg.model("P"))
    expected = thetas[n - m + 1:n + 1].mean(0)  # θ_{N−M+1}..θ_N
    assert (p - expected).abs().max() < 1e-10
    # The tolerance discriminates: the window starting one step early is far outside it.
    one_early = thetas[n - m:n].mean(0)
    assert (one_early - expected).abs().max() > 1e-6
    assert (p - one_early).abs().max() > 1e-6


@pytest.mark.parametrize(("n", "m"), [(130, 50), (301, 50), (30, 50)])
def test_final_window_average_is_the_mean_of_the_last_m_iterates_when_m_does_not_divide_n(n: int, m: int):
    thetas, avg = trajectory(n, window=m)
    w = min(m, n)  # a run shorter than M averages all of its iterates
    expected = thetas[n - w + 1:n + 1].mean(0)
    assert avg.p_range == (n - w + 1, n)
    assert (flat(avg.model("P")) - expected).abs().max() < 1e-10
    if n > m:
        # The window ending at the last multiple of M is far outside the tolerance.
        stale_end = n // m * m
        stale = thetas[stale_end - m + 1:stale_end + 1].mean(0)
        assert (flat(avg.model("P")) - stale).abs().max() > 1e-6


def run_with_ends(n: int, m: int, period: int, *, on_step=None):
    """A run of ``n`` steps in epochs of ``period`` steps; ``on_step(step, avg, thetas)`` after each."""
    model = make_mlp()
    opt = adam(model)
    avg = Averager(model, window=m, period=period)
    thetas = [flat(model)]
    for step, batch in enumerate(make_batches(n), start=1):
        sgd_step(model, opt, batch)
        avg.update(model)
        thetas.append(flat(model))
        if on_step:
            on_step(step, avg, thetas)
    return torch.stack(thetas), avg


def test_p_is_made_at_every_end_as_the_mean_of_the_last_m_iterates():
    m, n, period = 50, 120, 20  # epochs of 20 steps; each end's window reaches back over 2.5 epochs
    made = {}

    def check(step, avg, thetas):
        if step < period:
            assert avg.p_range is None and avg.ready() == ["G0.99", "G0.999"], step
            return
        end = step // period * period  # P stays the one made at the last end
        first = max(1, end - m + 1)  # before M iterates exist, every iterate so far (never θ_0)
        assert avg.p_range == (first, end) and avg.p_count == end - first + 1, step
        assert avg.ready() == ["P", "G0.99", "G0.999"]
        p = flat(avg.model("P"))
        assert (p - torch.stack(thetas[first:end + 1]).mean(0)).abs().max() < 1e-10, step
        made[end] = p
        # Memory stays bounded by the plan, not by the run: ⌈M/period⌉ + 1 chunks at most (no reserve here).
        assert len(avg.chunks) <= chunk_bound(m, period, 0) == 4, step

    thetas, avg = run_with_ends(n, m, period, on_step=check)
    assert sorted(made) == [20, 40, 60, 80, 100, 120]
    # A run stopped early at any end has that end's P, which differs from the window one step off.
    assert (made[60] - thetas[10:60].mean(0)).abs().max() > 1e-6


def test_a_window_spanning_more_epochs_than_copies_is_refused_and_the_reserve_gives_way_first():
    model = make_mlp()
    # M = 50 over epochs of 3 steps needs ⌈50/3⌉ + 1 = 18 chunks: refused under a cap of 12, in one line.
    with pytest.raises(ValueError, match=r"spans 17 epochs of 3 steps: P would keep 18 copies of the weights, more "
                                         r"than 12; set avg_window to at most 33"):
        Averager(model, window=50, period=3, max_chunks=12)
    assert Averager(model, window=33, period=3, max_chunks=12).reserve == 0  # 11 + 1 chunks fit exactly
    # The skip reserve shrinks to what fits: R = 4 needs 5 cuts an epoch of 20 steps (3 × 5 + 1 = 16 chunks).
    assert chunk_bound(50, 20, 4) == 16 and chunk_bound(50, 20, 2) == 10
    assert Averager(model, window=50, period=20, reserve=4, max_chunks=12).reserve == 2
    assert Averager(model, window=50, period=20, reserve=4).reserve == 4


def test_without_epochs_p_is_made_at_multiples_of_m():
    thetas, avg = trajectory(130, window=50, period=None)
    assert avg.p_range == (51, 100)
    assert (flat(avg.model("P")) - thetas[51:101].mean(0)).abs().max() < 1e-10


# 3 ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.99, 0.999])
def test_ema_matches_closed_form(gamma: float):
    n = 300
    thetas, avg = trajectory(n, window=50)
    j = torch.arange(1, n + 1, dtype=DTYPE)
    expected = gamma**n * thetas[0] + (1 - gamma) * ((gamma ** (n - j))[:, None] * thetas[1:]).sum(0)
    g = flat(avg.model(f"G{gamma:g}"))
    assert (g - expected).abs().max() < 1e-10
    # Not vacuous: the bias-corrected EMA (no θ_0 term, weights rescaled to sum to 1) is far off, as is θ_N.
    bias_corrected = (expected - gamma**n * thetas[0]) / (1 - gamma**n)
    assert (g - bias_corrected).abs().max() > 1e-6
    assert (g - thetas[n]).abs().max() > 1e-6


def test_window_average_before_the_first_block_is_never_theta0():
    thetas, avg = trajectory(49, window=50, period=200)
    assert avg.p_range is None and avg.ready() == ["G0.99", "G0.999"]
    with pytest.raises(ValueError, match="P averages nothing yet"):
        avg.model("P")
    assert "not made yet" in avg.describe("P")


# 4 ------------------------------------------------------------------------------------------------------------------
class Point(nn.Module):
    """The quadratic's variable, one row per seed: Adam and the averages act elementwise, so rows never interact."""

    def __init__(self, rows: int, d: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(rows, d, dtype=DTYPE))


def noisy_quadratic(sigma: float, seeds=range(5), d: int = 20, steps: int = 10_000, window: int = 2000):
    """Excess losses (last iterate, last-`window` mean, EMA 0.999) of Adam on ½ Σ λ_i (θ_i − θ*_i)², one per seed.

    Seed s draws θ* ~ N(0, I) and then one N(0, I) gradient noise vector per step from its own generator, as a
    training loop would; all seeds run at once as the rows of one parameter. P is checked to be the exact mean
    of the last `window` iterates, whatever steps mod window is.
    """
    lam = torch.logspace(-1, 1, d, dtype=DTYPE)
    stars, noises = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        stars.append(torch.randn(d, generator=g, dtype=DTYPE))
        noises.append(torch.stack([torch.randn(d, generator=g, dtype=DTYPE) for _ in range(steps)]))
    star = torch.stack(stars)  # (seeds, d)
    noise = sigma * torch.stack(noises, dim=1)  # (steps, seeds, d)
    point = Point(len(stars), d)  # θ_0 = 0
    opt = adam(point)
    avg = Averager(point, window=window, ema_decays=(0.999,), period=steps)
    theta = point.theta
    window_sum = torch.zeros_like(theta)
    for n in range(steps):
        with torch.no_grad():
            theta.grad = lam * (theta - star) + noise[n]
        opt.step()
        avg.update(point)
        if n >= steps - window:
            window_sum += theta.detach()
    assert avg.p_range == (steps - window + 1, steps)
    torch.testing.assert_close(avg.model("P").theta, window_sum / window, rtol=0, atol=1e-10)

    def excess(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * (lam * (t.detach() - star) ** 2).sum(1)

    return excess(theta), excess(avg.model("P").theta), excess(avg.model("G0.999").theta)


def test_averaging_beats_the_last_iterate_on_a_noisy_quadratic():
    # Seed-dependent by nature: at 9 500 steps, over seeds 0..39 no ratio exceeded 0.5, medians ≈ 0.15 (P) and
    # 0.13 (G); seeds 0–4 give at most 0.33.
    last, p, g = noisy_quadratic(sigma=1.0, steps=9_500)  # 9 500 mod 2 000 ≠ 0: the case a stale P would hide
    assert torch.all(p < 0.5 * last), (p / last).tolist()
    assert torch.all(g < 0.5 * last), (g / last).tolist()


def test_averaging_is_worse_without_noise():
    """Without gradient noise the averages only lag behind, so the test above is not vacuous.

    Compared at N = 450, M = 90 (window N/5): by N = 10 000, noiseless Adam has reached θ* to rounding
    (excess 0 or ~1e-30, with rare post-convergence spikes of ~1e-10), and comparing rounding errors means nothing.
    """
    last, p, g = noisy_quadratic(sigma=0.0, steps=450, window=90)
    assert torch.all(last > 1e-12), last.tolist()  # far above rounding
    assert torch.all(p > last), (p / last).tolist()
    assert torch.all(g > last), (g / last).tolist()


# 5 ------------------------------------------------------------------------------------------------------------------
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.bn1 = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn1(self.fc(torch.relu(self.bn2(self.conv(x))).flatten(1)))


def trained_bn_averages(seed: int):
    """A BatchNorm network after 7 Adam steps with its averages; the generator goes on drawing batches."""
    torch.manual_seed(0)
    model = BNNet().to(DTYPE)
    opt = adam(model)
    avg = Averager(model, window=3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(7):  # momentum-style running stats in the raw model and, copied from it, in the averages
        x = 2 + 3 * torch.randn(6, 2, 4, 4, generator=g, dtype=DTYPE)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        avg.update(model)
    return model, avg, g


def test_prepare_for_eval_recomputes_batchnorm_statistics_as_a_plain_average():
    model, avg, g = trained_bn_averages(2)
    raw_buffers = [b.clone() for b in model.buffers()]
    # Unequal batch sizes: the cumulative average weights batches, not samples. (x, label) pairs, as a loader gives.
    loader = [(1 + 2 * torch.randn(size, 2, 4, 4, generator=g, dtype=DTYPE), torch.zeros(size))
              for size in (8, 5, 8, 3)]

    net = avg.model("P")
    net.train()
    seen: dict[nn.Module, list[torch.Tensor]] = {net.bn2: [], net.bn1: []}
    hooks = [bn.register_forward_pre_hook(lambda mod, args: seen[mod].append(args[0].detach().clone()))
             for bn in seen]
    out = prepare_for_eval(net, loader, device="cpu")
    for h in hooks:
        h.remove()

    assert out is net and net.training is False and not any(m.training for m in net.modules())
    for bn, dims in ((net.bn2, (0, 2, 3)), (net.bn1, (0,))):
        inputs = seen[bn]
        assert len(inputs) == len(loader)
        mean = torch.stack([x.mean(dims) for x in inputs]).mean(0)
        var = torch.stack([x.var(dims, unbiased=True) for x in inputs]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=0, atol=1e-12)
        # Not the sample-weighted statistics of all images together.
        assert (torch.cat([x.transpose(0, 1).flatten(1) for x in inputs], 1).mean(1) - mean).abs().max() > 1e-6
        assert int(bn.num_batches_tracked) == len(loader) and bn.momentum == 0.1
    # The raw model and the other averages are untouched.
    assert all(torch.equal(a, b) for a, b in zip(raw_buffers, model.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(raw_buffers, avg.model("G0.99").buffers()))

    # Evaluation now uses the recomputed statistics: deterministic, independent of the batch.
    x = loader[0][0]
    torch.testing.assert_close(net(x)[:2], net(x[:2]), rtol=0, atol=1e-12)


def test_one_pass_for_every_average_gives_each_the_statistics_of_its_own_pass():
    from dogkit.training.averaging import prepare_all_for_eval

    _, avg, g = trained_bn_averages(3)
    loader = [(1 + 2 * torch.randn(size, 2, 4, 4, generator=g, dtype=DTYPE), torch.zeros(size)) for size in (8, 5, 3)]
    names = avg.ready()
    assert names == ["P", "G0.99", "G0.999"]
    alone = {}
    for name in names:  # one pass per average, each on its own copy
        alone[name] = {k: v.clone() for k, v in prepare_for_eval(copy.deepcopy(avg.model(name)), loader).state_dict()
                       .items()}

    class CountingLoader(list):
        passes = 0

        def __iter__(self):
            CountingLoader.passes += 1
            return super().__iter__()

    nets = prepare_all_for_eval([avg.model(n) for n in names], CountingLoader(loader))
    assert CountingLoader.passes == 1
    for name, net in zip(names, nets):
        assert not net.training
        state = net.state_dict()
        assert state.keys() == alone[name].keys()
        for key, value in alone[name].items():
            assert torch.equal(state[key], value), (name, key)
    # The averages differ, so equal statistics are not a coincidence of identical networks.
    assert not torch.equal(nets[0].state_dict()["bn1.running_mean"], nets[1].state_dict()["bn1.running_mean"])


def test_prepare_for_eval_without_batchnorm_only_switches_to_eval():
    model = make_mlp()
    model.train()
    before = [t.clone() for t in model.state_dict().values()]

    class Untouchable:
        def __iter__(self):
            raise AssertionError("the loader must not be read for a model without BatchNorm")

    out = prepare_for_eval(model, Untouchable())
    assert out is model and model.training is False and not any(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_prepare_for_eval_can_skip_the_recompute():
    torch.manual_seed(0)
    model = BNNet().to(DTYPE)
    before = [b.clone() for b in model.buffers()]
    out = prepare_for_eval(model, [torch.randn(4, 2, 4, 4, dtype=DTYPE)], recompute_bn=False)
    assert out.training is False and all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_frozen_batchnorm_keeps_its_statistics_and_normalises_with_them_during_the_recompute():
    """Under a freeze schedule: frozen layers keep their buffers; the layers after them get statistics of the
    activations they see in training, where the frozen BatchNorm uses its running statistics (eval mode)."""
    torch.manual_seed(0)
    net = BNNet().to(DTYPE)
    with torch.no_grad():
        net.bn2.running_mean.fill_(0.5)
        net.bn2.running_var.fill_(4.0)
    net.train()
    net.bn2.eval()
    frozen_before = [b.clone() for b in net.bn2.buffers()]
    g = torch.Generator().manual_seed(3)
    loader = [1 + 2 * torch.randn(6, 2, 4, 4, generator=g, dtype=DTYPE) for _ in range(3)]
    seen = []
    hook = net.bn1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    prepare_for_eval(net, loader, frozen=["bn2"])
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, net.bn2.buffers()))
    expected = [net.fc(torch.relu(net.bn2(net.conv(x))).flatten(1)) for x in loader]  # bn2 in eval mode now
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(net.bn1.running_mean, torch.stack([x.mean(0) for x in expected]).mean(0),
                               rtol=0, atol=1e-12)
    # Not vacuous: recomputing everything (the frozen layer in train mode) gives other statistics.
    everything = prepare_for_eval(copy.deepcopy(net).train(), loader)
    assert (everything.bn2.running_mean - frozen_before[0]).abs().max() > 1e-3


def test_the_frozen_batchnorm_layers_come_from_the_schedule_not_from_the_model():
    """A resumed run that tests before training any epoch never ran apply_freeze: reading requires_grad found
    nothing frozen there (and recomputed the frozen stem's statistics). The schedule names the same layers in a
    fresh model as in one apply_freeze has set."""
    from dogkit.deploy.preprocess import PreprocessSpec
    from dogkit.training.config import resolve_config
    from dogkit.training.models import build_model
    from dogkit.training.optim import apply_freeze, frozen_batchnorm

    cfg = resolve_config(1, None, {"freeze": "gradual"})
    fresh = build_model("resnet18", 10, spec=PreprocessSpec.for_size(32))
    assert all(p.requires_grad for p in fresh.parameters())  # what the old reading saw: nothing frozen
    frozen = frozen_batchnorm(cfg, fresh, 1)  # epoch 2: head + layer4 trainable
    assert "net.bn1" in frozen and "net.layer3.1.bn2" in frozen and len(frozen) == 1 + 4 + 5 + 5  # stem, layer1–3
    assert not any(name.startswith("net.layer4") for name in frozen)
    trained = build_model("resnet18", 10, spec=PreprocessSpec.for_size(32)).train()
    apply_freeze(cfg, trained, 1)
    by_grad = [name for name, m in trained.named_modules() if isinstance(m, nn.BatchNorm2d)
               and not any(p.requires_grad for p in m.parameters())]
    assert frozen == by_grad and all(not trained.get_submodule(name).training for name in frozen)
    assert frozen_batchnorm(cfg, fresh, 4) == ["net.bn1"]  # every stage trains by epoch 5; the stem never
    assert frozen_batchnorm(resolve_config(1, None, {}), fresh, 0) == []


# 6 ------------------------------------------------------------------------------------------------------------------
def test_resume_is_bit_identical_to_an_uninterrupted_run():
    m = 15  # 4 epochs of 10 steps, saved after 2: chunks cut at 16, 26 and 36
    batches = make_batches(40)

    straight = make_mlp(batchnorm=True)
    straight_opt = adam(straight)
    straight_avg = Averager(straight, window=m, period=10)
    for batch in batches:
        sgd_step(straight, straight_opt, batch)
        straight_avg.update(straight)

    first = make_mlp(batchnorm=True)
    first_opt = adam(first)
    first_avg = Averager(first, window=m, period=10)
    for batch in batches[:20]:
        sgd_step(first, first_opt, batch)
        first_avg.update(first)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict(), "averager": first_avg.state_dict()},
               buf)
    del first, first_opt, first_avg
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = make_mlp(seed=123, batchnorm=True)  # fresh objects, different initial weights
    resumed_opt = adam(resumed)
    resumed_avg = Averager(resumed, window=m, period=10)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["optimizer"])
    resumed_avg.load_state_dict(ckpt["averager"])
    for batch in batches[20:]:
        sgd_step(resumed, resumed_opt, batch)
        resumed_avg.update(resumed)

    def same(a: nn.Module, b: nn.Module) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    assert same(resumed, straight)
    assert resumed_avg.steps == straight_avg.steps == 40
    assert resumed_avg.names == straight_avg.names == ["P", "G0.99", "G0.999"]
    for name in straight_avg.names:
        assert same(resumed_avg.model(name), straight_avg.model(name)), name
    assert [(c.first, c.count, c.g_first, c.g_last) for c in resumed_avg.chunks] == \
        [(c.first, c.count, c.g_first, c.g_last) for c in straight_avg.chunks]
    assert all(torch.equal(a, b) for ca, cb in zip(resumed_avg.chunks, straight_avg.chunks, strict=True)
               for a, b in zip(ca.mean, cb.mean, strict=True))
    # The P being compared is 26..40: a lost chunk position would show.
    assert resumed_avg.p_range == straight_avg.p_range == (26, 40)


def test_load_state_dict_rejects_other_averages():
    model = make_mlp()
    state = Averager(model, window=15).state_dict()
    with pytest.raises(ValueError):
        Averager(model, window=16).load_state_dict(state)
    with pytest.raises(ValueError):
        Averager(model, window=15, ema_decays=(0.99,)).load_state_dict(state)
    Averager(model, window=15).load_state_dict(state)  # the matching one loads
    # Averages saved by an older dogkit (format 4: ends thinned, planned on the run's length) are refused whole.
    with pytest.raises(ValueError, match=r"saved by an older dogkit \(averages format 4; this one reads 5\)"):
        Averager(model, window=15).load_state_dict({**state, "format": 4})


# 7 ------------------------------------------------------------------------------------------------------------------
def skipped_run(planned: int, m: int, skips: set[int], *, save_at: int | None = None, period: int | None = None,
                on_step=None):
    """A run of ``planned`` optimizer steps of which those in ``skips`` (global step numbers) are skipped, as the
    fp16 GradScaler does: the weights stay put and the averager is told. Returns the taken iterates as
    {global step: θ} and the averager (saved and loaded into a fresh one after global step ``save_at``);
    ``on_step(step, avg, taken)`` after each step."""
    model = make_mlp()
    opt = adam(model)
    avg = Averager(model, window=m, period=period or planned, reserve=RESERVE)
    taken = {}
    for step, batch in enumerate(make_batches(planned), start=1):
        if step in skips:
            avg.skip()
        else:
            sgd_step(model, opt, batch)
            avg.update(model)
            taken[step] = flat(model)
        if step == save_at:
            buf = io.BytesIO()
            torch.save(avg.state_dict(), buf)
            buf.seek(0)
            avg = Averager(model, window=m, period=period or planned, reserve=RESERVE)
            avg.load_state_dict(torch.load(buf, weights_only=True))
        if on_step:
            on_step(step, avg, taken)
    return taken, avg


def mean_of(taken: dict, first: int, last: int) -> torch.Tensor:
    return torch.stack([theta for step, theta in taken.items() if first <= step <= last]).mean(0)


# At most R = 2 of them among the last M + R steps (79–130): the last M iterates taken, exactly.
@pytest.mark.parametrize("skips", [{100}, {5}, {81}, {80}, {130}, {110, 120}, {60, 78, 101, 129},
                                   {3, 40, 60, 95}, {81, 82}, {129, 130}])
def test_skipped_steps_leave_the_last_p_the_mean_of_the_last_m_iterates_taken(skips: set[int]):
    m, planned = 50, 130
    taken, avg = skipped_run(planned, m, skips)
    steps = sorted(taken)
    assert avg.steps == len(steps) == planned - len(skips) and avg.attempts == planned
    last_m = steps[-m:]  # an independent count: the last M steps actually taken, by global step number
    assert avg.p_range == (last_m[0], last_m[-1])
    assert (flat(avg.model("P")) - torch.stack([taken[s] for s in last_m]).mean(0)).abs().max() < 1e-10
    # The window one taken step later or earlier is far outside the tolerance: the check can fail.
    later = torch.stack([taken[s] for s in steps[-m + 1:]]).mean(0)
    assert (flat(avg.model("P")) - later).abs().max() > 1e-6


def test_more_skips_at_the_end_than_the_reserve_still_names_what_p_averages():
    m, planned = 50, 130
    skips = {101, 103, 105, 107, 109, 111}  # six skips in the last window; it reaches back over two
    taken, avg = skipped_run(planned, m, skips)
    first, last = avg.p_range
    assert (flat(avg.model("P")) - mean_of(taken, first, last)).abs().max() < 1e-10
    # The window starts at the first cut after the last M taken: four short, and it says so.
    count = sum(1 for s in taken if first <= s <= last)
    assert last == planned and count == avg.p_count == m - (len(skips) - RESERVE) == 46


def test_a_skipped_step_in_a_run_shorter_than_m_averages_every_iterate_taken():
    taken, avg = skipped_run(30, 50, {12})
    assert avg.p_range == (1, 30)
    assert (flat(avg.model("P")) - mean_of(taken, 1, 30)).abs().max() < 1e-10


@pytest.mark.parametrize("save_at", [78, 100, 120])
def test_resume_with_skipped_steps_is_bit_identical(save_at: int):
    skips = {79, 101, 121}
    straight_taken, straight = skipped_run(130, 50, skips)
    resumed_taken, resumed = skipped_run(130, 50, skips, save_at=save_at)
    assert resumed.p_range == straight.p_range and resumed.attempts == straight.attempts == 130
    assert torch.equal(flat(resumed.model("P")), flat(straight.model("P")))
    for name in ("G0.99", "G0.999"):
        assert torch.equal(flat(resumed.model(name)), flat(straight.model(name)))


@pytest.mark.parametrize("skips", [{51}, {70}, {51, 52, 99}, {100}, {101, 119}, {61, 62, 63, 64, 65}])
def test_skipped_steps_at_every_end_leave_p_the_last_m_iterates(skips: set[int]):
    """Windows that overlap (epochs of 20 steps, M = 50): every end's P is the mean of the last M iterates taken,
    reaching back over up to R = 2 skips, so an early stop anywhere ends exact; more skips in one window leave it
    an iterate short for each, and it says so."""
    m, planned, period = 50, 120, 20

    def check(step, avg, taken):
        if step % period == 0:
            first, last = avg.p_range
            inside = [s for s in taken if first <= s <= last]
            assert last == max(taken) and avg.p_count == len(inside), step  # the latest taken, made at the end
            lost = sum(1 for s in skips if step - m - RESERVE < s <= step)
            assert len(inside) == min(m, len(taken)) - max(0, lost - RESERVE), step
            assert (flat(avg.model("P")) - mean_of(taken, first, last)).abs().max() < 1e-10, step

    skipped_run(planned, m, skips, period=period, on_step=check)


# 8 ------------------------------------------------------------------------------------------------------------------
class Vector(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2, dtype=DTYPE))


def random_plan(rng: random.Random) -> dict:
    """A run as the trainer makes them: M, epochs of p steps, R, planned epochs, then stopped early, extended on
    resume (saved at or before its planned end) or as planned, with fp16 skips (often none), saved and resumed once."""
    m, p, reserve, planned = rng.randint(1, 12), rng.randint(1, 8), rng.choice([0, 0, 1, 2, 4]), rng.randint(1, 6)
    kind = rng.choice(["planned", "stopped early", "extended"])
    epochs = {"planned": planned, "stopped early": rng.randint(1, planned), "extended": planned + rng.randint(1, 5)}
    steps = epochs[kind] * p
    rate = rng.choice([0.0, 0.05, 0.2]) if reserve else 0.0
    save_at = rng.randint(1, planned * p if kind == "extended" else steps)
    return {"m": m, "p": p, "reserve": reserve, "kind": kind, "steps": steps, "save_at": save_at,
            "skips": {s for s in range(1, steps + 1) if rng.random() < rate}}


def brute_force_failures(plan: dict) -> list[str]:
    """Run ``plan`` keeping every iterate; what the Averager did against its promise at every epoch's end: P is the
    mean of the last M′ ≤ M iterates taken, all within the last M + R steps, with M′ = min(M, n) whenever those
    were; with none taken in the window's steps P stays. Memory stays within ``chunk_bound``."""
    m, p, steps = plan["m"], plan["p"], plan["steps"]
    model = Vector()
    avg = Averager(model, window=m, ema_decays=(), period=p, reserve=plan["reserve"])
    reserve, taken, failures, before = avg.reserve, [], [], None
    g = torch.Generator().manual_seed(plan["save_at"])
    for step in range(1, steps + 1):
        if step in plan["skips"]:
            avg.skip()
        else:
            with torch.no_grad():
                model.theta.copy_(torch.randn(2, generator=g, dtype=DTYPE))
            taken.append((step, model.theta.detach().clone()))
            avg.update(model)
        if len(avg.chunks) > chunk_bound(m, p, reserve):
            failures.append(f"{len(avg.chunks)} chunks at step {step}")
        if step == plan["save_at"]:  # resumed: a new Averager, planned again, continues the saved state
            state = avg.state_dict()
            avg = Averager(model, window=m, ema_decays=(), period=p, reserve=plan["reserve"])
            avg.load_state_dict(state)
        if step % p or not taken:
            continue
        want = min(m, len(taken))
        within = taken[-want][0] > step - m - reserve  # the last M iterates taken in the last M + R steps
        if not within and avg.p_range == before and all(s <= step - m for s, _ in taken):
            continue  # not one iterate in the window's steps: P stays
        got = avg.p_count
        mean = torch.stack([theta for _, theta in taken[-got:]]).mean(0) if 1 <= got <= len(taken) else None
        if (mean is None or got > m or avg.p_range != (taken[-got][0], taken[-1][0])
                or taken[-got][0] <= step - m - reserve or (avg.model("P").theta - mean).abs().max() > 1e-12):
            failures.append(f"step {step}: P is not the mean of the last {got} iterates it names")
        elif within and got != want:
            failures.append(f"step {step}{' (the last)' if step == steps else ''}: {got} iterates, not {want}")
        before = avg.p_range
    return failures


def test_p_keeps_its_promise_over_3000_random_plans_against_every_iterate_kept():
    rng = random.Random(36)
    plans = [random_plan(rng) for _ in range(3000)]
    failed = [(plan, brute_force_failures(plan)) for plan in plans]
    failed = [(plan, f) for plan, f in failed if f]
    assert not failed, failed[:3]
    # The plans reach the cases the promise is about, not only easy ones.
    kinds = {kind: sum(1 for plan in plans if plan["kind"] == kind) for kind in ("stopped early", "extended")}
    assert min(kinds.values()) > 800
    reaching_back = [plan for plan in plans if plan["skips"] and plan["m"] > plan["p"]
                     and any(plan["steps"] - plan["m"] < s <= plan["steps"] for s in plan["skips"])]
    assert len(reaching_back) > 150


def test_the_brute_force_reference_catches_cuts_that_ignore_the_reserve(monkeypatch):
    """The reference can fail: windows cut as if no step were ever skipped (R = 0 in the cuts, R claimed) end short
    as soon as a skip falls inside one."""
    real = averaging.is_cut
    monkeypatch.setattr(averaging, "is_cut", lambda step, window, period, reserve: real(step, window, period, 0))
    rng = random.Random(7)
    plans = [plan for plan in (random_plan(rng) for _ in range(400)) if plan["skips"]]
    assert sum(1 for plan in plans if brute_force_failures(plan)) > 20
