"""Register the Rapid classes with transformers' Auto classes, without importing transformers before it is used.

`import rapid_hf` is the one line that makes `AutoModelForImageClassification.from_pretrained` reload a saved Rapid
model, yet `import rapid_hf.reduction` (pure torch) must not pay for importing transformers. Each Rapid module
registers its own classes when it is imported (configs in `configuration_rapid`, models at the end of each family's
modeling module). `import rapid_hf` imports them at once if transformers' Auto modules are already loaded, and
otherwise asks the import system (a finder on `sys.meta_path`, removed once done) to import them right after
those load.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Collection
from types import ModuleType
from typing import Any

CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
CONFIGURATION_MODULE = "rapid_hf.models.configuration_rapid"
FAMILY_MODULES: tuple[str, ...] = (
    "rapid_hf.models.modeling_rapid",
    "rapid_hf.models.modeling_rapid_dinov2",
    "rapid_hf.models.modeling_rapid_clip",
)
"""One modeling module per family; families never import each other."""


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
    """Finds nothing itself: wraps the loaders of transformers' Auto modules so registration follows them.

    Registration imports the Rapid modules once `modeling_auto` has run (`configuration_auto` alone pulls
    `modeling_auto` in, since transformers' config classes need it). If another module is half imported at that
    moment (e.g. a Rapid module whose own import loaded transformers, or transformers' own import cycles), the
    Rapid modules are imported at the next import that is not nested in one; a Rapid module registers its own
    classes when imported.
    """

    def __init__(self) -> None:
        self.pending = False
        self.finished: set[str] = set()  # Auto modules whose code has run (their import is returning)

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None):
        actions = {CONFIGURATION_AUTO: self._after_configuration_auto, MODELING_AUTO: self._after_modeling_auto}
        if fullname not in actions:
            if self.pending:
                self._register()
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RunAfterLoading(spec.loader, actions[fullname])
        return spec

    def _after_configuration_auto(self) -> None:
        self.finished.add(CONFIGURATION_AUTO)
        if MODELING_AUTO not in sys.modules and not modules_initializing(self.finished):
            importlib.import_module(MODELING_AUTO)
        else:
            self.pending = True

    def _after_modeling_auto(self) -> None:
        self.finished.add(MODELING_AUTO)
        self.pending = True
        self._register()

    def _register(self) -> None:
        if modules_initializing(self.finished):
            return
        self.pending = False
        uninstall()
        import_missing((CONFIGURATION_MODULE, *FAMILY_MODULES))


def uninstall() -> None:
    """Stop waiting for transformers."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, RegisterAfterTransformersLoads)]


def register_when_transformers_loads() -> None:
    """Register now if transformers' Auto modules are loaded, else right after they load."""
    if MODELING_AUTO in sys.modules and not modules_initializing(ignore={"rapid_hf"}):
        import_missing((CONFIGURATION_MODULE, *FAMILY_MODULES))
        return
    if not any(isinstance(f, RegisterAfterTransformersLoads) for f in sys.meta_path):
        finder = RegisterAfterTransformersLoads()
        finder.pending = MODELING_AUTO in sys.modules
        sys.meta_path.insert(0, finder)
