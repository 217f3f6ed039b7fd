"""Runs a user can trust: data fingerprint, run lock, file modes under the umask, leftovers of
killed processes, SIGTERM, filesystem problems as one line. Nothing here trains a network; the
end-to-end cases on a trained run are in tests/test_pipeline_end_to_end.py.

Permission cases run the CLI as an unprivileged user when the tests run as root (root ignores
file modes), in a world-readable scratch folder outside pytest's private tmp folders.
"""

from __future__ import annotations

import re

import ctypes
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import REPO, TEST_CONFIG, run_cli
from conceptclef.core.config import load_config
from conceptclef.core.partial_files import create_partial, remove_leftover_partials
from conceptclef.core.runfiles import atomic_save_arrays, atomic_write_text
from conceptclef.data.cache import ImageCache
from conceptclef.data.demo import make_demo_dataset
from conceptclef.data.submission import write_submission
from conceptclef.pipeline.run.fingerprint import DataFingerprint, check_data_unchanged
from conceptclef.pipeline.image_sets import load_training_sets
from conceptclef.pipeline.errors import RunDirectoryError
from conceptclef.pipeline.run.lock import run_lock
from test_reliability_inputs import data, pristine  # noqa: F401 - the same small demo dataset and its fresh copies

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


@pytest.fixture()
def read_only(tmp_path: Path):
    """Make folders read-only (0555) for the test; they are made writable again for clean-up."""
    folders: list[Path] = []

    def make(folder: Path) -> Path:
        for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
            path.chmod(0o555)
            folders.append(path)
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)


def _cli(*args: object) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), *[str(arg) for arg in args]]


