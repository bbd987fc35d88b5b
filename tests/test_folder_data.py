"""Image folders as they come (alpha, palettes, 16 bits, EXIF, grayscale), their decoded cache
(built once, reused, invalidated, never half-written, a memory map), and training streamed from
it against training from memory. Every image is generated in tmp_path."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm.config import TrainConfig, preset
from fastddpm.datasets import DatasetError, ImageDataset, decode_image, folder, image_folder, load_dataset
from fastddpm.loader import BatchLoader, gather
from fastddpm.trainer import Trainer

SMALL = dict(steps=4, timesteps=20, batch_size=8, samples=4, nll_images=0, quality_images=0, log_every=1, warmup=2,
             sample_steps=2, device="cpu")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Each test's own cache, out of the home directory."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FASTDDPM_CACHE", str(path))
    return path


def save(path, image, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def rgba_icon(seed=0, size=8):
    """An RGBA image: random colours, the left half fully transparent, the rest opaque."""
    rgba = np.random.default_rng(seed).integers(0, 256, (size, size, 4), dtype=np.uint8)
    rgba[:, : size // 2, 3] = 0
    rgba[:, size // 2 :, 3] = 255
    return rgba


def rgba_folder(root, n, size=8):
    for i in range(n):
        save(root / f"icon{i:03d}.png", Image.fromarray(rgba_icon(i, size), "RGBA"))
    return root


# ---- images as they come ------------------------------------------------------------------------


@pytest.mark.parametrize("background, colour", [("white", (255, 255, 255)), ("black", (0, 0, 0)),
                                                ("#1080ff", (16, 128, 255))])
def test_transparent_pixels_take_the_background_exactly(tmp_path, background, colour):
    rgba = rgba_icon()
    path = save(tmp_path / "icon.png", Image.fromarray(rgba, "RGBA"))
    x = decode_image(path, 8, background).transpose(1, 2, 0)
    assert (x[:, :4] == np.array(colour, np.uint8)).all()  # alpha 0: the background, whatever RGB the file stores
    assert (x[:, 4:] == rgba[:, 4:, :3]).all()  # alpha 255: the pixel


def test_partial_alpha_is_blended_and_gray_alpha_too(tmp_path):
    la = np.stack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 128, np.uint8)], axis=-1)
    path = save(tmp_path / "la.png", Image.fromarray(la, "LA"))
    x = decode_image(path, 4, "white", channels=1)
    assert x.shape == (1, 4, 4) and (np.abs(x.astype(int) - (100 * 128 + 255 * 127) / 255) <= 1).all()


def test_palette_with_transparency_is_composited_without_a_warning(tmp_path):
    image = Image.new("P", (4, 4))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.putdata([0, 1, 2, 0] * 4)
    path = save(tmp_path / "p.png", image, transparency=bytes([255, 0, 255]))  # index 1 transparent
    assert Image.open(path).mode == "P"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when such a palette is converted to RGB
        x = decode_image(path, 4, "black").transpose(1, 2, 0)
    assert (x[:, 0] == [255, 0, 0]).all() and (x[:, 2] == [0, 0, 255]).all()
    assert (x[:, 1] == 0).all()  # the transparent green: the black background


def test_16_bit_samples_scale_to_8_bits(tmp_path):
    wide = np.array([[0, 128, 129, 257 * 128, 32768, 65279, 65535, 1000]] * 8, np.uint16)
    path = save(tmp_path / "g16.png", Image.fromarray(wide))
    assert Image.open(path).mode.startswith("I")  # PIL's own conversion would clip at 255
    x = decode_image(path, 8, channels=1)[0]
    assert x[0].tolist() == [0, 0, 1, 128, 128, 254, 255, 4]  # round(v / 257)
    assert (x == np.round(wide / 257)).all()


def png_16_bit_rgb(path, pixels):
    """A 16-bit RGB PNG written by hand (PIL writes only 16-bit grayscale)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_16_bit_colour_keeps_its_range(tmp_path):
    wide = np.array([[[0, 255, 256], [32767, 32896, 65535]]] * 2, np.uint16)
    x = decode_image(png_16_bit_rgb(tmp_path / "rgb16.png", wide), 2).transpose(1, 2, 0)
    assert (np.abs(x.astype(int) - wide / 257) <= 1).all() and x.max() == 255  # PIL: the high bytes


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # 6 wide, 4 high
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90° clockwise
    path = save(tmp_path / "photo.png", Image.fromarray(pixels), exif=exif)
    x = decode_image(path, 4).transpose(1, 2, 0)
    upright = np.rot90(pixels, -1)  # 4 wide, 6 high: center-cropped to rows 1..4
    assert (x == upright[1:5]).all()


