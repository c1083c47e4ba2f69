"""The given image: loading, fitting to multiples of 8, and frames back to uint8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lookback_core.image_prep import fit_to_multiple, image_size, load_image, to_uint8_frames


def save(tmp_path, array: np.ndarray, name: str) -> str:
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return str(path)


def test_load_rgb(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    image = load_image(save(tmp_path, pixels, "rgb.png"))
    assert image.shape == (1, 3, 30, 50) and image.dtype == torch.float32
    np.testing.assert_allclose(image[0].permute(1, 2, 0).numpy() * 255, pixels, atol=1e-3)


def test_load_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 0] = 200  # red, with alpha 0 on the left half and 255 on the right
    pixels[:, 4:, 3] = 255
    image = load_image(save(tmp_path, pixels, "rgba.png"))
    assert image.shape == (1, 3, 8, 8)
    assert torch.allclose(image[0, :, :, :4], torch.ones(3, 8, 4))
    assert torch.allclose(image[0, :, :, 4:], torch.tensor([200 / 255, 0, 0]).view(3, 1, 1).expand(3, 8, 4))


def test_load_grayscale_8_and_16_bit(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    image = load_image(save(tmp_path, gray, "gray.png"))
    assert image.shape == (1, 3, 8, 8)
    assert torch.equal(image[0, 0], image[0, 1]) and torch.equal(image[0, 0], image[0, 2])
    assert torch.allclose(image[0, 0], torch.from_numpy(gray / 255).float())

    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(deep).save(path)
    image = load_image(path)
    assert image.shape == (1, 3, 8, 8)
    assert torch.allclose(image[0, 2], torch.from_numpy(deep / 65535).float(), atol=1e-6)


def test_load_palette_with_transparency(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 4))
    path = tmp_path / "p.gif"
    rgba.save(path)  # GIF: a palette image with a transparent index
    image = load_image(path)
    assert torch.allclose(image[0, :, :4], torch.ones(3, 4, 8))
    assert torch.allclose(image[0, :, 4:], torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 4, 8))


def test_load_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (40, 24), (10, 200, 10)).save(path, exif=exif)
    assert load_image(path).shape == (1, 3, 40, 24)


def test_load_missing_or_broken_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="folder"):
        load_image(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    with pytest.raises(ValueError, match="broken.png"):
        load_image(broken)


def coordinates(b: int, h: int, w: int) -> torch.Tensor:
    """Channel 0 is the row, channel 1 the column (both / 1000), so crops can be located."""
    rows = torch.arange(h).view(h, 1).expand(h, w) / 1000
    cols = torch.arange(w).view(1, w).expand(h, w) / 1000
    return torch.stack([rows, cols, torch.zeros(h, w)]).expand(b, 3, h, w).clone()


def test_not_a_multiple_is_centre_cropped(tmp_path):
    image = coordinates(2, 300, 257)
    out, message = fit_to_multiple(image, width=None, height=None)
    assert out.shape == (2, 3, 296, 256)
    assert message == "image 257x300 is not a multiple of 8; centre-cropped to 256x296"
    assert out[0, 0, 0, 0] * 1000 == pytest.approx(2)  # 4 rows removed, 2 from the top
    assert out[0, 1, 0, 0] * 1000 == pytest.approx(0)  # 1 column removed, from the right


def test_not_a_multiple_resize_mode():
    out, message = fit_to_multiple(torch.rand(1, 3, 100, 70), width=None, height=None, mode="resize")
    assert out.shape == (1, 3, 96, 64)
    assert message == "image 70x100 is not a multiple of 8; resized to 64x96"


def test_already_a_multiple_is_untouched():
    image = torch.rand(1, 3, 64, 128)
    out, message = fit_to_multiple(image, width=None, height=None)
    assert out is image and message is None
    out, message = fit_to_multiple(image, width=128, height=64)
    assert out is image and message is None


def test_target_size_covers_then_centre_crops():
    # thirds of red, green and blue across a 640x480 image
    image = torch.zeros(1, 3, 480, 640)
    for i in range(3):
        image[:, i, :, i * 640 // 3 : (i + 1) * 640 // 3 + (i == 2)] = 1
    out, message = fit_to_multiple(image, width=256, height=256)
    assert out.shape == (1, 3, 256, 256)
    assert message == "image 640x480 resized to 341x256 and centre-cropped to 256x256"
    # aspect kept: the red third is 341/3 = 114 columns wide, (341 - 256) / 2 = 42 of them are cut
    red_columns = int((out[0, 0, 128] > 0.5).sum())
    assert abs(red_columns - (114 - 42)) <= 2
    assert out.min() >= 0 and out.max() <= 1


def test_one_side_given_keeps_the_aspect():
    out, message = fit_to_multiple(torch.rand(1, 3, 480, 640), width=320, height=None)
    assert out.shape == (1, 3, 240, 320)
    assert message == "image 640x480 resized to 320x240"
    out, _ = fit_to_multiple(torch.rand(1, 3, 480, 640), width=None, height=100)
    assert out.shape == (1, 3, 96, 128)  # 133 and 100, rounded down to multiples of 8, then cropped


def test_target_is_rounded_down_to_the_multiple():
    out, _ = fit_to_multiple(torch.rand(1, 3, 300, 300), width=250, height=250)
    assert out.shape == (1, 3, 248, 248)


def test_crop_only_when_the_image_already_covers_the_target():
    image = coordinates(1, 256, 300)
    out, message = fit_to_multiple(image, width=256, height=256)
    assert message == "image 300x256 centre-cropped to 256x256"
    assert torch.equal(out, image[..., 22:278])


def test_resize_mode_stretches_to_the_target():
    out, message = fit_to_multiple(torch.rand(1, 3, 480, 640), width=256, height=256, mode="resize")
    assert out.shape == (1, 3, 256, 256)
    assert message == "image 640x480 resized to 256x256"


def test_resampling_stays_in_range_and_dtype():
    checker = (torch.arange(64).view(8, 8) % 2 == torch.arange(64).view(8, 8) // 8 % 2).float()
    image = checker.repeat(12, 12).expand(1, 3, 96, 96).half()
    out, _ = fit_to_multiple(image, width=200, height=200)
    assert out.dtype == torch.float16 and out.shape == (1, 3, 200, 200)
    assert out.min() >= 0 and out.max() <= 1


def test_too_small_names_the_size():
    with pytest.raises(ValueError, match="image size 40x40 is too small"):
        fit_to_multiple(torch.rand(1, 3, 40, 40), width=None, height=None)
    with pytest.raises(ValueError, match=r"^image size 1x1 \(to multiples of 8: 0x0\) is too small"):
        fit_to_multiple(torch.rand(1, 3, 1, 1), width=None, height=None)
    with pytest.raises(ValueError, match=r"requested size 64x8 \(width=64, height=8, image 640x480\)"):
        fit_to_multiple(torch.rand(1, 3, 480, 640), width=64, height=8)
    out, _ = fit_to_multiple(torch.rand(1, 3, 40, 41), width=None, height=None, min_size=8)
    assert out.shape == (1, 3, 40, 40)


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (torch.rand(3, 64, 64), {}, "image"),
        (torch.rand(1, 4, 64, 64), {}, "image"),
        (np.zeros((1, 3, 64, 64)), {}, "image"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), {}, "image"),
        (torch.rand(1, 3, 64, 64), {"mode": "stretch"}, "mode"),
        (torch.rand(1, 3, 64, 64), {"width": 0}, "width"),
        (torch.rand(1, 3, 64, 64), {"multiple": 0}, "multiple"),
    ],
)
def test_fit_bad_arguments(image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_to_multiple(image, **{"width": None, "height": None, **kwargs})


def test_to_uint8_frames_both_layouts():
    frames = torch.rand(4, 3, 16, 24)
    channels_first = to_uint8_frames(frames)
    channels_last = to_uint8_frames(frames.permute(0, 2, 3, 1))
    assert channels_first.shape == (4, 16, 24, 3) and channels_first.dtype == np.uint8
    np.testing.assert_array_equal(channels_first, channels_last)
    np.testing.assert_array_equal(to_uint8_frames(frames.numpy()), channels_first)


def test_to_uint8_frames_rounds_and_clamps():
    values = torch.tensor([-1.0, 0.0, 0.5 / 255, 0.5, 1.0, 2.0]).view(6, 1, 1, 1).expand(6, 3, 1, 1)
    assert to_uint8_frames(values)[:, 0, 0, 0].tolist() == [0, 0, 1, 128, 255, 255]


def test_to_uint8_frames_bad_input_names_images():
    with pytest.raises(ValueError, match="images"):
        to_uint8_frames(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="images"):
        to_uint8_frames(torch.rand(2, 4, 16, 16))


def test_image_size_reads_the_header_only(tmp_path):
    """The size comes without decoding the pixels: a PNG cut short after its header still gives it
    (decoding it fails), and so does a JPEG turned a quarter by its EXIF."""
    whole = tmp_path / "whole.png"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:100])
    assert image_size(cut) == (300, 200)
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(cut)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = tmp_path / "turned.jpg"
    Image.new("RGB", (40, 24)).save(turned, exif=exif)
    assert image_size(turned) == (24, 40) == tuple(load_image(turned).shape[-1:-3:-1])
