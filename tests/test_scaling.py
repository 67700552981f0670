import json

import numpy as np
import pytest

from gptlab.scaling import (
    chinchilla_unsupported_reason,
    fit_chinchilla,
    fit_power_law,
    flops_per_token,
    ladder_config,
    monotone_decreasing,
    num_params,
    power_law_unsupported_reason,
    tokens_for_budget,
    training_flops,
)


def small(family: str):
    # depth 2, aspect 32, head_dim 16: width 64, 4 heads of 16.
    return ladder_config(2, aspect=32, head_dim=16, vocab_size=100, block_size=32, family=family)


def test_training_flops_equal_hand_count_llama():
    d, T, V, L, ffn = 64, 32, 100, 2, 192  # llama's ffn: 8/3 * 64 rounded up to a multiple of 64
    per_layer = 3 * d * d + d * d + 2 * d * ffn + ffn * d  # q, k, v; o; gate, up; down
    head = d * V
    per_token = 6 * (L * per_layer + head) + 12 * L * d * T
    assert flops_per_token(small("llama"), T) == per_token
    assert training_flops(small("llama"), tokens=1000, seq_len=T) == 1000 * per_token


def test_training_flops_equal_hand_count_gpt2_counting_the_tied_head():
    d, T, V, L, ffn = 64, 16, 100, 2, 256
    per_layer = 3 * d * d + d * d + d * ffn + ffn * d  # q, k, v; o; up; down
    head = d * V  # tied to the embedding, yet a matmul all the same
    assert training_flops(small("gpt2"), tokens=7, seq_len=T) == 7 * (6 * (L * per_layer + head) + 12 * L * d * T)


def test_tokens_for_budget_counts_all_parameters_or_divides_flops():
    config = small("llama")
    d, V, L, ffn = 64, 100, 2, 192
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d  # linear weights and two RMSNorm scales
    total = V * d + L * per_layer + d + d * V  # embedding, blocks, final norm, untied head
    assert num_params(config) == total
    assert tokens_for_budget(config, tokens_per_param=20) == 20 * total
    assert tokens_for_budget(config, tokens_per_param=20, non_embedding=True) == 20 * (total - V * d)
    per_token = flops_per_token(config, 32)
    assert tokens_for_budget(config, flops=1000 * per_token + 1, seq_len=32) == 1000
    with pytest.raises(ValueError):
        tokens_for_budget(config, tokens_per_param=20, flops=1e12)


@pytest.mark.parametrize("aspect,head_dim", [(32, 32), (64, 128), (48, 32)])
def test_ladder_config_grows_with_depth_and_heads_divide_width(aspect, head_dim):
    configs = [
        ladder_config(depth, aspect=aspect, head_dim=head_dim, vocab_size=256, block_size=64) for depth in range(1, 9)
    ]
    for depth, config in enumerate(configs, start=1):
        assert config.n_layer == depth
        assert config.head_dim == head_dim and config.n_head * head_dim == config.n_embd
        assert config.n_kv_head == config.n_head
        assert depth * aspect <= config.n_embd < depth * aspect + head_dim
    counts = [num_params(c) for c in configs]
    assert all(b > a for a, b in zip(counts, counts[1:]))


def test_ladder_config_matches_nanochat_d20():
    config = ladder_config(20, aspect=64, head_dim=128, vocab_size=65536, block_size=2048)
    assert (config.n_layer, config.n_embd, config.n_head) == (20, 1280, 10)


COMPUTE = np.geomspace(1e12, 1e17, 8)  # 5 decades


@pytest.mark.parametrize("l_inf", [1.8, 0.0])
def test_power_law_recovers_noise_free_parameters(l_inf):
    loss = 2e4 * COMPUTE**-0.3 + l_inf
    fit = fit_power_law(COMPUTE, loss, bootstrap=0)
    assert fit.a == pytest.approx(2e4, rel=1e-3)
    assert fit.alpha == pytest.approx(0.3, rel=1e-3)
    assert fit.l_inf == pytest.approx(l_inf, rel=1e-3, abs=1e-6)
    assert fit.dof == 5 and fit.rmse_log < 1e-9
    np.testing.assert_allclose(fit.predict(COMPUTE), loss, rtol=1e-9)


def test_power_law_interval_covers_true_exponent_under_noise():
    rng = np.random.default_rng(0)
    loss = (2e4 * COMPUTE**-0.3 + 1.8) * np.exp(rng.normal(0.0, 0.01, COMPUTE.size))
    fit = fit_power_law(COMPUTE, loss, bootstrap=1000, seed=0)
    lo, hi = fit.intervals["alpha"]
    assert lo < 0.3 < hi and hi - lo > 0
    assert fit.intervals["l_inf"][0] < 1.8 < fit.intervals["l_inf"][1]
    assert 900 <= fit.bootstrap_used <= 1000
    record = json.loads(json.dumps(fit.as_dict()))
    assert record["intervals"]["alpha"] == [lo, hi] and record["bootstrap"]["used"] == fit.bootstrap_used
    assert fit_power_law(COMPUTE, loss, bootstrap=50, seed=3) == fit_power_law(COMPUTE, loss, bootstrap=50, seed=3)


def test_power_law_with_three_points_is_exact_and_has_no_interval():
    compute, loss = [1e3, 1e4, 1e5], [3.0, 2.5, 2.2]
    fit = fit_power_law(compute, loss)
    assert fit.dof == 0 and fit.intervals is None and fit.bootstrap_used == 0
    np.testing.assert_allclose(fit.predict(compute), loss, rtol=1e-9)


def test_power_law_needs_three_distinct_compute_values():
    assert fit_power_law([1e3, 1e4, 1e4], [3.0, 2.5, 2.4]) is None
    assert "got 2" in power_law_unsupported_reason([1e3, 1e4, 1e4], [3.0, 2.5, 2.4])
    with pytest.raises(ValueError):
        fit_power_law([1e3, 1e4, 1e5], [3.0, -1.0, 2.0])


CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al.'s fit


def chinchilla_loss(params, tokens):
    c = CHINCHILLA
    return c["E"] + c["A"] / params ** c["alpha"] + c["B"] / tokens ** c["beta"]


def test_chinchilla_recovers_noise_free_parameters():
    params = np.repeat(np.geomspace(1e6, 1e8, 3), 3)
    tokens = np.tile(np.geomspace(1e8, 1e10, 3), 3)
    fit = fit_chinchilla(params, tokens, chinchilla_loss(params, tokens), bootstrap=20)
    for name, value in CHINCHILLA.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-6), name
    assert fit.dof == 4 and fit.bootstrap_used > 0
    record = json.loads(json.dumps(fit.as_dict()))
    assert set(record["intervals"]) == set(CHINCHILLA)


def test_chinchilla_refuses_collinear_or_too_few_runs():
    params = np.geomspace(1e5, 1e8, 8)
    tokens = 20 * params  # one tokens-per-parameter ratio for every size: D ∝ N
    assert fit_chinchilla(params, tokens, chinchilla_loss(params, tokens)) is None
    assert "collinear" in chinchilla_unsupported_reason(params, tokens)
    assert fit_chinchilla(params[:4], tokens[:4] * [1, 3, 1, 3], chinchilla_loss(params[:4], tokens[:4])) is None


def test_monotone_decreasing_is_strict():
    assert monotone_decreasing([3.0, 2.5, 2.1])
    assert not monotone_decreasing([3.0, 2.5, 2.5])
    assert not monotone_decreasing([3.0, 3.2, 2.1])
