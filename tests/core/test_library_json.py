"""The block-library JSON reader: the published format round-trips; anything else is a UserError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from puzzle_core.errors import UserError
from puzzle_core.library import BlockLibrary

DEMO = {
    "layer_0": {
        "attn_g3+ffn_1536": {
            "stats": {"runtime_ms": 817.0, "memory_mib": 1437.1, "num_params": 855654400, "num_kv_heads": 8},
            "metrics": {"kl_div": 0.0, "lm_loss": 1.64},
            "note": "parent",
        },
        "attn_noop+ffn_768": {"stats": {"runtime_ms": 402.5, "is_noop": True}, "metrics": {"kl_div": 0.12}},
    },
    "layer_1": {"attn_g3+ffn_1536": {"stats": {"runtime_ms": 817.0}, "metrics": {"kl_div": 0.0}}},
}


def test_published_format_round_trips_with_unknown_keys_kept(tmp_path):
    library = BlockLibrary.from_json(json.loads(json.dumps(DEMO)))
    assert library.num_layers == 2
    assert library.variants(0) == ["attn_g3+ffn_1536", "attn_noop+ffn_768"]
    assert library.get(0, "attn_noop+ffn_768", "metrics.kl_div") == 0.12
    assert library.paths() == {
        "stats.runtime_ms",
        "stats.memory_mib",
        "stats.num_params",
        "stats.num_kv_heads",
        "metrics.kl_div",
        "metrics.lm_loss",
    }, "numeric paths only"
    path = tmp_path / "library.json"
    library.write(path)
    assert json.loads(path.read_text()) == DEMO
    assert BlockLibrary.read(path).to_json() == DEMO


@pytest.mark.parametrize(
    "data, problem",
    [
        ([], "non-empty mapping"),
        ({}, "non-empty mapping"),
        ({"layer_0": {"v": {}}, "blocks": {}}, "unexpected top-level key 'blocks'"),
        ({"layer_01": {"v": {}}}, "unexpected top-level key 'layer_01'"),
        ({"layer_\u0661": {"v": {}}}, "unexpected top-level key"),
        ({"layer_0": {"v": {}}, "layer_2": {"v": {}}}, "layers layer_1 are missing"),
        ({"layer_0": {"v": {}}, "layer_99999999999999": {"v": {}}}, "layer_1, layer_2"),
        ({"layer_0": {}}, "layer_0 must map variant names to records"),
        ({"layer_0": {"v": 3}}, "layer_0.v must be a mapping"),
        ({"layer_0": {"v": {"stats": [1]}}}, "layer_0.v.stats must be a mapping"),
        ({"layer_0": {"v": {"metrics": {"kl": float("nan")}}}}, "layer_0.v.metrics.kl is nan"),
        ({"layer_0": {"v": {"stats": {"runtime_ms": float("inf")}}}}, "layer_0.v.stats.runtime_ms is inf"),
    ],
)
def test_malformed_libraries_are_user_errors(data, problem):
    with pytest.raises(UserError) as caught:
        BlockLibrary.from_json(data, "lib.json")
    assert problem in str(caught.value) and str(caught.value).startswith("lib.json")


def test_reading_a_missing_or_broken_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        BlockLibrary.read(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"layer_0": ')
    with pytest.raises(UserError, match="is not valid JSON"):
        BlockLibrary.read(broken)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="is not valid JSON"):
        BlockLibrary.read(binary)


def test_get_needs_a_number_at_the_path():
    library = BlockLibrary.from_json(DEMO)
    with pytest.raises(UserError, match="has no value at 'metrics.acc'"):
        library.get(0, "attn_g3+ffn_1536", "metrics.acc")
    with pytest.raises(UserError, match="stats.is_noop is True; expected a number"):
        library.get(0, "attn_noop+ffn_768", "stats.is_noop")
    with pytest.raises(UserError, match="expected a number"):
        library.get(0, "attn_g3+ffn_1536", "note")


# ---------------------------------------------------------------- fuzzing

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=20,
)
NUMBERS = st.floats(allow_nan=False, allow_infinity=False) | st.integers()
RECORDS = st.fixed_dictionaries(
    {},
    optional={
        "stats": st.dictionaries(st.text(max_size=8), NUMBERS | JSON_SCALARS, max_size=3),
        "metrics": st.dictionaries(st.text(max_size=8), NUMBERS | JSON_SCALARS, max_size=3),
        "attention": JSON,
    },
)
VARIANTS = st.dictionaries(st.text(max_size=10), RECORDS, min_size=1, max_size=3)
WELL_FORMED = st.integers(1, 4).flatmap(lambda n: st.fixed_dictionaries({f"layer_{i}": VARIANTS for i in range(n)}))


@st.composite
def damaged(draw, library=WELL_FORMED):
    """A well-formed library with one key added, or one value replaced by anything."""
    data = draw(library)
    if draw(st.booleans()):
        data[draw(st.sampled_from(["layer_9", "layer_", "layer_00", "blocks"]) | st.text(max_size=8))] = draw(JSON)
    else:
        layer = draw(st.sampled_from(sorted(data)))
        variant = draw(st.sampled_from(sorted(data[layer])))
        data[layer][variant][draw(st.sampled_from(["stats", "metrics"]) | st.text(max_size=4))] = draw(JSON)
    return data


LIBRARIES = WELL_FORMED | damaged() | JSON


@settings(max_examples=200, deadline=None)
@given(data=LIBRARIES | JSON)
def test_fuzz_from_json_gives_a_library_or_a_user_error(data):
    try:
        library = BlockLibrary.from_json(data)
    except UserError:
        return
    # whatever was accepted can be written back and read again unchanged
    assert BlockLibrary.from_json(json.loads(json.dumps(library.to_json()))).to_json() == library.to_json()
    for path in library.paths():
        for layer, variant, _ in library.records():
            try:
                library.get(layer, variant, path)
            except UserError:
                pass
