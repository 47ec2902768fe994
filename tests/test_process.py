"""process.py end to end: the output contract, clean failures and the offline, non-root runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import process
from conftest import ROOT, SAMPLE_INPUT, require_data
from model.io import OUTPUT_FILE, SOCKET


def make_input(root: Path, count: int = 4, size: int = 128, name: str = "stack.tiff") -> Path:
    folder = root / "images" / SOCKET
    folder.mkdir(parents=True)
    rng = np.random.default_rng(count)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    images[0].save(folder / name, save_all=True, append_images=images[1:])
    return root


def run_main(input_dir: Path, output_dir: Path, weights: Path, *extra: str) -> int:
    output_dir.mkdir(exist_ok=True)
    return process.main(["--input", str(input_dir), "--output", str(output_dir), "--weights", str(weights), *extra])


def read_output(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / OUTPUT_FILE).read_text())


def test_output_contract(tmp_path, tiny_weights):
    assert run_main(make_input(tmp_path / "in", count=5), tmp_path / "out", tiny_weights) == 0
    result = read_output(tmp_path / "out")
    assert len(result) == 5
    for entry in result:
        assert set(entry) == {"class", "confidence"}
        assert entry["class"] in ("normal", "atypical")
        assert type(entry["confidence"]) is float
        assert 0.0 <= entry["confidence"] <= 1.0


def p_atypical_as_evaluator_reads(entry: dict) -> float:
    """Recover P(atypical) the way the official track-2 evaluator does."""
    return entry["confidence"] if entry["class"] == "atypical" else 1.0 - entry["confidence"]


def test_class_follows_threshold(tmp_path, tiny_weights):
    threshold = json.loads((tiny_weights / "manifest.json").read_text())["threshold"]
    run_main(make_input(tmp_path / "in", count=8), tmp_path / "out", tiny_weights)
    for entry in read_output(tmp_path / "out"):
        assert (entry["class"] == "atypical") == (p_atypical_as_evaluator_reads(entry) >= threshold)


def test_confidence_modes_agree(tmp_path, tiny_weights):
    input_dir = make_input(tmp_path / "in", count=8)
    run_main(input_dir, tmp_path / "class", tiny_weights)
    run_main(input_dir, tmp_path / "atypical", tiny_weights, "--confidence", "atypical")
    by_class = read_output(tmp_path / "class")
    by_atypical = read_output(tmp_path / "atypical")
    assert [e["class"] for e in by_class] == [e["class"] for e in by_atypical]
    for entry, reference in zip(by_class, by_atypical):
        assert abs(p_atypical_as_evaluator_reads(entry) - reference["confidence"]) < 1e-12


def test_normal_confidence_is_complement():
    result = process.build_result([0.2, 0.7], ["normal", "atypical"])
    assert result[0]["confidence"] == pytest.approx(0.8)
    assert result[1]["confidence"] == pytest.approx(0.7)


def test_real_sample_stack(tmp_path, tiny_weights):
    require_data(SAMPLE_INPUT)
    assert run_main(SAMPLE_INPUT, tmp_path / "out", tiny_weights) == 0
    assert len(read_output(tmp_path / "out")) == 16


@pytest.mark.parametrize("size", [96, 256])
def test_other_page_sizes(tmp_path, tiny_weights, size):
    assert run_main(make_input(tmp_path / "in", count=2, size=size), tmp_path / "out", tiny_weights) == 0
    assert len(read_output(tmp_path / "out")) == 2


def test_pages_scored_in_order(tmp_path, tiny_weights):
    input_dir = make_input(tmp_path / "in", count=6)
    run_main(input_dir, tmp_path / "out", tiny_weights)
    forward = [entry["confidence"] for entry in read_output(tmp_path / "out")]

    stack = input_dir / "images" / SOCKET / "stack.tiff"
    with Image.open(stack) as image:
        frames = []
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(image.convert("RGB"))
    frames.reverse()
    frames[0].save(stack, save_all=True, append_images=frames[1:])
    run_main(input_dir, tmp_path / "out", tiny_weights)
    backward = [entry["confidence"] for entry in read_output(tmp_path / "out")]
    np.testing.assert_allclose(backward, forward[::-1], atol=1e-6)


def assert_clean_failure(code: int, output_dir: Path, capsys, message: str) -> None:
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert not (output_dir / OUTPUT_FILE).exists()
    assert error[-1].startswith("error: ")
    assert message in error[-1]
    assert not any(line.startswith("Traceback") for line in error)


def test_empty_folder_fails_cleanly(tmp_path, tiny_weights, capsys):
    (tmp_path / "in" / "images" / SOCKET).mkdir(parents=True)
    code = run_main(tmp_path / "in", tmp_path / "out", tiny_weights)
    assert_clean_failure(code, tmp_path / "out", capsys, "no stack file found")


def test_truncated_stack_fails_cleanly(tmp_path, tiny_weights, capsys):
    input_dir = make_input(tmp_path / "in", count=6)
    stack = input_dir / "images" / SOCKET / "stack.tiff"
    stack.write_bytes(stack.read_bytes()[:5000])
    code = run_main(input_dir, tmp_path / "out", tiny_weights)
    assert_clean_failure(code, tmp_path / "out", capsys, "stack.tiff")


def test_missing_weights_fail_cleanly(tmp_path, capsys):
    code = run_main(make_input(tmp_path / "in"), tmp_path / "out", tmp_path / "no-weights")
    assert_clean_failure(code, tmp_path / "out", capsys, "manifest not found")


def test_unwritable_output_fails_cleanly(tmp_path, tiny_weights, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    code = run_main(make_input(tmp_path / "in"), tmp_path / "out", tiny_weights)
    assert_clean_failure(code, tmp_path / "out", capsys, "not writable")


def test_missing_output_folder_created(tmp_path, tiny_weights):
    code = process.main(["--input", str(make_input(tmp_path / "in")), "--output", str(tmp_path / "new" / "out"),
                         "--weights", str(tiny_weights)])
    assert code == 0
    assert len(read_output(tmp_path / "new" / "out")) == 4


def test_output_path_is_file_fails_cleanly(tmp_path, tiny_weights, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    code = process.main(["--input", str(make_input(tmp_path / "in")), "--output", str(tmp_path / "taken"),
                         "--weights", str(tiny_weights)])
    assert_clean_failure(code, tmp_path / "taken", capsys, "cannot create the output folder")


def test_failed_run_keeps_no_partial_output(tmp_path, tiny_weights, monkeypatch, capsys):
    import model.predict

    def broken(self, pages):
        raise RuntimeError("inference failed")

    monkeypatch.setattr(model.predict.Predictor, "predict", broken)
    code = run_main(make_input(tmp_path / "in"), tmp_path / "out", tiny_weights)
    assert_clean_failure(code, tmp_path / "out", capsys, "inference failed")
    assert list((tmp_path / "out").iterdir()) == []


def test_nan_confidence_rejected():
    with pytest.raises(ValueError, match="invalid prediction"):
        process.build_result([float("nan")], ["normal"])


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def nobody_can_run_process() -> bool:
    """Return True when user nobody can start this interpreter and read process.py."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = f"open({str(ROOT / 'process.py')!r}).close()"
    return subprocess.run([*NOBODY, sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0


def test_subprocess_without_home_as_user(tiny_weights):
    """Run as a separate process with HOME unset and, when the tests run as root, as user nobody.

    A checkout that user nobody cannot reach (inside a private folder) runs the process as root.
    """
    as_nobody = nobody_can_run_process()
    base = Path(tempfile.mkdtemp(prefix="process-user-"))  # outside pytest's private (0700) folder
    try:
        base.chmod(0o755)
        weights = shutil.copytree(tiny_weights, base / "weights")
        input_dir = make_input(base / "in", count=2)
        output_dir = base / "out"
        output_dir.mkdir()
        output_dir.chmod(0o777)
        for path in base.rglob("*"):
            if path != output_dir:
                path.chmod(0o755 if path.is_dir() else 0o644)

        env = {key: value for key, value in os.environ.items() if key != "HOME"}
        command = [sys.executable, str(ROOT / "process.py"), "--input", str(input_dir), "--output", str(output_dir),
                   "--weights", str(weights), "--device", "cpu"]
        if as_nobody:
            command = [*NOBODY, *command]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

        assert completed.returncode == 0, completed.stderr[-2000:]
        assert len(read_output(output_dir)) == 2
        assert "CUDA available" in completed.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
