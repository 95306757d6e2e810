"""The ``gpumix`` command on a tiny dataset: JSON schema, positive
throughputs, a valid PNG of the expected size, and baselines that do what
they claim."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from gpumix import cli
from gpumix.benchmarks import throughput
from gpumix.benchmarks.preview import preview_size
from gpumix.datasets import make_image_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cli") / "data", num_classes=3,
                             per_class=8, size=(60, 80))


def gpumix(*args):
    """The command in its own process, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "gpumix.cli", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def gpumix_here(capsys, *args) -> str:
    """The command's ``main`` in this process (its DALI operators, compiled
    once per process, are then shared with the other tests); its stdout."""
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


def test_bench_quick_writes_json_and_png(tiny_folder, tmp_path):
    gpumix("bench", "--quick", "--data", str(tiny_folder), "--out", str(tmp_path),
           "--batch-size", "4", "--threads", "1")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {"command", "settings", "environment", "results"} <= set(report)
    assert {"numpy", "torch", "nvidia.dali", "commit", "auto_device"} <= set(
        report["environment"])
    keys = [r["key"] for r in report["results"]]
    assert keys == ["a", "a0", "b", "c", "c-dali", "d-mixup", "d-cutmix", "e-mixcut", "e-fmix"]
    for row in report["results"]:
        assert row["images_per_s"] > 0 and row["min"] <= row["images_per_s"] <= row["max"]
        assert row["batch_shape"][1:] == [3, 96, 96] or row["batch_shape"][1:] == [3, 80, 80]
    with Image.open(tmp_path / "bench.png") as png:
        png.verify()
    paired = {(r["key"], r["base"]): r for r in report["paired_ratios"]}
    assert set(paired) == {(k, b) for k, b in throughput.PAIRS if k in keys and b in keys}
    assert ("e-mixcut", "c") in paired
    for r in paired.values():
        assert 0 < r["min"] <= r["median"] <= r["max"]


def test_bench_runs_the_other_methods_when_named(tiny_folder, tmp_path, capsys):
    gpumix_here(capsys, "bench", "--quick", "--data", tiny_folder, "--out", tmp_path,
                "--batch-size", "4", "--threads", "1", "--only", "c", "e-gridmix",
                "e-saliencymix")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["key"] for r in report["results"]] == ["c", "e-gridmix", "e-saliencymix"]
    assert {(r["key"], r["base"]) for r in report["paired_ratios"]} == {
        ("e-gridmix", "c"), ("e-saliencymix", "c")}


def test_paired_ratios_pair_passes_of_the_same_round():
    # Round 2 ran in a slow phase for both: per-round ratios are 2, 2, 3,
    # while the ratio of the medians (3 / 1) mixes rounds.
    rows = [{"key": "c", "rates": [1.0, 4.0, 1.0]}, {"key": "e-mixcut", "rates": [2.0, 8.0, 3.0]},
            {"key": "b", "rates": [5.0, 5.0, 5.0]}]
    [ratio] = throughput.paired_ratios(rows)
    assert (ratio["key"], ratio["base"]) == ("e-mixcut", "c")
    assert (ratio["median"], ratio["min"], ratio["max"]) == (2.0, 2.0, 3.0)


def test_kernels_quick_writes_paired_figures(tmp_path, capsys):
    gpumix_here(capsys, "kernels", "--quick", "--out", tmp_path)
    report = json.loads((tmp_path / "kernels.json").read_text())
    rows = {r["case"]: r for r in report["results"]}
    assert {"cpu mixup uint8", "cpu cutmix uint8", "cpu mixup float32",
            "cpu cutmix float32"} <= set(rows)
    for row in rows.values():
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        figures = [row[k] for k in ("fraction_of_copy", "speedup_vs_timm",
                                    "speedup_vs_published", "over_cutmix") if k in row]
        assert all(np.isfinite(f) and f > 0 for f in figures)
    for name in ("resizemix nearest", "resizemix bilinear", "smoothmix", "gridmix"):
        assert rows[f"cpu {name} uint8 vs cutmix"]["over_cutmix"] > 0
    assert any(case.startswith("saliencymix peaks") for case in rows)
    assert report["environment"]["numpy"] == np.__version__


