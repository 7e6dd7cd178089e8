"""Names a module hands out without importing where they live until first asked (PEP 562 ``__getattr__``):
names moved to another module stay importable from the old one as the same objects, and the package's heavy
names (the trainers) cost nothing at ``import fastalign``. Also what keeps two modules that import each other's
names from importing each other at import time."""
import importlib


def lazy_attributes(module_name, homes):
    """A module ``__getattr__`` resolving each name in ``homes`` ({name: the module that defines it}) there."""
    def __getattr__(name):
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    return __getattr__
