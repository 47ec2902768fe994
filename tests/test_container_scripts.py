"""build.sh, test.sh and export.sh, run with a stand-in ``docker`` first on PATH.

The stand-in logs each call's arguments as one JSON line. For ``run`` it copies a prepared result
file into the folder mounted at /output, for ``save`` it writes a few bytes, and for ``info`` it
prints ``FAKE_DOCKER_INFO``. A stand-in ``nvidia-smi`` fails unless a test makes it succeed, so the
GPU checks do not depend on the machine running the tests.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULT_NAME = "multiple-mitotic-figure-classification.json"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the container scripts need bash")

STAND_IN_DOCKER = """#!{python}
import json, os, shutil, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")

# The first word that is not a flag is the subcommand, because global flags such as --log-level=debug come first.
command = next((arg for arg in args if not arg.startswith("-")), None)
if command == "info":
    print(os.environ.get("FAKE_DOCKER_INFO", "Runtimes: io.containerd.runc.v2 runc"))
elif command == "run" and os.environ.get("FAKE_RUN_RESULT"):
    for flag, value in zip(args, args[1:]):
        if flag in ("--volume", "-v") and value.split(":")[1] == "/output":
            shutil.copy(os.environ["FAKE_RUN_RESULT"], Path(value.split(":")[0]) / "{result_name}")
elif command == "save":
    sys.stdout.buffer.write(b"stand-in image archive\\n")
