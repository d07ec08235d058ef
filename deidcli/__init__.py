"""deid: remove the identity of every face in a video, keep what the face does.

Public API (heavy imports are deferred to the call):

    from deidcli import anonymize, AnonymizeOptions
    report = anonymize("in.mp4", "out.mp4", AnonymizeOptions(method="blur"))
"""

__version__ = "0.1.0"

__all__ = ["__version__", "anonymize", "AnonymizeOptions", "load_generator"]


def __getattr__(name):  # PEP 562: keep `import deidcli` light
    if name == "anonymize":
        from .pipeline.anonymize import anonymize

        return anonymize
    if name == "AnonymizeOptions":
        from .options import AnonymizeOptions

        return AnonymizeOptions
    if name == "load_generator":
        from .generator.model import load_generator

        return load_generator
    raise AttributeError(name)
