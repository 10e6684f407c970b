"""Conformance checks of a model family: what ``puzzle model check`` runs, and plugin tests call.

On one parent it builds the all-parent child (its logits must equal the parent's, its
parameter count too) and one child per variant kind, each with that variant in layer 0
and the parent's blocks elsewhere (fewer KV heads, narrower FFN, linear and no-op
attention and FFN). Each child must run and generate (cached steps agreeing with a full
forward), have exactly the parameters its variant leaves (counted from the parent's own
tensors: biases kept, nothing added), export, reload through the family, and reload in a
separate Python that cannot import puzzle or the family's package (plain transformers,
``trust_remote_code``) with the same logits, generations and parameter count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings
from pathlib import Path
from typing import Callable

import attrs

from puzzle_core.blocks import AttentionSpec, BlockSpec, FFNSpec, SubBlockSpec
from puzzle_core.interfaces import LoadedModel, ModelFamily, parameter_count

COLUMNS = ("build", "logits", "params", "generate", "export", "no puzzle")
NEW_TOKENS = 5


@attrs.frozen
class Cell:
    """One check of one child: passed (``True``), failed (``False``) or not run (``None``), and why."""

    passed: bool | None
    detail: str = ""

    @property
    def mark(self) -> str:
        return {True: "ok", False: "FAIL", None: "-"}[self.passed]


@attrs.frozen
class ChildCheck:
    """The checks of one child: its name, the block in layer 0, and a cell per column."""

    name: str
    block: str
    cells: dict[str, Cell]

    @property
    def passed(self) -> bool:
        return all(cell.passed is not False for cell in self.cells.values())


@attrs.frozen
class FamilyReport:
    """The outcome of :func:`check_family`: one :class:`ChildCheck` per child."""

    family: str
    parent: str
    children: tuple[ChildCheck, ...]

    @property
    def passed(self) -> bool:
        """Whether no check failed."""
        return all(child.passed for child in self.children)

    def failures(self) -> list[str]:
        """``child / column: reason`` for every failed check."""
        return [f"{child.name} / {column}: {cell.detail}" for child in self.children
                for column, cell in child.cells.items() if cell.passed is False]

    def notes(self) -> list[str]:
        """``child / column: note`` for checks that passed with something to say (a warning, a rule not applied)."""
        return [f"{child.name} / {column}: {cell.detail}" for child in self.children
                for column, cell in child.cells.items()
                if cell.passed and ("warned:" in cell.detail or cell.detail.startswith("not checked"))]

    def table(self) -> str:
        """A plain-text table, a row per child and a column per check, then the reason for each failure."""
        names = ["child", "layer 0", *COLUMNS]
        rows = [[child.name, child.block, *(child.cells[c].mark for c in COLUMNS)] for child in self.children]
        widths = [max(len(str(row[i])) for row in [names, *rows]) for i in range(len(names))]
        lines = ["  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip()
                 for row in [names, *rows]]
        failures, notes = self.failures(), self.notes()
        if notes:
            lines += ["", "notes:"] + [f"  {line}" for line in notes]
        lines += ["", f"{len(failures)} failed:" if failures else "all passed"] + [f"  {line}" for line in failures]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"family": self.family, "parent": self.parent, "passed": self.passed,
                "children": [{"name": c.name, "block": c.block,
                              "checks": {k: {"passed": v.passed, "detail": v.detail} for k, v in c.cells.items()}}
                             for c in self.children]}


def variant_kinds(shape) -> list[tuple[str, SubBlockSpec]]:
    """``(name, spec)`` of one variant per kind the parent's layer 0 can take."""
    parent = shape.blocks[0]
    kinds: list[tuple[str, SubBlockSpec]] = []
    heads, group = shape.num_attention_heads, parent.attention.n_heads_in_group
    if parent.attention.kind == "attention":
        fewer = [g for g in range(group + 1, heads + 1) if heads % g == 0]
        if fewer:
            kinds.append(("fewer KV heads", AttentionSpec(n_heads_in_group=fewer[0])))
    if parent.ffn.kind == "ffn" and parent.ffn.intermediate_size > 1:
        kinds.append(("narrower FFN", FFNSpec(intermediate_size=parent.ffn.intermediate_size // 2)))
    kinds += [("linear attention", AttentionSpec(replace_with_linear=True)), ("linear FFN", FFNSpec(replace_with_linear=True)),
              ("no-op attention", AttentionSpec(no_op=True)), ("no-op FFN", FFNSpec(no_op=True))]
    return kinds


_K_V = re.compile(r"(^|\.)(k_proj|v_proj)\.(weight|bias)$")
_GATE_UP = re.compile(r"(^|\.)(gate_proj|up_proj)\.(weight|bias)$|(^|\.)down_proj\.weight$")


def expected_sublayer_params(state: dict, parent_spec: SubBlockSpec, spec: SubBlockSpec, shape) -> int | None:
    """Parameters a variant made from a parent sub-block (``state``) must have; ``None`` when the tensor names are
    not the usual decoder ones, so the rule cannot be applied."""
    sizes = {key: value.numel() for key, value in state.items()}
    if spec.no_op:
        return 0
    if spec == parent_spec:
        return sum(sizes.values())
    if spec.kind == "linear":
        return sum(n for key, n in sizes.items() if "norm" in key) + shape.hidden_size**2
    if isinstance(spec, AttentionSpec):
        if not any(_K_V.search(key) for key in sizes):
            return None
        ratio = (parent_spec.n_heads_in_group or 1) / spec.n_heads_in_group
        return round(sum(n * ratio if _K_V.search(key) else n for key, n in sizes.items()))
    if not any(_GATE_UP.search(key) for key in sizes):
        return None
    ratio = spec.intermediate_size / parent_spec.intermediate_size
    return round(sum(n * ratio if _GATE_UP.search(key) else n for key, n in sizes.items()))


def probe_batch(parent: LoadedModel):
    """Two rows of token ids (the second left-padded) and their attention mask."""
    import torch

    ids = None
    if parent.tokenizer is not None:
        ids = parent.tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids[:, :12]
    if ids is None or ids.shape[1] < 4:
        ids = torch.randint(0, parent.shape.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    ids = ids.repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _pad_token(model) -> int:
    config = model.config
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int):
            return value
    return 0


class _Checker:
    """Runs the checks of one child, each cell after the ones it depends on."""

    def __init__(self, name: str, block: str):
        self.name, self.block = name, block
        self.cells: dict[str, Cell] = {}

    def run(self, column: str, step: Callable[[], str], needs: tuple[str, ...] = ()):
        if any(self.cells.get(n, Cell(None)).passed is not True for n in needs):
            self.cells[column] = Cell(None, f"needs {', '.join(needs)}")
            return
        try:
            self.cells[column] = Cell(True, step() or "")
        except AssertionError as exc:  # a check that did not hold says why
            self.cells[column] = Cell(False, " ".join(str(exc).split()))
        except Exception as exc:  # a check reports whatever the family raised
            self.cells[column] = Cell(False, f"{type(exc).__name__}: {' '.join(str(exc).split())}")

    def result(self) -> ChildCheck:
        return ChildCheck(self.name, self.block, {c: self.cells.get(c, Cell(None, "not run")) for c in COLUMNS})


def _close(actual, expected, atol: float, what: str) -> str:
    difference = float((actual.float() - expected.float()).abs().max())
    if not difference <= atol:
        raise AssertionError(f"{what} differ by up to {difference:.2e} (allowed {atol:.0e})")
    return f"max |diff| {difference:.1e}"


def check_family(family: ModelFamily, parent: LoadedModel, folder: Path | None = None, isolated: bool = True,
                 atol: float = 1e-5, family_name: str | None = None) -> FamilyReport:
    """Check ``family`` on ``parent`` (ideally fp32) as the module docstring says; children are exported under
    ``folder`` (a temporary folder when ``None``). ``isolated=False`` leaves out the reload without puzzle."""
    import torch

    if folder is None:
        with tempfile.TemporaryDirectory(prefix="puzzle-check-") as scratch:
            return check_family(family, parent, Path(scratch), isolated, atol, family_name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids, mask = probe_batch(parent)
    with torch.no_grad():
        parent_logits = parent.model(ids, attention_mask=mask).logits
    parent_params = parameter_count(parent.model)
    runner = family.layer_runner(parent.model)
    children: list[tuple[_Checker, dict]] = []  # each child's checker and what its checks made
    plans = [("all-parent", None)] + variant_kinds(parent.shape)
    for name, spec in plans:
        blocks = list(parent.shape.blocks)
        if spec is not None:
            parent_block = blocks[0]
            blocks[0] = (BlockSpec(spec, parent_block.ffn) if isinstance(spec, AttentionSpec)
                         else BlockSpec(parent_block.attention, spec))
        checker = _Checker(name, blocks[0].id)
        built: dict = {}

        def build(blocks=blocks):
            built["child"] = family.build_child(parent, blocks)
            if built["child"].shape.blocks != tuple(blocks):
                raise AssertionError(f"the child's shape lists blocks {[b.id for b in built['child'].shape.blocks]}")
            return ""

        def logits(spec=spec):
            with torch.no_grad():
                built["logits"] = built["child"].model(ids, attention_mask=mask).logits
            if spec is None:
                return _close(built["logits"], parent_logits, atol, "the all-parent child's and the parent's logits")
            if not torch.isfinite(built["logits"]).all():
                raise AssertionError("non-finite logits")
            return "finite"

        def params(spec=spec):
            got = parameter_count(built["child"].model)
            if spec is None:
                expected = parent_params
            else:
                part = "attention" if isinstance(spec, AttentionSpec) else "ffn"
                source = runner.sublayer(0, part)
                parent_spec = getattr(parent.shape.blocks[0], part)
                variant = expected_sublayer_params(source.state_dict(), parent_spec, spec, parent.shape)
                if variant is None:
                    return "not checked: the parent's tensor names are not q/k/v/o_proj, gate/up/down_proj"
                expected = parent_params - parameter_count(source) + variant
            if got != expected:
                raise AssertionError(f"{got:,} parameters, expected {expected:,}")
            return f"{got:,}"

        def generate():
            model = built["child"].model
            generated = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=_pad_token(model))
            with torch.no_grad():
                full = model(generated).logits
            start = ids.shape[1]
            if not torch.equal(full[0, start - 1:-1].argmax(-1), generated[0, start:]):
                raise AssertionError("cached generation disagrees with a full forward pass")
            built["generated"] = generated
            return f"{generated.shape[1] - start} tokens"

        def export(name=name):
            target = folder / re.sub(r"\W+", "-", name)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                family.export(built["child"], target)
            back = family.load_child(target)
            if back.shape.blocks != built["child"].shape.blocks:
                raise AssertionError(f"reloaded with blocks {[b.id for b in back.shape.blocks]}")
            with torch.no_grad():
                again = back.model(ids, attention_mask=mask).logits
            built["folder"] = target
            notes = "; ".join(sorted({" ".join(str(w.message).split())[:300] for w in caught}))
            return _close(again, built["logits"], atol, "reloaded logits") + (f"; warned: {notes}" if notes else "")

        checker.run("build", build)
        checker.run("logits", logits, needs=("build",))
        checker.run("params", params, needs=("build",))
        checker.run("generate", generate, needs=("build", "logits"))
        checker.run("export", export, needs=("build", "logits"))
        children.append((checker, built))
    if isolated:
        _check_without_puzzle(children, ids, mask, folder, family, atol)
    return FamilyReport(family_name or getattr(family, "name", type(family).__name__), parent.source,
                        tuple(checker.result() for checker, _ in children))


ISOLATED_SCRIPT = textwrap.dedent('''
    """Load exported children with plain transformers, in a Python that cannot import puzzle or the family."""
    import importlib.abc, json, sys
    blocked = tuple(json.loads(sys.argv[2]))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"{name} must not be needed to load an exported child")

    sys.meta_path.insert(0, Block())
    sys.path.extend(json.loads(sys.argv[1]))
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    job = json.loads(open(sys.argv[3]).read())
    inputs = load_file(job["inputs"])
    for name, folder in job["children"].items():
        # the code being trusted is the family's own, exported verbatim by the check that started this process
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(inputs["ids"], attention_mask=inputs["mask"]).logits
        generated = model.generate(inputs["ids"][:1], max_new_tokens=job["new_tokens"], do_sample=False,
                                   pad_token_id=job["pad"][name])
        save_file({"logits": logits.contiguous(), "generated": generated.contiguous()}, f"{folder}/isolated.safetensors")
        json.dump({"params": sum(p.numel() for p in model.parameters()), "module": type(model).__module__},
                  open(f"{folder}/isolated.json", "w"))
''')


def _check_without_puzzle(children, ids, mask, folder: Path, family, atol: float) -> None:
    """One separate Python reloads every exported child; each child's 'no puzzle' cell compares with it."""
    import torch
    from safetensors.torch import load_file, save_file

    exported = {checker.name: built["folder"] for checker, built in children if "folder" in built}
    for checker, built in children:
        if "folder" not in built:
            checker.cells["no puzzle"] = Cell(None, "needs export")
    if not exported:
        return
    save_file({"ids": ids.contiguous(), "mask": mask.contiguous()}, str(folder / "inputs.safetensors"))
    pads = {checker.name: _pad_token(built["child"].model) for checker, built in children if "folder" in built}
    job = {"inputs": str(folder / "inputs.safetensors"), "children": {k: str(v) for k, v in exported.items()},
           "new_tokens": NEW_TOKENS, "pad": pads}
    (folder / "isolated-job.json").write_text(json.dumps(job))
    (folder / "isolated.py").write_text(ISOLATED_SCRIPT)
    blocked = sorted({"puzzle_core", "puzzle_plugins", type(getattr(family, "family", family)).__module__.split(".")[0]})
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    env = {"PATH": os.environ.get("PATH", ""), "HF_HOME": str(folder / "hf-home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # -I: no user site, no PYTHON* variables, the script's folder not on the path; -S: no .pth files (editable installs)
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(folder / "isolated.py"), json.dumps(paths), json.dumps(blocked),
         str(folder / "isolated-job.json")],
        capture_output=True, text=True, env=env, cwd=folder, timeout=1800,
    )
    for checker, built in children:
        if "folder" not in built:
            continue
        target = built["folder"]
        if not (target / "isolated.json").is_file():
            tail = " ".join(result.stderr.strip().splitlines()[-3:])
            checker.cells["no puzzle"] = Cell(False, f"plain transformers could not load it: {tail[-400:]}")
            continue
        facts = json.loads((target / "isolated.json").read_text())
        outputs = load_file(str(target / "isolated.safetensors"))
        try:
            if "transformers_modules" not in facts["module"]:
                raise AssertionError(f"transformers built {facts['module']}, not the exported code")
            detail = _close(outputs["logits"], built["logits"], atol, "logits without puzzle")
            if facts["params"] != parameter_count(built["child"].model):
                raise AssertionError(f"{facts['params']:,} parameters without puzzle, "
                                     f"{parameter_count(built['child'].model):,} here")
            if "generated" in built and not torch.equal(outputs["generated"], built["generated"]):
                raise AssertionError("generates other tokens without puzzle")
            checker.cells["no puzzle"] = Cell(True, detail)
        except AssertionError as exc:
            checker.cells["no puzzle"] = Cell(False, str(exc))
