"""Names from strangers' folders are shown on one line, with nothing that drives a terminal."""

import os

import pytest

from dogkit.text import shown, utf8


@pytest.mark.parametrize("raw, expected", [
    ("Shih-Tzu é 柴犬 🐕", "Shih-Tzu é 柴犬 🐕"),  # ordinary names untouched
    ("two\nlines", "two\\nlines"),
    ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
    ("evil\u202egpj.exe", "evil\\u202egpj.exe"),  # a bidi override would show the name reversed
    ("a\u2028b\rc\td\x7f", "a\\u2028b\\rc\\td\\x7f"),
    (os.fsdecode(b"\xff\xfe.jpg"), "\\xff\\xfe.jpg"),  # bytes that are not UTF-8
    ("no\u00a0break", "no\u00a0break"),
])
def test_shown_escapes_only_what_drives_a_terminal(raw, expected):
    assert shown(raw) == expected
    assert shown(raw).encode("utf-8").decode("utf-8") == expected  # always writable as UTF-8
    assert "\n" not in shown(raw)


def test_utf8_tells_names_the_os_could_not_decode():
    assert utf8("plain.jpg") and utf8("柴犬.jpg")
    assert not utf8(os.fsdecode(b"\xff\xfe.jpg"))
