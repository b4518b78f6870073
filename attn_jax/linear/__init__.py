"""Linear and recurrent attention: the recurrent family of the functional API.

``o, state = aj.linear.<mech>(q, k, v, *gates, scale=None, initial_state=None,
return_final_state=False, segment_ids=None, impl="auto")`` with ``impl`` in
``"auto" | "chunk" | "parallel" | "recurrent" | "reference" | "pallas"``.
"""

from attn_jax.linear import feature_maps
from attn_jax.linear.agent import agent_attention, agent_attention_reference, pool_agents
from attn_jax.linear.based import (BasedCache, based_attention, based_attention_reference, based_linear_attention,
                                   based_prefill, based_window_attention, init_based_cache)
from attn_jax.linear.efficient_attention import efficient_attention, efficient_attention_reference
from attn_jax.linear.flowformer import flow_attention, flow_attention_reference
from attn_jax.linear.linear_attention import (cosformer_attention, cosformer_attention_reference, linear_attention,
                                              linear_attention_reference)
from attn_jax.linear.log_normal import lln_moment_matching, log_normal_attention, log_normal_attention_reference
from attn_jax.linear.mega import damped_ema, damped_ema_reference, damped_ema_step
from attn_jax.linear.delta_rule import DELTA, delta_rule, delta_rule_step, explain_delta_rule, gated_delta_rule
from attn_jax.linear.gated import GATED, explain_gated, gated_linear_attention, recurrent_step
from attn_jax.linear.gla import gla, gla_log_gates
from attn_jax.linear.lightning import lightning_attention, lightning_decays
from attn_jax.linear.retention import retention, retnet_decays
from attn_jax.linear.ssd import ssd, ssd_log_decay

__all__ = ["feature_maps", "agent_attention", "agent_attention_reference", "pool_agents", "BasedCache",
           "based_attention", "based_attention_reference", "based_linear_attention", "based_prefill",
           "based_window_attention", "init_based_cache", "efficient_attention", "efficient_attention_reference",
           "flow_attention", "flow_attention_reference", "cosformer_attention", "cosformer_attention_reference",
           "linear_attention", "linear_attention_reference", "lln_moment_matching", "log_normal_attention",
           "log_normal_attention_reference", "damped_ema", "damped_ema_reference", "damped_ema_step",
           "DELTA", "delta_rule", "delta_rule_step", "explain_delta_rule", "gated_delta_rule", "GATED", "explain_gated", "gated_linear_attention", "recurrent_step", "gla", "gla_log_gates",
           "lightning_attention", "lightning_decays", "retention", "retnet_decays", "ssd", "ssd_log_decay"]
