"""deid: remove the identity of every face in a video, keep what the face does.

Public API (heavy imports are deferred to the call):

    from deidcli import anonymize, AnonymizeOptions
    report = anonymize("in.mp4", "out.mp4", AnonymizeOptions(method="blur"))
"""

import sys
import types

__version__ = "0.1.0"

__all__ = ["__version__", "anonymize", "AnonymizeOptions", "load_generator"]


class _Package(types.ModuleType):
    """``deidcli.anonymize`` is the function, also once the submodule of the same name has been
    imported (the import system then binds the submodule on the package; this property wins
    over that binding). The submodule itself stays importable: ``from deidcli.anonymize import ...``."""

    @property
    def anonymize(self):
        from .anonymize import anonymize

        return anonymize

    @anonymize.setter
    def anonymize(self, value):  # the import system binding the submodule: keep the function
        pass


sys.modules[__name__].__class__ = _Package


def __getattr__(name):  # PEP 562: keep `import deidcli` light
    if name == "AnonymizeOptions":
        from .options import AnonymizeOptions

        return AnonymizeOptions
    if name == "load_generator":
        from .model import load_generator

        return load_generator
    raise AttributeError(name)
