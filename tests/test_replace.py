"""Replacing an output never loses the old one; ``python -m export.onnx ckpt.pt`` works as written."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime.bundle import BundleError, load_bundle, staged_output

REPO = Path(__file__).resolve().parents[1]
IMAGES = str(REPO / "examples" / "images")


def make_folder(path: Path, tag: str, files: int = 5) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (path / f"part{i}.txt").write_text(f"{tag} {i}\n")


def complete_version(path: Path, files: int = 5) -> str | None:
    """'old' or 'new' when ``path`` holds one whole version, else None."""
    try:
        texts = [(path / f"part{i}.txt").read_text() for i in range(files)]
    except OSError:
        return None
    tags = {t.split()[0] for t in texts}
    extra = {p.name for p in path.iterdir()} - {f"part{i}.txt" for i in range(files)}
    return tags.pop() if len(tags) == 1 and not extra else None


class Crash(Exception):
    pass


STEPS = ["os.replace#1", "os.replace#2", "exchange", "remove"]


@pytest.mark.parametrize("swap", ["atomic-exchange", "fallback"])
@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_step_leaves_a_complete_folder(tmp_path, monkeypatch, swap, step):
    import runtime.atomic

    out = tmp_path / "bundle"
    make_folder(out, "old")
    calls = {"os.replace": 0}
    real_replace, real_exchange = os.replace, runtime.atomic.exchange

    def replace(a, b):
        calls["os.replace"] += 1
        if step == f"os.replace#{calls['os.replace']}":
            raise Crash(step)
        return real_replace(a, b)

    def exchange(a, b):
        if step == "exchange":
            raise Crash(step)
        return real_exchange(a, b) if swap == "atomic-exchange" else False

    def remove(p):
        if step == "remove":
            raise Crash(step)
        shutil.rmtree(p)

    monkeypatch.setattr(runtime.atomic.os, "replace", replace)
    monkeypatch.setattr(runtime.atomic, "exchange", exchange)
    monkeypatch.setattr(runtime.atomic, "_remove", remove)
    try:
        with staged_output(out, force=True) as tmp:
            make_folder(tmp, "new")
        crashed = False
    except Crash:
        crashed = True
    version = complete_version(out)
    assert version in ("old", "new"), f"no complete folder after a crash at {step}"
    if not crashed:
        assert version == "new"
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "bundle"]
    assert all(".partial" not in n for n in leftovers)  # the staging folder never stays behind
    assert len(leftovers) <= 1  # at most the old folder aside (.bundle.*.old) after a crash while deleting it


KILLER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import runtime.atomic as atomic
    from runtime.bundle import staged_output
    step, out = sys.argv[1], Path(sys.argv[2])
    def die_after(name, fn):
        def wrapped(*a, **k):
            result = fn(*a, **k)
            if step == name:
                os._exit(9)  # a kill: no except, no finally
            return result
        return wrapped
    atomic.exchange = die_after("exchange", atomic.exchange)
    atomic._remove = die_after("remove", atomic._remove)
    with staged_output(out, force=True) as tmp:
        for i in range(5):
            (tmp / f"part{i}.txt").write_text(f"new {i}\\n")
        if step == "staging":
            os._exit(9)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the atomic swap is Linux's renameat2")
@pytest.mark.parametrize("step", ["staging", "exchange", "remove", "none"])
def test_killed_writer_leaves_a_complete_folder(tmp_path, step):
    out = tmp_path / "bundle"
    make_folder(out, "old")
    r = subprocess.run([sys.executable, "-c", KILLER, step, str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == (0 if step == "none" else 9), r.stderr
    assert complete_version(out) == ("old" if step == "staging" else "new")


@pytest.mark.parametrize("swap", ["atomic-exchange", "fallback"])
def test_export_force_never_loses_the_old_bundle(tiny_checkpoint, tiny_bundle, tmp_path, monkeypatch, capsys, swap):
    """The move of the new bundle into place fails (disk full, a crash): the old bundle must still be there, whole.
    It used to be deleted first."""
    from export.onnx import main

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    before = load_bundle(out).manifest["export"]["time"]
    real_replace, failed = os.replace, []

    def replace(a, b):
        if Path(b) == out and not failed:
            failed.append(a)
            raise OSError(28, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    if swap == "fallback":
        try:
            import runtime.atomic
        except ImportError:  # the code before the fix had no swap at all
            pass
        else:
            monkeypatch.setattr(runtime.atomic, "exchange", lambda a, b: False)
    code = main([str(tiny_checkpoint), "-o", str(out), "--force", "--images", IMAGES, "-q"])
    monkeypatch.undo()
    manifest = load_bundle(out).manifest  # a complete bundle in place either way
    if failed:
        assert code == 2 and "No space left" in capsys.readouterr().err
        assert manifest["export"]["time"] == before  # the old one
    else:
        assert code == 0 and swap == "atomic-exchange"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_export_without_output_goes_beside_the_checkpoint(tiny_checkpoint, tmp_path, capsys):
    from export.onnx import main

    ckpt = tmp_path / "models" / "ckpt.pt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_checkpoint, ckpt)
    out = tmp_path / "models" / "ckpt-bundle"
    assert main([str(ckpt), "--images", IMAGES, "--levels", "0,1", "-q"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert load_bundle(out).num_levels == 2
    stamp = load_bundle(out).manifest["export"]["time"]
    assert main([str(ckpt), "--images", IMAGES, "-q"]) == 2  # exists: refused, untouched
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert load_bundle(out).manifest["export"]["time"] == stamp
    assert main([str(ckpt), "--images", IMAGES, "--force", "-q"]) == 0
    assert load_bundle(out).num_levels == 4
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt-bundle", "ckpt.pt"]


def test_promised_command_as_written(tiny_checkpoint, tmp_path):
    """The README's command, in a fresh process, exactly: no -o."""
    shutil.copy(tiny_checkpoint, tmp_path / "ckpt.pt")
    r = subprocess.run([sys.executable, "-m", "export.onnx", "ckpt.pt", "--images", IMAGES, "--levels", "0", "-q"],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert "wrote ckpt-bundle" in r.stdout and (tmp_path / "ckpt-bundle" / "manifest.json").is_file()


def test_output_holding_the_checkpoint_is_refused(tiny_checkpoint, tmp_path, capsys):
    from export.onnx import main

    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    assert main([str(ckpt), "-o", str(tmp_path), "--force", "-q"]) == 2
    assert "holds the checkpoint" in capsys.readouterr().err and ckpt.is_file()


def test_existing_output_refused_before_any_work(tmp_path):
    out = tmp_path / "b"
    make_folder(out, "old")
    with pytest.raises(BundleError, match="already exists"):
        with staged_output(out):
            pass
    assert complete_version(out) == "old"


def test_force_replaces_bundles_only(tiny_checkpoint, tmp_path, capsys):
    """`-o SOMEDIR --force` must never delete a folder that is not a bundle: refused before any work, left as it was."""
    from calibration.quantize import main as quantize
    from export.onnx import main as export

    other = tmp_path / "photos"
    make_folder(other, "mine")
    assert export([str(tiny_checkpoint), "-o", str(other), "--force", "-q"]) == 2
    assert "not a bundle folder" in capsys.readouterr().err and complete_version(other) == "mine"
    demo = REPO / "models" / "waveclip-demo" / "bundle"
    assert quantize([str(demo), "--data", IMAGES, "-o", str(other), "--force", "-q"]) == 2
    assert "not a bundle folder" in capsys.readouterr().err and complete_version(other) == "mine"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep\n")
    with pytest.raises(SystemExit) as exc:  # refused by -o's own check, as argparse errors are
        export([str(tiny_checkpoint), "-o", str(a_file), "--force", "-q"])
    assert exc.value.code == 2 and a_file.read_text() == "keep\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export([str(tiny_checkpoint), "-o", str(empty), "--force", "--images", IMAGES, "-q"]) == 0
    assert load_bundle(empty).num_levels > 0
    assert export([str(tiny_checkpoint), "-o", str(empty), "--force", "--images", IMAGES, "-q"]) == 0  # a bundle
