"""book/reproduce.md is executed: every command block of the thesis page, in the page's order, at
``thesis-tiny`` (issue 25), so the page cannot drift from the code again.

The page's own text is parsed (code fences, ``\\`` continuations, shell variables, ``for`` loops)
and each command is sent where it belongs. Only sizes are swapped: ``--preset thesis`` becomes
``thesis-tiny``, every ``evaluate`` scores 2 clips with at most 4 new tokens. The data is the
embedded Italian corpus packed as ``mls_italian_opus.tar.gz``, so the page's ``extract`` and its
``data/mls_italian_opus`` paths run verbatim in a temporary folder.

- ``python -m kdlib ...`` runs through `kdlib.__main__.main` (extract, scan, the five trainings
  chained by ``teacher_from`` / ``init_from``, evaluate, export): the run folders are then checked.
- The papermill commands are checked against the chapters (the notebook exists, each ``-p`` is a
  name of its parameters cell, each run path is one the page's earlier commands make); the same
  chapters run at thesis-tiny in tests/test_notebooks_thesis.py.
- The Python block is compiled and every ``tune.<name>`` it calls exists; ``scripts/gpu_check.py``
  takes the page's arguments (its CPU run is tests/test_gpu_check.py); ``torchrun`` /
  ``accelerate launch`` are tests/test_distributed.py's; the setup lines (clone, make, source,
  ln, mkdir, export) are this test's environment. A command of any other kind fails the test.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import tarfile

import nbformat
import pytest

from conftest import NOTEBOOKS, ROOT

PAGE = ROOT / "book" / "reproduce.md"
SETUP = ("git", "make", "source", "ln", "mkdir", "export", "cd")


def page_blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(bash|python)\n(.*?)```", PAGE.read_text(), re.S)]


def shell_commands(block: str, variables: dict[str, str]) -> list[list[str]]:
    """The block's commands as argument lists: comments dropped, continuations joined, ``NAME=...``
    assignments kept in ``variables`` and expanded, ``for x in ...; do ...; done`` unrolled."""
    text = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        assign = re.fullmatch(r"([A-Z]+)=(.*)", line)
        if assign:
            variables[assign.group(1)] = shlex.split(assign.group(2))[0] if assign.group(2) else ""
            continue
        loop = re.fullmatch(r"for (\w+) in ([^;]+); do (.+); done", line)
        bodies = ([loop.group(3).replace(f"${loop.group(1)}", v) for v in loop.group(2).split()]
                  if loop else [line])
        for body in bodies:
            for part in body.split(" && "):
                for name, value in variables.items():
                    part = re.sub(rf"\${name}\b", value, part)
                commands.append(shlex.split(part))
    return commands


def parameter_names(notebook) -> set[str]:
    nb = nbformat.read(str(notebook), as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    return {n.targets[0].id for n in ast.parse(cell.source).body if isinstance(n, ast.Assign)}


def sized(args: list[str]) -> list[str]:
    """The page's command at thesis-tiny: the preset swapped, evaluations cut to 2 clips."""
    args = ["thesis-tiny" if a == "thesis" and i and args[i - 1] == "--preset" else a for i, a in enumerate(args)]
    if args[0] == "evaluate":
        if "--max-new-tokens" in args:
            args[args.index("--max-new-tokens") + 1] = "4"
        else:
            args += ["--max-new-tokens", "4"]
        args += ["--limit", "2"]
    return args


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder like the page's checkout: ``mls_italian_opus.tar.gz`` (the embedded corpus in MLS
    layout), ``notebooks/``; the page's relative paths resolve here."""
    from kdlib.data import embedded_corpus

    with tarfile.open(tmp_path / "mls_italian_opus.tar.gz", "w:gz") as tar:
        tar.add(embedded_corpus("it"), arcname="mls_italian_opus")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDLIB_PROGRESS", "0")
    return tmp_path


