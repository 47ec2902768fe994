"""Locate and read the track-2 input stack.

Grand Challenge hands the container one image on the socket ``stacked-histopathology-roi-cropouts``:
a multi-page TIFF (or an MHA volume) whose pages are 128x128 RGB patches centred on a mitotic figure.
This module finds that file under the input folder and turns it into a list of ``(H, W, 3)`` uint8
page arrays. Every failure raises :class:`StackError` with a one-line message naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

SOCKET = "stacked-histopathology-roi-cropouts"
OUTPUT_FILE = "multiple-mitotic-figure-classification.json"
STACK_SUFFIXES = (".tif", ".tiff", ".mha")

# A 128x128 patch has 16,384 pixels; the limit is 1,024 times that. A page that declares more pixels is
# rejected before it is decoded, so a broken or hostile header cannot make the process allocate gigabytes.
MAX_PAGE_PIXELS = 4096 * 4096
MAX_PAGES = 4096


class StackError(Exception):
    """The input folder or stack file is missing, ambiguous, unreadable or invalid."""


def socket_folder(input_dir: Path) -> Path:
    """Return the folder that contains the stack, checking ``inputs.json`` when there is one.

    ``inputs.json`` entries name their socket under ``interface`` or ``socket`` (Grand Challenge has
    written both); entries for other sockets are ignored. Without ``inputs.json`` the socket's folder
    is used directly.
    """
    inputs_json = input_dir / "inputs.json"
    if inputs_json.is_file():
        try:
            entries = json.loads(inputs_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StackError(f"{inputs_json}: invalid JSON ({error})") from None
        if not isinstance(entries, list):
            raise StackError(f"{inputs_json}: expected a JSON list of socket entries, got {type(entries).__name__}")
        slugs = [_entry_slug(entry) for entry in entries]
        if SOCKET not in slugs:
            raise StackError(f"{inputs_json}: no entry for socket '{SOCKET}' (found: {', '.join(map(str, slugs)) or 'none'})")
    return input_dir / "images" / SOCKET


def _entry_slug(entry: object) -> str | None:
    if not isinstance(entry, dict):
        return None
    for key in ("interface", "socket"):
        value = entry.get(key)
        if isinstance(value, dict) and isinstance(value.get("slug"), str):
            return value["slug"]
    return None


def case_inputs(image_name: str) -> list[dict]:
    """Return ``inputs.json`` for one case, in the form Grand Challenge writes for this socket."""
    return [
        {
            "file": None,
            "image": {"name": image_name},
            "value": None,
            "interface": {
                "slug": SOCKET,
                "kind": "Image",
                "super_kind": "Image",
                "relative_path": f"images/{SOCKET}",
                "example_value": None,
            },
        }
    ]


def find_stack(input_dir: Path) -> Path:
    """Return the one stack file (``.tif``, ``.tiff`` or ``.mha``, any letter case) of the socket."""
    folder = socket_folder(Path(input_dir))
    if not folder.is_dir():
        raise StackError(f"{folder}: input folder not found")

    stacks = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in STACK_SUFFIXES)
    if not stacks:
        raise StackError(f"{folder}: no stack file found (expected one of {', '.join(STACK_SUFFIXES)})")
    if len(stacks) > 1:
        raise StackError(f"{folder}: expected one stack file, found {len(stacks)}: {', '.join(p.name for p in stacks)}")
    return stacks[0]


def read_stack(path: Path) -> list[np.ndarray]:
    """Read every page of a stack as an ``(H, W, 3)`` uint8 RGB array, in page order."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        pages = _read_tiff(path)
    else:
        pages = _read_sitk(path)
    if not pages:
        raise StackError(f"{path}: the stack has no pages")
    return pages


