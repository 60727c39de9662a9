"""``python -m export --format timm|torchvision|open_clip``: each export, loaded in a fresh interpreter where manyview
is not importable by the README.md lines the export wrote, gives the ONNX encoder's features (cosine >= 0.9999)
on fixed images through the library's own preprocessing, and texts through its own tokenizer; backbones with no
library equivalent are refused with a pointer to what works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest

from export import fine_tune
from export.fine_tune import ExportMismatch, UnsupportedExport, export_fine_tune, loading_code

MIN_COSINE = 0.9999
TEXTS = ["a photo of a cat", "a red square on a blue background", "zero"]
TINY_TEXT = {"context_length": 16, "width": 32, "heads": 2, "layers": 1}
SIGLIP_CARD = {"objective": "siglip", "logit_scale": 12.5, "logit_bias": -7.0}
TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 1, "vocab_size": 49408},
}

# name -> (format, ModelConfig fields, model card, onnx reference?)
CASES = {
    "vit_registers_timm": ("timm", {"backbone": "vit-micro-cifar", "register_tokens": 1, "vit_pool": "avg"},
                           {"objective": "dino"}, True),
    "resnet10t_timm": ("timm", {"backbone": "timm:resnet10t"}, {"objective": "simclr"}, True),
    "resnet18_cifar_torchvision": ("torchvision", {"backbone": "resnet18-cifar"}, {"objective": "simclr"}, True),
    "siglip_vit_open_clip": ("open_clip", {"backbone": "vit-micro-cifar", "image_projection": 32, "text": TINY_TEXT},
                             SIGLIP_CARD, True),
    "clip_resnet10t_open_clip": ("open_clip", {"backbone": "timm:resnet10t", "image_projection": 32,
                                               "text": TINY_TEXT}, {"objective": "clip"}, True),
    # LiT's locked tower has no projection: the text tower maps into the backbone's own pooled feature.
    "lit_resnet10t_open_clip": ("open_clip", {"backbone": "timm:resnet10t", "text": TINY_TEXT},
                                {"objective": "lit", "logit_scale": 10.0}, True),
    # CoCa's ONNX export belongs to the coca work; its reference here is the eager manyview model.
    "coca_open_clip": ("open_clip", {"backbone": "vit-micro-cifar", "coca": TINY_COCA}, {"objective": "coca"}, False),
}


def _images():
    """Fixed PIL images: three at the model's 32 px and one 48x40 that every pipeline resizes and crops alike."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 32, dtype=np.float32)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              np.stack([np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)), np.full((32, 32), 90.0)],
                       axis=-1).astype(np.uint8),
              np.zeros((32, 32, 3), dtype=np.uint8) + np.array([200, 30, 60], dtype=np.uint8),
              rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)]
    return arrays, [Image.fromarray(array) for array in arrays]


def _save(path, fields: dict, card: dict) -> str:
    from trainer.models import save_model
    from trainer.models.embedding import EmbeddingModel, ModelConfig
    from trainer.models.text import TextConfig

    fields = dict(fields)
    if "text" in fields:
        fields["text"] = TextConfig(**fields["text"])
    save_model(EmbeddingModel(ModelConfig(**fields)), str(path), {**card, "steps": 0})
    return str(path)