def test_preview_png_has_the_expected_size_and_a_name_with_its_suffix(tiny_folder, tmp_path,
                                                                       capsys):
    printed = gpumix_here(capsys, "preview", "--data", tiny_folder, "--out", tmp_path / "grid",
                          "--columns", "4", "--size", "48")
    out = tmp_path / "grid.png"  # the suffix is added and the path printed
    assert str(out) in printed
    with Image.open(out) as png:
        assert png.format == "PNG"
        assert png.size == preview_size(4)
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas


def test_info_reports_device_choice():
    out = gpumix("info").stdout
    assert "auto_device" in out and "nvidia.dali" in out
    threads = next(line for line in out.splitlines() if "cpu_kernel_threads" in line)
    assert int(threads.split(":")[1]) >= 1


def test_bad_cli_arguments_fail_clearly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpumix.cli", "bench", "--data",
                             str(tmp_path / "missing")], capture_output=True, text=True)
    assert result.returncode != 0 and "is not a folder" in result.stderr
    result = subprocess.run([sys.executable, "-m", "gpumix.cli", "bench", "--batch-size", "0"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "positive" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["bench", "--only", "c", "zzz"], "--only: unknown configuration zzz; the keys are a a0"),
    (["bench", "--only", "c", "--out", "{file}/sub"], "--out: cannot write into"),
    (["kernels", "--out", "{file}"], "--out: cannot write into"),
    (["preview", "--out", "{file}/grid.png"], "--out: cannot write into"),
])
def test_cli_argument_errors_come_before_any_work(tiny_folder, tmp_path, capsys, args, message):
    afile = tmp_path / "afile"
    afile.write_text("")
    args = [a.format(file=afile) for a in args]
    data = ["--data", str(tiny_folder)] if args[0] != "kernels" else []
    assert cli.main([*args, *data]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["bench", "--settle", "-1"], ["bench", "--settle", "nan"],
                                  ["preview", "--seed", "-5"]])
def test_cli_refuses_bad_numbers_while_parsing(args, capsys):
    with pytest.raises(SystemExit):
        cli.main(args)
    assert f"argument {args[1]}" in capsys.readouterr().err


def test_preview_of_a_one_image_folder(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "one", num_classes=1, per_class=1, size=(40, 48))
    gpumix_here(capsys, "preview", "--data", folder, "--out", tmp_path / "one.png",
                "--columns", "2", "--size", "32")
    with Image.open(tmp_path / "one.png") as png:
        assert png.format == "PNG" and png.size == preview_size(2)
        assert np.asarray(png.convert("RGB")).std() > 10  # not a blank canvas


@pytest.mark.parametrize("make", [lambda s: throughput.torchvision_timm(s),
                                  throughput.torchvision_fast_collate],
                         ids=["timm-mixup", "timm-fast-collate"])
def test_timm_baselines_produce_soft_targets_that_sum_to_one(tiny_folder, make):
    import argparse

    settings = argparse.Namespace(data=str(tiny_folder), batch_size=4, size=32, threads=0,
                                  num_classes=3, device="cpu")
    x, t = next(iter(make(settings)()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(t.sum(1), torch.ones(4), rtol=0, atol=1e-5)
    assert torch.all(t.max(1).values < 1.0)  # smoothed (and mixed): soft, not one-hot


def test_the_built_in_dataset_is_made_once_whole_and_never_mixed_with_another(tmp_path):
    """Two makers at once: one folder, whole, no staging left behind; the same
    arguments again reuse it; other arguments for the same folder are refused."""
    import threading

    root = tmp_path / "cache" / "data"
    threads = [threading.Thread(target=make_image_folder, args=(root, 2, 3, (24, 32)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert files == [f"class_{c:02d}/img_{i:04d}.jpg" for c in range(2) for i in range(3)]
    assert sorted(p.name for p in root.parent.iterdir()) == ["data"]  # no staging folder
    assert root.stat().st_mode & 0o777 == 0o755  # readable by others: a cache may be shared
    first = {f: (root / f).read_bytes() for f in files}
    assert make_image_folder(root, 2, 3, (24, 32)) == root
    assert {f: (root / f).read_bytes() for f in files} == first
    with pytest.raises(ValueError, match="holds other files"):
        make_image_folder(root, 3, 5, (24, 32))
