"""Linear and recurrent attention (DESIGN.md §2, the recurrent family).

``o, state = aj.linear.<mech>(q, k, v, *gates, scale=None, initial_state=None,
return_final_state=False, segment_ids=None, impl="auto")`` with ``impl`` in
``"auto" | "chunk" | "parallel" | "recurrent" | "reference" | "pallas"``.
"""

from attn_jax.linear.delta_rule import DELTA, delta_rule, delta_rule_step, explain_delta_rule, gated_delta_rule
from attn_jax.linear.gated import GATED, explain_gated, gated_linear_attention, recurrent_step
from attn_jax.linear.gla import gla, gla_log_gates
from attn_jax.linear.lightning import lightning_attention, lightning_decays
from attn_jax.linear.retention import retention, retnet_decays
from attn_jax.linear.ssd import ssd, ssd_log_decay

__all__ = ["DELTA", "delta_rule", "delta_rule_step", "explain_delta_rule", "gated_delta_rule", "GATED", "explain_gated", "gated_linear_attention", "recurrent_step", "gla", "gla_log_gates",
           "lightning_attention", "lightning_decays", "retention", "retnet_decays", "ssd", "ssd_log_decay"]
