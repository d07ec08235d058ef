"""deid: remove the identity of every face in a video, keep what the face does.

Public API (heavy imports are deferred to the call):

    from deidcli import anonymize, AnonymizeOptions
    report = anonymize("in.mp4", "out.mp4", AnonymizeOptions(method="blur"))

    from deidcli import live, LiveOptions       # a camera or a stream as it happens (docs/live.md)
    report = live("rtsp://cam/stream", "out.mkv", live_options=LiveOptions(max_latency=0.3))

    from deidcli import faces_index              # one picture per face track, a sheet, an index (docs/faces.md)
    report = faces_index("in.mp4", "faces/")
"""

__version__ = "0.1.0"

__all__ = ["__version__", "anonymize", "AnonymizeOptions", "live", "LiveOptions", "faces_index", "FacesOptions",
           "load_generator"]


def __getattr__(name):  # PEP 562: keep `import deidcli` light
    if name == "anonymize":
        from .pipeline.anonymize import anonymize

        return anonymize
    if name == "AnonymizeOptions":
        from .options import AnonymizeOptions

        return AnonymizeOptions
    if name == "live":
        from .pipeline.live import live

        return live
    if name == "LiveOptions":
        from .options import LiveOptions

        return LiveOptions
    if name in ("faces_index", "FacesOptions"):
        from .pipeline import faces_index

        return getattr(faces_index, name)
    if name == "load_generator":
        from .generator.model import load_generator

        return load_generator
    raise AttributeError(name)
