"""Every command and code snippet of the README runs, at toy sizes.

The scripts run in this process as ``python <script> <args>`` would run them (``runpy`` with ``sys.argv``),
with the README's flags made small. The library snippets run as written, with the tiny model put in
place of SDXL (no weights offline) and few steps; the API snippet against the demo on the tiny model.
"""

import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch

import seg_core
from seg_core import StableDiffusionXLSEGPipeline, shapes

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def readme_commands(script: str) -> list[list[str]]:
    """The arguments of every ``python <script> ...`` command in the README's shell blocks and inline code."""
    text = "\n".join(readme_blocks("bash")).replace("\\\n", " ") + "\n" + "\n".join(re.findall(r"`([^`\n]+)`", README))
    return [shlex.split(m)[2:] for m in re.findall(rf"python {re.escape(script)}[^\n`#(]*", text)]


def run_script(monkeypatch, script: str, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *args])
    runpy.run_path(str(ROOT / script), run_name="__main__")


def load_script(script: str) -> dict:
    return runpy.run_path(str(ROOT / script), run_name="readme_test")


@pytest.mark.parametrize("script", ["scripts/evaluate.py", "scripts/train_embedded.py"])
def test_every_readme_command_line_is_accepted_by_its_script(script):
    commands = readme_commands(script)
    assert commands, f"the README shows no {script} command"
    parse_args = load_script(script)["parse_args"]
    for argv in commands:
        parse_args(argv)  # exits (SystemExit) on an unknown or malformed flag


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 128 features from a handful of images
def test_evaluate_script_writes_both_tables(monkeypatch, tmp_path, capsys):
    # Toy size: 12 captions instead of 84 (the sample grid takes 12 per row), 4 images in Table 1, 1 step.
    monkeypatch.setattr(shapes, "LABELS", shapes.LABELS[:12])
    readme, grid = tmp_path / "README.md", tmp_path / "samples.png"
    run_script(monkeypatch, "scripts/evaluate.py", "--steps", "1", "--unconditional", "4", "--per-prompt", "1",
               "--reference", "16", "--write", str(readme), "--grid", str(grid))
    block = readme.read_text()
    assert "<!-- eval:start -->" in block and "<!-- eval:end -->" in block
    table1, table2 = block.split("Table 2 analogue")
    for row in ("Vanilla", "SAG (s=1.0)", "PAG (s=3.0)", "SEG (sigma=10)", "SEG (sigma=inf)"):
        assert re.search(rf"\| {re.escape(row)} \| \d+\.\d\d \|", table1), row
    for row in ("Vanilla", "SEG (sigma=1)", "SEG (sigma=inf)", "CFG (w=3)", "CFG (w=3) + SEG (sigma=inf)"):
        assert re.search(rf"\| {re.escape(row)} \| \d+\.\d\d \| \d+\.\d%", table2), row
    assert grid.stat().st_size > 0
    assert "Command: `python scripts/evaluate.py --steps 1" in capsys.readouterr().out


def test_train_embedded_script_runs_every_stage_and_resumes(monkeypatch, tmp_path):
    out, classifier = tmp_path / "embedded", tmp_path / "classifier.safetensors"
    toy = ["--out", str(out), "--classifier-out", str(classifier), "--train-images", "32", "--vae-steps", "2",
           "--vae-batch", "4", "--unet-steps", "2", "--unet-batch", "4", "--classifier-steps", "2"]
    run_script(monkeypatch, "scripts/train_embedded.py", *toy)
    run_script(monkeypatch, "scripts/train_embedded.py", *toy, "--stages", "unet", "--resume", "--unet-steps", "1")
    log = json.loads((out / "training_log.json").read_text())
    assert len(log["vae"]) == 2 and len(log["classifier"]) == 2
    assert len(log["unet"]) == 3 and log["unet_resumed_at"] == 2
    assert classifier.stat().st_size > 0 and (out / "training_curve.png").stat().st_size > 0
    pipe = seg_core.load_pipeline(str(out), device="cpu")  # the saved model loads and samples
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a white background", num_inference_steps=1, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_bench_quick_prints_its_summary(monkeypatch, capsys):
    assert ["--quick"] in readme_commands("bench/guidance_cost.py")
    run_script(monkeypatch, "bench/guidance_cost.py", "--quick", "--rounds", "1", "--size", "64", "--threads", "1")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "quick" and summary["size"] == 64
    assert all(value > 0 for key, value in summary.items() if key.endswith("_over_cfg"))
    # Sharing the down blocks saves FLOPs: the exact counts, not timings.
    assert 1.0 < summary["flops_cfg_seg_over_cfg"] < summary["flops_cfg_seg_unshared_over_cfg"] <= 1.5
    # The Compare's UNet time is 25 of its steps (the four methods one after another).
    assert summary["compare_25_steps_s"] > 0


def test_bench_times_only_the_modes_asked_for(monkeypatch, capsys):
    """bench/gpu_compile.sh's stages time a few modes each; ratios of modes left out are left out."""
    run_script(monkeypatch, "bench/guidance_cost.py", "--quick", "--rounds", "1", "--size", "64", "--threads", "1",
               "--modes", "cfg,cfg_seg")
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[2:-1]] == ["cfg", "cfg_seg"]  # the table's rows
    summary = json.loads(lines[-1])
    assert {"cfg_seg_over_cfg", "flops_cfg_seg_over_cfg"} <= set(summary)
    assert not {"cfg_pag_over_cfg", "compare_25_steps_s", "blur_over_attention"} & set(summary)
    with pytest.raises(SystemExit):
        run_script(monkeypatch, "bench/guidance_cost.py", "--quick", "--modes", "cfg,bogus")
    assert "--modes: unknown bogus; the modes are cond, cfg" in capsys.readouterr().err


