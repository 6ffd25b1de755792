"""vllm-superweight."""

__version__ = "0.1.0"


def register() -> None:
    from .vllm_plugin import config  # noqa: F401
