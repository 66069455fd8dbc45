"""The repository's promises: README's commands are what CI runs; the bundled model loads as SD2 does."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import REPO_ROOT, TINY_MODEL

TINY_MODEL_README = TINY_MODEL / "README.md"


def readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in first_block.splitlines() if line.strip()]


def test_readme_opens_with_install_and_test_commands_that_ci_runs():
    install, test = readme_commands()
    assert install.startswith("pip install torch==") and "-r requirements.txt" in install
    assert "pytest" in test
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert f"python -m {install}" in ci
    assert re.search(rf"^{re.escape(test)}$", ci, re.M)


def test_tiny_model_is_sd2_inpainting_shaped(tiny_pipeline):
    unet = tiny_pipeline.unet
    assert unet.config.in_channels == 9 and unet.config.use_linear_projection
    assert sum("CrossAttn" in b for b in unet.config.down_block_types) == 3
    assert sum("CrossAttn" in b for b in unet.config.up_block_types) == 3
    tokens = tiny_pipeline.tokenizer.tokenize("a photo of sks a metal nut with sks bottle toothbrush")
    assert len(tokens) == 11 and "sks</w>" in tokens


def test_tiny_pipeline_inpaints_end_to_end(tiny_pipeline):
    from PIL import Image

    image = Image.new("RGB", (64, 64), (128, 100, 60))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 40))
    result = tiny_pipeline("A bottle with sks", image=image, mask_image=mask, num_inference_steps=2, height=64, width=64,
                           generator=torch.Generator().manual_seed(0), output_type="np").images
    assert result.shape == (1, 64, 64, 3) and result.min() >= 0 and result.max() <= 1


def test_components_load_per_subfolder(tiny_model_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tiny_model_path, subfolder="tokenizer").model_max_length == 77
    assert CLIPTextModel.from_pretrained(tiny_model_path, subfolder="text_encoder").config.hidden_size == 32
    assert AutoencoderKL.from_pretrained(tiny_model_path, subfolder="vae").config.latent_channels == 4
    assert UNet2DConditionModel.from_pretrained(tiny_model_path, subfolder="unet").config.in_channels == 9
    # what the last UNet pre-training stage trained (scripts/pretrain_tiny_model.py: v-prediction when it ran that stage)
    stages = json.loads((tiny_model_path / "pretraining.json").read_text())["settings"]
    expected = "v_prediction" if stages.get("v_prediction_steps") else "epsilon"
    assert DDPMScheduler.from_pretrained(tiny_model_path, subfolder="scheduler").config.prediction_type == expected


def test_tiny_model_builder_is_deterministic_and_shapes_the_bundled_model(tmp_path, tiny_model_path):
    """make_tiny_model.py gives the same weights twice; the bundled model (those weights, pre-trained by
    pretrain_tiny_model.py) has exactly its architecture and tokenizer."""
    from safetensors.torch import load_file

    from scripts.tiny.model import main as build

    first, second = build(["--output_dir", str(tmp_path / "a")]), build(["--output_dir", str(tmp_path / "b")])
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        fresh, again, bundled = load_file(first / part), load_file(second / part), load_file(tiny_model_path / part)
        assert all(torch.equal(fresh[k], again[k]) for k in fresh), part
        assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in bundled.items()}, part
    for name in ("vocab.json", "merges.txt"):
        assert (first / "tokenizer" / name).read_text() == (tiny_model_path / "tokenizer" / name).read_text()


def test_pretraining_script_writes_a_loadable_pipeline(tmp_path):
    """scripts/pretrain_tiny_model.py (a few steps here): trains, sets the VAE scaling factor, records itself."""
    from diffusers import StableDiffusionInpaintPipeline

    from scripts.tiny.pretrain import main as pretrain

    out = pretrain(["--output_dir", str(tmp_path / "tiny"), "--vae_steps", "2", "--unet_steps", "2", "--colour_vae_steps", "2",
                    "--v_prediction_steps", "2", "--batch_size", "2"])
    pipe = StableDiffusionInpaintPipeline.from_pretrained(out)
    record = json.loads((out / "pretraining.json").read_text())
    assert record["settings"]["unet_steps"] == 2 and record["settings"]["colour_vae_steps"] == 2 and record["latent_std"] > 0
    assert pipe.vae.config.scaling_factor == pytest.approx(1 / record["latent_std"], rel=1e-3)
    assert "python scripts/pretrain_tiny_model.py" in (out / "README.md").read_text()


ENTRY_SCRIPTS = ("train_defectfill", "infer_defectfill", "eval_defectfill", "downstream_defectfill", "app_defectfill",
                  "build_dataset_defectfill", "dataset_mvtec", "attention_processor")
PACKAGE = REPO_ROOT / "defectfill"


def imported_modules(path, full: bool = False) -> set[str]:
    """The modules a file imports (the top-level names, or with `full` the dotted names; `from a import b` also
    counts a.b, which may be a module)."""
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name if full else alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module if full else node.module.split(".")[0])
            if full:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_modules() -> dict[str, set[str]]:
    """{module: the defectfill modules it imports} for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(REPO_ROOT).with_suffix("")
        name = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        modules[name] = {m for m in imported_modules(path, full=True) if m.split(".")[0] == "defectfill"}
    return {name: {m for m in imports if m in modules or m.rsplit(".", 1)[0] in modules} for name, imports in modules.items()}


