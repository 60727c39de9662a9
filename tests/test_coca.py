"""CoCa (Yu et al. 2022): the captioning loss by hand, the model stored whole as open_clip's CoCa, the objective's
loss against open_clip's own CoCaLoss, 2 processes = 1, gradient caching, and captions from the ONNX export
(greedy, torch-free) equal to eager greedy decoding, shown in the app's search status. Tiny towers (width 32,
one layer each, 32 px) keep the file fast."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distributed_helpers import assert_two_processes_match_one
from onnx_fixtures import make_shard, shared_onnx_dir
from trainer.losses import caption_loss, caption_token_nll
from trainer.objectives import ObjectiveSpec, get_objective

TINY = {"embed_dim": 32, "text_layers": 1, "decoder_layers": 1, "text_heads": 2, "context_length": 12,
        "image_queries": 8, "pooler_heads": 2, "vision_width": 32, "vision_layers": 1, "vision_heads": 2}
SOT, EOT = 49406, 49407
CAPTIONS = ["a red square", "a blue sky", "green grass", "a dark night"]
COLOURS = [(220, 30, 30), (40, 60, 230), (30, 200, 40), (10, 10, 10)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is faster than two on a shared 2-core machine (no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(**changes):
    torch.manual_seed(0)
    return get_objective("coca").build(ObjectiveSpec(backbone="vit-micro-cifar", image_size=32,
                                                     options={**TINY, **changes}))


def pictures() -> list[Image.Image]:
    """One flat colour per caption, with a little noise so the pictures are photo-like."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(np.clip(np.array(c) + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8))
            for c in COLOURS]


def caption_batch(objective, repeat: int = 1) -> dict:
    from types import SimpleNamespace

    views = objective.views()
    views.transform.transforms[0].scale = (1.0, 1.0)  # whole images: the test compares exact captions
    rows = [views(image, SimpleNamespace(caption=text, meta={})) for image, text in zip(pictures(), CAPTIONS)] * repeat
    return {"image": torch.stack([r["image"] for r in rows]), "tokens": torch.stack([r["tokens"] for r in rows])}


# -- the loss ------------------------------------------------------------------------------------------------


def test_caption_loss_by_hand() -> None:
    # Two captions, vocabulary of 3, 3 positions; pad id 0 (the second caption's last position is padding).
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [2.0, 1.0, 1.0]],
                           [[0.5, 0.5, 0.5], [1.0, 0.0, 2.0], [9.0, -9.0, 4.0]]])
    targets = torch.tensor([[1, 2, 1], [2, 1, 0]])

    def nll(row, target):  # -log softmax, written out
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    first = nll([1, 2, 0], 1) + nll([0, 0, 3], 2) + nll([2, 1, 1], 1)
    second = nll([0.5, 0.5, 0.5], 2) + nll([1, 0, 2], 1)  # log 3 + (log(e + 1 + e^2) - 0)
    sums, counts = caption_token_nll(logits, targets, pad_id=0)
    assert sums.tolist() == pytest.approx([first, second], rel=1e-6)
    assert counts.tolist() == [3, 2]
    assert float(caption_loss(logits, targets, pad_id=0)) == pytest.approx((first + second) / 5, rel=1e-6)
    assert second == pytest.approx(math.log(3) + math.log(math.e + 1 + math.e ** 2), rel=1e-9)
    assert float(caption_loss(logits, torch.zeros(2, 3, dtype=torch.int64), pad_id=0)) == 0.0  # all padding
    with pytest.raises(ValueError, match="disagree"):
        caption_token_nll(logits, targets[:, :2], pad_id=0)


# -- the model -----------------------------------------------------------------------------------------------


def test_model_is_open_clips_coca_under_one_prefix(tmp_path: Path) -> None:
    import open_clip

    from trainer.models import load_model
    from trainer.models.embedding import save_model

    objective = build()
    model = objective.encoder
    keys = set(model.state_dict())
    reference = open_clip.CoCa(**model.config.coca)
    assert keys == {f"coca.{k}" for k in reference.state_dict()}  # nothing else, nothing twice
    assert reference.load_state_dict({k[5:]: v for k, v in model.state_dict().items()}) is not None
    assert model.embed_dim == model.feature_dim == 32 and model.config.text.context_length == 12
    assert torch.isfinite(model.coca.text_decoder.text_projection).all()
    assert model.coca.text_decoder.text_projection.std() > 0.05  # initialised (open_clip leaves it empty)
    batch = caption_batch(objective)
    with torch.no_grad():
        image, text = model.encode_image(batch["image"]), model.encode_text(batch["tokens"])
        assert torch.equal(image, model.coca.encode_image(batch["image"], normalize=False))
        assert torch.equal(text, model.coca.encode_text(batch["tokens"], normalize=False))
    save_model(model, str(tmp_path / "model"), {"objective": "coca"})
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["model"]["coca"]["vision_cfg"]["patch_size"] == 4 and saved["has_text"]
    loaded, _ = load_model(str(tmp_path / "model"))
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(batch["image"]), image, atol=1e-6)
        assert torch.allclose(loaded.encode_text(batch["tokens"]), text, atol=1e-6)