class QuickPipeline(StableDiffusionXLSEGPipeline):
    """The tiny model standing in for SDXL in the snippets: 2 steps and 64x64 unless told otherwise."""

    def __call__(self, *args, **kwargs):
        for name, value in (("num_inference_steps", 2), ("height", 64), ("width", 64)):
            kwargs.setdefault(name, value)
        return super().__call__(*args, **kwargs)


def test_library_snippets_run(monkeypatch):
    asked = []
    real_load = seg_core.load_pipeline

    def tiny(controlnet=None):
        pipe = QuickPipeline(**real_load("tiny", controlnet=controlnet, device="cpu").components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_pipeline(model="sdxl", controlnet=None, device=None, dtype=None):
        asked.append((model, controlnet))
        return tiny(controlnet)

    def from_pretrained(cls, repo, **kwargs):
        asked.append((repo, kwargs.get("torch_dtype")))
        return tiny()

    monkeypatch.setattr(seg_core, "load_pipeline", load_pipeline)
    monkeypatch.setattr(StableDiffusionXLSEGPipeline, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.chdir(ROOT)
    snippets = [b for b in readme_blocks("python") if "gradio_client" not in b and "load_embedded" not in b]
    assert len(snippets) == 3
    namespace = {}
    for snippet in snippets:
        exec(snippet.replace('.to("cuda")', '.to("cpu")'), namespace)  # noqa: S102
    assert asked == [("stabilityai/stable-diffusion-xl-base-1.0", torch.float16), ("sdxl", None), ("sdxl", "canny")]
    images = [namespace[name] for name in ("image", "vanilla", "sag", "pag", "seg")]
    assert all(image.size == (64, 64) for image in images)


def test_embedded_model_snippet_runs():
    (snippet,) = [b for b in readme_blocks("python") if "load_embedded" in b]
    namespace = {}
    exec(snippet, namespace)  # noqa: S102
    assert namespace["image"].size == (32, 32)


def test_api_snippet_runs_against_the_demo(monkeypatch):
    from app_server import running_demo
    from seg_core.studio import Limits

    _, url = running_demo(Limits(max_steps=2))  # python app.py --model tiny --max-steps 2
    (snippet,) = [b for b in readme_blocks("python") if "gradio_client" in b]
    assert '"http://127.0.0.1:7860/"' in snippet
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(snippet.replace('"http://127.0.0.1:7860/"', repr(url)), namespace)  # noqa: S102
    assert Path(namespace["path"]).exists() and Path(namespace["grid"]).exists()
    assert len(namespace["images"]) == 4


def imported_packages(path: Path) -> set[str]:
    """Top-level modules ``path`` imports, except those guarded by ``except ImportError`` (optional)."""
    import ast

    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_everything_the_code_imports_is_installed_by_the_requirements():
    """A fresh `pip install -r requirements.txt` runs the library, the demo, the scripts and the bench
    (scipy was once missing: scripts/evaluate.py failed on a fresh install)."""
    from importlib.metadata import distribution, packages_distributions

    from packaging.requirements import Requirement

    def closure(names):
        seen, todo = set(), [n.lower().replace("_", "-") for n in names]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for line in distribution(name).requires or []:
                req = Requirement(line)
                if req.marker is None or req.marker.evaluate({"extra": ""}):
                    todo.append(req.name.lower().replace("_", "-"))
        return seen

    listed = [Requirement(line).name for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    installed = closure(listed)
    providers = packages_distributions()
    files = [*ROOT.glob("seg_core/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("bench/*.py"), ROOT / "app.py"]
    local = {"seg_core", "app"}
    missing = {}
    for path in files:
        for module in imported_packages(path) - local - set(sys.stdlib_module_names):
            dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
            if not dists & installed:
                missing.setdefault(module, []).append(path.name)
    assert not missing, f"imported but installed by no requirement in requirements.txt: {missing}"


def test_render_examples_script_writes_what_the_app_reads(monkeypatch, tmp_path):
    assert ["[--model", "M]"] in readme_commands("scripts/render_examples.py")  # `... [--model M]`
    import seg_core.space

    every_example = seg_core.space.example_rows
    monkeypatch.setattr(seg_core.space, "example_rows", lambda *args: every_example(*args)[:2])  # toy size
    out = tmp_path / "examples"
    run_script(monkeypatch, "scripts/render_examples.py", "--model", "tiny", "--out", str(out), "--threads", "1")
    entries = json.loads((out / "examples.json").read_text())
    assert len(entries) == 2 and all((out / entry["grid"]).exists() for entry in entries)
    assert all(len(entry["images"]) == 4 and all((out / name).exists() for name, _ in entry["images"])
               for entry in entries)


def test_compare_cost_bench_prints_its_summary(monkeypatch, capsys):
    # (its --sdxl-cpu-estimate mode times SDXL's full-size mid block, half a minute of CPU: not run here)
    assert ["--model", "embedded", "--threads", "1"] in readme_commands("bench/compare_cost.py")
    run_script(monkeypatch, "bench/compare_cost.py", "--model", "tiny", "--rounds", "1", "--threads", "1")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["compare_seconds"] > 0 and summary["unet_evaluations"] > 0


def test_adapters_eager_cost_bench_prints_its_summary(monkeypatch, capsys):
    assert ["--model", "embedded", "--threads", "1"] in readme_commands("bench/adapters_eager_cost.py")
    run_script(monkeypatch, "bench/adapters_eager_cost.py", "--model", "tiny", "--steps", "1", "--rounds", "1")
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "tiny" and set(summary) >= {"none", "one LoRA"}
    assert all(summary[choice]["chosen_ms"] > 0 and summary[choice]["all_running_ms"] > 0
               for choice in ("none", "one LoRA"))
