"""How long a simulated worker's step takes: the cost model's fits, read as the truth.

The simulated workers time their steps with a :class:`~pdserve.router.cost_model.CostModel`
of the same profile the router predicts with, without per-worker corrections: a decode step
by the decode fit, a step of prompt chunks alone by the prefill fit, a decode step with
chunks mixed in by their sum (``CostModel.mixed_step_s``), and a KV transfer by the
transfer fit over the bytes the real channel sends (whole blocks).
"""

from __future__ import annotations

from pdserve.engine.config import blocks_for
from pdserve.router.cost_model import CostModel, Profile

# A simulated worker's sampled token: any id (requests are simulated with ignore_eos and
# no stop tokens, so only max_tokens ends them).
DUMMY_TOKEN = 0


class StepTimes:
    """Step and transfer seconds of every simulated worker of one deployment."""

    def __init__(self, profile: Profile, block_size: int) -> None:
        self.profile = profile
        self.block_size = block_size  # the deployment's (it may differ from the profile's)
        self._model = CostModel(profile)

    def decode_step_s(self, batch: int, context: int, prompt_tokens: int,
                      prompt_attention: int) -> float:
        """A decode worker's step: ``batch`` sequences holding ``context`` tokens, and
        ``prompt_tokens`` of local prefill (attention work ``prompt_attention``)."""
        m = self._model
        if not prompt_tokens:
            return m.decode_step_s(batch, context) if batch else 0.0
        if not batch:
            return m.prefill_step_s(prompt_tokens, prompt_attention)
        return m.mixed_step_s(batch, context, prompt_tokens, prompt_attention)

    def prefill_step_s(self, tokens: int, attention: int) -> float:
        return self._model.prefill_step_s(tokens, attention)

    def transfer_bytes(self, num_tokens: int) -> int:
        """What the channel sends for a prompt of ``num_tokens``: its whole blocks' KV."""
        bs = self.block_size
        return blocks_for(num_tokens, bs) * bs * self.profile.kv_bytes_per_token

    def transfer_s(self, nbytes: int) -> float:
        fit = self.profile.transfer
        return fit.latency_s + nbytes / fit.bytes_per_s if nbytes else 0.0
