"""A family's child code: the Python files written next to its children's weights, run here as written.

transformers loads an exported child with ``trust_remote_code=True`` from the files next
to its weights, resolving their relative imports (``from .heterogeneous_decoder import
...``) among those files. :class:`ChildCode` loads the same files into this process the
same way, as one package holding the family's files and the shared ones they import
(``puzzle_core/decoder/child_code/``). So the classes a family builds, trains and checks
its children with are those of the files it exports, byte for byte, and an export is a
plain copy of them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.util
import re
import shutil
import sys
import types
from pathlib import Path

import attrs

from puzzle_core.errors import PluginError

SHARED_FOLDER = Path(__file__).parent / "child_code"
PACKAGE = "puzzle_child_code"
_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+)\s*$)", re.M)  # as transformers finds them


class _CodeFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of loaded child-code packages (``puzzle_child_code.<family>.<file>``)."""

    def __init__(self):
        self.files: dict[str, Path] = {}

    def find_spec(self, fullname, path=None, target=None):
        file = self.files.get(fullname)
        return importlib.util.spec_from_file_location(fullname, file) if file is not None else None


_FINDER = _CodeFinder()


def _finder() -> _CodeFinder:
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
    if PACKAGE not in sys.modules:
        root = types.ModuleType(PACKAGE, "Child code of model families, loaded as it is exported.")
        root.__path__ = []
        sys.modules[PACKAGE] = root
    return _FINDER


@attrs.frozen
class ChildCode:
    """The configuration and model classes of a family's children, from files in ``folder``.

    ``config_class`` / ``model_class`` are ``"<file stem>.<class>"``, e.g.
    ``"configuration_qwen2_nas.Qwen2NASConfig"``. The files they import relatively are
    looked up in ``folder`` first, then among the shared files; :meth:`files` lists all
    that an export writes.
    """

    folder: Path = attrs.field(converter=lambda p: Path(p).resolve())
    config: str = attrs.field(validator=attrs.validators.matches_re(r"\w+\.\w+"))
    model: str = attrs.field(validator=attrs.validators.matches_re(r"\w+\.\w+"))

    @property
    def package(self) -> str:
        """The name this code is loaded under in this process."""
        digest = hashlib.sha1(str(self.folder).encode()).hexdigest()[:8]
        name = re.sub(r"\W", "_", self.folder.name)
        return f"{PACKAGE}.{name}_{digest}"

    def files(self) -> dict[str, Path]:
        """File name -> source, for the two modules and everything they import relatively (transitively)."""
        found: dict[str, Path] = {}
        pending = [self.config.split(".")[0], self.model.split(".")[0]]
        while pending:
            stem = pending.pop()
            if f"{stem}.py" in found:
                continue
            source = next((f / f"{stem}.py" for f in (self.folder, SHARED_FOLDER) if (f / f"{stem}.py").is_file()), None)
            if source is None:
                raise PluginError(
                    f"The child code in {self.folder} imports '.{stem}', which is neither a file there nor one of "
                    f"the shared files ({', '.join(sorted(p.name for p in SHARED_FOLDER.glob('[a-z]*.py')))})."
                )
            found[f"{stem}.py"] = source
            pending += [a or b for a, b in _RELATIVE_IMPORT.findall(source.read_text(encoding="utf-8"))]
        return found

    def _class(self, path: str) -> type:
        stem, name = path.split(".")
        finder = _finder()
        if self.package not in sys.modules:
            package = types.ModuleType(self.package, f"Child code from {self.folder}")
            package.__path__ = []
            sys.modules[self.package] = package
            finder.files.update({f"{self.package}.{n.removesuffix('.py')}": p for n, p in self.files().items()})
        module = importlib.import_module(f"{self.package}.{stem}")
        try:
            return getattr(module, name)
        except AttributeError:
            raise PluginError(f"{self.folder / (stem + '.py')} defines no class {name!r}.") from None

    @property
    def config_class(self) -> type:
        """The configuration class (a transformers config with ``block_configs``)."""
        return self._class(self.config)

    @property
    def model_class(self) -> type:
        """The causal-LM class its children are."""
        return self._class(self.model)

    def auto_map(self) -> dict[str, str]:
        """The ``auto_map`` of an exported ``config.json``."""
        return {"AutoConfig": self.config, "AutoModelForCausalLM": self.model}

    def write(self, folder: Path) -> list[Path]:
        """Copy every file of :meth:`files` into ``folder``, unchanged."""
        written = []
        for name, source in self.files().items():
            shutil.copyfile(source, Path(folder) / name)
            written.append(Path(folder) / name)
        return written

    def register_auto_classes(self) -> None:
        """Let transformers' ``Auto*`` classes open these children in this process without remote code."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config_class = self.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, self.model_class, exist_ok=True)
