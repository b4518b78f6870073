"""attn_jax.parallel: the sharded cases run in their own process on 8 simulated CPU devices; the
logical-axis rules are checked here against every parameter of the models."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from attn_jax import parallel
from attn_jax.models import (DecoderConfig, DecoderLM, EncoderClassifier, EncoderConfig, Seq2Seq, Seq2SeqConfig,
                             ViT, ViTConfig)

CASES = Path(__file__).with_name("_sharded_cases.py")
ROOT = Path(__file__).resolve().parents[2]


def test_sharded_cases_on_8_simulated_devices():
    env = dict(os.environ)
    # Appended, never overwritten: the suite's conftest may have put fast-compile flags there.
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # every case ran (a collection problem must not pass as "nothing failed")
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) == 10, out[-3000:]


def test_param_rules_cover_every_model_parameter():
    cfg = DecoderConfig(vocab_size=48, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                        mixer_pattern="softmax,gla,mla", tie_embeddings=False)
    others = [lambda: EncoderClassifier(EncoderConfig(vocab_size=48, num_classes=3, d_model=32, num_heads=4),
                                        rngs=nnx.Rngs(0)),
              lambda: ViT(ViTConfig(num_classes=5, image_size=8, patch_size=4, d_model=32, num_heads=4),
                          rngs=nnx.Rngs(0)),
              lambda: Seq2Seq(Seq2SeqConfig(src_vocab_size=48, d_model=32, num_heads=4, num_kv_heads=2),
                              rngs=nnx.Rngs(0))]
    state = nnx.state(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    known = {name for name, _ in parallel.PARAM_RULES}
    for model_state in [state, *(nnx.state(nnx.eval_shape(make), nnx.Param) for make in others)]:
        for path, var in nnx.to_flat_state(model_state):
            axes = var.get_metadata().get("out_sharding")
            unknown = {a for a in axes if a is not None} - known
            assert not unknown, f"{path}: logical axes {unknown} have no rule in PARAM_RULES"
    mesh = parallel.make_mesh()
    shardings = parallel.param_shardings(state, mesh)
    assert shardings["blocks"][0]["mixer"]["w_q"].get_value().spec == PartitionSpec("fsdp", "tensor", None)
    assert shardings["blocks"][0]["mlp"]["w_down"].get_value().spec == PartitionSpec("tensor", "fsdp")
    assert shardings["lm_head"].get_value().spec == PartitionSpec("fsdp", "tensor")
    assert all(s.mesh == mesh for s in jax.tree.leaves(shardings))
    assert parallel.activation_spec("batch", "length", None) == PartitionSpec(("data", "fsdp"), "sequence", None)
