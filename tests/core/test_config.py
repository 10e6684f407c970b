"""Config: YAML -> frozen attrs through one converter; every problem reported at once, with its path."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Literal

import attrs
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from puzzle_core.api import hookimpl
from puzzle_core.cli import main
from puzzle_core.choices import PluginChoice, SolverChoice
from puzzle_core.config import parse_yaml, read_yaml, stable_hash, structure, unstructure
from puzzle_core.errors import ConfigError, UserError
from puzzle_core.interfaces import Scorer, Solver
from puzzle_core.plugins import make_plugin_manager, reset_plugin_manager
from puzzle_core.records import ScorerPlugin, SolverPlugin
from puzzle_core.registry import get_registries
from puzzle_core.schema import PuzzleConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


# ---------------------------------------------------------------- the converter


@attrs.frozen
class Inner:
    gap: float = 0.1
    steps: int = 3
    mode: Literal["fast", "exact"] = "fast"
    verbose: bool = False
    names: list[str] = attrs.Factory(list)
    weights: dict[str, float] = attrs.Factory(dict)


@attrs.frozen
class Outer:
    inner: Inner = attrs.Factory(Inner)
    items: list[Inner] = attrs.Factory(list)
    label: str = "x"
    folder: Path = Path(".")
    ratio: float | None = None


@attrs.frozen
class Required:
    size: int


def problems(data, type_=Outer) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        structure(data, type_)
    return caught.value.problems


def test_every_problem_is_reported_at_once_with_its_path():
    data = {
        "inner": {"gap": "abc", "steps": 1.5, "mode": "slow", "verbose": "yes", "names": "a", "weights": {"w": "x"}},
        "items": [{}, {"gap": []}],
        "ratio": {},
        "extra": 1,
    }
    assert sorted(problems(data)) == sorted(
        [
            "at $.inner.gap: expected float, got 'abc'",
            "at $.inner.steps: expected int, got 1.5",
            "at $.inner.mode: expected one of 'fast', 'exact', got 'slow'",
            "at $.inner.verbose: expected true or false, got 'yes'",
            "at $.inner.names: expected a list, got 'a'",
            "at $.inner.weights.w: expected float, got 'x'",
            "at $.items[1].gap: expected float, got []",
            "at $.ratio: expected float, got {}",
            "at $.extra: unknown key. Known keys: inner, items, label, folder, ratio.",
        ]
    )


def test_error_message_names_the_file_and_has_one_line_per_problem():
    with pytest.raises(ConfigError) as caught:
        structure({"inner": {"gap": "abc", "steps": "x"}}, Outer, source="run.yaml")
    assert str(caught.value).splitlines() == [
        "config error at $.inner.gap: expected float, got 'abc' (in run.yaml)",
        "config error at $.inner.steps: expected int, got 'x' (in run.yaml)",
    ]
    assert isinstance(caught.value, UserError) and caught.value.exit_code == 2


def test_unknown_key_suggests_the_closest_known_one():
    assert problems({"inner": {"gapp": 1}}) == ["at $.inner.gapp: unknown key. Did you mean 'gap'?"]


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"inner": 5}, "at $.inner: expected a mapping, got 5"),
        ({"inner": ["gap"]}, "at $.inner: expected a mapping, got list"),
        ({"items": {"gap": 1}}, "at $.items: expected a list, got dict"),
        ({"inner": {"weights": [1]}}, "at $.inner.weights: expected a mapping, got list"),
        ({"inner": {"verbose": 1}}, "at $.inner.verbose: expected true or false, got 1"),
        ({"inner": {"steps": True}}, "at $.inner.steps: expected int, got True"),
        ({"inner": {"steps": "1e400"}}, "at $.inner.steps: expected int, got '1e400'"),
        ({"label": None}, "at $.label: expected string, got None"),
        ({1: 2}, "at $.1: unknown key. Known keys: inner, items, label, folder, ratio."),
    ],
)
def test_wrong_shapes_are_named(data, problem):
    assert problems(data) == [problem]


def test_missing_required_key():
    assert problems({}, Required) == ["at $.size: required key is missing"]


def test_values_that_are_unambiguous_are_accepted():
    config = structure(
        {"inner": {"gap": "1e-3", "steps": 4.0, "names": ["a", 2]}, "items": [None], "ratio": 2, "folder": "out"},
        Outer,
    )
    assert config.inner.gap == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert config.inner.steps == 4 and config.inner.names == ["a", "2"]
    assert config.items == [Inner()], "an empty section means its defaults"
    assert config.ratio == 2.0 and config.folder == Path("out")


def test_big_integers_keep_their_value():
    assert structure({"steps": 2**70 + 1}, Inner).steps == 2**70 + 1


def test_records_are_frozen_and_round_trip():
    config = structure({"inner": {"gap": 0.5, "weights": {"a": 1}}, "items": [{"mode": "exact"}]}, Outer)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.label = "y"
    assert structure(unstructure(config), Outer) == config


def test_stable_hash_ignores_key_order_and_sees_values():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash({})) == 16


# ---------------------------------------------------------------- plugin choices


@attrs.frozen
class GapOptions:
    gap: float = 1e-3
    time_limit: float = 60.0


class GapSolver(Solver):
    def __init__(self, options: GapOptions):
        self.options = options

    def solve(self, problem):
        return []


class NoScorer(Scorer):
    def batch_score(self, child, parent, batch):
        return 0.0, 1.0


@pytest.fixture
def test_plugins():
    """Only a 'mip' solver (with options) and a 'kl' scorer (without), made process-wide."""

    class Plugin:
        @hookimpl
        def puzzle_solvers(self):
            return [SolverPlugin(name="mip", implementation=GapSolver, options=GapOptions)]

        @hookimpl
        def puzzle_scorers(self):
            return [ScorerPlugin(name="kl", implementation=NoScorer)]

    manager = make_plugin_manager(load_entry_points=False)
    manager.register_plugin(Plugin(), "test", "test-dist")
    reset_plugin_manager(manager)


@attrs.frozen
class SearchLike:
    solver: SolverChoice = attrs.Factory(lambda: structure("mip", SolverChoice))
    baselines: list[SolverChoice] = attrs.Factory(list)


def test_plugin_choice_by_name_or_mapping(test_plugins):
    assert structure({}, SearchLike).solver == SolverChoice(name="mip", options=GapOptions())
    config = structure({"solver": {"name": "mip", "gap": 0.01}, "baselines": ["mip"]}, SearchLike)
    assert config.solver.options == GapOptions(gap=0.01)
    built = get_registries().record(config.solver).create(config.solver.options)
    assert isinstance(built, GapSolver) and built.options == GapOptions(gap=0.01)
    assert unstructure(config) == {
        "solver": {"name": "mip", "gap": 0.01, "time_limit": 60.0},
        "baselines": [{"name": "mip", "gap": 0.001, "time_limit": 60.0}],
    }
    assert structure(unstructure(config), SearchLike) == config


def test_plugin_choice_problems_have_paths(test_plugins):
    data = {"solver": {"name": "mip", "gap": "abc", "gapp": 1}, "baselines": ["mpi", {"gap": 1}, 3]}
    found = problems(data, SearchLike)
    assert "at $.solver.gap: expected float, got 'abc'" in found
    assert "at $.solver.gapp: unknown key. Did you mean 'gap'?" in found
    assert (
        "at $.baselines[0]: Unknown solver 'mpi'. Did you mean 'mip'? Available solvers: mip. "
        "Install a plugin that provides it, or pick one of these." in found
    )
    assert "at $.baselines[1]: expected a plugin name or a mapping with 'name', got {'gap': 1}" in found
    assert "at $.baselines[2]: expected a plugin name or a mapping with 'name', got 3" in found
    assert len(found) == 5


def test_plugin_without_options_refuses_option_keys(test_plugins):
    from puzzle_core.choices import ScorerChoice

    assert problems({"name": "kl", "temperature": 2}, ScorerChoice) == [
        "at $.temperature: unknown key. Known keys: (none)."
    ]


def test_choice_classes_are_named_after_their_records():
    from puzzle_core import choices
    from puzzle_core.records import RECORD_TYPES, CommandPlugin

    for record_type in [t for t in RECORD_TYPES if t is not CommandPlugin]:  # commands are not picked in configs
        cls = choices.choice_type(record_type.kind)
        assert issubclass(cls, PluginChoice) and cls.kind == record_type.kind
        assert cls.__name__ == record_type.__name__.removesuffix("Plugin") + "Choice"
        assert getattr(choices, cls.__name__) is cls


# ---------------------------------------------------------------- reading YAML


def test_read_yaml_problems_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="is a directory"):
        read_yaml(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("label: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"is not UTF-8 text \(invalid continuation byte at byte 10\)"):
        read_yaml(latin1)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert read_yaml(empty) == {}


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a: [1\n", "at line 2, column 1: expected ',' or ']'"),
        ("a: 1\n b: 2\n", "at line 2, column 3: mapping values are not allowed here"),
        ("seed: 1\nsearch: {}\nseed: 2\n", "at line 3, column 1: found duplicate key 'seed'"),
        ("? [a]\n: 1\n", "found unhashable key"),
        ("a: !!python/object:os.system {}\n", "could not determine a constructor"),
        ("[" * 600 + "]" * 600, "nested too deeply"),
    ],
)
def test_malformed_yaml_is_a_user_error(text, problem):
    with pytest.raises(UserError) as caught:
        parse_yaml(text, "run.yaml")
    assert problem in str(caught.value) and "run.yaml" in str(caught.value)


def test_yaml_merge_keys_may_override():
    assert parse_yaml("base: &b {gap: 1}\nmine:\n  <<: *b\n  gap: 2\n")["mine"] == {"gap": 2}


# ---------------------------------------------------------------- the run config and the CLI


def write(tmp_path: Path, text: str | bytes, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def validate(path: Path, capsys) -> tuple[int, str]:
    code = main(["config", "validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


BAD_CONFIGS = {
    "unknown-key": ("search:\n  solvr: mip\n", "config error at $.search.solvr: unknown key. Did you mean 'solver'?"),
    "wrong-type": ("search:\n  solver:\n    name: mip\n    gap: abc\n", "config error at $.search.solver.gap: expected float, got 'abc'"),
    "unknown-plugin": ("costs:\n  model: h10\n", "config error at $.costs.model: Unknown cost model 'h10'. Did you mean"),
    "malformed-yaml": ("search: [mip\n", "is not valid YAML at line 2, column 1"),
    "non-utf8": (b"parent:\n  source: caf\xe9\n", "is not UTF-8 text"),
    "top-level-list": ("- parent\n- search\n", "config error at $: expected a mapping of sections, got list"),
    "top-level-scalar": ("just text\n", "config error at $: expected a mapping of sections, got str"),
    "section-not-mapping": ("search: mip\n", "config error at $.search: expected a mapping, got 'mip'"),
    "duplicate-key": ("seed: 1\nseed: 2\n", "found duplicate key 'seed'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_validate_reports_bad_configs_with_exit_code_2(case, tmp_path, capsys):
    text, expected = BAD_CONFIGS[case]
    code, output = validate(write(tmp_path, text), capsys)
    assert code == 2
    assert expected in output
    assert "Traceback" not in output and output.startswith("Error: ")


def test_config_validate_missing_file(tmp_path, capsys):
    code, output = validate(tmp_path / "nope.yaml", capsys)
    assert code == 2 and "nope.yaml' does not exist" in output and "Traceback" not in output


def test_config_validate_lists_all_problems_at_once(tmp_path, capsys):
    text = "seed: x\nsearch:\n  solver: {name: mip, gap: abc}\n  solvr: 1\nbogus: 1\n"
    code, output = validate(write(tmp_path, text), capsys)
    assert code == 2
    for line in (
        "config error at $.seed: expected int, got 'x'",
        "config error at $.search.solver.gap: expected float, got 'abc'",
        "config error at $.search.solvr: unknown key. Did you mean 'solver'?",
        "config error at $.bogus: unknown key.",
    ):
        assert line in output


def test_tiny_config_validates(capsys):
    code, output = validate(TINY, capsys)
    assert (code, output) == (0, f"{TINY}: OK\n")


@pytest.mark.parametrize("text", ["{}\n", TINY.read_text()], ids=["all-defaults", "tiny"])
def test_config_show_prints_the_resolved_config_and_it_revalidates(text, tmp_path, capsys):
    source = write(tmp_path, text)
    assert main(["config", "show", str(source)]) == 0
    shown = capsys.readouterr().out
    resolved = write(tmp_path, shown, "resolved.yaml")
    assert load_config(resolved) == load_config(source)
    data = yaml.safe_load(shown)
    assert set(data) == {f.name for f in attrs.fields(PuzzleConfig)}, "every section, defaults included"
    assert "lr" in data["library"] and "name" in data["search"]["solver"]
    assert main(["config", "validate", str(resolved)]) == 0


# ---------------------------------------------------------------- fuzzing


def _field_names(cls, seen=None) -> set[str]:
    """Every field name reachable from ``cls``, to steer the fuzzer into real sections."""
    seen = set() if seen is None else seen
    for field in attrs.fields(cls):
        seen.add(field.name)
        for candidate in getattr(field.type, "__args__", ()) + (field.type,):
            if isinstance(candidate, type) and attrs.has(candidate) and candidate.__name__ not in seen:
                seen.add(candidate.__name__)
                _field_names(candidate, seen)
    return {name for name in seen if name[0].islower()}


attrs.resolve_types(PuzzleConfig)
KEYS = st.sampled_from(sorted(_field_names(PuzzleConfig) | {"name", "gap", "weight"})) | st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["mip", "greedy", "kl", "cosine", "h100", "local", "llama", "metrics.kl", "1e-3", "-1"])
)
YAML_DATA = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=40,
)
SECTIONS = st.dictionaries(st.sampled_from([f.name for f in attrs.fields(PuzzleConfig)]) | KEYS, YAML_DATA, max_size=6)


@functools.cache
def resolved_tiny() -> dict:
    return unstructure(load_config(TINY))


def _places(node, path=()):
    """Every (container, key) inside ``node``."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield path + (key,)
        yield from _places(child, path + (key,))


