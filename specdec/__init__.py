"""specdec: exact speculative decoding over a paged KV cache, in pure PyTorch."""

__version__ = "0.1.0"

from specdec.core.request import SamplingParams  # noqa: E402


def __getattr__(name):
    # The engine pulls in torch; keep `import specdec` light for the bookkeeping modules.
    if name == "LLM":
        from specdec.llm import LLM
        return LLM
    if name in ("RequestOutput", "CompletionOutput", "Engine"):
        from specdec import engine
        return getattr(engine, name)
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Engine"]