def test_vision_tower_sizes_come_from_the_backbone_name() -> None:
    objective = get_objective("coca").build(ObjectiveSpec(backbone="vit-micro-cifar", image_size=32, options={
        k: v for k, v in TINY.items() if not k.startswith("vision_")}))
    vision = objective.encoder.config.coca["vision_cfg"]
    assert (vision["width"], vision["layers"], vision["head_width"], vision["patch_size"]) == (64, 2, 32, 4)


@pytest.mark.parametrize("backbone, options, message", [
    ("cnn-small", {}, "needs a ViT backbone"),
    ("timm:vit_tiny_patch16_224", {"vision_width": None}, "must be one of"),
    ("vit-micro-cifar", {"embed_dim": 33}, "multiple of text_heads"),
    ("vit-micro-cifar", {"caption_weight": 0, "contrastive_weight": 0}, "nothing to train"),
    ("vit-micro-cifar", {"patch_size": 5}, "multiple of the patch size"),
])
def test_bad_settings_are_refused(backbone: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_objective("coca").build(ObjectiveSpec(backbone=backbone, image_size=32, options={**TINY, **options}))


def test_register_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="register tokens"):
        get_objective("coca").build(ObjectiveSpec(backbone="vit-micro-cifar", image_size=32, options=TINY,
                                                  register_tokens=2))


# -- the objective -------------------------------------------------------------------------------------------


