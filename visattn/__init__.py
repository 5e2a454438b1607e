"""visattn: computer-vision attention blocks that plug into real backbones and detectors.

    >>> import visattn
    >>> visattn.list_blocks("channel")
    ['eca', 'se', 'sk']
    >>> block = visattn.create_block("cbam", 256)
"""
from .plug import plug
from .registry import KINDS, BlockInfo, block_info, create_block, list_blocks

__version__ = "0.1.0"

__all__ = ["KINDS", "BlockInfo", "__version__", "block_info", "create_block", "list_blocks", "plug"]


def __getattr__(name: str):
    """``visattn.explain`` is imported on first use (it is not needed to build or train models)."""
    if name == "explain":
        import importlib

        return importlib.import_module(f"{__name__}.explain")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
