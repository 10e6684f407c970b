"""Model families from third-party distributions: detection, aliases, faults in their code, the conformance kit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_distributions import site_packages  # noqa: F401  (fixture)

from puzzle_core.cli import main
from puzzle_core.errors import UserError
from puzzle_core.schema import ParentSection

# A family written the way the issue tells of: a Llama subclass with a name of its own. It claims what Llama
# claims (model_type "llama"), offers no aliases (they are not inherited), and its build_child can fail.
SUBCLASS_FAMILY = """
    from puzzle_core.api import ArchitecturePlugin, ModelFamily, NoOptions, hookimpl

    def make(_options: NoOptions) -> ModelFamily:
        from puzzle_plugins.llama.family import LlamaFamily

        class LookAlike(LlamaFamily):
            name = "lookalike"
            ALIASES = {ALIASES}

            def build_child(self, parent, blocks, sublayers=None):
                if "{fault}":
                    raise KeyError("bias")  # what a Qwen2 parent's q_proj state dict did to the Llama init
                return super().build_child(parent, blocks, sublayers)

            def layer_runner(self, model):
                if "{fault}":
                    raise RuntimeError("no rotary embedding on this model")
                return super().layer_runner(model)

            def aliases(self):
                from puzzle_plugins.llama.aliases import tiny_random_llama
                return {name: tiny_random_llama for name in self.ALIASES}

        return LookAlike()

    @hookimpl
    def puzzle_architectures():
        return [ArchitecturePlugin(name="lookalike", implementation=make, description="a Llama look-alike")]