@pytest.mark.notebook
def test_every_command_of_the_page_runs_at_thesis_tiny(workdir, capsys):
    from kdlib.__main__ import build_parser, main
    from kdlib import tune

    variables: dict[str, str] = {}
    ran, checked = [], []
    for kind, block in page_blocks():
        if kind == "python":
            tree = ast.parse(block)  # it compiles, and every tune.<name> it calls exists
            called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Name) and n.value.id == "tune"}
            assert called and all(hasattr(tune, name) for name in called), called - set(dir(tune))
            checked.append("python: tune")
            continue
        for args in shell_commands(block, variables):
            if args[:3] == ["python", "-m", "kdlib"]:
                cli = sized(args[3:])
                assert main(cli) == 0, cli
                ran.append(" ".join(cli[:2]))
            elif "papermill" in args[0]:
                nb_path = next(a for a in args if a.endswith(".ipynb") and a.startswith("notebooks/"))
                notebook = ROOT / nb_path
                assert notebook.exists(), nb_path
                names = {args[i + 1] for i, a in enumerate(args) if a == "-p"}
                assert names <= parameter_names(notebook), (nb_path, names - parameter_names(notebook))
                for i, a in enumerate(args):
                    if a == "-p" and args[i + 1] in ("prev_run", "stage1_run", "stage2_run", "ce_only_run", "run_dir"):
                        # a run the page's chapter 05-07 commands write under their out_dir
                        assert re.fullmatch(r"\.\./runs/thesis_nb/0[567]/(stage[0-3]|ce_only)", args[i + 2]), args[i + 2]
                checked.append(f"papermill {notebook.stem}")
            elif args[:2] == ["python", "scripts/gpu_check.py"]:
                assert (ROOT / args[1]).exists() and '"--out"' in (ROOT / args[1]).read_text()
                checked.append("gpu_check")
            elif args[0] in ("torchrun", "accelerate"):
                assert "kdlib" in args and "train" in args
                checked.append(args[0])
            elif args[0] in SETUP:
                checked.append(args[0])
            else:
                pytest.fail(f"reproduce.md: a command this test does not know how to run: {' '.join(args)}")
    assert build_parser()  # the CLI the page drives
    capsys.readouterr()

    # What the page promises, read from what its commands made
    assert ran.count("train --preset") == 5 and ran.count("evaluate --run-dir") == 6, ran
    assert {"extract", "scan", "export"} <= {r.split()[0] for r in ran}, ran
    assert sum(c.startswith("papermill") for c in checked) == 8, checked
    runs = workdir / "runs" / "thesis"
    summaries = {r: json.loads((runs / r / "summary.json").read_text()) for r in ("s0", "ce_only", "s1", "s2", "s3")}
    for name, summary in summaries.items():
        # fp16 + GradScaler as on the GPU: a first overflowing step may be skipped (the scale halves)
        assert summary["steps"] == 4 and summary["nonfinite_steps"] <= 1, (name, summary)
        assert summary["dev_loss"] is not None and summary["dev_wer"] is not None
        config = json.loads((runs / name / "training_config.json").read_text())
        assert config["preset"] == "thesis-tiny"  # data_root is kept relative to the run folder
        assert (runs / name / config["data_root"]).resolve() == (workdir / "data" / "mls_italian_opus").resolve()
        assert config["amp"] == "fp16" and config["grad_checkpointing"]
    # the preset's own pair (no student override): whisper-small's shape, 3:1 merged frames
    for name in ("ce_only", "s1", "s2", "s3"):
        config = json.loads((runs / name / "training_config.json").read_text())
        assert config["student"] == "tiny-random" and config["student_frame_factor"] == 3, name
        assert summaries[name]["placement"]["teacher"]["dtype"] == "float16"  # as large-v3 loads
    assert summaries["ce_only"]["final_kl"] is None and summaries["s1"]["final_kl"] is not None
    assert summaries["s2"]["final_geo"] is not None
    # stage 0 adapted the teacher's decoder only, without its cross-attention k/v
    trainable0 = json.loads((runs / "s0" / "trainable.json").read_text())["student"]
    assert trainable0 and not any(".encoder." in n or "encoder_attn.k_proj" in n for n in trainable0)
    assert any(".encoder." in n for n in json.loads((runs / "s2" / "trainable.json").read_text())["student"])
    for name in ("s0", "ce_only", "s1", "s2", "s3"):
        metrics = json.loads((runs / name / "metrics_test.json").read_text())
        assert metrics["n_utterances"] == 2 and metrics["wer"] is not None, name
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(runs / "s3" / "merged")
    assert model.config.num_mel_bins == 80 and model.config.vocab_size == 51865  # the student, not the teacher


def test_the_parser_follows_the_shell():
    variables: dict[str, str] = {}
    got = shell_commands('D="--set a=1"\n# note\nfor r in x y; do cmd --run $r $D; done\npython -m kdlib train \\\n'
                         '    --stage 0 $D   # trailing\n', variables)
    assert got == [["cmd", "--run", "x", "--set", "a=1"], ["cmd", "--run", "y", "--set", "a=1"],
                   ["python", "-m", "kdlib", "train", "--stage", "0", "--set", "a=1"]]
    assert sized(["train", "--preset", "thesis", "--stage", "1"])[2] == "thesis-tiny"
    assert sized(["evaluate", "--run-dir", "r"])[-4:] == ["--max-new-tokens", "4", "--limit", "2"]
