"""Register the Rapid classes with transformers' Auto classes, without importing transformers before it is used.

`import rapid_hf` is the one line that makes `AutoModelForImageClassification.from_pretrained` reload a saved Rapid
model, yet `import rapid_hf.reduction` (pure torch) must not pay for importing transformers. Each family module
registers its own configs and classes when it is imported (`register_family` at its end; the modules are listed in
`rapid_hf.models.families`). `import rapid_hf` imports them at once if transformers' Auto modules are already
loaded, and otherwise asks the import system (a finder on `sys.meta_path`, removed once done) to import them right
after those load.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Collection
from types import ModuleType
from typing import Any

from rapid_hf.models.families import FAMILY_MODULES

CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
MODELS_PACKAGE = "rapid_hf.models"


def import_missing(modules: tuple[str, ...]) -> None:
    """Import the modules not imported yet."""
    for module in modules:
        if module not in sys.modules:
            importlib.import_module(module)


def modules_initializing(ignore: Collection[str] = ()) -> bool:
    """Whether some module (other than those in `ignore`) is half imported right now: importing the Rapid modules
    then could meet it half done (transformers' own modules import each other in cycles)."""
    return any(
        name not in ignore and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )


class _RunAfterLoading(importlib.abc.Loader):
    """A loader that runs `then()` after the wrapped loader has executed the module."""

    def __init__(self, loader: importlib.abc.Loader, then: Callable[[], None]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.then()

    def __getattr__(self, name: str) -> Any:  # resource readers, get_source, ...
        return getattr(self.loader, name)


class RegisterAfterTransformersLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: registers the Rapid modules once transformers' Auto modules have run.

    `configuration_auto` pulls `modeling_auto` in (transformers' config classes need it); once `modeling_auto`
    has run, registration imports the Rapid modules, unless another module is half imported at that moment (a
    Rapid module whose own import loaded transformers, or transformers' own import cycles). Then it registers right
    after the first of those imports returns, or after the next import (never before a module exists, so no module
    runs twice).
    """

    def __init__(self) -> None:
        self.pending = False
        self.finished: set[str] = set()  # modules whose code has run (their import is returning)

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        actions = {CONFIGURATION_AUTO: self._after_configuration_auto, MODELING_AUTO: self._after_modeling_auto}
        # transformers' and the Rapid modules are followed from the start: the import that loads the Auto modules
        # may be nested in one of them (`from transformers import pipeline`, importing a Rapid module directly).
        followed = fullname.startswith(("transformers.", f"{MODELS_PACKAGE}."))
        if fullname not in actions and not self.pending and not followed:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunAfterLoading(spec.loader, actions.get(fullname, lambda: self._register(fullname)))
        elif fullname not in actions:  # a module no loader of ours can follow (builtin, frozen, ...): now
            self._register(fullname)
        return spec

    def _after_configuration_auto(self) -> None:
        self.finished.add(CONFIGURATION_AUTO)
        if MODELING_AUTO not in sys.modules and not modules_initializing(self.finished):
            importlib.import_module(MODELING_AUTO)
        else:
            self.pending = True

    def _after_modeling_auto(self) -> None:
        self.pending = True
        self._register(MODELING_AUTO)

    def _register(self, finished: str) -> None:
        self.finished.add(finished)
        if not self.pending or modules_initializing(self.finished):
            return
        self.pending = False
        uninstall()
        import_missing(FAMILY_MODULES)


def uninstall() -> None:
    """Stop waiting for transformers."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, RegisterAfterTransformersLoads)]


def register_when_transformers_loads() -> None:
    """Register now if transformers' Auto modules are loaded, else right after they load."""
    if MODELING_AUTO in sys.modules and not modules_initializing(ignore={"rapid_hf"}):
        import_missing(FAMILY_MODULES)
        return
    if not any(isinstance(f, RegisterAfterTransformersLoads) for f in sys.meta_path):
        finder = RegisterAfterTransformersLoads()
        finder.pending = MODELING_AUTO in sys.modules
        sys.meta_path.insert(0, finder)
