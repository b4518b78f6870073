"""The shape annotations of the op families are checked during the test run (tests/conftest.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

import attn_jax as aj
from attn_jax.linear import gla_log_gates
from attn_jax.softmax import xla


def test_hook_is_active_on_public_ops():
    for fn in (aj.attention, aj.linear.gla, aj.linear.ssd, xla.attention_blockwise):
        assert hasattr(fn, "__wrapped__"), f"{fn.__name__} is not wrapped by jaxtyping's import hook"


def test_library_validation_answers_bad_input_first():
    with pytest.raises(ValueError, match="batch size mismatch"):
        aj.attention(jnp.zeros((2, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)), impl="reference")


def test_a_call_outside_the_annotations_fails_the_run():
    gla_log_gates(np.zeros((2, 3), np.float32))                        # within the annotation
    with pytest.raises(Exception, match="Type-check error"):
        gla_log_gates(np.zeros((2, 3), np.int32))                      # runs, but Float is annotated


def test_numpy_inputs_are_accepted():
    q = np.ones((1, 5, 2, 8), np.float32)
    o = aj.attention(q, q, q, impl="reference")
    assert o.shape == (1, 5, 2, 8)
    o, state = aj.linear.gla(q, q, q, np.full((1, 5, 2, 8), -0.1, np.float32), return_final_state=True)
    assert state.shape == (1, 2, 8, 8)