def test_an_all_grayscale_folder_has_one_channel_and_channels_forces(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    save(tmp_path / "a.png", Image.fromarray(gray))
    save(tmp_path / "b.png", Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), "LA"))
    save(tmp_path / "c.png", Image.fromarray(gray.astype(np.uint16) * 257))
    save(tmp_path / "d.jpg", Image.fromarray(gray))
    ds = image_folder(tmp_path, 8)
    assert ds.shape == (1, 8, 8)
    for i in range(3):
        assert (ds.codes[i, 0].numpy() == gray).all()
    as_rgb = image_folder(tmp_path, 8, channels=3)
    assert as_rgb.shape == (3, 8, 8) and all(torch.equal(as_rgb.codes[:, c], ds.codes[:, 0]) for c in range(3))
    colour = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    save(tmp_path / "e.png", Image.fromarray(colour))
    mixed = image_folder(tmp_path, 8)
    assert mixed.shape == (3, 8, 8) and (mixed.codes[4].permute(1, 2, 0).numpy() == colour).all()
    assert (mixed.codes[0].numpy() == gray).all()  # grayscale replicated
    as_gray = image_folder(tmp_path, 8, channels=1)
    assert as_gray.shape == (1, 8, 8)
    assert (as_gray.codes[4, 0].numpy() == np.asarray(Image.fromarray(colour).convert("L"))).all()  # ITU-R 601 luma


