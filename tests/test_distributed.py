"""Scale out and hold up: torch.distributed sharding (two real processes,
gloo), resumption in a new process, faults, and a soak test (slow)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpumix.datasets import make_image_folder
from gpumix.torch import DALIMixLoader

WORKER = Path(__file__).parent / "helpers" / "loader_worker.py"
N_FILES = 21


@pytest.fixture(scope="module")
def id_list(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("dist") / "data", num_classes=3,
                             per_class=7, size=(40, 52))
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    path = root.parent / "ids.txt"
    path.write_text("".join(f"{f} {i}\n" for i, f in enumerate(files)))
    return path


def run_worker(*args):
    result = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def run_ddp(id_list, tmp_path, tag):
    init = tmp_path / f"init-{tag}"
    outs = [tmp_path / f"{tag}-rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), "ddp", str(r), "2", str(init),
                               str(id_list), str(outs[r])], stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [json.loads(o.read_text()) for o in outs]


def test_two_ranks_shard_disjointly_cover_everything_and_mix_differently(id_list, tmp_path):
    ranks = run_ddp(id_list, tmp_path, "first")
    assert [r["shard"] for r in ranks] == [[0, 2], [1, 2]]  # read from torch.distributed
    for epoch in range(2):
        shards = [set(r["epochs"][epoch]["primaries"]) for r in ranks]
        for r in ranks:  # no duplicates within a shard
            assert len(r["epochs"][epoch]["primaries"]) == len(set(r["epochs"][epoch]["primaries"]))
        assert not shards[0] & shards[1]  # disjoint
        assert shards[0] | shards[1] == set(range(N_FILES))  # together: every sample once
        assert ranks[0]["epochs"][epoch]["steps"] == ranks[1]["epochs"][epoch]["steps"]
    assert ranks[0]["epochs"][0]["lams"] != ranks[1]["epochs"][0]["lams"]  # own streams
    # epoch-dependent shuffling: the second epoch reads another order
    assert ranks[0]["epochs"][0]["primaries"] != ranks[0]["epochs"][1]["primaries"]
    for r in ranks:  # a second loader, same seed and world size: identical epochs
        assert r["again"] == r["epochs"]


def test_resume_in_a_new_process_continues_exactly(id_list, tmp_path):
    """Saved here (the state and the batches after it), resumed in another process."""
    state, expected, resumed = tmp_path / "state", tmp_path / "expected.pt", tmp_path / "got.pt"
    spec = importlib.util.spec_from_file_location("loader_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    worker.save(id_list, state, expected)
    run_worker("resume", id_list, state, resumed)
    for (x, t, p), (rx, rt, rp) in zip(torch.load(expected), torch.load(resumed)):
        torch.testing.assert_close(rx, x, rtol=0, atol=0)
        torch.testing.assert_close(rt, t, rtol=0, atol=0)
        assert p["labels"].tolist() == rp["labels"].tolist()


def copy_folder(src_list, dst, count):
    files = [line.rsplit(" ", 1)[0] for line in Path(src_list).read_text().splitlines()]
    (dst / "a").mkdir(parents=True)
    for i, f in enumerate(files[:count]):
        (dst / "a" / f"{i:03d}.jpg").write_bytes(Path(f).read_bytes())
    return sorted((dst / "a").iterdir())


def test_a_file_that_disappears_mid_epoch_is_named(id_list, tmp_path):
    files = copy_folder(id_list, tmp_path / "data", N_FILES)  # the last far beyond prefetch
    loader = DALIMixLoader(tmp_path / "data", batch_size=2, size=16, shuffle=False)
    files[-1].unlink()  # gone after construction
    with pytest.raises(RuntimeError, match=files[-1].name):
        for _ in loader:
            pass


def test_a_dangling_link_is_named(id_list, tmp_path):
    copy_folder(id_list, tmp_path / "data", 3)
    (tmp_path / "data" / "a" / "zz_link.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(RuntimeError, match="zz_link.jpg"):
        for _ in DALIMixLoader(tmp_path / "data", batch_size=2, size=16, shuffle=False):
            pass


def test_an_exception_inside_the_pipeline_reaches_the_training_loop(id_list):
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    import gpumix.dali

    @pipeline_def(batch_size=2, num_threads=1, device_id=None, seed=0)
    def pipe():
        images = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)] * 2,
                                    batch=True, layout="HWC")
        labels = fn.external_source(source=lambda: [np.array([1], np.int32),
                                                    np.array([7], np.int32)], batch=True)
        return gpumix.dali.mix(images, labels, num_classes=5)

    p = pipe()
    p.build()
    _, targets = p.run()  # the params operator keeps the error, the targets are NaN
    assert np.isnan(np.stack([np.array(t) for t in targets])).all()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        gpumix.dali.raise_pending(p)
    # and the loader checks its labels against num_classes before it starts
    with pytest.raises(ValueError, match="num_classes=5"):
        DALIMixLoader(file_list=id_list, num_classes=5)


@pytest.mark.slow
def test_soak_twenty_epochs_keep_memory_flat(id_list):
    loader = DALIMixLoader(file_list=id_list, batch_size=4, size=32, mixup_alpha=1.0,
                           cutmix_alpha=1.0, fmix_alpha=1.0, mode="elem")

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    for _ in range(3):  # warm up allocators and JIT caches
        for _ in loader:
            pass
    start = rss_mb()
    for _ in range(20):
        for _ in loader:
            pass
    growth = rss_mb() - start
    assert growth < 50, f"RSS grew by {growth:.1f} MB over 20 epochs"