sys.exit(int(os.environ.get("FAKE_DOCKER_EXIT", "0")))
"""

SCRIPT_VARIABLES = ("DOCKER", "IMAGE", "BASE_IMAGE", "DOCKER_BUILD_ARGS", "DOCKER_RUN_ARGS", "INPUT_DIR", "EXPECTED",
                    "OUTPUT_DIR", "MODEL_DIR", "GPUS", "WEIGHTS_DIR", "EXPORT_DIR")


def write_executable(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    write_executable(folder / "docker", STAND_IN_DOCKER.format(python=sys.executable, result_name=RESULT_NAME))
    write_executable(folder / "nvidia-smi", "#!/bin/sh\nexit 1\n")
    return folder


@pytest.fixture
def run_script(tmp_path: Path, bin_dir: Path):
    """Return a function that runs one of the scripts with the stand-ins and extra environment."""
    log = tmp_path / "docker.log"

    def run(script: str, **env_updates: str) -> subprocess.CompletedProcess:
        env = {key: value for key, value in os.environ.items() if key not in SCRIPT_VARIABLES}
        env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_DOCKER_LOG=str(log), **env_updates)
        return subprocess.run(["bash", str(ROOT / script)], env=env, capture_output=True, text=True, timeout=60)

    return run


def docker_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "docker.log"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def calls_of(tmp_path: Path, command: str) -> list[list[str]]:
    return [args for args in docker_calls(tmp_path) if command in args]


def write_result(path: Path, pages: list[tuple[str, float]]) -> Path:
    path.write_text(json.dumps([{"class": name, "confidence": confidence} for name, confidence in pages]), encoding="utf-8")
    return path


EXPECTED_PAGES = [("normal", 0.12), ("atypical", 0.81), ("normal", 0.40), ("atypical", 0.66)]


@pytest.fixture
def sample(tmp_path: Path) -> dict[str, str]:
    """Environment for test.sh: an input folder and an expected output with four pages."""
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    expected = write_result(tmp_path / "expected.json", EXPECTED_PAGES)
    return {"INPUT_DIR": str(input_dir), "EXPECTED": str(expected)}


# build.sh

def test_build_default_base(tmp_path, run_script):
    completed = run_script("build.sh")
    assert completed.returncode == 0, completed.stderr
    assert docker_calls(tmp_path) == [["build", "--tag", "midog25-atypical", "."]]


def test_build_forwards_base_image(tmp_path, run_script):
    completed = run_script("build.sh", BASE_IMAGE="localhost/python-bookworm-base", IMAGE="custom:dev")
    assert completed.returncode == 0, completed.stderr
    assert docker_calls(tmp_path) == [
        ["build", "--tag", "custom:dev", "--build-arg", "BASE_IMAGE=localhost/python-bookworm-base", "."]
    ]


def test_build_empty_base_not_forwarded(tmp_path, run_script):
    run_script("build.sh", BASE_IMAGE="")
    assert "--build-arg" not in docker_calls(tmp_path)[0]


def test_build_multiword_docker(tmp_path, run_script):
    completed = run_script("build.sh", DOCKER="docker --log-level=debug", DOCKER_BUILD_ARGS="--network host --pull=never")
    assert completed.returncode == 0, completed.stderr
    assert docker_calls(tmp_path) == [
        ["--log-level=debug", "build", "--tag", "midog25-atypical", "--network", "host", "--pull=never", "."]
    ]


def test_build_failure_propagates(run_script):
    completed = run_script("build.sh", FAKE_DOCKER_EXIT="3")
    assert completed.returncode == 3


# test.sh: the command

def test_run_isolation(tmp_path, run_script, sample):
    completed = run_script("test.sh", FAKE_RUN_RESULT=sample["EXPECTED"], **sample)
    assert completed.returncode == 0, completed.stderr

    [args] = calls_of(tmp_path, "run")
    assert args[args.index("--pull") + 1] == "never"
    assert args[args.index("--network") + 1] == "none"
    assert "--read-only" in args
    assert f"{sample['INPUT_DIR']}:/input:ro" in args
    assert args[args.index("--tmpfs") + 1] == "/tmp"
    assert "--shm-size" in args
    assert "--gpus" not in args
    assert not any(value.endswith(":/opt/ml/model:ro") for value in args)
    assert args[-1] == "midog25-atypical"


def test_run_output_writable(tmp_path, run_script, sample):
    output_dir = tmp_path / "output"
    completed = run_script("test.sh", FAKE_RUN_RESULT=sample["EXPECTED"], OUTPUT_DIR=str(output_dir), **sample)
    assert completed.returncode == 0, completed.stderr
    assert output_dir.stat().st_mode & 0o777 == 0o777
    assert f"{output_dir}:/output" in calls_of(tmp_path, "run")[0]
    assert (output_dir / RESULT_NAME).is_file()


def test_run_default_sample(tmp_path, run_script):
    expected = ROOT / "test" / "expected_output.json"
    completed = run_script("test.sh", FAKE_RUN_RESULT=str(expected))
    assert completed.returncode == 0, completed.stderr
    assert f"{ROOT / 'test' / 'input'}:/input:ro" in calls_of(tmp_path, "run")[0]


def test_run_gpus_with_nvidia_smi(tmp_path, bin_dir, run_script, sample):
    write_executable(bin_dir / "nvidia-smi", "#!/bin/sh\nexit 0\n")
    run_script("test.sh", FAKE_RUN_RESULT=sample["EXPECTED"], **sample)
    args = calls_of(tmp_path, "run")[0]
    assert args[args.index("--gpus") + 1] == "all"


def test_run_gpus_with_nvidia_runtime(tmp_path, run_script, sample):
    run_script("test.sh", FAKE_RUN_RESULT=sample["EXPECTED"], FAKE_DOCKER_INFO="Runtimes: nvidia runc", **sample)
    args = calls_of(tmp_path, "run")[0]
    assert args[args.index("--gpus") + 1] == "all"


def test_run_gpus_none_overrides(tmp_path, bin_dir, run_script, sample):
    write_executable(bin_dir / "nvidia-smi", "#!/bin/sh\nexit 0\n")
    run_script("test.sh", FAKE_RUN_RESULT=sample["EXPECTED"], GPUS="none", **sample)
    assert "--gpus" not in calls_of(tmp_path, "run")[0]


def test_run_invalid_gpus_value(run_script, sample):
    completed = run_script("test.sh", FAKE_RUN_RESULT=sample["EXPECTED"], GPUS="yes", **sample)
    assert completed.returncode != 0
    assert "GPUS must be auto, all or none, got 'yes'" in completed.stderr


def test_run_model_dir_mounted(tmp_path, run_script, sample):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    run_script("test.sh", FAKE_RUN_RESULT=sample["EXPECTED"], MODEL_DIR=str(model_dir), **sample)
    assert f"{model_dir}:/opt/ml/model:ro" in calls_of(tmp_path, "run")[0]


def test_run_extra_args_before_image(tmp_path, run_script, sample):
    run_script("test.sh", FAKE_RUN_RESULT=sample["EXPECTED"], DOCKER_RUN_ARGS="--ulimit nofile=1024:1024", **sample)
    args = calls_of(tmp_path, "run")[0]
    assert args[-3:] == ["--ulimit", "nofile=1024:1024", "midog25-atypical"]


# test.sh: the comparison

def test_compare_matching_output(tmp_path, run_script, sample):
    actual = write_result(tmp_path / "actual.json", [(name, value + 0.0009) for name, value in EXPECTED_PAGES])
    completed = run_script("test.sh", FAKE_RUN_RESULT=str(actual), **sample)
    assert completed.returncode == 0, completed.stderr
    assert "matches" in completed.stderr


MISMATCHES = {
    "class": ([("normal", 0.12), ("atypical", 0.81), ("atypical", 0.40), ("atypical", 0.66)], "page 2: class 'atypical', expected 'normal'"),
    "confidence": ([("normal", 0.12), ("atypical", 0.8115), ("normal", 0.40), ("atypical", 0.66)], "page 1: confidence 0.811500, expected 0.810000"),
    "short": (EXPECTED_PAGES[:3], "3 page(s) in the output, 4 expected"),
    "long": (EXPECTED_PAGES + [("normal", 0.5)], "5 page(s) in the output, 4 expected"),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_compare_mismatch_fails(tmp_path, run_script, sample, case):
    pages, message = MISMATCHES[case]
    actual = write_result(tmp_path / "actual.json", pages)
    completed = run_script("test.sh", FAKE_RUN_RESULT=str(actual), **sample)
    assert completed.returncode == 1
    assert message in completed.stderr


def test_compare_invalid_output(tmp_path, run_script, sample):
    actual = tmp_path / "actual.json"
    actual.write_text('{"class": "normal"}', encoding="utf-8")
    completed = run_script("test.sh", FAKE_RUN_RESULT=str(actual), **sample)
    assert completed.returncode == 1
    assert "expected a JSON list, got dict" in completed.stderr


def test_run_missing_output_fails(run_script, sample):
    completed = run_script("test.sh", **sample)
    assert completed.returncode == 1
    assert f"wrote no {RESULT_NAME}" in completed.stderr


def test_run_container_failure(run_script, sample):
    completed = run_script("test.sh", FAKE_RUN_RESULT=sample["EXPECTED"], FAKE_DOCKER_EXIT="1", **sample)
    assert completed.returncode == 1


# export.sh

@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}", encoding="utf-8")
    (folder / "fold0.safetensors").write_bytes(b"fold 0")
    (folder / ".gitkeep").write_bytes(b"")
    return folder


def test_export_writes_archives(tmp_path, run_script, weights_dir):
    export_dir = tmp_path / "export"
    completed = run_script("export.sh", WEIGHTS_DIR=str(weights_dir), EXPORT_DIR=str(export_dir))
    assert completed.returncode == 0, completed.stderr

    assert calls_of(tmp_path, "save") == [["save", "midog25-atypical"]]
    names = sorted(path.name for path in export_dir.iterdir())
    assert len(names) == 2
    assert re.fullmatch(r"midog25-atypical-\d{8}\.tar\.gz", names[0])
    assert re.fullmatch(r"midog25-atypical-weights-\d{8}\.tar\.gz", names[1])

    assert gzip.decompress((export_dir / names[0]).read_bytes()) == b"stand-in image archive\n"
    with tarfile.open(export_dir / names[1]) as archive:
        assert sorted(archive.getnames()) == ["fold0.safetensors", "manifest.json"]


def test_export_name_from_tagged_image(tmp_path, run_script, weights_dir):
    export_dir = tmp_path / "export"
    run_script("export.sh", WEIGHTS_DIR=str(weights_dir), EXPORT_DIR=str(export_dir), IMAGE="localhost/midog25-atypical:dev")
    assert calls_of(tmp_path, "save") == [["save", "localhost/midog25-atypical:dev"]]
    assert all(path.name.startswith("midog25-atypical-") for path in export_dir.iterdir())


def test_export_requires_manifest(tmp_path, run_script, weights_dir):
    (weights_dir / "manifest.json").unlink()
    export_dir = tmp_path / "export"
    completed = run_script("export.sh", WEIGHTS_DIR=str(weights_dir), EXPORT_DIR=str(export_dir))
    assert completed.returncode == 1
    assert "manifest.json not found" in completed.stderr
    assert not export_dir.exists()


def test_export_failed_save(tmp_path, run_script, weights_dir):
    export_dir = tmp_path / "export"
    completed = run_script("export.sh", WEIGHTS_DIR=str(weights_dir), EXPORT_DIR=str(export_dir), FAKE_DOCKER_EXIT="1")
    assert completed.returncode != 0
    assert list(export_dir.iterdir()) == []


# all scripts

@pytest.mark.parametrize("script", ["build.sh", "test.sh", "export.sh", "test/container-check.sh"])
def test_script_syntax(script):
    completed = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
