"""Bad input to the ``visattn`` command line: one clear line on stderr and exit status 2, never a
traceback, never a PASS from no measurement, and output paths checked before long work.

Add a case: one row in ``CASES`` (argv, a regex the error line must match). ``{tmp}`` is replaced by
a fresh temporary folder holding ``gt.json`` (valid COCO), ``pred.json`` (valid results) and
``bad.json`` (not JSON).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from visattn.bench import benchmark_blocks
from visattn.cli import main

TINY_BENCH = ["bench", "--blocks", "se", "--shape", "1", "8", "4", "4", "--backward-repeats", "1"]

CASES = [
    ("bench-repeats-0", [*TINY_BENCH, "--repeats", "0"], r"--repeats.*>= 1, got 0"),
    ("bench-backward-repeats-neg", ["bench", "--backward-repeats", "-1"], r"--backward-repeats.*>= 1"),
    ("bench-shape-zero", ["bench", "--shape", "1", "0", "4", "4"], r"--shape.*>= 1, got 0"),
    ("bench-shape-text", ["bench", "--shape", "1", "a", "4", "4"], r"--shape.*'a'"),
    ("bench-unknown-block", ["bench", "--blocks", "cbma"], r"--blocks.*invalid choice: 'cbma'"),
    ("bench-out-missing-dir", [*TINY_BENCH, "--out", "{tmp}/no/such/dir/b.md"], r"--out.*does not exist"),
    ("bench-out-is-dir", [*TINY_BENCH, "--out", "{tmp}"], r"--out.*is a folder"),
    ("synth-image-size-neg", ["synth", "{tmp}/s", "--image-size", "-5"], r"--image-size.*>= 1, got -5"),
    ("synth-num-images-0", ["synth", "{tmp}/s", "--num-images", "0"], r"--num-images.*>= 1, got 0"),
    ("synth-workers-0", ["synth", "{tmp}/s", "--workers", "0"], r"--workers.*>= 1"),
    ("synth-seed-neg", ["synth", "{tmp}/s", "--seed", "-1"], r"--seed.*>= 0"),
    ("synth-out-under-file", ["synth", "{tmp}/gt.json/s", "--num-images", "1"], r"out.*not a folder"),
    ("eval-n-boot-0", ["eval", "--gt", "{tmp}/gt.json", "--pred", "{tmp}/pred.json", "--compare",
                       "{tmp}/pred.json", "--n-boot", "0", "--out", "{tmp}/r"], r"--n-boot.*>= 1, got 0"),
    ("eval-missing-gt", ["eval", "--gt", "{tmp}/nope.json", "--pred", "{tmp}/pred.json", "--out", "{tmp}/r"],
     r"--gt '.*nope\.json' does not exist"),
    ("eval-missing-pred", ["eval", "--gt", "{tmp}/gt.json", "--pred", "{tmp}/nope.json", "--out", "{tmp}/r"],
     r"--pred '.*nope\.json' does not exist"),
    ("eval-missing-compare", ["eval", "--gt", "{tmp}/gt.json", "--pred", "{tmp}/pred.json", "--compare",
                              "{tmp}/nope.json", "--out", "{tmp}/r"], r"--compare '.*nope\.json' does not exist"),
    ("eval-gt-is-dir", ["eval", "--gt", "{tmp}", "--pred", "{tmp}/pred.json", "--out", "{tmp}/r"],
     r"--gt .* is not a file"),
    ("eval-out-is-file", ["eval", "--gt", "{tmp}/gt.json", "--pred", "{tmp}/pred.json", "--out", "{tmp}/gt.json"],
     r"--out .*not a folder"),
    ("eval-malformed-gt", ["eval", "--gt", "{tmp}/bad.json", "--pred", "{tmp}/pred.json", "--out", "{tmp}/r"],
     r"bad\.json"),
    ("eval-malformed-pred", ["eval", "--gt", "{tmp}/gt.json", "--pred", "{tmp}/bad.json", "--out", "{tmp}/r"],
     r"bad\.json"),
]


@pytest.fixture
def files(tmp_path):
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(
        [{"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9}]))
    (tmp_path / "bad.json").write_text("{not json")
    return tmp_path


def _run(argv: list[str], tmp, capsys) -> tuple[int, str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects a bad option with status 2
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, pattern, files, capsys):
    code, err = _run(argv, files, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert re.search(pattern, err), err
    assert not (files / "r" / "report.json").exists()


def test_bench_out_checked_before_timing(files, capsys, monkeypatch):
    import visattn.bench

    def never(*args, **kwargs):
        raise AssertionError("benchmark ran although --out cannot be written")

    monkeypatch.setattr(visattn.bench, "benchmark_blocks", never)
    code, err = _run([*TINY_BENCH, "--repeats", "1", "--out", "{tmp}/missing/b.md"], files, capsys)
    assert code == 2 and "--out" in err


@pytest.mark.parametrize("kwargs, pattern", [
    ({"repeats": 0}, r"repeats must be an int >= 1, got 0"),
    ({"backward_repeats": 0}, r"backward_repeats must be an int >= 1"),
    ({"shape": (1, 8, 4)}, r"shape must be four ints"),
    ({"shape": (1, 8, 4, -4)}, r"shape must be four ints"),
    ({"names": ["nope"]}, r"unknown block\(s\) \['nope'\]"),
])
def test_benchmark_blocks_validates(kwargs, pattern):
    args = {"names": ["se"], "shape": (1, 8, 4, 4), "repeats": 1, "backward_repeats": 1, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        benchmark_blocks(**args)


def test_console_script_error_has_no_traceback(files):
    cmd = [sys.executable, "-m", "visattn.cli", "eval", "--gt", str(files / "bad.json"), "--pred",
           str(files / "pred.json"), "--out", str(files / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visattn eval: error:") and "bad.json" in lines[0], proc.stderr


def test_bench_out_is_written_whole(files, capsys):
    out = files / "b.md"
    out.write_text("old report")
    assert main([*TINY_BENCH, "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Block speed") and "| se |" in text
    assert sorted(p.name for p in files.iterdir()) == ["b.md", "bad.json", "gt.json", "pred.json"]
