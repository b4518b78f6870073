"""attn_jax.analysis.report / plots and experiments.analysis_capture: the HTML is well-formed XHTML
whose images exist as PNG files; the CLI renders a saved capture; a harness model is captured.

(Headless Chromium is not installed on the development machines, so the page is checked by an XML
parser and its links by the file system, not by rendering.)"""

import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from attn_jax.analysis import report

XHTML = "{http://www.w3.org/1999/xhtml}"


def _maps(B=2, H=3, T=6):
    rng = np.random.default_rng(0)
    a = np.tril(rng.random((B, H, T, T)) + 1e-3)
    a[..., 0] *= 0.01                                     # heads 1, 2: little on token 0 (α_0 ~ 1/T)
    a[:, 0] = 0.0
    a[:, 0, :, 0] = 1.0                                   # head 0 is a sink head
    return {"blocks/0/mixer": a / a.sum(-1, keepdims=True), "blocks/1/mixer": np.tril(rng.normal(size=(B, H, T, T)))}


def _check_page(path):
    root = ET.parse(path).getroot()                       # raises on malformed markup
    assert root.tag == XHTML + "html"
    srcs = [img.get("src") for img in root.iter(XHTML + "img")]
    assert srcs
    for src in srcs:
        f = os.path.join(os.path.dirname(path), src)
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f"{src} is not a PNG"
    return root, srcs


def test_report_is_well_formed_and_references_existing_pngs(tmp_path):
    maps = _maps()
    hidden = {"blocks/0": np.ones((2, 6, 8)), "blocks/1": np.ones((2, 6, 8))}
    hidden["blocks/1"][0, 0, 3] = 5000.0
    history = [{"step": s, "layer": "blocks/0/mixer", "entropy": [1.0 / s] * 3, "sink": [0.1 * s] * 3}
               for s in (1, 2, 4)]
    path = report.write_report(str(tmp_path / "out"), maps, hidden=hidden, history=history,
                               tokens=np.full((2, 6), 65), meta={"task": "<hand-built>"})
    root, srcs = _check_page(path)
    text = ET.tostring(root, encoding="unicode")
    assert "<hand-built>" not in text and "&lt;hand-built&gt;" in text       # escaped
    assert {"entropy.png", "sink.png", "heads.png", "entropy_history.png", "sink_history.png"} <= set(srcs)
    assert "rollout.png" not in srcs                      # layer 1 holds signed weights: no rollout
    cells = [td.text for td in root.iter(XHTML + "td")]
    assert "0.33" in cells                                # sink ratio of layer 0: 1 of 3 heads
    assert "1" in cells                                   # one massive activation in blocks/1


def test_cli_renders_a_saved_capture_and_names_a_missing_one(tmp_path, capsys):
    maps = {"layer": _maps()["blocks/0/mixer"]}
    report.save_capture(str(tmp_path / "analysis" / "capture.npz"), maps, tokens=np.arange(12).reshape(2, 6),
                        meta={"step": 3})
    loaded = report.load_capture(str(tmp_path / "analysis" / "capture.npz"))
    np.testing.assert_allclose(loaded["maps"]["layer"], maps["layer"], rtol=1e-6)
    assert loaded["meta"] == {"step": 3}
    assert report.main([f"--workdir={tmp_path}"]) == 0
    _, srcs = _check_page(str(tmp_path / "analysis" / "report.html"))
    assert "rollout.png" in srcs
    assert report.main([f"--workdir={tmp_path / 'nothing'}"]) == 1
    assert "analysis_capture" in capsys.readouterr().err


def test_harness_capture_writes_capture_history_and_report(tmp_path):
    """capture_workdir on a trainer-shaped object (the task, config and model a restored Trainer has)."""
    import types

    import ml_collections
    from attn_jax.core import testing as tk
    from attn_jax.models import DecoderConfig, DecoderLM
    from experiments.analysis_capture import capture_workdir
    from tests.experiments.test_train import TinyCopy
    model = tk.build_module(DecoderLM, DecoderConfig(vocab_size=8, d_model=16, num_heads=2, num_layers=1))
    trainer = types.SimpleNamespace(task=TinyCopy(), model=lambda: model,
                                    config=ml_collections.ConfigDict({"model": {"mixer": "softmax"}}))
    out = capture_workdir(str(tmp_path), trainer=trainer, step=0)
    assert out["layers"] == ["blocks/0/mixer"]
    _check_page(out["report"])
    with open(tmp_path / "analysis" / "history.jsonl") as f:
        lines = [json.loads(x) for x in f]
    assert [ln["step"] for ln in lines] == [0] and len(lines[0]["entropy"]) == 2
    # a later capture of the same step replaces its lines
    from experiments.analysis_capture import record_history
    assert len(record_history(str(tmp_path / "analysis" / "history.jsonl"), 0, report.load_capture(
        str(tmp_path / "analysis" / "capture.npz"))["maps"])) == 1
    with pytest.raises(ValueError, match="maps"):
        report.write_report(str(tmp_path / "x"), {})
