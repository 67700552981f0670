"""Scaling study: model sizes from one dial, FLOPs accounting, scaling-law fits.

Everything here is a pure function of numbers (or of a ``ModelConfig``), so the ladder runner,
the report and the tests share one implementation and the fits can be checked against curves
with known parameters.

Fits
- ``fit_power_law``: L(C) = a·C^(-alpha) + L_inf, loss against training compute.
- ``fit_chinchilla``: L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022), when the ladder
  varies parameters and tokens independently.
Both fit log L (relative errors: loss noise grows with the loss, and a ladder's losses span a
range), work in compute/parameters/tokens divided by their geometric mean (no overflow, and the
coefficient and the exponent are not tied to each other by huge logarithms), and give seeded
percentile-bootstrap intervals. Data that cannot support a fit gives ``None``; the matching
``*_unsupported_reason`` says why, for the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gptlab.model import GPT, ModelConfig
from gptlab.stats import percentile_interval

# ---------------------------------------------------------------------------------------------
# Model sizes and FLOPs


def ladder_config(
    depth: int,
    *,
    vocab_size: int,
    block_size: int,
    aspect: int = 32,
    head_dim: int = 32,
    family: str = "llama",
) -> ModelConfig:
    """The model of a given depth, with width and heads derived from it, as nanochat does.

    Width is ``depth * aspect`` rounded up to a multiple of ``head_dim`` so every head has exactly
    ``head_dim`` channels; one dial then moves parameters by orders of magnitude while the shape
    stays balanced. nanochat uses aspect 64 and head_dim 128 for GPU models; the defaults here
    (32, 32) give CPU-sized ones: depth 4 is 4 layers of width 128 with 4 heads.
    """
    if depth < 1 or aspect < 1 or head_dim < 1:
        raise ValueError(f"depth, aspect and head_dim must be positive, got {depth}, {aspect}, {head_dim}")
    n_embd = math.ceil(depth * aspect / head_dim) * head_dim
    n_head = n_embd // head_dim
    return ModelConfig(
        family=family,
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=n_embd,
    )


def _meta_model(config: ModelConfig) -> GPT:
    # On the meta device no memory is allocated, so the model's own counts (the one definition of
    # parameters and FLOPs) serve for models of any size.
    with torch.device("meta"):
        return GPT(config)


def num_params(config: ModelConfig, *, non_embedding: bool = False) -> int:
    """Parameters of the model a config describes (see ``GPT.num_params``)."""
    return _meta_model(config).num_params(non_embedding=non_embedding)


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 per linear weight plus attention (see ``GPT.flops_per_token``)."""
    return _meta_model(config).flops_per_token(seq_len)


def training_flops(config: ModelConfig, tokens: int, seq_len: int | None = None) -> float:
    """FLOPs to train on ``tokens`` tokens in windows of ``seq_len`` (default: block_size)."""
    return flops_per_token(config, seq_len) * tokens


