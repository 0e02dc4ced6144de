import numpy as np
import pytest
from imagegen import encode, pattern
from PIL import Image

from dogkit.data.images import ImageError, decode_rgb, detect_format, resize_shorter, scaled_size


def test_rgb_jpeg_and_png_decode_to_rgb_in_rgb_order():
    a = pattern()
    out = decode_rgb(encode(a, "PNG"))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, a)  # PNG is lossless: exact, and proves RGB (not BGR) order
    jpeg = decode_rgb(encode(a, "JPEG", quality=95))
    assert np.abs(jpeg.astype(int) - a).mean() < 3


def test_grayscale_cmyk_and_alpha_become_rgb_like_pillow_does():
    a = pattern()
    gray = decode_rgb(encode(a, "JPEG", mode="L"))
    assert gray.shape == (48, 64, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()

    cmyk_bytes = encode(a, "JPEG", mode="CMYK", quality=95)
    via_pillow = np.asarray(Image.open(__import__("io").BytesIO(cmyk_bytes)).convert("RGB")).astype(int)
    assert np.abs(decode_rgb(cmyk_bytes).astype(int) - via_pillow).mean() < 3

    rgba = np.dstack([a, np.zeros((48, 64), np.uint8)])
    rgba[:24, :, 3] = 255  # top half opaque, bottom half fully transparent
    out = decode_rgb(encode(rgba, "PNG"))
    np.testing.assert_array_equal(out[:24], a[:24])
    assert (out[24:] == 255).all()  # transparent pixels composite over white


def test_sixteen_bit_png_is_reduced_to_eight_bits():
    import cv2

    a16 = (pattern().astype(np.uint16) * 257)
    ok, buf = cv2.imencode(".png", a16[..., ::-1])
    assert ok
    np.testing.assert_array_equal(decode_rgb(buf.tobytes()), pattern())


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is a text file pretending to be a JPEG\n", "not an image"),
        (encode(pattern(), "JPEG")[:-300], "truncated JPEG"),
        (encode(pattern(), "PNG")[:-40], "truncated PNG"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100 + b"\xff\xda" + b"\x01" * 50 + b"\xff\xd9", "undecodable JPEG"),
    ],
)
def test_unusable_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(ImageError) as info:
        decode_rgb(data)
    assert info.value.reason.startswith(reason)


def test_format_comes_from_content_not_extension():
    assert detect_format(encode(pattern(), "PNG")[:16]) == "png"
    assert detect_format(encode(pattern(), "JPEG")[:16]) == "jpeg"
    assert detect_format(b"GIF89a" + b"\0" * 10) == "gif"
    assert detect_format(b"hello world, no image") is None


def test_resize_shorter_never_enlarges():
    assert scaled_size(500, 375, 256) == (341, 256)
    assert scaled_size(200, 100, 256) == (200, 100)
    assert resize_shorter(pattern(300, 600), 150).shape == (150, 300, 3)


def test_exif_orientation_turns_images_as_pillow_does():
    """Each of the eight orientations, in each format that carries the tag, against Pillow's exif_transpose."""
    import io

    from imagegen import exif_jpeg
    from PIL import Image, ImageOps

    from dogkit.data.images import decode_rgb, exif_orientation, oriented_size

    stored = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    for fmt in ("PNG", "WEBP", "JPEG"):
        for tag in range(1, 9):
            data = exif_jpeg(stored, tag, fmt)
            assert exif_orientation(data) == tag, (fmt, tag)
            expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB")))
            upright = decode_rgb(data, orientation=True)
            assert upright.shape[:2] == expected.shape[:2] == oriented_size(10, 6, tag)[::-1], (fmt, tag)
            tolerance = 6 if fmt == "JPEG" else 0  # two JPEG decoders
            assert np.abs(upright.astype(int) - expected.astype(int)).max() <= tolerance, (fmt, tag)
            assert decode_rgb(data).shape == (6, 10, 3)  # without orientation: the pixels as stored
    # TIFF is turned by its decoder already; a damaged EXIF block reads as "as stored".
    assert exif_orientation(exif_jpeg(stored, 6, "TIFF")) == 1
    broken = bytearray(exif_jpeg(stored, 6))
    at = broken.index(b"Exif\0\0") + 6
    broken[at:at + 2] = b"XX"  # not a TIFF byte order
    assert exif_orientation(bytes(broken)) == 1 and exif_orientation(b"\xff\xd8\xff\xe1\x00") == 1
