"""A live engine's step-time model, learned from its own steps (no calibration file needed);
the embedded llama.cpp engine and the vLLM plug-in both use it.

Policies that weigh recompute against memory (MARS's retention, InferCept's waste) ask a
`StepTimer` what a prefill or a host-to-device copy would cost. In the simulator that is the cost
model; live, it is either a `mars calibrate` preset (`mars serve --cost-model FILE`) or this:
a least-squares line `step_s = a + b * new_tokens` over the recent steps (exponentially
forgotten, so it follows the machine's load), and a per-token transfer time from the restores the
engine really did. Attention's quadratic term is left out: at the contexts a small CPU model
serves it is within the line's noise; a calibration preset models it.
"""

from __future__ import annotations

from mars.sched.plan import StepPlan

# Before any measurement: this machine's SmolLM2 figures (~300 prefill tokens/s on one core,
# ~25 ms a step, a 2,000-token restore in ~3 ms).
_PRIOR_A, _PRIOR_B, _PRIOR_COPY = 0.025, 1 / 300, 1.5e-6


class OnlineStepTimer:
    def __init__(self, forget: float = 0.99, host_copies: bool = True) -> None:
        self.forget = forget
        self.host_copies = host_copies  # False: no host tier (vLLM), a restore never pays
        # Decayed sums of the regression of step seconds on new tokens, seeded with a prior
        # worth a few steps so the first estimates are sane.
        self._n, self._x, self._y, self._xx, self._xy = 0.0, 0.0, 0.0, 0.0, 0.0
        for x in (1.0, 256.0):
            self._add(x, _PRIOR_A + _PRIOR_B * x, weight=2.0)
        self._copy_s, self._copy_tokens = _PRIOR_COPY * 4000, 4000.0

    def _add(self, x: float, y: float, weight: float = 1.0) -> None:
        f = self.forget
        self._n = self._n * f + weight
        self._x = self._x * f + weight * x
        self._y = self._y * f + weight * y
        self._xx = self._xx * f + weight * x * x
        self._xy = self._xy * f + weight * x * y

    def observe(self, plan: StepPlan, execute_s: float) -> None:
        """One executed step; steps with restores are left out (the copy is not compute)."""
        if not plan.restores:
            self.observe_step(execute_s, plan.total_tokens)

    def observe_step(self, seconds: float, num_tokens: int) -> None:
        if num_tokens >= 1 and seconds > 0:
            self._add(float(num_tokens), seconds)

    def observe_copy(self, num_tokens: int, seconds: float) -> None:
        self._copy_s = self._copy_s * self.forget + seconds
        self._copy_tokens = self._copy_tokens * self.forget + num_tokens

    @property
    def line(self) -> tuple[float, float]:
        """(seconds per step, seconds per new token) as currently estimated."""
        var = self._n * self._xx - self._x * self._x
        b = (self._n * self._xy - self._x * self._y) / var if var > 0 else _PRIOR_B
        b = max(b, 0.0)
        a = max((self._y - b * self._x) / self._n, 0.0)
        return a, b

    def step_seconds(
        self, num_seqs: int, new_tokens: int, attn_pairs: int, kv_read_tokens: int
    ) -> float:
        a, b = self.line
        return a + b * new_tokens

    def transfer_seconds(self, num_tokens: int) -> float:
        if not self.host_copies:
            return float("inf")
        return num_tokens * self._copy_s / max(self._copy_tokens, 1.0)
