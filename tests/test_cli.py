import shutil
import subprocess
import sys

import pytest

import visattn
from visattn.bench import benchmark_blocks, format_markdown
from visattn.cli import main


def test_blocks_lists_every_block_with_kind_and_paper(capsys):
    assert main(["blocks"]) == 0
    out = capsys.readouterr().out
    for name in visattn.list_blocks():
        info = visattn.block_info(name)
        line = next(l for l in out.splitlines() if l.split()[0] == name)
        assert info.kind in line and info.paper in line


def test_blocks_by_kind(capsys):
    main(["blocks", "--kind", "spatial"])
    names = [l.split()[0] for l in capsys.readouterr().out.splitlines()[1:]]
    assert names == visattn.list_blocks("spatial")


def test_bad_kind_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["blocks", "--kind", "temporal"])
    assert "invalid choice" in capsys.readouterr().err


def test_console_script():
    exe = shutil.which("visattn")
    cmd = [exe, "blocks"] if exe else [sys.executable, "-m", "visattn.cli", "blocks"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert "cbam" in out and "Squeeze-and-Excitation" in out


def test_bench_report(tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert main(["bench", "--blocks", "cbam", "simam", "--shape", "2", "16", "8", "8",
                 "--repeats", "1", "--backward-repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| cbam | hybrid |" in text and "| simam | spatial | 0 |" in text
    assert "cbam fwd <= 2.0x copy" in text  # goal lines are computed, whatever their verdict
    assert text in capsys.readouterr().out


def test_bench_numbers_are_positive():
    floor, rows = benchmark_blocks(["se"], shape=(2, 16, 8, 8), repeats=1, backward_repeats=1)
    (row,) = rows
    assert floor["fwd_ms"] > 0 and row.fwd_ms > 0 and row.fwd_bwd_ms > 0 and row.timm_fwd_ms > 0
    assert row.params == row.timm_params
    assert "| se | channel |" in format_markdown(floor, rows, (2, 16, 8, 8), "cmd")


def test_peak_memory_measures_an_allocation():
    import torch

    from visattn.bench import peak_memory_mb

    mb = peak_memory_mb(lambda: torch.ones(50 * 2**20 // 4))  # 50 MiB, alive until measured
    assert 45 < mb < 80
