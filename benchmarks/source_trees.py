"""Which Heron source tree a benchmark subprocess runs, and `--baseline DIR`: the same cells from another one.

throughput.py and serving.py run every system in a subprocess. Which `heron` that subprocess imports
decides what is measured, and the venv's editable install points at whichever checkout ran
`pip install -e`, not necessarily the one the benchmark lives in. So each Heron subprocess gets its
tree's root first on PYTHONPATH (the benchmark code itself is always this checkout's; only `heron`
changes), reports `heron.__file__`, and the parent refuses a result imported from anywhere else.
BENCH_HERON_TREE tells a worker that its parent chose its tree, so `put_tree_first` leaves PYTHONPATH
in charge there.

With `--baseline DIR` (a checkout of another revision, e.g. `git worktree add ../base HEAD~1`) the Heron
cells run from both trees, this tree then the baseline for each repeat (A B A B...) so drift hits both,
and the reports add the baseline's rows and "this tree / baseline" ratios of the medians.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout this benchmark belongs to
TREE_ENV = "BENCH_HERON_TREE"
HERON_FILE = "HERON_FILE "  # the line a Heron subprocess prints to say where its heron came from

# `heron serve` (any `heron` command) with nothing ahead of PYTHONPATH: -P keeps the working
# directory, which may be another checkout, off sys.path; the venv's `heron` script would import
# whatever the editable install points at.
_CLI = (
    "import sys, heron, heron.cli; print(%r + heron.__file__, flush=True); "
    "sys.argv[0] = 'heron'; sys.exit(heron.cli.main())" % HERON_FILE
)


class WrongTree(Exception):
    """A subprocess imported heron from somewhere other than the tree it was started for."""


def put_tree_first() -> None:
    """This checkout's heron ahead of any installed one, unless a parent benchmark chose this worker's."""
    if TREE_ENV not in os.environ:
        sys.path.insert(0, str(ROOT))


def revision(root: Path) -> str:
    """`git rev-parse --short HEAD`, with "+dirty" when the work tree has changes (untracked files too)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision (not a git checkout)"
    return head + ("+dirty" if dirty else "")


@dataclass(frozen=True)
class Tree:
    name: str  # "this tree" or "baseline": the label of its rows
    root: Path
    revision: str

    @classmethod
    def at(cls, name: str, root: str | Path) -> Tree:
        root = Path(root).resolve()
        if not (root / "heron" / "__init__.py").is_file():
            raise ValueError(f"{root} is not a Heron checkout (no heron/__init__.py)")
        return cls(name, root, revision(root))

    def describe(self) -> str:
        return f"{self.name} {self.revision} ({self.root})"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a subprocess that must import this tree's heron."""
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env[TREE_ENV] = str(self.root)
        return env

    def check(self, heron_file: str | None, what: str) -> str:
        """heron_file if it lies in this tree's heron package; else WrongTree, since the numbers would
        belong to another revision than the row says."""
        package = (self.root / "heron").resolve()
        if heron_file is None or not Path(heron_file).resolve().is_relative_to(package):
            raise WrongTree(f"{what} for {self.describe()} imported heron from {heron_file}, not from {package}")
        return heron_file


def trees(baseline: str | None) -> list[Tree]:
    """This tree, then the baseline where one is given: the order each repeat runs them in."""
    out = [Tree.at("this tree", ROOT)]
    if baseline is not None:
        out.append(Tree.at("baseline", baseline))
    return out


def heron_cli_command() -> list[str]:
    """argv prefix of a `heron` command; run it with a tree's `env()`. It prints HERON_FILE first."""
    return [sys.executable, "-P", "-c", _CLI]


def heron_file_in(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(HERON_FILE):
            return line[len(HERON_FILE):].strip()
    return None


def worker_heron_file() -> str:
    """In a worker: where its heron came from, for the parent to check."""
    import heron

    return heron.__file__


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else None


def ratio(this: float | None, baseline: float | None) -> float | None:
    """this / baseline of two medians; None where either is missing."""
    if this is None or baseline is None or baseline == 0 or this != this or baseline != baseline:
        return None
    return this / baseline


def fmt_ratio(x: float | None) -> str:
    # Three decimals: the question is usually "within 3%?", which two would blur.
    return "-" if x is None or x != x else f"{x:.3f}"


def header(tree_list: list[Tree], heron_files: dict[str, set[str]] | None = None) -> str:
    """The line naming each tree's revision and where its subprocesses' heron came from (checked)."""
    seen = heron_files or {}

    def one(tree: Tree) -> str:
        files = ", ".join(sorted(seen.get(tree.name, ()))) or "no Heron subprocess finished"
        return f"{tree.describe()}, heron.__file__ {files}"

    if len(tree_list) == 1:
        return f"Heron: {one(tree_list[0])}"
    return "Heron trees (run A B A B per repeat): " + "; ".join(one(t) for t in tree_list)
