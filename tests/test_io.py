"""Finding and reading stacks: every accepted layout and every rejected input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_INPUT, require_data
from model.io import SOCKET, StackError, find_stack, fit_page, read_stack


def random_pages(count: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def write_tiff(path: Path, images: list[Image.Image]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], compression="tiff_deflate")
    return path


def socket_dir(root: Path) -> Path:
    folder = root / "images" / SOCKET
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def inputs_entry(slug: str, key: str = "interface") -> dict:
    return {key: {"slug": slug, "kind": "Image", "relative_path": f"images/{slug}"}, "image": {"name": "x"}}


def huge_page_tiff(path: Path, width: int, height: int) -> Path:
    """Write a valid little-endian TIFF header whose one RGB page declares ``width`` x ``height``."""
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, 8), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, 3),
    ]
    ifd_offset = 16
    data = b"II*\x00" + struct.pack("<I", ifd_offset) + b"\x00" * 8
    data += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        data += struct.pack("<HHII", tag, kind, count, value)
    data += struct.pack("<I", 0)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- accepted inputs


def test_real_sample_reads_16_pages():
    require_data(SAMPLE_INPUT)
    pages = read_stack(find_stack(SAMPLE_INPUT))
    assert len(pages) == 16
    assert all(page.shape == (128, 128, 3) and page.dtype == np.uint8 for page in pages)


@pytest.mark.parametrize("name", ["stack.tif", "stack.TIF", "stack.tiff", "STACK.TIFF"])
def test_tiff_suffix_any_case(tmp_path, name):
    pages = random_pages(3)
    write_tiff(socket_dir(tmp_path) / name, [Image.fromarray(p) for p in pages])
    read = read_stack(find_stack(tmp_path))
    assert len(read) == 3
    np.testing.assert_array_equal(read[2], pages[2])


@pytest.mark.parametrize("count", [1, 40])
def test_page_counts(tmp_path, count):
    write_tiff(socket_dir(tmp_path) / "s.tif", [Image.fromarray(p) for p in random_pages(count)])
    assert len(read_stack(find_stack(tmp_path))) == count


def test_rgba_pages_drop_alpha(tmp_path):
    rgba = np.dstack([random_pages(1)[0], np.full((128, 128), 7, np.uint8)])
    path = write_tiff(tmp_path / "s.tiff", [Image.fromarray(rgba, "RGBA")] * 2)
    pages = read_stack(path)
    np.testing.assert_array_equal(pages[1], rgba[..., :3])


def test_greyscale_page_among_rgb(tmp_path):
    grey = np.arange(128 * 128, dtype=np.uint32).reshape(128, 128).astype(np.uint8)
    images = [Image.fromarray(random_pages(1)[0]), Image.fromarray(grey, "L"), Image.fromarray(random_pages(1)[0])]
    pages = read_stack(write_tiff(tmp_path / "s.tiff", images))
    assert pages[1].shape == (128, 128, 3)
    np.testing.assert_array_equal(pages[1][..., 2], grey)


def test_palette_page_converted(tmp_path):
    palette_image = Image.fromarray(random_pages(1)[0]).convert("P")
    pages = read_stack(write_tiff(tmp_path / "s.tiff", [palette_image]))
    np.testing.assert_array_equal(pages[0], np.asarray(palette_image.convert("RGB")))


def test_16bit_page_scaled_to_8bit(tmp_path):
    values = np.full((128, 128), 65535, np.uint16)
    values[0, 0] = 257 * 10
    pages = read_stack(write_tiff(tmp_path / "s.tiff", [Image.fromarray(values)]))
    assert pages[0][1, 1, 0] == 255
    assert pages[0][0, 0, 0] == 10


@pytest.mark.parametrize("size", [256, 96, 130])
def test_other_page_sizes_fitted(size):
    page = random_pages(1, size)[0]
    fitted = fit_page(page, 128)
    assert fitted.shape == (128, 128, 3)
    if size >= 128:
        offset = (size - 128) // 2
        np.testing.assert_array_equal(fitted, page[offset : offset + 128, offset : offset + 128])
    else:
        np.testing.assert_array_equal(fitted[16:112, 16:112], page)


def test_inputs_json_socket_key(tmp_path):
    (tmp_path / "inputs.json").write_text(json.dumps([inputs_entry(SOCKET, key="socket")]))
    write_tiff(socket_dir(tmp_path) / "s.tif", [Image.fromarray(random_pages(1)[0])])
    assert find_stack(tmp_path).name == "s.tif"


def test_inputs_json_extra_socket(tmp_path):
    entries = [inputs_entry("some-other-socket"), inputs_entry(SOCKET)]
    (tmp_path / "inputs.json").write_text(json.dumps(entries))
    write_tiff(socket_dir(tmp_path) / "s.tif", [Image.fromarray(random_pages(1)[0])])
    assert find_stack(tmp_path).name == "s.tif"


def test_no_inputs_json(tmp_path):
    write_tiff(socket_dir(tmp_path) / "s.tiff", [Image.fromarray(random_pages(1)[0])])
    assert find_stack(tmp_path).name == "s.tiff"


def test_other_files_ignored(tmp_path):
    folder = socket_dir(tmp_path)
    write_tiff(folder / "s.tiff", [Image.fromarray(random_pages(1)[0])])
    (folder / "notes.txt").write_text("not an image")
    assert find_stack(tmp_path).name == "s.tiff"


def test_mha_3d_stack(tmp_path):
    import SimpleITK as sitk

    pages = np.stack(random_pages(5))
    path = socket_dir(tmp_path) / "stack.mha"
    sitk.WriteImage(sitk.GetImageFromArray(pages, isVector=True), str(path))
    read = read_stack(find_stack(tmp_path))
    assert len(read) == 5
    np.testing.assert_array_equal(read[4], pages[4])


def test_mha_single_rgb_image(tmp_path):
    import SimpleITK as sitk

    page = random_pages(1)[0]
    sitk.WriteImage(sitk.GetImageFromArray(page, isVector=True), str(tmp_path / "one.mha"))
    path = (tmp_path / "one.mha").rename(tmp_path / "one.MHA")
    read = read_stack(path)
    assert len(read) == 1
    np.testing.assert_array_equal(read[0], page)


# ---------------------------------------------------------------- rejected inputs


def test_empty_folder_rejected(tmp_path):
    socket_dir(tmp_path)
    with pytest.raises(StackError, match="no stack file found"):
        find_stack(tmp_path)


def test_missing_folder_rejected(tmp_path):
    with pytest.raises(StackError, match="input folder not found"):
        find_stack(tmp_path)


def test_two_stacks_rejected(tmp_path):
    folder = socket_dir(tmp_path)
    for name in ("a.tif", "b.mha"):
        (folder / name).write_bytes(b"x")
    with pytest.raises(StackError, match="expected one stack file, found 2: a.tif, b.mha"):
        find_stack(tmp_path)


def test_inputs_json_without_socket_rejected(tmp_path):
    (tmp_path / "inputs.json").write_text(json.dumps([inputs_entry("another-socket")]))
    with pytest.raises(StackError, match="no entry for socket"):
        find_stack(tmp_path)


def test_invalid_inputs_json_rejected(tmp_path):
    (tmp_path / "inputs.json").write_text("{not json")
    with pytest.raises(StackError, match="invalid JSON"):
        find_stack(tmp_path)


def test_truncated_tiff_rejected(tmp_path):
    path = write_tiff(tmp_path / "s.tiff", [Image.fromarray(p) for p in random_pages(4)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StackError, match="s.tiff"):
        read_stack(path)


def test_text_file_named_tiff_rejected(tmp_path):
    path = tmp_path / "s.tiff"
    path.write_text("this is not an image\n")
    with pytest.raises(StackError, match="not a readable TIFF"):
        read_stack(path)


def test_huge_declared_page_rejected(tmp_path):
    path = huge_page_tiff(tmp_path / "huge.tiff", 30000, 30000)
    with pytest.raises(StackError, match="declares more pixels than the limit"):
        read_stack(path)


def test_text_file_named_mha_rejected(tmp_path):
    path = tmp_path / "s.mha"
    path.write_text("not an image")
    with pytest.raises(StackError, match="s.mha"):
        read_stack(path)


def test_large_declared_page_rejected(tmp_path):
    path = huge_page_tiff(tmp_path / "large.tiff", 5000, 5000)
    with pytest.raises(StackError, match="declares 5000x5000 pixels"):
        read_stack(path)
