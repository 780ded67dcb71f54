"""Paths stay inside the root: every way out is refused, on the real path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imgserver.images.paths import OutsideRoot, confine, open_folder


@pytest.fixture
def jail(tmp_path: Path) -> Path:
    """A root inside tmp_path, with a secret file and folder beside it."""
    root = tmp_path / "root"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "cat.jpg").write_bytes(b"x")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "passwd").write_text("secret")
    return Path(os.path.realpath(root))


@pytest.mark.parametrize("raw, expected", [
    ("photos/cat.jpg", "photos/cat.jpg"),
    ("./photos/../photos/cat.jpg", "photos/cat.jpg"),
    ("new/folder/out.png", "new/folder/out.png"),
    ("%2e%2e/x.png", "%2e%2e/x.png"),          # a literal name, not URL-decoded
    ("..foo/x.png", "..foo/x.png"),
    ("photos/..", "."),
])
def test_paths_inside_root_resolve(jail: Path, raw: str, expected: str) -> None:
    assert confine(jail, raw) == (jail / expected).resolve()


def test_paths_absolute_inside_root_is_allowed(jail: Path) -> None:
    assert confine(jail, str(jail / "photos" / "cat.jpg")) == jail / "photos" / "cat.jpg"


@pytest.mark.parametrize("raw", [
    "../secret/passwd",
    "photos/../../secret/passwd",
    "/etc/passwd",
    "/",
    "..",
    "nonexistent/../../x.png",
    "photos/../../root2/x.png",
])
def test_paths_escapes_are_refused(jail: Path, raw: str) -> None:
    with pytest.raises(OutsideRoot, match="outside the root"):
        confine(jail, raw)


def test_paths_sibling_with_common_prefix_is_outside(jail: Path) -> None:
    sibling = jail.parent / (jail.name + "-other")
    sibling.mkdir()
    with pytest.raises(OutsideRoot):
        confine(jail, str(sibling / "x.png"))


def test_paths_symlinked_file_pointing_out_is_refused(jail: Path) -> None:
    (jail / "link.jpg").symlink_to(jail.parent / "secret" / "passwd")
    with pytest.raises(OutsideRoot, match="outside the root"):
        confine(jail, "link.jpg")


def test_paths_symlinked_folder_pointing_out_is_refused(jail: Path) -> None:
    (jail / "out").symlink_to(jail.parent / "secret")
    with pytest.raises(OutsideRoot, match="outside the root"):
        confine(jail, "out/new.png")
    with pytest.raises(OutsideRoot):
        confine(jail, "out/passwd")


def test_paths_symlink_inside_root_is_followed(jail: Path) -> None:
    (jail / "alias").symlink_to(jail / "photos")
    assert confine(jail, "alias/cat.jpg") == jail / "photos" / "cat.jpg"


def test_paths_dangling_symlink_pointing_out_is_refused(jail: Path) -> None:
    (jail / "dangling.png").symlink_to(jail.parent / "secret" / "new.png")
    with pytest.raises(OutsideRoot):
        confine(jail, "dangling.png")


@pytest.mark.parametrize("raw", ["", "a\x00b.png", "a\nb.png", "bad\r.png", "x\x7f.png"])
def test_paths_empty_or_control_characters_are_refused(jail: Path, raw: str) -> None:
    with pytest.raises(OutsideRoot):
        confine(jail, raw)


def test_paths_open_folder_refuses_symlink_swapped_in(jail: Path) -> None:
    target = confine(jail, "photos/cat.jpg")
    os.close(open_folder(jail, target.parent))
    (jail / "photos").rename(jail / "photos-old")
    (jail / "photos").symlink_to(jail.parent / "secret")
    with pytest.raises(OutsideRoot, match="changed after validation"):
        open_folder(jail, target.parent)


def test_paths_open_folder_creates_inside_only(jail: Path) -> None:
    folder = confine(jail, "new/deeper/out.png").parent
    (jail / "new").symlink_to(jail.parent / "secret")  # swapped in after validation
    with pytest.raises(OutsideRoot):
        open_folder(jail, folder, create=True)
    assert sorted(p.name for p in (jail.parent / "secret").iterdir()) == ["passwd"]
    (jail / "new").unlink()
    fd = open_folder(jail, folder, create=True)
    os.close(fd)
    assert (jail / "new" / "deeper").is_dir()


@pytest.mark.parametrize("raw, name", [
    ("x" * 256 + ".png", "x" * 256 + ".png"),
    ("out/" + "é" * 126 + ".png", "é" * 126 + ".png"),       # 126 characters, 256 bytes
    ("photos/" + "d" * 256 + "/cat.png", "d" * 256),
    ("photos/" + "d" * 300 + "/../cat.jpg", "d" * 300),       # the kernel looks it up too
])
def test_paths_name_over_255_bytes_is_refused(jail: Path, raw: str, name: str) -> None:
    size = len(name.encode())
    with pytest.raises(OutsideRoot, match=f"is {size} bytes in UTF-8, more than the 255"):
        confine(jail, raw)


def test_paths_names_of_255_bytes_are_allowed(jail: Path) -> None:
    name = "é" * 125 + "a.png"  # 255 bytes
    assert confine(jail, f"{'f' * 255}/{name}") == jail / ("f" * 255) / name


def test_paths_dangling_symlink_to_a_name_over_255_bytes_is_refused(jail: Path) -> None:
    (jail / "later.png").symlink_to("z" * 300 + ".png")
    with pytest.raises(OutsideRoot, match="'later.png': the name .* is 304 bytes in UTF-8"):
        confine(jail, "later.png")


def test_paths_resolve_as_realpath_does_through_links_files_and_missing_parts(
        jail: Path) -> None:
    # confine looks only at the parts below the root until a symlink or "..": the same
    # answer as os.path.realpath from "/", for every kind of part.
    (jail / "photos" / "deep").mkdir()
    (jail / "rel").symlink_to("photos/deep")
    (jail / "photos" / "up").symlink_to("..")
    (jail / "chain").symlink_to("rel")
    (jail / "absolute").symlink_to(jail / "photos")
    (jail / "loop").symlink_to("loop")
    (jail / "dangling").symlink_to("nowhere/at/all")
    for raw in ["photos/cat.jpg", "photos/cat.jpg/under/a/file", "rel/x.png", "chain/x.png",
                "photos/up/photos/cat.jpg", "absolute/cat.jpg", "dangling/x.png",
                "missing/a/b.png", "photos/deep/../cat.jpg", "photos//./cat.jpg", ".",
                "loop/x.png", str(jail / "rel" / "y.png")]:
        candidate = Path(raw) if Path(raw).is_absolute() else jail / raw
        assert confine(jail, raw) == Path(os.path.realpath(candidate)), raw
