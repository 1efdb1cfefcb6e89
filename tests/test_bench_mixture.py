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


@pytest.mark.parametrize(("plan_name", "hint"), [("FULL_PLAN", "add `--output"), ("QUICK_PLAN", "drop `--quick`")])
def test_section_hint_matches_plan(bench, plan_name, hint):
    settings = bench.Settings("cpu", 1, (1,), 1, 1.0, 1.0)

    section = bench.build_section(getattr(bench, plan_name), settings, [], [], 60.0)

    assert section[0] == "### CPU results"
    assert hint in section[2]


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


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--repeats", "-2"], "--repeats must be at least 1, got -2"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--dense-time-limit-s", "-1"], "--dense-time-limit-s must be 0 or more, got -1.0"),
        (["--dense-memory-limit-gb", "nan"], "--dense-memory-limit-gb must be 0 or more, got nan"),
        (["--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
        (["--output", "/nonexistent-folder/page.md"], "folder /nonexistent-folder not found"),
    ],
)
def test_invalid_option_rejected_before_measuring(bench, capsys, arguments, message):
    with pytest.raises(SystemExit) as error:
        bench.parse_arguments(arguments)

    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_without_device_rejected(bench, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--device", "cuda"])

    assert "finds no CUDA device" in capsys.readouterr().err


def test_valid_options_accepted(bench, tmp_path):
    arguments = bench.parse_arguments(["--repeats", "1", "--threads", "1", "--output", str(tmp_path / "page.md")])

    assert arguments.repeats == 1
    assert arguments.threads == 1
    assert arguments.output == tmp_path / "page.md"
