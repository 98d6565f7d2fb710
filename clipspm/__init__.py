"""clipspm: CLIP-SPM few-shot action recognition from a cached CLIP feature store.

Stage one (`clipspm.stages.extract`) decodes TSN frame samples and stores frozen CLIP features;
stage two (`clipspm.stages.heads`) trains the CLIP-SPM heads episodically from that store;
stage three (`clipspm.stages.finetune`) tunes the visual tower end to end.
`clipspm.load_run(run_dir)` gives a trained or imported run's head and config.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clipspm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["load_run"]


def __getattr__(name: str):
    # Imported when first asked for: `import clipspm`, which every command does, stays light.
    if name == "load_run":
        from clipspm.stages.runs import load_run

        return load_run
    raise AttributeError(f"module 'clipspm' has no attribute {name!r}")
