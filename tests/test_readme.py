"""The front page and the docs say what the code does: every ```python block
of README.md and docs/*.md runs as written (each in its own interpreter, with
``data_root`` set to a small generated image folder and batch size 64 cut to
8), and what the examples' comments promise about the outputs holds. Links
stay inside the repository, and CI runs the README's test command."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpumix.cli import BUILTIN
from gpumix.datasets import make_image_folder

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SMALL_BATCH = ("batch_size=64", "batch_size=8")

# Run after each example, in its namespace: its soft targets are float32 rows
# that sum to 1, and its image batches are NCHW float32 with three channels.
CHECKS = textwrap.dedent("""
    import numpy as _np
    import torch as _torch

    _names = dict(globals())
    if "targets" in _names:
        _t = _torch.as_tensor(_names["targets"]).cpu()
        assert _t.dtype == _torch.float32 and _t.dim() == 2, (_t.dtype, tuple(_t.shape))
        assert _torch.allclose(_t.sum(1), _torch.ones(len(_t)), atol=1e-5), _t.sum(1)
        assert bool((_t >= 0).all())
    for _name in ("images", "x"):
        _x = _names.get(_name)
        if isinstance(_x, _torch.Tensor):
            assert _x.dim() == 4 and _x.shape[1] == 3, (_name, tuple(_x.shape))
            assert _x.dtype == _torch.float32, (_name, _x.dtype)
    print("EXAMPLE OK")
""")


def python_blocks() -> list:
    """Every ```python block of the pages, as pytest params named page-number."""
    blocks = []
    for page in PAGES:
        codes = [code for language, code in FENCE.findall(page.read_text())
                 if language == "python"]
        blocks += [pytest.param(code, id=f"{page.relative_to(ROOT)}-{number}")
                   for number, code in enumerate(codes, 1)]
    return blocks


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    spec = BUILTIN["quick"]
    return make_image_folder(tmp_path_factory.mktemp("readme") / "data", spec["num_classes"],
                             spec["per_class"], spec["size"])


def test_readme_shows_the_three_ways_to_use_it():
    blocks = python_blocks()
    readme = [b for b in blocks if b.id.startswith("README.md")]
    assert len(readme) == 3, [b.id for b in blocks]  # loader, own pipeline, torch module


@pytest.mark.parametrize("code", python_blocks())
def test_example_runs(code, data_root, tmp_path):
    code = code.replace(*SMALL_BATCH)
    program = f"data_root = {str(data_root)!r}\n" + code + CHECKS
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:] + result.stderr[-4000:])
    assert "EXAMPLE OK" in result.stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(page):
    prose = FENCE.sub("", page.read_text())  # code may hold brackets; links are in prose
    for target in LINK.findall(prose):
        assert "://" not in target, f"{page.name} links outside the repository: {target}"
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert path.exists(), f"{page.name}: {target} does not exist"


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_bytes()) <= 6 * 1024


def test_ci_runs_the_readme_test_command():
    commands = [code.strip() for language, code in FENCE.findall((ROOT / "README.md").read_text())
                if language == "bash"]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