"""


def install(site, fault: bool = False, aliases: tuple[str, ...] = ()) -> None:
    source = SUBCLASS_FAMILY.replace("{fault}", "yes" if fault else "").replace("{ALIASES}", repr(list(aliases)))
    site.install("acme-lookalike", {"lookalike": source})


@pytest.fixture
def tiny_folder() -> Path:
    from puzzle_plugins.llama.aliases import tiny_random_llama

    return Path(tiny_random_llama())


def test_two_families_claiming_one_model_is_an_error_naming_both_unless_the_config_picks(site_packages, tiny_folder,
                                                                                      capsys):
    from puzzle_core.config import structure
    from puzzle_core.parents import load_parent
    from puzzle_core.registry import get_registries

    install(site_packages)
    with pytest.raises(UserError) as error:
        load_parent(ParentSection(source=str(tiny_folder)), get_registries())
    message = str(error.value)
    assert "'llama' architecture (plugin 'llama' from distribution 'puzzle-nas'" in message
    assert "'lookalike' architecture (plugin 'lookalike' from distribution 'acme-lookalike' 1.0)" in message
    assert "parent.architecture" in message
    assert main(["model", "info", str(tiny_folder)]) == 2
    assert "claimed by" in capsys.readouterr().err
    picked = structure({"source": str(tiny_folder), "architecture": "lookalike"}, ParentSection)
    family, parent = load_parent(picked, get_registries())
    assert family.name == "lookalike" and parent.shape.family == "lookalike"


def test_an_alias_offered_twice_is_an_error_naming_both(site_packages):
    from puzzle_core.parents import load_parent
    from puzzle_core.registry import get_registries

    install(site_packages, aliases=("tiny-random-llama",))
    with pytest.raises(UserError, match="alias 'tiny-random-llama' is claimed by the 'llama'.* and the 'lookalike'"):
        load_parent(ParentSection(source="tiny-random-llama"), get_registries())


def test_a_subclass_inherits_neither_aliases_nor_claims_on_children(site_packages, tiny_folder, tmp_path, capsys):
    install(site_packages)
    (tmp_path / "blocks.json").write_text(json.dumps(["attn_g4+ffn_64"] * 4))
    assert main(["model", "assemble", str(tiny_folder), "--architecture", "lookalike", "--blocks",
                 str(tmp_path / "blocks.json"), "--out", str(tmp_path / "child")]) == 0
    assert main(["model", "assemble", "tiny-random-llama", "--architecture", "lookalike", "--blocks",
                 str(tmp_path / "blocks.json"), "--out", str(tmp_path / "other")]) == 2
    assert "neither a known alias" in capsys.readouterr().err
    assert main(["model", "info", str(tmp_path / "child"), "--json"]) == 0  # only the family that wrote it claims it
    assert json.loads(capsys.readouterr().out)["family"] == "lookalike"


def test_a_fault_in_family_code_names_the_family_and_exits_2(site_packages, tiny_folder, tmp_path, capsys,
                                                              monkeypatch):
    install(site_packages, fault=True)
    (tmp_path / "blocks.json").write_text(json.dumps(["attn_g4+ffn_64"] * 4))
    argv = ["model", "assemble", str(tiny_folder), "--architecture", "lookalike", "--blocks",
            str(tmp_path / "blocks.json"), "--out", str(tmp_path / "child")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    (message,) = [line for line in err.splitlines() if "error" in line.lower()]
    assert message.startswith("Plugin error: The 'lookalike' architecture (plugin 'lookalike' from distribution "
                              "'acme-lookalike' 1.0) failed in build_child(): KeyError: 'bias'.")
    assert "Traceback" not in err
    monkeypatch.setenv("PUZZLE_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise KeyError("bias")' in err


def test_a_fault_in_family_code_during_a_pipeline_stage_names_the_family(site_packages, tiny_folder, tmp_path,
                                                                          capsys):
    install(site_packages, fault=True)
    config = tmp_path / "run.yaml"
    config.write_text(f"parent:\n  source: {json.dumps(str(tiny_folder))}\n  architecture: lookalike\n"
                      f"data:\n  corpus: synthetic\n  seq_len: 32\nthreads: 1\nlibrary:\n  tokens: 256\n")
    assert main(["run", str(config), "--run-dir", str(tmp_path / "run"), "--stage", "library"]) == 2
    err = capsys.readouterr().err
    assert ("Plugin error: The 'lookalike' architecture (plugin 'lookalike' from distribution 'acme-lookalike' 1.0) "
            "failed in layer_runner(): RuntimeError: no rotary embedding on this model.") in err
    assert "Traceback" not in err


def test_the_conformance_kit_fails_a_family_with_a_phantom_bias_and_says_why(tmp_path):
    """The issue's workaround: zero o_proj (and q/k/v) biases on a Llama child. The logits still match; the
    parameter count does not, and the variants the family cannot initialise fail at build, each with its reason."""
    import torch

    from puzzle_core.api.decoder import layer_sublayer
    from puzzle_core.api.testing import check_family
    from puzzle_plugins.llama.family import LlamaFamily
    from tests.tiny import tiny_parent

    class PhantomBias(LlamaFamily):
        name = "phantom"

        def child_config(self, parent_config, blocks):
            config = super().child_config(parent_config, blocks)
            config.attention_bias = True
            return config

        def build_child(self, parent, blocks, sublayers=None):
            sublayers = dict(sublayers or {})
            for index, (block, original) in enumerate(zip(blocks, parent.shape.blocks)):
                if block.attention == original.attention:
                    weights = dict(layer_sublayer(parent.model.model.layers[index], "attention").state_dict())
                    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                        weights[f"self_attn.{name}.bias"] = torch.zeros(weights[f"self_attn.{name}.weight"].shape[0])
                    sublayers.setdefault((index, "attention"), weights)
            return super().build_child(parent, blocks, sublayers)

    _, parent = tiny_parent()
    report = check_family(PhantomBias(), parent, tmp_path, isolated=False)
    all_parent = report.children[0].cells
    assert all_parent["build"].passed and all_parent["logits"].passed
    assert not all_parent["params"].passed and "182,080 parameters, expected 181,312" in all_parent["params"].detail
    fewer_kv = report.children[1]
    assert fewer_kv.name == "fewer KV heads" and not fewer_kv.cells["build"].passed
    assert fewer_kv.cells["logits"].passed is None  # not run: it needs the build
    assert "all-parent / params: 182,080 parameters, expected 181,312" in report.table()


def test_a_registered_family_keeps_its_runners_streamed_head():
    """Scoring streams the LM head in vocabulary slices only when the runner says how: guarding must not hide it."""
    import torch

    from puzzle_core.guarded import create_family
    from puzzle_core.registry import get_registries
    from tests.tiny import tiny_parent

    _, parent = tiny_parent()
    family = create_family(get_registries().architectures.entry("llama"))
    runner = family.layer_runner(parent.model)
    pre, weight = runner.head_projection()
    hidden = torch.randn(2, 3, parent.shape.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(pre(hidden) @ weight.T, runner.head(hidden))