def closure(modules: dict[str, set[str]], start: str) -> set[str]:
    """Every defectfill module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for imported in modules.get(todo.pop(), ()):
            target = imported if imported in modules else imported.rsplit(".", 1)[0]
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_no_entry_script_imports_another():
    """Scripts share the package, never each other (tests may import them: they are the scripts' users)."""
    sources = [p for p in REPO_ROOT.glob("*.py")] + list((REPO_ROOT / "scripts").rglob("*.py")) + list((REPO_ROOT / "bench").glob("*.py"))
    sources += list(PACKAGE.rglob("*.py"))
    offenders = {p.name: sorted(imported_modules(p) & (set(ENTRY_SCRIPTS) - {p.stem})) for p in sources}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_package_imports_point_one_way():
    """The method, mask, error and attention modules import nothing of ours; synthesis does not need the dataset
    loader; nothing outside the builder and the downstream check imports them."""
    modules = package_modules()
    for leaf in ("defectfill.method", "defectfill.masks", "defectfill.errors", "defectfill.attention"):
        assert modules[leaf] == set(), (leaf, modules[leaf])
    synthesis_needs = closure(modules, "defectfill.painting") | closure(modules, "defectfill.pipelines")
    assert not any(m.startswith("defectfill.data") for m in synthesis_needs), synthesis_needs
    for part in ("defectfill.build", "defectfill.downstream"):
        users = {name for name, imports in modules.items() if not name.startswith(part) and any(m.startswith(part) for m in imports)}
        assert users == set(), (part, users)


def test_the_package_is_the_product_alone():
    """The installed package imports nothing of the clone (the scripts' tooling, the tests, the entry scripts, the
    benchmarks) and finds no file through its own location: the tiny model's tooling lives in scripts/tiny."""
    clone_only = set(ENTRY_SCRIPTS) | {"scripts", "tests", "tiny", "bench"}
    imports = {str(p.relative_to(REPO_ROOT)): sorted(imported_modules(p) & clone_only) for p in PACKAGE.rglob("*.py")}
    assert {name: found for name, found in imports.items() if found} == {}
    located = [str(p.relative_to(REPO_ROOT)) for p in PACKAGE.rglob("*.py") if "__file__" in p.read_text()]
    assert located == []
    assert "package-data" not in (REPO_ROOT / "pyproject.toml").read_text()


def test_no_file_edits_sys_path_and_the_package_imports_from_another_folder(tmp_path):
    import subprocess
    import sys

    edits = [str(p) for p in REPO_ROOT.rglob("*.py") if ".git" not in p.parts and p.name != "test_repo.py"
             and re.search(r"sys\.path\.(insert|append)", p.read_text())]
    assert edits == []
    result = subprocess.run([sys.executable, "-c", "from defectfill import painting; print(painting.__file__)"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_code_and_docs_cite_nothing_a_user_has_not_seen():
    """No issue numbers of this project's tracker, no section names of its internal method notes."""
    files = [p for p in REPO_ROOT.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".toml") and ".git" not in p.parts
             and "outputs" not in p.parts and p.name != "test_repo.py"]
    cited = {str(p.relative_to(REPO_ROOT)) for p in files if re.search(r"issue #\d+|\bSPEC\b", p.read_text())}
    assert cited == set()


def test_every_measured_block_names_the_script_that_writes_it():
    """Figures quoted from a measurement live in `<!-- measured:NAME -->` blocks, and each block is written by a
    script: its name appears in the code that writes it."""
    from scripts.tiny.docs import block_names, read_block

    code = "\n".join(p.read_text() for p in [*PACKAGE.rglob("*.py"), *(REPO_ROOT / "scripts").rglob("*.py")])
    for doc in (REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), TINY_MODEL_README):
        for name in block_names(doc):
            assert read_block(doc, name).strip(), (doc.name, name)
            assert re.search(rf"[\"']{re.escape(name)}[\"']", code), f"no code writes the {name} block of {doc.name}"


def test_readme_speed_ratios_come_from_the_benchmark_results():
    """A speed ratio quoted in the README or docs/ (e.g. 0.77x) is one that bench/RESULTS.md records."""
    pages = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")]
    results = (REPO_ROOT / "bench" / "RESULTS.md").read_text()
    quoted = {figure for page in pages for figure in re.findall(r"\b\d+\.\d+x\b", page.read_text())}
    assert {figure for figure in quoted if figure not in results} == set()