@st.composite
def damaged_configs(draw):
    """The resolved tiny config with one value replaced, one key dropped or one key added."""
    data = copy.deepcopy(resolved_tiny())
    *parents, last = draw(st.sampled_from(list(_places(data))))
    container = functools.reduce(lambda node, key: node[key], parents, data)
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        container[last] = draw(YAML_DATA)
    elif action == "drop":
        del container[last]
    elif isinstance(container, dict):
        container[draw(KEYS)] = draw(YAML_DATA)
    return data


CONFIGS = damaged_configs() | SECTIONS | YAML_DATA


@settings(max_examples=300, deadline=None)
@given(data=CONFIGS)
def test_fuzz_structure_gives_a_config_or_a_config_error(data):
    try:
        config = structure(data, PuzzleConfig)
    except UserError:
        return
    assert isinstance(config, PuzzleConfig)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=damaged_configs() | SECTIONS)
def test_fuzz_config_files_give_a_config_or_a_user_error(data, tmp_path):
    path = write(tmp_path, yaml.safe_dump(data, allow_unicode=True))
    try:
        config = load_config(path)
    except UserError:
        return
    assert isinstance(config, PuzzleConfig)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_raw_bytes_give_a_config_or_a_user_error(raw, tmp_path):
    try:
        load_config(write(tmp_path, raw))
    except UserError:
        pass



