"""`--baseline DIR` of benchmarks/throughput.py and benchmarks/serving.py, without a model: argument
parsing, revision naming, which heron a benchmark subprocess imports (a fake tree's, even from inside
this checkout and with the venv's editable install pointing elsewhere), and the tables' baseline rows and
"this tree / baseline" ratios. The benchmarks themselves are run by hand, as their docstrings say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from heron.bench import LevelResult, RequestResult

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helper module as a sibling

import serving  # noqa: E402
import source_trees  # noqa: E402
import throughput  # noqa: E402
from source_trees import Tree, WrongTree  # noqa: E402

THIS = Tree("this tree", Path("/src/a"), "abc1234+dirty")
BASE = Tree("baseline", Path("/src/b"), "def5678")


def _git(root: Path, *args: str) -> str:
    cmd = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def _fake_tree(root: Path) -> Path:
    """A checkout whose heron only says who it is: heron.cli.main prints its argv."""
    (root / "heron").mkdir(parents=True)
    (root / "heron" / "__init__.py").write_text("")
    (root / "heron" / "cli.py").write_text("import sys\n\ndef main():\n    print('ARGV', sys.argv)\n    return 0\n")
    return root


def test_revision_is_the_short_head_plus_dirty(tmp_path: Path):
    repo = _fake_tree(tmp_path / "repo")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "--short", "HEAD")
    assert source_trees.revision(repo) == head
    (repo / "heron" / "new.py").write_text("")  # untracked source changes what runs too
    assert source_trees.revision(repo) == head + "+dirty"
    assert Tree.at("baseline", repo).describe() == f"baseline {head}+dirty ({repo.resolve()})"
    assert source_trees.revision(tmp_path) == "unknown revision (not a git checkout)"
    with pytest.raises(ValueError, match="not a Heron checkout"):
        Tree.at("baseline", tmp_path)


def test_subprocesses_import_their_own_tree(tmp_path: Path):
    tree = Tree.at("baseline", _fake_tree(tmp_path / "fake"))
    env = tree.env({**os.environ, "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"] == os.pathsep.join([str(tree.root), "/elsewhere"])
    # From inside this checkout (its heron/ in the working directory), as `heron serve` is started.
    proc = subprocess.run(source_trees.heron_cli_command() + ["serve", "--port", "1"], env=env,
                          cwd=source_trees.ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    heron_file = source_trees.heron_file_in(proc.stdout)
    assert tree.check(heron_file, "heron serve") == str(tree.root / "heron" / "__init__.py")
    assert "ARGV ['heron', 'serve', '--port', '1']" in proc.stdout
    # A worker script, as the benchmarks start theirs: its own folder first, then PYTHONPATH.
    script = tmp_path / "worker.py"
    script.write_text("import source_trees\nprint(source_trees.worker_heron_file())\n")
    env["PYTHONPATH"] += os.pathsep + str(BENCHMARKS)
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=source_trees.ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.stdout.strip() == str(tree.root / "heron" / "__init__.py"), proc.stderr


def test_a_result_from_the_wrong_tree_is_refused(tmp_path: Path):
    tree = Tree.at("baseline", _fake_tree(tmp_path / "fake"))
    with pytest.raises(WrongTree, match="imported heron from .*heron/__init__.py, not from"):
        tree.check(str(source_trees.ROOT / "heron" / "__init__.py"), "the worker")
    with pytest.raises(WrongTree, match="imported heron from None"):
        tree.check(None, "the worker")


def test_the_parent_puts_its_own_tree_first_unless_it_is_a_worker(monkeypatch):
    monkeypatch.setattr(sys, "path", ["/x"])
    monkeypatch.setenv(source_trees.TREE_ENV, "/src/b")
    source_trees.put_tree_first()
    assert sys.path == ["/x"]  # a worker: PYTHONPATH, set by its parent, decides
    monkeypatch.delenv(source_trees.TREE_ENV)
    source_trees.put_tree_first()
    assert sys.path == [str(source_trees.ROOT), "/x"]


def test_header_names_both_revisions_and_where_heron_came_from():
    line = source_trees.header([THIS, BASE], {"this tree": {"/src/a/heron/__init__.py"}})
    assert "this tree abc1234+dirty (/src/a), heron.__file__ /src/a/heron/__init__.py" in line
    assert "baseline def5678 (/src/b), heron.__file__ no Heron subprocess finished" in line
    assert source_trees.header([THIS]).startswith("Heron: this tree abc1234+dirty")
    assert source_trees.fmt_ratio(source_trees.ratio(99.0, 100.0)) == "0.990"
    assert source_trees.ratio(1.0, None) is None and source_trees.fmt_ratio(None) == "-"


def test_throughput_arguments():
    args = throughput.parse_args([])
    assert (args.num_prompts, args.max_tokens, args.repeats, args.baseline) == (64, 128, 1, None)
    assert throughput.parse_args(["--baseline", str(source_trees.ROOT)]).baseline == str(source_trees.ROOT)
    with pytest.raises(SystemExit):
        throughput.parse_args(["--baseline", str(BENCHMARKS)])


def test_serving_arguments():
    args = serving.parse_args([])
    assert (args.concurrency, args.repeats, args.baseline, args.max_num_seqs) == ([1, 8, 32], 1, None, 32)
    assert serving.parse_args(["--baseline", str(source_trees.ROOT), "--repeats", "3"]).repeats == 3
    for bad in (["--baseline", str(source_trees.ROOT), "--url", "http://127.0.0.1:1"],
                ["--baseline", str(BENCHMARKS)], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            serving.parse_args(bad)


def _run(tokens_per_s: float, ttft_s: float | None = None) -> dict:
    run = {"tokens_per_s": tokens_per_s, "peak_rss_mib": 100.0, "heron_file": "x"}
    return run | ({"ttft_s": ttft_s} if ttft_s is not None else {})


def test_throughput_table_and_ratios():
    assert throughput.median_run([_run(3), _run(1), _run(2)])["tokens_per_s"] == 2
    results = {("heron", "batch", "this tree"): _run(110), ("transformers", "batch", "this tree"): _run(10)}
    assert throughput.results_table(results, 4, [THIS]) == [
        "| system | workload | tokens/s | TTFT | peak RSS |",
        "| --- | --- | ---: | ---: | ---: |",
        "| heron | 4 prompts together | 110.0 | - | 100 MiB |",
        "| transformers | 4 prompts together | 10.0 | - | 100 MiB |",
    ]
    assert throughput.baseline_ratios(results, 4, 1) == []  # no baseline, no ratio lines

    results = {("heron", "single", "this tree"): _run(48, 0.05), ("heron", "single", "baseline"): _run(50, 0.04),
               ("transformers", "single", "this tree"): _run(5, 1.0)}
    table = throughput.results_table(results, 4, [THIS, BASE])
    assert table[0] == "| system | tree | workload | tokens/s | TTFT | peak RSS |"
    assert table[2:] == [
        "| heron | this tree abc1234+dirty | 1 stream (decode) | 48.0 | 50 ms | 100 MiB |",
        "| heron | baseline def5678 | 1 stream (decode) | 50.0 | 40 ms | 100 MiB |",
        "| transformers | - | 1 stream (decode) | 5.0 | 1000 ms | 100 MiB |",
    ]
    assert throughput.baseline_ratios(results, 4, 3) == [
        "this tree / baseline, tokens/s, medians of 3 run(s) each (above 1: this tree is faster):",
        "this tree / baseline, heron, 1 stream (decode): 0.960",
    ]


def _level(c: int, tokens_per_s: float, ttft_s: float) -> LevelResult:
    level = LevelResult(c, wall_s=1.0)
    level.results = [RequestResult(True, int(tokens_per_s / c), ttft_s=ttft_s, tpot_s=0.01) for _ in range(c)]
    return level


def test_serving_table_with_a_baseline():
    this, base = serving.TreeRuns(THIS), serving.TreeRuns(BASE)
    for served, ttft in ((30.0, 0.2), (10.0, 0.2), (20.0, 0.2)):  # three sweeps: the median is 20
        this.add_served("m", [_level(2, served, ttft)], None)
    base.add_served("m", [_level(2, 40.0, 0.1)], None)
    this.add_offline({2: [40.0]})
    base.add_offline({2: [50.0]})

    header = ("| concurrency | requests | output tok/s served | offline tok/s | served/offline "
              "| TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 |")
    assert serving.results_table([2], [this])[0] == header  # without a baseline the table is as it was
    table = serving.results_table([2], [this, base])
    assert table[0] == header.replace("| concurrency |", "| concurrency | tree |")
    assert table[1] == "| ---: | --- |" + " ---: |" * 8
    assert table[2:] == [
        "| 2 | this tree abc1234+dirty | 6 | 20.0 | 40.0 | 0.50 | 0.20 s | 0.20 s | 10.0 ms | 10.0 ms |",
        "| 2 | baseline def5678 | 2 | 40.0 | 50.0 | 0.80 | 0.10 s | 0.10 s | 10.0 ms | 10.0 ms |",
        "| 2 | this tree / baseline | - | 0.500 | 0.800 | - | 2.000 | 2.000 | 1.000 | 1.000 |",
    ]
