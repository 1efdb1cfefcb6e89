"""Tests of the layer benchmark's reporting helpers. The timed measurements stay out of pytest."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_mixture.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mixture", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)

    # The dataclasses in the file look their module up in sys.modules while it runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_command_drops_output(bench):
    argv = ["benchmarks/bench_mixture.py", "--threads", "1", "--output", "docs/benchmarks.md", "--output=x.md", "--quick"]

    assert bench.measurement_command(argv) == "python benchmarks/bench_mixture.py --threads 1 --quick"


def test_section_replaces_own_device_only(bench, tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "# Benchmarks\n\nintro\n\n"
        "<!-- bench_mixture cpu begin -->\nold cpu\n<!-- bench_mixture cpu end -->\n\nbetween\n\n"
        "<!-- bench_mixture cuda begin -->\nold cuda\n<!-- bench_mixture cuda end -->\n\nafter\n"
    )

    bench.write_section(page, "cuda:0", ["### CUDA results", "new cuda"])
    text = page.read_text()

    assert "old cuda" not in text
    assert "<!-- bench_mixture cuda begin -->\n### CUDA results\nnew cuda\n<!-- bench_mixture cuda end -->" in text
    assert "old cpu" in text
    assert text.index("between") < text.index("new cuda") < text.index("after")


def test_section_appended_when_missing(bench, tmp_path):
    page = tmp_path / "new.md"

    bench.write_section(page, "cpu", ["### CPU results"])
    text = page.read_text()

    assert text.startswith("# Benchmarks\n")
    assert text.rstrip().endswith("<!-- bench_mixture cpu end -->")


def test_code_line_names_commit(bench):
    line = bench.describe_code()
    head = subprocess.run(
        ["git", "-C", str(BENCH_PATH.parent), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()

    if head:
        assert line.startswith(f"- code: commit {head}")
        assert re.search(r"measured on \d{4}-\d{2}-\d{2} \(UTC\)$", line)
    else:
        assert line.startswith("- code: unknown commit")