def run_with_file_permissions(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run so that file modes apply: as root, without the capabilities that bypass them.

    Root ignores read-only modes through CAP_DAC_OVERRIDE (and CAP_DAC_READ_SEARCH); dropping them
    from the bounding set before exec makes the child a root that file modes do stop.
    """

    def drop_permission_override() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    preexec = drop_permission_override if os.geteuid() == 0 else None
    return subprocess.run(command, preexec_fn=preexec, capture_output=True, text=True, timeout=timeout)


def _fingerprint(data: Path) -> DataFingerprint:
    config = load_config(TEST_CONFIG)
    train, valid = load_training_sets(data, config)
    return DataFingerprint.of(data, train, valid)


def _relabel_first_valid_image(data: Path) -> str:
    """Give the first validation image another concept already in the vocabulary (same vocabulary)."""
    path = data / "valid_concepts.csv"
    lines = path.read_text().splitlines()
    image_id, cuis = lines[0].split("\t")
    other = next(line.split("\t")[1].split(";")[0] for line in lines[1:] if line.split("\t")[1].split(";")[0] not in cuis)
    lines[0] = f"{image_id}\t{other}"
    path.write_text("\n".join(lines) + "\n")
    return image_id


# ---------------------------------------------------------------- 1. data fingerprint


def test_unchanged_data_give_the_same_fingerprint(data, tmp_path):
    first = _fingerprint(data)
    assert first.differences(_fingerprint(data)) == []
    first.save(tmp_path / "data.json")
    assert DataFingerprint.load(tmp_path / "data.json").differences(first) == []


def test_relabelled_validation_image_is_named(data, tmp_path):
    check_data_unchanged(tmp_path, _fingerprint(data), resuming=False)
    image_id = _relabel_first_valid_image(data)
    with pytest.raises(RunDirectoryError) as error:
        check_data_unchanged(tmp_path, _fingerprint(data), resuming=True)
    message = str(error.value)
    assert f"valid: 1 image(s) relabelled ({image_id})" in message
    assert re.search(r"valid concept file \S*valid_concepts.csv changed: the labels of 1 image\(s\)", message) and "new --out" in message
    assert "train:" not in message


def test_added_image_is_named_with_its_split(data, tmp_path):
    before = _fingerprint(data)
    source = next((data / "train").rglob("*.jpg"))
    shutil.copy(source, source.with_name("extra_image.jpg"))
    with open(data / "train_concepts.csv", "a") as stream:
        stream.write("extra_image\tC0040405\n")
    changes = before.differences(_fingerprint(data))
    assert "train: 1 image(s) added (extra_image)" in changes
    assert not any(change.startswith("valid:") for change in changes)


def test_other_data_folder_is_named_unless_it_is_the_same_data_moved(data, tmp_path):
    before = _fingerprint(data)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved, copy_function=shutil.copy2)  # keeps mtimes: the same files
    assert before.differences(_fingerprint(moved)) == []
    other = tmp_path / "other"
    make_demo_dataset(other, n_train=70, n_valid=35, n_test=10, seed=1, image_size=48)
    changes = before.differences(_fingerprint(other))
    assert any(change.startswith("train: ") for change in changes), changes
    assert changes[-1] == f"data folder was {data.resolve()}, now {other.resolve()}"


def test_touched_image_file_is_a_change(data):
    before = _fingerprint(data)
    image = next((data / "valid").rglob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")
    changes = before.differences(_fingerprint(data))
    assert changes == [f"valid: 1 image(s) with a changed file (size or modification time) ({image.stem})"]


# ---------------------------------------------------------------- 5. filesystem problems


def test_out_that_is_a_file_is_one_line_before_any_work(data, tmp_path):
    out = tmp_path / "run.txt"
    out.write_text("not a run\n")
    result = run_cli("train-all", "--data", data, "--out", out, "--config", TEST_CONFIG)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {out}: --out is a file, not a run directory; choose a folder (new or a run to resume)"
    assert out.read_text() == "not a run\n"
    assert not (data / ".cache").exists()


def test_validation_category_unseen_in_training_is_refused_before_training(data, tmp_path):
    (data / "valid" / "DRCT").rename(data / "valid" / "DRNEW")
    run = tmp_path / "run"
    result = run_cli("train-all", "--data", data, "--out", run, "--config", TEST_CONFIG)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1]
    assert errors[0].startswith(f"error: {data / 'valid' / 'DRNEW'}/") and "validation category DRNEW" in errors[0]
    assert "has no training images" in errors[0] and "Traceback" not in result.output
    assert not (run / "router").exists()


@pytest.mark.slow  # starts conceptclef in subprocesses
def test_read_only_output_folder_is_one_line(data, tmp_path, read_only):
    (tmp_path / "read-only").mkdir()
    parent = read_only(tmp_path / "read-only")
    out = parent / "run"
    result = run_with_file_permissions(_cli("train-all", "--data", data, "--out", out, "--config", TEST_CONFIG))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {out}: cannot write the run directory (Permission denied); choose a writable --out"
    assert not out.exists() and not (data / ".cache").exists()


@pytest.mark.slow  # starts conceptclef in subprocesses
def test_read_only_data_folder_caches_inside_the_run(data, tmp_path, read_only):
    """DATA/.cache cannot be made: the images are cached in RUN/cache instead of failing."""
    read_only(data)
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from conceptclef.core.config import load_config
        from conceptclef.pipeline.image_sets import load_training_sets
        from conceptclef.pipeline.run.directory import image_cache_dir
        from conceptclef.pipeline.run.layout import RunLayout
        config = load_config({str(TEST_CONFIG)!r})
        cache = image_cache_dir(Path({str(data)!r}), config, RunLayout(Path({str(run)!r})))
        train, valid = load_training_sets(Path({str(data)!r}), config, cache)
        print(cache, len(train.records), len(valid.records))
        """
    )
    result = run_with_file_permissions([sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(run / "cache"), "70", "35"]
    assert "is not writable (Permission denied)" in result.stderr
    assert not (data / ".cache").exists()
    assert len(list((run / "cache").glob("images-*.npy"))) == 2


# ---------------------------------------------------------------- 8. run lock


_HOLD_LOCK = """
import sys, time
from conceptclef.pipeline.run.lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.slow  # starts conceptclef in subprocesses
def test_second_train_all_refuses_while_the_first_holds_the_run(data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            _cli("train-all", "--data", data, "--out", run, "--config", TEST_CONFIG), capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 2
        assert f"another train-all (pid {holder.pid}) is using this run directory" in second.stderr
        assert "wait for it to finish, or use another --out" in second.stderr
        assert sorted(path.name for path in run.iterdir()) == [".lock"]  # nothing written by the second
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock: the next process gets it although .lock remains.
    assert (run / ".lock").exists()
    with run_lock(run):
        assert (run / ".lock").read_bytes() == b""


def test_lock_is_released_after_an_error_in_the_block(tmp_path):
    with pytest.raises(ValueError):
        with run_lock(tmp_path / "run"):
            raise ValueError("stage failed")
    with run_lock(tmp_path / "run"):
        pass


# ---------------------------------------------------------------- 9. umask


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(umask, expected, tmp_path, real_radiology_images):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "run" / "config.toml", "seed = 0\n")
        atomic_save_arrays(tmp_path / "run" / "features.npz", rows=np.zeros((2, 3), np.float32))
        write_submission(tmp_path / "submission.tsv", {"img1": ["C0040405"]})
        images = [real_radiology_images["ct_gray_jpeg"], real_radiology_images["us_rgb_jpeg"]]
        cached = ImageCache(tmp_path / "cache", workers=1).image_array(images, 32, progress=False)
    finally:
        os.umask(previous)
    written = [
        tmp_path / "run" / "config.toml",
        tmp_path / "run" / "features.npz",
        tmp_path / "submission.tsv",
        cached.path,
        cached.path.with_suffix(".json"),
    ]
    assert {str(path): stat.S_IMODE(path.stat().st_mode) for path in written} == {str(path): expected for path in written}


# ---------------------------------------------------------------- 10. leftovers and SIGTERM


_SLOW_CACHE = """
import sys, time
from pathlib import Path
import conceptclef.data.cache as cache_module
decode = cache_module.load_resized_array
def slow(path, size):
    time.sleep(0.05)
    return decode(path, size)
cache_module.load_resized_array = slow
images = sorted(Path(sys.argv[2]).rglob("*.jpg"))
cache_module.ImageCache(sys.argv[1], workers=1).image_array(images, 32, progress=False)
"""


def _start_slow_caching(cache_dir: Path, data: Path) -> tuple[subprocess.Popen, Path]:
    """A process building an image cache slowly; returns it and its temporary file once it exists."""
    process = subprocess.Popen([sys.executable, "-c", _SLOW_CACHE, str(cache_dir), str(data)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        partials = list(cache_dir.glob(".*.partial"))
        if partials:
            return process, partials[0]
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the caching process never created its temporary file")


def test_next_cache_build_removes_a_killed_builds_temporary_file(data, tmp_path):
    cache_dir = tmp_path / "cache"
    process, partial = _start_slow_caching(cache_dir, data)
    process.kill()
    process.wait()
    assert partial.exists()  # SIGKILL: nothing could clean up
    images = sorted(data.rglob("*.jpg"))
    cached = ImageCache(cache_dir, workers=1).image_array(images, 32, progress=False)
    assert not partial.exists()
    assert len(cached) == len(images)
    assert list(cache_dir.glob(".*.partial")) == []


def test_a_live_writers_temporary_file_is_kept(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        name = create_partial(tmp_path / "images.npy")[1].name.split(f"-{os.getpid()}.")
        theirs = tmp_path / f"{name[0]}-{live.pid}.{name[1]}"
        theirs.write_bytes(b"half")
        assert remove_leftover_partials(tmp_path) == []
        assert theirs.exists()
    finally:
        live.kill()
        live.wait()
    assert remove_leftover_partials(tmp_path) == [theirs]
    assert len(list(tmp_path.glob(".*.partial"))) == 1  # this process's own file stays


def test_taking_the_run_lock_removes_dead_writers_files_in_the_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "run" / "global").mkdir(parents=True)
    own = create_partial(tmp_path / "run" / "global" / "checkpoint.pt")[1]
    leftover = own.with_name(own.name.replace(f"-{os.getpid()}.", f"-{pid}."))
    os.rename(own, leftover)
    with run_lock(tmp_path / "run"):
        assert not leftover.exists()


@pytest.mark.slow  # starts conceptclef in subprocesses
def test_sigterm_ends_train_all_cleanly_without_leftovers(data, tmp_path):
    """SIGTERM while train-all caches images: one error line, exit 143, no temporary file left."""
    run = tmp_path / "run"
    launcher = (
        "import sys, time\n"
        "import conceptclef.data.cache as cache_module\n"
        "decode = cache_module.load_resized_array\n"
        "cache_module.load_resized_array = lambda path, size: (time.sleep(0.05), decode(path, size))[1]\n"
        "from conceptclef.cli import app\n"
        "sys.argv[0] = 'conceptclef'\n"
        "app()\n"
    )
    command = [sys.executable, "-c", launcher, "train-all", "--data", str(data), "--out", str(run), "--config", str(TEST_CONFIG)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((data / ".cache").glob(".*.partial")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((data / ".cache").glob(".*.partial")), "train-all never started caching"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1] == "error: stopped by SIGTERM; the finished files are kept: rerun the same command to resume"
    assert list((data / ".cache").glob(".*.partial")) == []
    assert list(run.rglob(".*.partial")) == []


def test_a_concept_file_whose_bytes_alone_changed_says_so(data, tmp_path):
    check_data_unchanged(tmp_path, _fingerprint(data), resuming=False)
    path = data / "valid_concepts.csv"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(RunDirectoryError) as error:
        check_data_unchanged(tmp_path, _fingerprint(data), resuming=True)
    message = str(error.value)
    assert re.search(
        r"valid concept file \S*valid_concepts.csv changed: only its bytes \(line endings, spacing or quoting\); "
        r"the labels and their order are the same",
        message,
    ), message
    assert " -> " not in message
