"""runtime.classify's terminal output: whole result lines above the progress bar, never torn; --json unchanged."""
import json
import os
import shutil
import select
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples" / "images").glob("*.jpg"))
RESULT = " exit level "


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """120 images (hard links to copies of the 4 examples): more than a pipe buffer of result lines."""
    folder = tmp_path_factory.mktemp("many")
    copies = [Path(shutil.copy(p, tmp_path_factory.mktemp("src"))) for p in EXAMPLES]
    for i in range(120):
        src = copies[i % len(copies)]
        os.link(src, folder / f"{i:03d}_{src.name}")
    return folder


def visible_lines(raw: str) -> list[str]:
    """What a terminal shows: each line with carriage returns applied (later text overwrites from column 0)."""
    shown = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        screen: list[str] = []
        for piece in line.split("\r"):
            screen[:len(piece)] = piece
        shown.append("".join(screen).rstrip())
    return shown


def check_lines(lines: list[str], n: int) -> None:
    results = [s for s in lines if RESULT in s]
    assert len(results) == n
    for s in results:  # each result line whole: starts with its image path, no bar text in it
        assert s.startswith(str(REPO)) or s.startswith("/"), s
        assert "img/s" not in s and "%|" not in s, s


def test_results_and_bar_sharing_one_log_are_never_torn(many_images):
    """stdout and stderr into one pipe (``2>&1 | tee log``, CI logs): bar fragments used to land between an image's
    result line and its top-k lines."""
    r = subprocess.run([sys.executable, "-m", "runtime.classify", str(REPO / "models" / "waveclip-demo" / "bundle"),
                        str(many_images), "--top-k", "3"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 0
    lines = r.stdout.decode().split("\n")  # bytes: no newline translation hides a carriage return
    assert not any("\r" in s or "img/s" in s for s in lines), "progress bar text in the log"
    check_lines(lines, 120)
    for i, s in enumerate(lines):  # each result line is followed by its two top-k lines
        if RESULT in s:
            assert lines[i + 1].startswith("    ") and lines[i + 2].startswith("    "), lines[i:i + 3]
    assert lines[-2].startswith("120 images")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty")
def test_results_print_above_the_bar_on_a_terminal(many_images):
    import fcntl
    import pty
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # child: the command on a 120-column terminal
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "runtime.classify",
                                  str(REPO / "models" / "waveclip-demo" / "bundle"), str(many_images), "--top-k", "1"])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    raw = b""
    while select.select([fd], [], [], 120)[0]:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        raw += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    text = raw.decode()
    assert "img/s" in text  # the bar was drawn
    check_lines(visible_lines(text), 120)


def test_json_output_unchanged(many_images):
    r = subprocess.run([sys.executable, "-m", "runtime.classify", str(REPO / "models" / "waveclip-demo" / "bundle"),
                        *map(str, EXAMPLES), "--json", "--top-k", "2"], cwd=REPO, capture_output=True, text=True)
    doc = json.loads(r.stdout)
    assert set(doc) == {"bundle", "backend", "thresholds", "results", "summary"}
    assert [Path(x["image"]).name for x in doc["results"]] == [p.name for p in EXAMPLES]
    assert set(doc["results"][0]) == {"image", "label", "class_name", "score", "margin", "exit_level", "top_k",
                                      "level_ms", "preprocess_ms"}
    assert r.stderr == ""