def tokens_for_budget(
    config: ModelConfig,
    *,
    tokens_per_param: float | None = None,
    flops: float | None = None,
    seq_len: int | None = None,
    non_embedding: bool = False,
) -> int:
    """Training tokens for a budget given as tokens per parameter or as total FLOPs (one of them).

    Parameters are counted as Chinchilla does, embeddings included (Kaplan et al. leave them out:
    ``non_embedding=True``). The choice matters at small scale, where the embedding table can be
    most of the model.
    """
    if (tokens_per_param is None) == (flops is None):
        raise ValueError("give exactly one budget: tokens_per_param or flops")
    if tokens_per_param is not None:
        if tokens_per_param <= 0:
            raise ValueError(f"tokens_per_param must be positive, got {tokens_per_param}")
        return round(tokens_per_param * num_params(config, non_embedding=non_embedding))
    if flops <= 0:
        raise ValueError(f"flops must be positive, got {flops}")
    return int(flops // flops_per_token(config, seq_len))


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _as_positive_array(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be a 1-D sequence of finite positive numbers")
    return array


def _intervals(samples: dict[str, list[float]], confidence: float) -> dict[str, tuple[float, float]]:
    return {name: percentile_interval(np.asarray(values), confidence) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------
# L(C) = a·C^(-alpha) + L_inf


@dataclass(frozen=True)
class PowerLawFit:
    """L(C) = a·C^(-alpha) + L_inf fitted by least squares on log L.

    ``dof`` is points minus parameters. With ``dof == 0`` (three points) the curve passes through
    every point, nothing measures its uncertainty, and ``intervals`` is None.
    """

    a: float
    alpha: float
    l_inf: float
    n: int
    dof: int
    rmse_log: float  # root-mean-square residual of log L
    intervals: dict[str, tuple[float, float]] | None
    bootstrap_used: int
    bootstrap_requested: int
    confidence: float

    def predict(self, compute):
        """Loss at the given compute (a number or an array)."""
        compute = np.asarray(compute, dtype=np.float64)
        # exp of a log stays finite where a·C^(-alpha) would multiply a huge and a tiny number.
        return np.exp(math.log(self.a) - self.alpha * np.log(compute)) + self.l_inf

    def as_dict(self) -> dict:
        return {
            "form": "L(C) = a * C^(-alpha) + L_inf",
            "a": self.a,
            "alpha": self.alpha,
            "l_inf": self.l_inf,
            "n": self.n,
            "dof": self.dof,
            "rmse_log": self.rmse_log,
            "confidence": self.confidence,
            "intervals": None if self.intervals is None else {k: list(v) for k, v in self.intervals.items()},
            "bootstrap": {"requested": self.bootstrap_requested, "used": self.bootstrap_used},
        }


def power_law_unsupported_reason(compute, loss) -> str | None:
    """Why ``fit_power_law`` cannot fit these points, or None when it can."""
    compute = _as_positive_array(compute, "compute")
    loss = _as_positive_array(loss, "loss")
    if compute.shape != loss.shape:
        raise ValueError(f"compute and loss differ in length ({compute.size} and {loss.size})")
    distinct = np.unique(compute).size
    if distinct < 3:
        return f"the power law has 3 parameters and needs at least 3 distinct compute values, got {distinct}"
    return None


def _profile(x: np.ndarray, y: np.ndarray, l_inf: np.ndarray):
    """For each candidate L_inf, (log a, alpha) by weighted least squares and the log-L error.

    With L_inf fixed the curve is a line in log space: log(L - L_inf) = log a - alpha·x. Each
    point is weighted by ((L - L_inf)/L)^2, the square of d log L / d log(L - L_inf), so the line
    fit approximates least squares on log L itself.
    """
    gap = y[None, :] - l_inf[:, None]
    z = np.log(gap)
    w = (gap / y[None, :]) ** 2
    w_sum = w.sum(axis=1, keepdims=True)
    x_mean = (w * x).sum(axis=1, keepdims=True) / w_sum
    z_mean = (w * z).sum(axis=1, keepdims=True) / w_sum
    slope = (w * (x - x_mean) * (z - z_mean)).sum(axis=1) / (w * (x - x_mean) ** 2).sum(axis=1)
    log_a = z_mean[:, 0] - slope * x_mean[:, 0]
    predicted = np.log(np.exp(log_a[:, None] + slope[:, None] * x) + l_inf[:, None])
    sse = ((np.log(y) - predicted) ** 2).sum(axis=1)
    return sse, log_a, -slope


def _power_law_residuals(theta: np.ndarray, x: np.ndarray, log_y: np.ndarray):
    log_a, alpha, l_inf = theta
    term = np.exp(log_a - alpha * x)
    model = term + l_inf
    jacobian = np.stack([term / model, -x * term / model, 1.0 / model], axis=1)
    return log_y - np.log(model), jacobian


def _fit_power_law_once(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(log a, alpha, L_inf) in normalised compute x = log(C / C_ref)."""
    upper = y.min() * (1.0 - 1e-9)  # L_inf < min(L): every point keeps a positive power-law term
    # 1. Dense grid over L_inf / min(L), denser towards 1 where flattening curves put it.
    grid = np.concatenate([np.linspace(0.0, 0.99, 100), 1.0 - np.geomspace(1e-2, 1e-9, 30)[1:]]) * y.min()
    sse, _, _ = _profile(x, y, grid)
    best = int(np.argmin(sse))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    # 2. Golden-section search of the profile between the best grid point's neighbours.
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(40):
        c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        sse_cd = _profile(x, y, np.array([c, d]))[0]
        lo, hi = (lo, d) if sse_cd[0] < sse_cd[1] else (c, hi)
    l_inf = min((lo + hi) / 2.0, upper)
    _, log_a, alpha = _profile(x, y, np.array([l_inf]))
    theta = np.array([log_a[0], alpha[0], l_inf])
    # 3. Levenberg-Marquardt on all three parameters: the profile's line fit is only a
    # linearisation of the log-L objective, this minimises the objective itself.
    log_y = np.log(y)
    residuals, jacobian = _power_law_residuals(theta, x, log_y)
    sse = residuals @ residuals
    damping = 1e-3
    for _ in range(100):
        hessian = jacobian.T @ jacobian
        step = np.linalg.solve(hessian + damping * np.diag(np.diag(hessian)), jacobian.T @ residuals)
        candidate = theta + step
        candidate[2] = min(max(candidate[2], 0.0), upper)
        cand_residuals, cand_jacobian = _power_law_residuals(candidate, x, log_y)
        cand_sse = cand_residuals @ cand_residuals
        if cand_sse < sse:
            converged = sse - cand_sse <= 1e-14 * sse + 1e-300
            theta, residuals, jacobian, sse = candidate, cand_residuals, cand_jacobian, cand_sse
            damping = max(damping / 10.0, 1e-12)
            if converged:
                break
        else:
            damping *= 10.0
            if damping > 1e12:
                break
    return theta


def fit_power_law(
    compute, loss, *, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
) -> PowerLawFit | None:
    """Fit L(C) = a·C^(-alpha) + L_inf with 0 <= L_inf < min(L); None if the points cannot support it.

    Method: a dense grid and golden-section search over L_inf, each L_inf solved for (a, alpha)
    in closed form, then Levenberg-Marquardt on all three. Intervals: points resampled with
    replacement (seeded), refitted; resamples with fewer than 3 distinct compute values are
    skipped and ``bootstrap_used`` counts the rest.
    """
    if power_law_unsupported_reason(compute, loss) is not None:
        return None
    compute, loss = np.asarray(compute, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    log_c_ref = float(np.log(compute).mean())
    x = np.log(compute) - log_c_ref

    def to_original(theta: np.ndarray) -> dict[str, float]:
        log_a, alpha, l_inf = theta
        return {"a": math.exp(log_a + alpha * log_c_ref), "alpha": float(alpha), "l_inf": float(l_inf)}

    theta = _fit_power_law_once(x, loss)
    residuals, _ = _power_law_residuals(theta, x, np.log(loss))
    n = compute.size
    intervals, used = None, 0
    if n > 3 and bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {"a": [], "alpha": [], "l_inf": []}
        for _ in range(bootstrap):
            idx = rng.integers(0, n, size=n)
            if np.unique(x[idx]).size < 3:
                continue
            for name, value in to_original(_fit_power_law_once(x[idx], loss[idx])).items():
                samples[name].append(value)
            used += 1
        if used:
            intervals = _intervals(samples, confidence)
    return PowerLawFit(
        **to_original(theta),
        n=n,
        dof=n - 3,
        rmse_log=float(np.sqrt(np.mean(residuals**2))),
        intervals=intervals,
        bootstrap_used=used,
        bootstrap_requested=bootstrap,
        confidence=confidence,
    )


# ---------------------------------------------------------------------------------------------
# L(N, D) = E + A/N^alpha + B/D^beta

# Above this |correlation| of log N and log D the two terms cannot be told apart: a ladder that
# trains every size on the same tokens per parameter has D ∝ N and correlation 1.
COLLINEARITY_LIMIT = 0.99
HUBER_DELTA = 1e-3  # Hoffmann et al.: robust to outlying runs, quadratic near the fit


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A/N^alpha + B/D^beta fitted by a Huber loss on log L, as Hoffmann et al. did."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    n: int
    dof: int
    rmse_log: float
    intervals: dict[str, tuple[float, float]] | None
    bootstrap_used: int
    bootstrap_requested: int
    confidence: float

    def predict(self, params, tokens):
        """Loss of a model with ``params`` parameters trained on ``tokens`` tokens."""
        log_n = np.log(np.asarray(params, dtype=np.float64))
        log_d = np.log(np.asarray(tokens, dtype=np.float64))
        return self.E + np.exp(math.log(self.A) - self.alpha * log_n) + np.exp(math.log(self.B) - self.beta * log_d)

    def as_dict(self) -> dict:
        return {
            "form": "L(N, D) = E + A / N^alpha + B / D^beta",
            "E": self.E,
            "A": self.A,
            "B": self.B,
            "alpha": self.alpha,
            "beta": self.beta,
            "n": self.n,
            "dof": self.dof,
            "rmse_log": self.rmse_log,
            "confidence": self.confidence,
            "intervals": None if self.intervals is None else {k: list(v) for k, v in self.intervals.items()},
            "bootstrap": {"requested": self.bootstrap_requested, "used": self.bootstrap_used},
        }


def chinchilla_unsupported_reason(params, tokens) -> str | None:
    """Why ``fit_chinchilla`` cannot fit runs with these sizes, or None when it can."""
    log_n = np.log(_as_positive_array(params, "params"))
    log_d = np.log(_as_positive_array(tokens, "tokens"))
    if log_n.shape != log_d.shape:
        raise ValueError(f"params and tokens differ in length ({log_n.size} and {log_d.size})")
    distinct = len(set(zip(log_n.tolist(), log_d.tolist())))
    if distinct < 5:
        return f"the Chinchilla form has 5 parameters and needs at least 5 distinct (N, D) runs, got {distinct}"
    if np.ptp(log_n) == 0 or np.ptp(log_d) == 0:
        return "parameters or tokens do not vary across the runs"
    correlation = float(np.corrcoef(log_n, log_d)[0, 1])
    if abs(correlation) > COLLINEARITY_LIMIT:
        return (
            f"log N and log D are collinear (correlation {correlation:.3f}), so the N and D terms "
            "cannot be separated: train some sizes on more or fewer tokens per parameter"
        )
    return None


def _chinchilla_log_loss(theta: torch.Tensor, x_n, x_d) -> torch.Tensor:
    """log L for each row of theta = (log A, log B, log E, alpha, beta), in normalised N and D.

    logsumexp(log A - alpha·log N, log B - beta·log D, log E) keeps E, A, B positive without
    constraints and does not overflow where the sum of three exponentials could.
    """
    log_a, log_b, log_e, alpha, beta = theta.unbind(-1)
    return torch.logsumexp(
        torch.stack(
            [
                log_a[..., None] - alpha[..., None] * x_n,
                log_b[..., None] - beta[..., None] * x_d,
                log_e[..., None].expand(*log_e.shape, x_n.numel()),
            ]
        ),
        dim=0,
    )


def _chinchilla_objective(theta: torch.Tensor, x_n, x_d, log_y) -> torch.Tensor:
    """Huber loss of log L for each row of theta."""
    predicted = _chinchilla_log_loss(theta, x_n, x_d)
    huber = torch.nn.functional.huber_loss(predicted, log_y.expand_as(predicted), reduction="none", delta=HUBER_DELTA)
    # Divided by delta so the gradient is O(1) and L-BFGS's tolerances mean the same at any delta.
    return huber.sum(-1) / HUBER_DELTA


def _lbfgs(theta0: torch.Tensor, x_n, x_d, log_y) -> torch.Tensor:
    theta = theta0.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=1000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        value = _chinchilla_objective(theta, x_n, x_d, log_y)
        value.backward()
        return value

    optimizer.step(closure)
    return theta.detach()


def _chinchilla_starts() -> torch.Tensor:
    # A small grid in normalised units (N and D divided by their geometric means), where
    # A/N^alpha and B/D^beta are of the order of the loss itself.
    axes = [
        torch.tensor([-2.0, -0.5, 1.0]),  # log A
        torch.tensor([-2.0, -0.5, 1.0]),  # log B
        torch.tensor([-1.0, 0.0, 1.0]),  # log E
        torch.tensor([0.1, 0.4, 1.0]),  # alpha
        torch.tensor([0.1, 0.4, 1.0]),  # beta
    ]
    return torch.cartesian_prod(*axes).to(torch.float64)


def fit_chinchilla(
    params, tokens, loss, *, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0, starts: int = 4
) -> ChinchillaFit | None:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta; None when the runs cannot separate N from D.

    Method (Hoffmann et al. 2022, appendix D.2): Huber loss (delta 1e-3) on log L, minimised by
    L-BFGS from the ``starts`` best points of a grid of initialisations. Bootstrap refits start
    from the full fit. ``chinchilla_unsupported_reason`` says why a None was returned.
    """
    if chinchilla_unsupported_reason(params, tokens) is not None:
        return None
    params, tokens = np.asarray(params, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    loss = _as_positive_array(loss, "loss")
    if loss.shape != params.shape:
        raise ValueError(f"params and loss differ in length ({params.size} and {loss.size})")
    log_n_ref, log_d_ref = float(np.log(params).mean()), float(np.log(tokens).mean())
    x_n = torch.from_numpy(np.log(params) - log_n_ref)
    x_d = torch.from_numpy(np.log(tokens) - log_d_ref)
    log_y = torch.from_numpy(np.log(loss))

    def to_original(theta: torch.Tensor) -> dict[str, float]:
        log_a, log_b, log_e, alpha, beta = theta.tolist()
        return {
            "E": math.exp(log_e),
            "A": math.exp(log_a + alpha * log_n_ref),
            "B": math.exp(log_b + beta * log_d_ref),
            "alpha": alpha,
            "beta": beta,
        }

    grid = _chinchilla_starts()
    candidates = grid[_chinchilla_objective(grid, x_n, x_d, log_y).argsort()[:starts]]
    fits = [_lbfgs(theta0, x_n, x_d, log_y) for theta0 in candidates]
    theta = min(fits, key=lambda t: _chinchilla_objective(t, x_n, x_d, log_y).item())

    n = params.size
    intervals, used = None, 0
    if n > 5 and bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {"E": [], "A": [], "B": [], "alpha": [], "beta": []}
        for _ in range(bootstrap):
            idx = rng.integers(0, n, size=n)
            if chinchilla_unsupported_reason(params[idx], tokens[idx]) is not None:
                continue
            refit = _lbfgs(theta, x_n[idx], x_d[idx], log_y[idx])
            for name, value in to_original(refit).items():
                samples[name].append(value)
            used += 1
        if used:
            intervals = _intervals(samples, confidence)

    residuals = log_y - _chinchilla_log_loss(theta, x_n, x_d)
    return ChinchillaFit(
        **to_original(theta),
        n=n,
        dof=n - 5,
        rmse_log=float(residuals.square().mean().sqrt()),
        intervals=intervals,
        bootstrap_used=used,
        bootstrap_requested=bootstrap,
        confidence=confidence,
    )


# ---------------------------------------------------------------------------------------------
# Ladder checks


def monotone_decreasing(values) -> bool:
    """True when every value is strictly below the one before (e.g. loss along a compute ladder)."""
    values = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.diff(values) < 0))
