"""stoker: a clean Linux microVM with your repository inside, in one command."""

__version__ = "0.1.0"

# The Python API (stoker.sdk), imported on first use so the CLI's start-up stays light.
__all__ = ["Client", "ExecResult", "Sandbox", "sandbox"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from stoker import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'stoker' has no attribute {name!r}")