# Runs in a fresh interpreter: -I -S (no site processing, so manyview's editable install is not on the path) with
# only site-packages appended, cwd a temporary directory; every export is loaded by its README's own lines.
CHILD = textwrap.dedent('''
    import json, re, sys
    sys.path.append(sys.argv[1])
    for name in ("trainer", "export"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"manyview's {name} is importable in the fresh interpreter")
    import numpy as np
    import torch
    from PIL import Image

    jobs = json.loads(open(sys.argv[2]).read())
    arrays = np.load(sys.argv[3])
    images = [Image.fromarray(arrays[f"image{i}"]) for i in range(len(arrays.files))]
    results = {}
    for name, job in jobs.items():
        readme = open(job["folder"] + "/README.md").read()
        namespace = {}
        exec(re.search(r"```python\\n(.*?)```", readme, re.S).group(1), namespace)
        model = namespace["model"]
        with torch.no_grad():
            if job["format"] == "open_clip":
                batch = torch.stack([namespace["preprocess"](image) for image in images])
                image = model.encode_image(batch)
                text = model.encode_text(namespace["tokenizer"](job["texts"]))
                bias = None if getattr(model, "logit_bias", None) is None else float(model.logit_bias)
                results[name] = {"image": image.tolist(), "text": text.tolist(), "class": type(model).__name__,
                                 "logit_scale": float(model.logit_scale.exp()), "logit_bias": bias}
            else:
                batch = torch.stack([namespace["transform"](image) for image in images])
                results[name] = {"image": model(batch).tolist(), "class": type(model).__module__}
    print(json.dumps(results))
''')


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case saved, exported to ONNX and to its format, then loaded once in the fresh interpreter."""
    import torch

    from export.onnx import export_model
    from export.runtime import Encoder
    from trainer.models import load_model
    from trainer.models.text import build_tokenizer

    root = tmp_path_factory.mktemp("fine_tune")
    arrays, images = _images()
    reference, reports, jobs = {}, {}, {}
    for name, (fmt, fields, card, onnx) in CASES.items():
        model_dir = _save(root / name / "model", fields, card)
        folder = str(root / name / fmt)
        reports[name] = export_fine_tune(model_dir, folder, fmt)
        if onnx:
            export_model(model_dir, str(root / name / "onnx"))
            encoder = Encoder(str(root / name / "onnx"), precision="fp32")
            reference[name] = {"image": encoder.encode_images(images)}
            if encoder.has_text:
                reference[name]["text"] = encoder.encode_texts(TEXTS)
        else:  # eager manyview, with manyview's own preprocessing and tokenizer
            from trainer.data.preprocess import Preprocess, preprocess_image

            model, _ = load_model(model_dir)
            spec = Preprocess.of_model(model.config)
            with torch.no_grad():
                pixels = torch.from_numpy(np.stack([preprocess_image(image, spec) for image in images]))
                tokens = torch.as_tensor(np.asarray(build_tokenizer(model.config.text.context_length)(TEXTS)))
                reference[name] = {"image": model.encode_image(pixels).numpy(),
                                   "text": model.encode_text(tokens).numpy()}
        jobs[name] = {"format": fmt, "folder": folder, "texts": TEXTS}
    (root / "jobs.json").write_text(json.dumps(jobs))
    np.savez(root / "images.npz", **{f"image{i}": array for i, array in enumerate(arrays)})
    (root / "child.py").write_text(CHILD)
    work = root / "cwd"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(root / "child.py"), sysconfig.get_paths()["purelib"],
         str(root / "jobs.json"), str(root / "images.npz")],
        cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    return {"reference": reference, "loaded": loaded, "reports": reports, "jobs": jobs}


@pytest.mark.parametrize("name", list(CASES))
def test_fresh_library_load_matches_the_onnx_encoder(exported, name):
    loaded, reference = exported["loaded"][name], exported["reference"][name]
    cosines = _cosines(reference["image"], loaded["image"])
    assert cosines.min() >= MIN_COSINE, (name, cosines)
    if CASES[name][0] == "open_clip":
        text = _cosines(reference["text"], loaded["text"])
        assert text.min() >= MIN_COSINE, (name, text)
    report = exported["reports"][name]
    assert report["feature"] == "embedding"
    assert all(figures["min_cosine"] >= MIN_COSINE for key, figures in report.items() if key in ("image", "text"))


def test_libraries_and_learned_logits(exported):
    loaded = exported["loaded"]
    assert loaded["vit_registers_timm"]["class"].startswith("timm.")
    assert loaded["resnet18_cifar_torchvision"]["class"].startswith("torchvision.")
    assert loaded["siglip_vit_open_clip"]["class"] == "CustomTextCLIP"
    assert loaded["coca_open_clip"]["class"] == "CoCa"
    siglip = loaded["siglip_vit_open_clip"]
    assert siglip["logit_scale"] == pytest.approx(12.5, rel=1e-5)
    assert siglip["logit_bias"] == pytest.approx(-7.0, rel=1e-6)
    clip = loaded["clip_resnet10t_open_clip"]
    assert clip["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5) and clip["logit_bias"] is None


def test_folder_files_permissions_and_readme(exported):
    from safetensors import safe_open

    mask = os.umask(0o022)
    os.umask(mask)
    expected = {"timm": {"config.json"}, "torchvision": set(), "open_clip": {"open_clip_config.json"}}
    for name, job in exported["jobs"].items():
        folder = job["folder"]
        assert set(os.listdir(folder)) == {"README.md", "model.safetensors"} | expected[job["format"]], name
        weights = os.path.join(folder, "model.safetensors")
        assert os.stat(weights).st_mode & 0o777 == 0o666 & ~mask
        with safe_open(weights, "pt") as handle:
            card = json.loads(handle.metadata()["model_card"])
        assert card["objective"] == CASES[name][2]["objective"] and card["model"]["backbone"]
        readme = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
        code = loading_code(readme)
        assert folder in code  # the lines name this folder: the child ran them verbatim
        if job["format"] == "timm":
            assert f'timm.create_model("local-dir:{folder}", pretrained=True)' in code
        if job["format"] == "open_clip":
            assert f'open_clip.create_model_and_transforms("local-dir:{folder}")' in code
    torchvision = loading_code(open(os.path.join(exported["jobs"]["resnet18_cifar_torchvision"]["folder"],
                                                 "README.md"), encoding="utf-8").read())
    assert "stride=1" in torchvision and "model.maxpool = torch.nn.Identity()" in torchvision
    timm_config = json.load(open(os.path.join(exported["jobs"]["vit_registers_timm"]["folder"], "config.json")))
    assert timm_config["num_classes"] == 0
    assert timm_config["model_args"]["reg_tokens"] == 1 and timm_config["model_args"]["global_pool"] == "avg"
    assert timm_config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert timm_config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("fmt,fields,words", [
    ("timm", {"backbone": "cnn-small"}, "no timm equivalent"),
    ("torchvision", {"backbone": "cnn-small"}, "no torchvision equivalent"),
    ("open_clip", {"backbone": "cnn-small"}, "image-only"),
    ("timm", {"backbone": "resnet18-cifar"}, "--format torchvision"),
    ("torchvision", {"backbone": "vit-micro-cifar"}, "--format timm"),
    ("open_clip", {"backbone": "vit-micro-cifar", "register_tokens": 1, "image_projection": 32, "text": TINY_TEXT},
     "register tokens"),
    ("timm", {"backbone": "cnn-small", "colour_space": "lab", "view_channels": [[0], [1, 2]]}, "split-view"),
])
def test_backbones_without_an_equivalent_are_refused(tmp_path, fmt, fields, words):
    model_dir = _save(tmp_path / "model", fields, {"objective": "x"})
    with pytest.raises(UnsupportedExport, match=words) as error:
        export_fine_tune(model_dir, str(tmp_path / "out"), fmt)
    assert "ONNX export" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_image_text_model_as_timm_is_its_backbone(tmp_path):
    """timm gets the image backbone of a CLIP model: the features are the backbone's, and the README says so."""
    model_dir = _save(tmp_path / "model", {"backbone": "vit-micro-cifar", "image_projection": 32, "text": TINY_TEXT},
                      {"objective": "clip"})
    report = export_fine_tune(model_dir, str(tmp_path / "out"), "timm")
    assert report["feature"] == "backbone" and report["image"]["min_cosine"] >= MIN_COSINE
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "image backbone only" in readme and "image_projection" in readme


def test_cli_formats_and_a_failed_check_leaves_the_output(tmp_path, monkeypatch, capsys):
    from export.__main__ import main

    model_dir = _save(tmp_path / "model", {"backbone": "timm:resnet10t"}, {"objective": "x"})
    out = tmp_path / "out"
    assert main(["--model", model_dir, "--format", "timm", "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == "timm"
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    monkeypatch.setattr(fine_tune, "MIN_COSINE", 1.5)  # no export can meet it: the check must fail
    with pytest.raises(ExportMismatch):
        export_fine_tune(model_dir, str(out), "timm")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["model", "out"]  # no staging directory left behind
    with pytest.raises(SystemExit):
        main(["--model", model_dir, "--format", "timm", "--fp16", "--output", str(out)])
    assert "only --format onnx takes --fp16" in capsys.readouterr().err
    cnn = _save(tmp_path / "cnn", {"backbone": "cnn-small"}, {"objective": "x"})
    assert main(["--model", cnn, "--format", "torchvision", "--output", str(tmp_path / "cnn_out")]) == 2
    assert "export refused" in capsys.readouterr().err and not (tmp_path / "cnn_out").exists()
