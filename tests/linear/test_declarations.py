"""The declarations are the single source: the mixer registry, the catalogue and the README's
positional rows are exactly the declarations, and a name is declared once."""

import dataclasses

import pytest

from attn_jax import feature_matrix, mixers
from attn_jax.core import declaration
from attn_jax.core.declaration import Declaration, Paper, Parity
from attn_jax.linear import catalog


def test_mixer_registry_is_the_declarations_with_a_layer():
    layered = {d.name: d for d in declaration.declarations() if d.layer is not None}
    assert set(layered) == set(mixers.names())   # the library registers nothing outside the declarations
    for name, d in layered.items():
        feats = mixers.features(name)
        assert ("causal" in feats) == d.causal, name
        assert ("bidirectional" in feats) == d.bidirectional, name


def test_catalogue_is_the_linear_declarations_with_a_parity_entry():
    with_parity = [d for d in declaration.declarations("linear") if d.parity is not None]
    entries = catalog.CATALOG
    assert sorted(e.declaration.name for e in entries) == sorted(d.name for d in with_parity)
    assert len({e.name for e in entries}) == len(entries)          # row titles are unique
    for e in entries:
        assert e.paper == e.declaration.cite() and "arXiv:" in e.paper
        assert e.mixer is None or e.mixer in mixers.names()


def test_positional_rows_are_the_positional_declarations():
    rows = {title for title, _, _ in feature_matrix.positional_rows()}
    # ALiBi, T5, low-rank factors, relative embeddings and FIRE are biases: rows of the attention matrix, not of the
    # positional block
    biases = ("alibi", "t5", "low_rank_bias", "relative", "fire")
    declared = {d.title for d in declaration.declarations("positional") if d.name not in biases}
    assert rows == declared and len(rows) == 3


def test_a_name_is_declared_once():
    gla = declaration.get("gla")
    with pytest.raises(ValueError, match="^name:.*'gla'.*already declared"):
        declaration.declare(dataclasses.replace(gla, title="another GLA"))
    assert declaration.get("gla") is gla
    with pytest.raises(ValueError, match="^name: unknown mechanism 'nope'"):
        declaration.get("nope")


def test_records_validate_their_fields():
    with pytest.raises(ValueError, match="^year:"):
        Paper("t", 20, "2312.06635")
    with pytest.raises(ValueError, match="^directions:"):
        Declaration("x", "linear", "x", (), directions=("forward",))
    with pytest.raises(ValueError, match="^layer:"):
        Declaration("x", "linear", "x", (), layer="no_colon")
    with pytest.raises(ValueError, match="^kernel_gate:"):
        Parity(call=len, kernel_gate="matrix")
    with pytest.raises(TypeError, match="^call:"):
        Parity(call=None)


def test_listing_names_every_declaration():
    text = feature_matrix.listing()
    for d in declaration.declarations():
        assert any(line.split()[0] == d.name for line in text.splitlines()), d.name
