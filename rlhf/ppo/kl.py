"""KL between the policy and the frozen reference: per-token estimators, and the coefficient's controllers.

Pure arithmetic (docs/design.md, detail 7). The estimators follow Schulman 2020, "Approximating KL
divergence"; the adaptive controller Ziegler et al. 2019 (lm-human-preferences).
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy. [B, T] -> [B, T].

    k1 = log p - log q (unbiased, can be negative); k2 = (log p - log q)^2 / 2 (biased, low variance, its
    gradient is that of the true KL); k3 = (q/p - 1) - log(q/p) (unbiased, always >= 0; GRPO's KL loss).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use one of {KL_ESTIMATORS}")


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    ``current_kl`` is the mean per-sequence KL of the last rollout; ``n_steps`` the number of
    episodes (sequences) it covered, so the horizon is measured in episodes as in the paper.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(kl_coef: float, adaptive: bool, target: float | None, horizon: int) -> FixedKLController:
    if adaptive:
        if target is None:
            raise ValueError("adaptive_kl=true needs kl_target")
        return AdaptiveKLController(kl_coef, target, horizon)
    return FixedKLController(kl_coef)
