"""Linear and recurrent attention: the recurrent family of the functional API.

``o, state = aj.linear.<mech>(q, k, v, *gates, scale=None, initial_state=None,
return_final_state=False, segment_ids=None, impl="auto")`` with ``impl`` in
``"auto" | "chunk" | "parallel" | "recurrent" | "reference" | "pallas"``;
``aj.explain(aj.linear.gla, q, k, v, log_g)`` (or ``gated_linear_attention``, ``delta_rule``,
``gated_delta_rule``) says which form a call would use on each platform, and why.
"""

import types as _types

from attn_jax.linear import feature_maps
from attn_jax.linear.agent import agent_attention, agent_attention_reference, pool_agents
from attn_jax.linear.based import (BasedCache, based_attention, based_attention_reference, based_linear_attention,
                                   based_prefill, based_window_attention, init_based_cache)
from attn_jax.linear.efficient_attention import efficient_attention, efficient_attention_reference
from attn_jax.linear.flowformer import flow_attention, flow_attention_reference
from attn_jax.linear.linear_attention import (cosformer_attention, cosformer_attention_reference, cosformer_features,
                                              linear_attention,
                                              linear_attention_reference)
from attn_jax.linear.log_normal import lln_moment_matching, log_normal_attention, log_normal_attention_reference
from attn_jax.linear.mega import damped_ema, damped_ema_reference, damped_ema_step
from attn_jax.linear.delta_rule import DELTA, delta_rule, delta_rule_step, gated_delta_rule
from attn_jax.linear.gated import GATED, gated_linear_attention, recurrent_step
from attn_jax.linear.gla import gla, gla_log_gates
from attn_jax.linear.lightning import lightning_attention, lightning_decays
from attn_jax.linear.retention import retention, retnet_decays
from attn_jax.linear.rpe_fft import kernelized_rpe_attention, kernelized_rpe_attention_reference, toeplitz_apply
from attn_jax.linear.ssd import ssd, ssd_log_decay

# the public names are the ones imported above (each module's own file lists its functions once)
__all__ = sorted(_n for _n, _v in dict(globals()).items()
                 if not _n.startswith("_") and (not isinstance(_v, _types.ModuleType) or _n == "feature_maps"))