def test_loss_equals_open_clips_coca_loss() -> None:
    from open_clip.loss import CoCaLoss

    objective = build()
    batch = caption_batch(objective)
    outputs = objective(batch)
    with torch.no_grad():
        reference = objective.encoder.coca(batch["image"], batch["tokens"])
        contrastive, caption = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
            reference["image_features"], reference["text_features"], reference["logits"], reference["labels"],
            reference["logit_scale"])
    assert float(outputs["contrastive_loss"]) == pytest.approx(float(contrastive), rel=1e-5)
    assert float(outputs["caption_loss"]) * 2 == pytest.approx(float(caption), rel=1e-5)
    assert float(outputs["loss"].detach()) == pytest.approx(float(contrastive + caption), rel=1e-5)
    assert float(outputs["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-5)


def _build_for_processes():
    return build()


def _batch_for_processes() -> dict:
    # Captions of different lengths on the two halves: the caption loss is a mean over the global batch's tokens.
    objective = build()
    batch = caption_batch(objective, repeat=1)
    return {"image": batch["image"], "tokens": batch["tokens"][[0, 2, 1, 3]]}


def test_two_processes_match_one(tmp_path: Path) -> None:
    assert_two_processes_match_one(_build_for_processes, _batch_for_processes, tmp_path)


def test_gradient_cache_gives_the_big_batch_gradient() -> None:
    from trainer.grad_cache import grad_cache_backward

    batch = caption_batch(build(), repeat=2)
    whole, cached = build(), build()
    whole(batch)["loss"].backward()
    outputs = grad_cache_backward(cached, batch, micro_batch_size=3)
    assert float(outputs["loss"].detach()) == pytest.approx(float(whole(batch)["loss"].detach()), rel=1e-5)
    for (name, a), (_, b) in zip(whole.named_parameters(), cached.named_parameters()):
        if a.grad is not None:
            # float32 sums in another order: judged against the gradient's own scale
            assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5 * float(a.grad.abs().max())), name


# -- captions from the export, in the app --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny CoCa trained to caption the four pictures, saved and exported; (model dir, onnx dir)."""
    from export.onnx import export_model
    from trainer.models.embedding import save_model

    root = tmp_path_factory.mktemp("coca")
    objective = build(contrastive_weight=0.1)
    batch = caption_batch(objective)
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        objective(batch)["loss"].backward()
        optimizer.step()
    save_model(objective.encoder.eval(), str(root / "model"), {"objective": "coca", "steps": 30})
    report = export_model(str(root / "model"), str(root / "onnx"))
    assert report["caption_decoder"]["argmax_agreement"] == 1.0
    assert report["caption_decoder"]["max_abs_diff"] <= 1e-4 and report["caption_image"]["max_abs_diff"] <= 1e-4
    return root / "model", root / "onnx"


def eager_greedy(coca, pixels: torch.Tensor, context_length: int) -> list[list[int]]:
    """Greedy decoding the way open_clip's generate loop runs the model: the unpadded prefix grows by the argmax."""
    captions = []
    with torch.no_grad():
        image_tokens = coca.visual(pixels)[1]
        for row in range(len(pixels)):
            prefix = torch.tensor([[SOT]])
            while prefix.shape[1] < context_length:
                logits = coca.text_decoder(image_tokens[row:row + 1], coca.text(prefix)[1])[0, -1]
                prefix = torch.cat([prefix, logits.argmax().view(1, 1)], dim=1)
                if int(prefix[0, -1]) == EOT:
                    break
            ids = prefix[0, 1:].tolist()
            captions.append(ids[:-1] if ids and ids[-1] == EOT else ids)
    return captions


def test_onnx_captions_equal_eager_greedy_decoding(trained: tuple[Path, Path]) -> None:
    from export.captions import Captioner
    from trainer.models import load_model

    model_dir, onnx_dir = trained
    info = json.loads((onnx_dir / "preprocess.json").read_text())
    assert info["captioner"]["image"] == "caption_image.onnx" and info["captioner"]["context_length"] == 12
    assert (onnx_dir / "caption_decoder.onnx").is_file() and info["parity"]["caption_decoder"]["batch"] == 5
    captioner = Captioner(onnx_dir)
    model, _ = load_model(str(model_dir))
    batch = captioner.prepare(pictures())
    expected = eager_greedy(model.coca, torch.from_numpy(batch), 12)
    assert captioner.generate(batch) == expected
    assert captioner.caption(pictures()) == CAPTIONS  # it learnt the four captions, and decodes them
    assert [len(ids) for ids in captioner.generate(batch, max_length=2)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="max_length"):
        captioner.generate(batch, max_length=12)


def test_decode_matches_open_clip() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    from export.captions import decode_tokens
    from export.tokenizer import ClipTokenizer
    from trainer.models import bpe_vocab_path

    ours, theirs = ClipTokenizer(bpe_vocab_path()), SimpleTokenizer()
    for text in ["a photo of a cat", "Naïve café, 3 dogs & 12 cats!", "don't stop"]:
        ids = ours.encode(text)
        assert decode_tokens(ours, ids) == theirs.decode(ids).strip()
        assert decode_tokens(ours, [SOT, *ids, EOT]) == theirs.decode(ids).strip()


def test_exports_without_caption_graphs_say_so(tmp_path_factory) -> None:
    from export.captions import Captioner
    from export.contract import EncoderError

    with pytest.raises(EncoderError, match="no caption decoder"):
        Captioner(shared_onnx_dir(tmp_path_factory, with_text=True))


def test_app_shows_the_generated_caption(trained: tuple[Path, Path], tmp_path: Path, tmp_path_factory) -> None:
    from app.collection import Collection
    from app.search_tab import execute
    from export.runtime import Encoder
    from index.build import build_index
    from index.search import Index

    _, onnx_dir = trained
    shard = make_shard(tmp_path / "data" / "test-000000.tar", count=12)
    build_index(str(onnx_dir), str(shard), str(tmp_path / "index"), progress=False)
    collection = Collection(encoder=Encoder(str(onnx_dir)), indexes={"images": Index.load(str(tmp_path / "index"))})
    gallery, ids, status, _ = execute(collection, {"kind": "image", "image": pictures()[0]}, 3, None, None, None)
    assert len(ids) == 3 and "Generated caption: *a red square*" in status, status
    _, _, status, _ = execute(collection, {"kind": "text", "query": "a red square"}, 3, None, None, None)
    assert "Generated caption" not in status  # a text query has no image to caption
    _, _, status, _ = execute(collection, {"kind": "id", "id": int(ids[0])}, 3, None, None, None)
    assert "Generated caption: *" in status

    # An export without caption graphs: search as before, no caption line.
    plain = shared_onnx_dir(tmp_path_factory, with_text=True)
    build_index(str(plain), str(shard), str(tmp_path / "plain-index"), progress=False)
    other = Collection(encoder=Encoder(str(plain)), indexes={"images": Index.load(str(tmp_path / "plain-index"))})
    assert other.captioner is None
    _, ids, status, _ = execute(other, {"kind": "image", "image": pictures()[0]}, 3, None, None, None)
    assert len(ids) == 3 and "Generated caption" not in status


def test_knn_evaluation_runs_on_a_coca_model(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from trainer.evaluate import evaluate

    shard = make_shard(tmp_path / "train-000000.tar", count=16)
    result = evaluate(str(trained[0]), str(shard), str(shard), knn_k=3, num_workers=0, zero_shot=True)
    assert 0.0 <= result["knn_top1"] <= 1.0 and result["test_samples"] == 16
    assert 0.0 <= result["zero_shot_top1"] <= 1.0


def test_captioning_needs_no_torch() -> None:
    """export.captions is serving code: importing it (with the app's search) must not pull torch in."""
    import subprocess
    import sys

    script = ("import sys, export.captions, app.search, app.collection\n"
              "print([m for m in ('torch', 'open_clip', 'timm') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