def _check_page_size(path: Path, index: int, width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise StackError(f"{path}: page {index} has an invalid size {width}x{height}")
    if width * height > MAX_PAGE_PIXELS:
        raise StackError(
            f"{path}: page {index} declares {width}x{height} pixels, more than the limit of {MAX_PAGE_PIXELS:,}"
        )


def _read_tiff(path: Path) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise StackError(f"{path}: not a readable TIFF image") from None
    except Image.DecompressionBombError:
        raise StackError(f"{path}: page 0 declares more pixels than the limit of {MAX_PAGE_PIXELS:,}") from None
    except (OSError, TypeError, ValueError, KeyError, SyntaxError, struct.error) as error:
        # Pillow raises several types for malformed TIFF headers, e.g. TypeError("Missing dimensions").
        raise StackError(f"{path}: invalid TIFF ({error})") from None

    pages = []
    with image:
        try:
            count = getattr(image, "n_frames", 1)  # walks every page header
        except (OSError, ValueError, SyntaxError, EOFError, TypeError, KeyError, struct.error) as error:
            raise StackError(f"{path}: invalid TIFF page header ({error})") from None
        if count > MAX_PAGES:
            raise StackError(f"{path}: {count} pages, more than the limit of {MAX_PAGES}")
        for index in range(count):
            try:
                image.seek(index)
                _check_page_size(path, index, *image.size)
                image.load()
                if image.mode in _PIL_CONVERT_MODES:
                    pages.append(np.asarray(image.convert("RGB")))
                else:
                    pages.append(to_rgb(np.asarray(image)))
            except StackError:
                raise
            except (OSError, ValueError, SyntaxError, EOFError, TypeError, KeyError, struct.error) as error:
                raise StackError(f"{path}: page {index} cannot be decoded ({error})") from None
    return pages


# Pillow modes whose arrays are not intensities (palette indices, bit planes, other colour spaces).
_PIL_CONVERT_MODES = {"1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _read_sitk(path: Path) -> list[np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if path.suffix.lower() == ".mha":
        reader.SetImageIO("MetaImageIO")  # ITK picks the reader by suffix, and matches ".mha" in lower case only
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise StackError(f"{path}: not a readable image") from None

    size = reader.GetSize()
    if len(size) not in (2, 3):
        raise StackError(f"{path}: expected a 2D image or a 3D stack, got {len(size)} dimensions")
    count = size[2] if len(size) == 3 else 1
    if count > MAX_PAGES:
        raise StackError(f"{path}: {count} pages, more than the limit of {MAX_PAGES}")
    _check_page_size(path, 0, size[0], size[1])

    try:
        array = sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError as error:
        raise StackError(f"{path}: cannot be decoded ({str(error).strip().splitlines()[-1]})") from None

    components = reader.GetNumberOfComponents()
    if len(size) == 2:
        array = array[None]
    if components == 1:
        array = array[..., None]
    return [to_rgb(page) for page in array]


def to_rgb(array: np.ndarray) -> np.ndarray:
    """Convert one page (greyscale, grey + alpha, RGB, RGBA; 8 or 16 bit, or float) to uint8 RGB.

    Alpha is dropped. 16-bit values are scaled to 8 bit; floats in [0, 1] are scaled by 255.
    """
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise StackError(f"unsupported page shape {array.shape}: expected greyscale, RGB or RGBA")

    channels = array.shape[2]
    if channels in (1, 2):
        array = np.repeat(array[..., :1], 3, axis=2)
    else:
        array = array[..., :3]
    return _to_uint8(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise StackError("page contains NaN or infinite values")
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise StackError(f"page values outside 0..65535 ({array.dtype})")
        # uint16 is 16-bit data. Wider integers (Pillow's mode "I") are 16-bit only when they exceed 255.
        if array.dtype.itemsize == 1 or (array.dtype.itemsize > 2 and array.max(initial=0) <= 255):
            return array.astype(np.uint8)
        return np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)
    raise StackError(f"unsupported page data type {array.dtype}")


def fit_page(page: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop a larger page, or pad a smaller one by reflection, to ``size`` x ``size``.

    The figure sits at the page centre, so cropping keeps it and the pixel scale is never changed:
    the model was trained at the challenge's ~0.25 um/px. Reflection padding gives the missing border
    tissue-like texture instead of a black frame.
    """
    height, width = page.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    page = page[top : top + size, left : left + size]

    height, width = page.shape[:2]
    pad_y, pad_x = size - height, size - width
    if pad_y or pad_x:
        mode = "reflect" if min(height, width) > 1 and pad_y < height and pad_x < width else "edge"
        page = np.pad(page, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)), mode=mode)
    return np.ascontiguousarray(page)