def test_one_dtype_vocabulary_torch_spellings_are_read_as_the_short_names():
    config = structure(
        {"parent": {"dtype": "bfloat16"}, "library": {"activation_dtype": "float32"}, "scenario": {"kv_dtype": "fp8"}},
        PuzzleConfig,
    )
    assert (config.parent.dtype, config.library.activation_dtype, config.scenario.kv_dtype) == ("bf16", "fp32", "fp8")
    assert unstructure(config)["parent"]["dtype"] == "bf16"
    assert problems({"scenario": {"dtype": "float16"}}, PuzzleConfig) == [
        "at $.scenario.dtype: expected one of 'fp32', 'bf16', 'fp8', got 'fp16'"
    ]


# ---------------------------------------------------------------- --set overrides and plugin/scenario checks


def test_overrides_set_typed_values_at_dot_paths(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  corpus: synthetic\nsearch:\n  solver: mip\n")
    config = load_config(path, ["search.speedup=2", "gkd.tokens=32768", "parent.dtype=bfloat16",
                                "search.solver.gap=0.01", "gkd.enabled=false", "search.speedups=[1.5, 2]"])
    assert (config.search.speedup, config.gkd.tokens, config.parent.dtype) == (2.0, 32768, "bf16")
    assert config.search.solver.options.gap == 0.01 and config.gkd.enabled is False
    assert config.search.speedups == [1.5, 2.0]
    assert config.data.corpus.name == "synthetic", "what the file says stays"
    switched = load_config(path, ["search.solver=greedy", "parent.architecture=llama"])
    assert (switched.search.solver.name, switched.parent.architecture.name) == ("greedy", "llama")


def test_overrides_of_unknown_paths_are_config_errors_with_suggestions(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  corpus: synthetic\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["search.speeedup=2", "gkd.tokns=5", "nothing", "seed.x=1", "gkd.tokens=many"])
    assert caught.value.problems == [
        "at $.search.speeedup: unknown key. Did you mean 'speedup'?",
        "at $.gkd.tokns: unknown key. Did you mean 'tokens'?",
        "at --set 'nothing': expected PATH=VALUE, e.g. --set search.speedup=2",
        "at $.seed.x: $.seed is 0, not a section; set seed=... instead",
    ]
    with pytest.raises(ConfigError, match=r"at \$\.gkd\.tokens: expected int, got 'many'"):
        load_config(path, ["gkd.tokens=many"])


def test_run_and_config_commands_take_the_same_overrides(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  corpus: synthetic\n")
    assert main(["config", "show", str(path), "--set", "search.speedup=2", "--set", "gkd.tokens=32768"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["search"]["speedup"] == 2.0 and shown["gkd"]["tokens"] == 32768
    assert main(["config", "validate", str(path), "--set", "gkd.tokens=32768"]) == 0
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--run-dir", str(run_dir), "--set", "search.speeedup=2"]) == 2
    assert "Did you mean 'speedup'?" in capsys.readouterr().err and not run_dir.exists()


def test_a_run_directory_keeps_a_config_with_a_base_whole(tmp_path, monkeypatch):
    """`puzzle search RUN_DIR` and the benchmarks load the run directory's copy of the config, where a base named
    relative to the original would not resolve."""
    kept = {}
    monkeypatch.setattr("puzzle_core.pipeline.run_pipeline", lambda config, run_dir, **kw: kept.update(kw))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "shared.yaml").write_text("data:\n  corpus: synthetic\nseed: 3\n")
    path = tmp_path / "configs" / "run.yaml"
    path.write_text("base: shared.yaml\ngkd:\n  tokens: 4096\n")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    copy = tmp_path / "run" / "config.yaml"
    copy.parent.mkdir()
    copy.write_text(kept["config_text"])
    assert load_config(copy) == load_config(path)
    assert load_config(copy).seed == 3 and load_config(copy).gkd.tokens == 4096


def test_config_validate_checks_the_cost_model_can_price_the_scenario(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("costs:\n  model: h100\nscenario:\n  dtype: fp8\n")
    assert main(["config", "validate", str(path)]) == 0
    capsys.readouterr()
    assert main(["config", "validate", str(path), "--set", "costs.model=a100"]) == 2
    err = capsys.readouterr().err
    assert "at $.costs.model: cost model 'a100' cannot price this scenario" in err
    assert "no fp8 throughput" in err and "supports bf16, fp32" in err
    # the run refuses it before any stage writes anything
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--run-dir", str(run_dir), "--set", "costs.model=a100"]) == 2
    assert not run_dir.exists()


def test_a_config_with_a_base_says_only_what_differs(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(
        "threads: 1\nlibrary: {tokens: 1024, lr: 0.003}\nsearch: {speedup: 1.5, baselines: [greedy, max_params]}\n"
    )
    (tmp_path / "variant.yaml").write_text(
        "base: shared/base.yaml\nlibrary: {tokens: 4096}\nsearch: {baselines: [greedy]}\n"
    )
    config = load_config(tmp_path / "variant.yaml")
    assert (config.threads, config.library.tokens, config.library.lr) == (1, 4096, 0.003)  # sections merge
    assert [b.name for b in config.search.baselines] == ["greedy"] and config.search.speedup == 1.5  # lists replace
    assert load_config(tmp_path / "variant.yaml", ["library.tokens=8"]).library.tokens == 8


@pytest.mark.parametrize("files, problem", [
    ({"a.yaml": "base: missing.yaml\n"}, r"at \$\.base: 'missing.yaml' .* does not exist"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, r"at \$\.base: configs name each other as base in a cycle"),
    ({"a.yaml": "base: [b.yaml]\n"}, r"at \$\.base: expected the path of another config"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "library: {tokenz: 3}\n"}, r"at \$\.library\.tokenz"),
])
def test_base_problems_are_config_errors(tmp_path, files, problem):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(tmp_path / "a.yaml")


def test_the_quality_config_is_the_demo_with_bigger_budgets_and_no_kept_activations():
    demo, quality = (unstructure(load_config(ROOT / "configs" / f"{name}.yaml")) for name in ("demo", "quality"))
    differing = {
        f"{section}.{key}"
        for section, values in quality.items() if isinstance(values, dict)
        for key, value in values.items() if demo[section][key] != value
    }
    assert differing == {"library.tokens", "library.keep_activations", "scoring.tokens", "gkd.tokens",
                         "gkd.checkpoint_every"}
    assert quality["library"]["keep_activations"] is False
    assert quality["library"]["tokens"] == 4 * demo["library"]["tokens"]