def test_mixed_sizes_are_resized_and_center_cropped(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255
    save(tmp_path / "wide.png", Image.fromarray(wide))
    save(tmp_path / "small.png", Image.fromarray(np.full((5, 5, 3), 77, np.uint8)))
    ds = image_folder(tmp_path, 10)
    assert ds.shape == (3, 10, 10) and torch.all(ds.codes[0] == 77) and torch.all(ds.codes[1] == 255)  # small, wide


# ---- the cache ----------------------------------------------------------------------------------


def count_decodes(monkeypatch):
    calls = []
    original = folder.decode_image

    def counted(path, *args, **kwargs):
        calls.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(folder, "decode_image", counted)
    return calls


def test_a_folder_is_decoded_once_and_reused_until_a_file_changes(tmp_path, cache_dir, monkeypatch):
    root = rgba_folder(tmp_path / "icons", 5)
    calls = count_decodes(monkeypatch)
    first = image_folder(root, 8, workers=1)
    assert len(calls) == 5 and len(list(cache_dir.glob("*.json"))) == 1
    again = image_folder(root, 8, workers=1)
    assert len(calls) == 5 and torch.equal(first.codes, again.codes)  # nothing decoded
    index = json.loads(next(cache_dir.glob("*.json")).read_text())
    assert index["shape"] == [5, 3, 8, 8] and index["size"] == 8 and index["background"] == "white"
    assert [entry[0] for entry in index["files"]] == [f"icon{i:03d}.png" for i in range(5)]

    save(root / "icon002.png", Image.fromarray(rgba_icon(99), "RGBA"))
    os.utime(root / "icon002.png", ns=(1, 1))  # another mtime, whatever the clock's resolution
    changed = image_folder(root, 8, workers=1)
    assert len(calls) == 10 and not torch.equal(changed.codes[2], first.codes[2])
    assert torch.equal(changed.codes[3], first.codes[3])
    assert len(list(cache_dir.glob("*.json"))) == 1  # the superseded cache is deleted
    image_folder(root, 8, workers=1, background="black")  # other settings: a cache of its own
    assert len(calls) == 15 and len(list(cache_dir.glob("*.npy"))) == 2


def test_the_parallel_build_equals_the_serial_one(tmp_path):
    root = rgba_folder(tmp_path / "icons", 9)
    save(root / "sub" / "gray.jpg", Image.fromarray(np.full((12, 20), 90, np.uint8)))
    serial = image_folder(root, 8, workers=1, cache_dir=tmp_path / "one")
    parallel = image_folder(root, 8, workers=2, cache_dir=tmp_path / "two")
    assert json.loads(next((tmp_path / "two").glob("*.json")).read_text())["workers"] == 2
    assert torch.equal(serial.codes, parallel.codes)


def test_an_interrupted_build_leaves_no_cache(tmp_path, cache_dir, monkeypatch):
    root = rgba_folder(tmp_path / "icons", 6)
    calls = count_decodes(monkeypatch)
    original = folder.decode_image

    def interrupted(path, *args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(path, *args, **kwargs)

    monkeypatch.setattr(folder, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        image_folder(root, 8, workers=1)
    assert list(cache_dir.iterdir()) == []  # no index, no array, no temporary file
    monkeypatch.undo()
    monkeypatch.setenv("FASTDDPM_CACHE", str(cache_dir))
    assert len(image_folder(root, 8, workers=1)) == 6


def test_a_killed_build_leaves_no_index_and_the_next_run_builds(tmp_path, cache_dir):
    root = rgba_folder(tmp_path / "icons", 6)
    script = f"""
import os
from fastddpm.datasets import folder, image_folder
decode, done = folder.decode_image, []
def killed(*args, **kwargs):
    done.append(1)
    if len(done) == 3:
        os._exit(9)
    return decode(*args, **kwargs)
folder.decode_image = killed
image_folder({str(root)!r}, 8, workers=1)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "FASTDDPM_CACHE": str(cache_dir)})
    assert result.returncode == 9, result.stderr
    assert not list(cache_dir.glob("*.json")) and not list(cache_dir.glob("*.npy"))
    assert len(list(cache_dir.glob("*.tmp"))) == 1  # the dead build's array, never renamed
    ds = image_folder(root, 8, workers=1)
    assert len(ds) == 6 and not list(cache_dir.glob("*.tmp"))  # the next build clears it away


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_the_codes_are_a_memory_map_of_the_cache(tmp_path, cache_dir):
    ds = image_folder(rgba_folder(tmp_path / "icons", 4), 8)
    npy = str(next(cache_dir.glob("*.npy")))
    address = ds.codes.data_ptr()
    with open("/proc/self/maps") as f:
        maps = [line.split() for line in f]
    spans = [[int(a, 16) for a in m[0].split("-")] for m in maps if m[-1] == npy]
    assert any(lo <= address < hi for lo, hi in spans), "the codes are not mapped from the cache file"


def test_under_torchrun_local_rank_0_builds_while_the_others_wait(tmp_path, cache_dir):
    root = rgba_folder(tmp_path / "icons", 6)
    script = tmp_path / "load.py"
    script.write_text(f"""
import os
import time
import torch.distributed as dist
from fastddpm.datasets import folder, image_folder
dist.init_process_group("gloo")
decode, calls = folder.decode_image, []
def slow(*args, **kwargs):  # rank 1 would look for the cache long before rank 0 has built it
    calls.append(1)
    time.sleep(0.2)
    return decode(*args, **kwargs)
folder.decode_image = slow
ds = image_folder({str(root)!r}, 8, workers=1)
os.write(1, f"rank {{dist.get_rank()}} decoded {{len(calls)}}, read {{int(ds.codes.sum())}}\\n".encode())  # one write: lines never interleave
dist.destroy_process_group()
""")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "FASTDDPM_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    total = int(image_folder(root, 8).codes.sum())
    assert lines == [f"rank 0 decoded 6, read {total}", f"rank 1 decoded 0, read {total}"]


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_folders_and_options_are_one_line_errors_naming_them(tmp_path):
    with pytest.raises(DatasetError, match="dataset path does not exist: .*nowhere"):
        image_folder(tmp_path / "nowhere", 8)
    root = rgba_folder(tmp_path / "icons", 3)
    for kwargs, message in (({"background": "grey"}, "background must be white, black or #rrggbb, got 'grey'"),
                            ({"background": "#12345"}, "background must be"),
                            ({"channels": 2}, "channels must be 1, 3 or null"),
                            ({"channels": True}, "channels must be 1, 3 or null")):
        with pytest.raises(ValueError, match=message):
            image_folder(root, 8, **kwargs)
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)
    with pytest.raises(ValueError, match="data_memory_mb must be a non-negative integer"):
        TrainConfig(data_memory_mb=-1)
    with pytest.raises(DatasetError, match="background 'black' applies to image folders only, not to digits"):
        load_dataset("digits", background="black")
    with pytest.raises(DatasetError, match="channels 3 applies to image folders only; digits has 1"):
        load_dataset("digits", channels=3)
    assert load_dataset("digits", channels=1).shape == (1, 8, 8)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_corrupt_or_unreadable_image_is_named(tmp_path, cache_dir, workers):
    root = rgba_folder(tmp_path / "icons", 4)
    bad = root / "icon002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DatasetError, match="cannot read image .*icon002.png") as error:
        image_folder(root, 8, workers=workers)
    assert "\n" not in str(error.value) and not list(cache_dir.glob("*"))
    bad.unlink()
    (root / "gone.png").symlink_to(root / "missing.png")  # listed, unreadable
    with pytest.raises(DatasetError, match="cannot read image .*gone.png"):
        image_folder(root, 8, workers=workers)


# ---- streaming ----------------------------------------------------------------------------------


def test_gather_reads_rows_in_order_and_returns_them_in_the_batch_order():
    codes = torch.arange(10 * 2, dtype=torch.uint8).reshape(10, 2)
    indices = torch.tensor([7, 2, 9, 2, 0])
    assert torch.equal(gather(codes, indices), codes[indices])


def test_the_prefetching_loader_gives_the_batches_the_plain_one_gives():
    codes = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageDataset(codes)
    indices = lambda step: torch.randperm(40, generator=torch.Generator().manual_seed(step))[:8]  # noqa: E731
    plain, ahead = BatchLoader(data, "cpu", indices), BatchLoader(data, "cpu", indices, prefetch=True)
    for step in (0, 1, 2, 3, 7, 8, 2):  # in turn, then out of turn (a resume)
        want = data.tensor()[indices(step)]
        assert torch.equal(plain(step), want) and torch.equal(ahead(step), want)
    ahead.close()


def small(**overrides):
    return preset("digits", **{**SMALL, **overrides})


def losses(run_dir):
    with open(run_dir / "log.csv") as f:
        return [line.split(",")[:2] for line in f.read().splitlines()[1:]]


def test_a_folder_over_the_memory_budget_trains_streamed_as_it_would_from_memory(tmp_path, monkeypatch):
    root = rgba_folder(tmp_path / "icons", 20)  # 20 images, batch 8: 2 batches an epoch, 4 images never drawn
    options = dict(data=str(root), image_size=8, steps=5, hflip=True)
    Trainer(small(**options), tmp_path / "memory").fit()

    def whole(*args):
        raise AssertionError("the streamed run read the whole set")

    monkeypatch.setattr(ImageDataset, "tensor", whole)
    trainer = Trainer(small(**options, data_memory_mb=0), tmp_path / "streamed")
    assert trainer.data is None and isinstance(trainer.loader, BatchLoader)
    trainer.fit()
    assert losses(tmp_path / "streamed") == losses(tmp_path / "memory")  # the same batches, bit for bit
    Trainer(small(**{**options, "steps": 3}, data_memory_mb=0), tmp_path / "resumed").fit()
    Trainer(small(**options, data_memory_mb=0), tmp_path / "resumed", resume=True).fit()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "memory")  # exact resume, across an epoch


def test_fastddpm_train_on_a_folder_of_rgba_pngs_needs_only_data_and_image_size(tmp_path, cache_dir):
    root = rgba_folder(tmp_path / "icons", 8, size=32)
    config = tmp_path / "short.json"
    config.write_text(json.dumps({k: v for k, v in SMALL.items() if k != "device"}))
    env = {**os.environ, "FASTDDPM_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "fastddpm", "train", "--data", str(root), "--image-size", "32",
                             "--steps", "2", "--batch-size", "4", "--config", str(config), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from fastddpm.checkpoint import latest_checkpoint, read_checkpoint

    header, _ = read_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert header["data"]["shape"] == [3, 32, 32] and header["data"]["name"] == f"folder:{root}"
    assert header["train"]["background"] == "white" and header["step"] == 2
    bad = subprocess.run([sys.executable, "-m", "fastddpm", "train", "--data", str(root), "--image-size", "32",
                          "--background", "grey", "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["fastddpm train: error: background must be white, black or #rrggbb, "
                                               "got 'grey'"]
