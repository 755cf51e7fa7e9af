"""The README's code blocks, run the way a user runs them, with tiny step counts, so a README example that
breaks fails the suite.

Every fenced ``bash``, ``python`` and ``yaml`` block of README.md is one test; the blocks of the file run
in order in one scratch directory (the export block reads the checkpoint an earlier block wrote).
``python -m clip_hvt.X ARGS`` runs in-process as ``python -m`` would (``runpy``); a ``python`` block is
executed; a ``yaml`` block with a ``model:`` section is read as a config file by ``clip_hvt.summary``.

What a test machine cannot do is rewritten to a tiny local equivalent, by the table ``REWRITES`` below
(each with its reason): GPU configs become ``configs/cpu_smoke.yaml``, shard specs on ``/data`` become
the embedded shapes data, training gets a few steps on a small generated set, summaries skip the
timing. A block that cannot run here at all is marked in README.md, just above it, with
``<!-- readme-test: skip REASON -->``; the reason shows as the skip message.
"""
import os
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# (pattern, replacement, why): applied in order to each command line.
REWRITES = [
    (r"configs/gpu\.yaml", "configs/cpu_smoke.yaml", "no GPU here: the same run on the CPU"),
    (r"runs/gpu/", "runs/cpu_smoke/", "the run directory of the rewritten GPU run"),
    (r" --data\.(train|val)_shards '?/data/\S*", "", "no shards on /data here: the embedded shapes data"),
]
TRAIN_TINY = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.enable_progress_bar", "false",
              "--data.shapes.train_samples", "128", "--data.shapes.val_samples", "16",
              "--data.shapes.zeroshot_per_class", "1", "--data.batch_size", "8", "--data.num_workers", "0",
              "--model.model_cfg.vision_cfg.image_size", "64"]
SUMMARY_TINY = ["--steps", "0", "--model.model_cfg.vision_cfg.image_size", "64"]
NOT_RUN = {"pip": "installing: the test runs in the installed environment",
           "pytest": "the test suite itself"}


def blocks():
    """(language, code, skip reason or None, line number) for each fenced block of README.md."""
    text = README.read_text()
    found = []
    for match in re.finditer(r"(?:<!-- readme-test: skip (?P<why>.*?) -->\s*\n)?```(?P<lang>\w+)\n(?P<code>.*?)```",
                             text, re.S):
        line = text[:match.start("lang")].count("\n") + 1
        found.append((match["lang"], match["code"], match["why"], line))
    return found


def commands(code: str) -> list[list[str]]:
    """A bash block's commands as argv lists: continuations joined, comments dropped, ``&&`` split."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        for pattern, replacement, _ in REWRITES:
            line = re.sub(pattern, replacement, line)
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return out


def run_python_module(argv: list[str], shapes: Path) -> None:
    """``python -m clip_hvt.X ARGS`` in-process (what ``python -m`` runs), with the tiny settings added."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("clip_hvt."), f"not a clip_hvt command: {argv}"
    module, args = argv[2], argv[3:]
    if module == "clip_hvt.train":
        args += [*TRAIN_TINY, "--data.shapes.root", str(shapes)]
    elif module == "clip_hvt.summary":
        args += SUMMARY_TINY
    saved = sys.argv
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        assert exc.code in (0, None), f"{' '.join(argv)} exited with: {exc.code}"
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request):
    """One scratch directory for all blocks, holding links to the checkout's configs."""
    failed_before = request.session.testsfailed
    work = tmp_path_factory.mktemp("readme")
    for name in ("configs", "data_scripts", "slurm"):
        (work / name).symlink_to(ROOT / name)
    yield work
    # The blocks leave about 5 GB (checkpoints of 224 px models), and pytest's own clean-up of module
    # directories waits for the end of a green session: removed here when every block passed.
    if request.session.testsfailed == failed_before:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("lang, code, skip, line", blocks(), ids=[f"README.md:{b[3]}" for b in blocks()])
def test_readme_block_runs(lang, code, skip, line, workdir, monkeypatch):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if lang == "python":
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    elif lang == "yaml":
        if "model:" not in code:
            pytest.skip("not a config file")
        config = workdir / f"readme_{line}.yaml"
        config.write_text(code)
        run_python_module(["python", "-m", "clip_hvt.summary", "--config", str(config)], workdir / "shapes")
    elif lang == "bash":
        ran = 0
        for argv in commands(code):
            if argv[0] in NOT_RUN or argv[:3] == ["python", "-m", "pytest"]:
                continue
            run_python_module(argv, workdir / "shapes")
            ran += 1
        if not ran:
            pytest.skip("; ".join(NOT_RUN.values()))
    else:
        pytest.skip(f"a {lang} block is not run")
