"""Linear and recurrent attention (DESIGN.md §2, the recurrent family)."""

from attn_jax.linear.gated import GATED, explain_gated, gated_linear_attention, recurrent_step
