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
