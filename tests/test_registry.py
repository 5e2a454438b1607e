import pytest
import torch

import visattn
from visattn.registry import KINDS

REQUIRED = {
    "se": "channel", "eca": "channel", "sk": "channel",
    "simam": "spatial", "coord": "spatial", "triplet": "spatial",
    "cbam": "hybrid", "bam": "hybrid", "scse": "hybrid", "gc": "hybrid", "danet": "hybrid",
}


def test_required_blocks_registered_with_kinds():
    for name, kind in REQUIRED.items():
        assert visattn.block_info(name).kind == kind, name
        assert name in visattn.list_blocks(kind)


def test_list_blocks_sorted_and_partitioned_by_kind():
    names = visattn.list_blocks()
    assert names == sorted(names)
    assert sorted(n for k in KINDS for n in visattn.list_blocks(k)) == names


@pytest.mark.parametrize("name", visattn.list_blocks())
def test_block_info_metadata(name):
    info = visattn.block_info(name)
    assert info.name == name and info.kind in KINDS
    assert info.paper and 2010 < info.year < 2030 and info.url.startswith("http")
    assert isinstance(visattn.create_block(name, 16), info.cls)


def test_unknown_block_lists_valid_names():
    with pytest.raises(ValueError, match="unknown block 'cbma'.*cbam.*se"):
        visattn.create_block("cbma", 16)
    with pytest.raises(ValueError, match="registered blocks"):
        visattn.block_info("nope")


def test_unknown_kind():
    with pytest.raises(ValueError, match="valid kinds"):
        visattn.list_blocks("temporal")


@pytest.mark.parametrize("name", visattn.list_blocks())
def test_misspelt_keyword_is_type_error(name):
    with pytest.raises(TypeError, match="rd_ratoi"):
        visattn.create_block(name, 16, rd_ratoi=0.5)


def test_keyword_reaches_block():
    assert visattn.create_block("se", 64, rd_channels=5).fc1.out_channels == 5
    assert visattn.create_block("eca", 64, kernel_size=7).conv.kernel_size == (7,)


@pytest.mark.parametrize("channels,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                            ("64", TypeError), (True, TypeError)])
def test_bad_channels(channels, error):
    with pytest.raises(error, match="channels must be an int >= 1"):
        visattn.create_block("se", channels)


@pytest.mark.parametrize("name,kwargs,match", [
    ("eca", {"kernel_size": 4}, "odd kernel_size"),
    ("cbam", {"spatial_kernel_size": 6}, "odd spatial_kernel_size"),
    ("sk", {"kernel_size": (3,)}, ">= 2 odd kernel sizes"),
    ("sk", {"groups": 3}, "groups=3 must divide"),
    ("gc", {"fusion": "mul"}, "fusion must be"),
    ("scse", {"mode": "mean"}, "mode must be"),
    ("se", {"act_layer": "relux"}, "unknown activation 'relux'"),
])
def test_bad_options_are_named(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        visattn.create_block(name, 16, **kwargs)


def test_sk_split_needs_divisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        visattn.create_block("sk", 15)


def test_activation_by_class():
    block = visattn.create_block("se", 16, act_layer=torch.nn.SiLU)
    assert isinstance(block.act, torch.nn.SiLU)
