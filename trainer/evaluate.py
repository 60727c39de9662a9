"""Evaluate a saved model: ``python -m trainer.evaluate --model RUN/model --train-data ... --test-data ...``.

Prints one JSON object: ``knn_top1`` (weighted kNN, InstDisc protocol: k=200, tau=0.1, cosine on
L2-normalised features), plus ``linear_top1`` with ``--linear`` and ``zero_shot_top1`` with ``--zero-shot``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trainer.data.pipeline import eval_batches
from trainer.data.preprocess import Preprocess
from trainer.data.shards import ShardPatternError, expand_patterns, read_manifest
from trainer.models import build_tokenizer, load_model

log = logging.getLogger("manyview.evaluate")
ZERO_SHOT_TEMPLATES = ("a photo of a {}.", "a picture of the {}.", "an image of a {}.")


@torch.no_grad()
def extract_features(model, urls: list[str], batch_size: int = 256, num_workers: int = 2,
                     limit: int | None = None, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image embeddings [N, D] and labels [N] of the samples in ``urls``."""
    config = model.config
    spec = Preprocess.of_model(config)
    features, labels = [], []
    seen = 0
    with tqdm(desc=desc, unit="img", disable=None) as bar:
        for batch in eval_batches(urls, spec, batch_size, num_workers):
            features.append(F.normalize(model.encode_image(batch["image"]).float(), dim=1))
            labels.append(batch["label"])
            seen += len(batch["label"])
            bar.update(len(batch["label"]))
            if limit is not None and seen >= limit:
                break
    if not features:
        raise ValueError(f"no readable images in {urls}")
    feats, labs = torch.cat(features), torch.cat(labels)
    if limit is not None:
        feats, labs = feats[:limit], labs[:limit]
    return feats, labs


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): each of the k nearest neighbours votes exp(cos / tau) for its class."""
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk] @ bank.t()
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
                 epochs: int = 100, lr: float = 0.1, weight_decay: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """Multinomial logistic regression on frozen, standardised features (full-batch Adam); test predictions."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = (torch.randn(train_x.shape[1], num_classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(train_x @ weight + bias, train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (test_x @ weight + bias).argmax(dim=1)


@torch.no_grad()
def zero_shot_predict(model, features: torch.Tensor, class_names: list[str]) -> torch.Tensor:
    """Classify by the nearest class-name prompt embedding (averaged over templates)."""
    tokenizer = build_tokenizer(model.config.text.context_length)
    classifiers = []
    for name in class_names:
        tokens = tokenizer([template.format(name) for template in ZERO_SHOT_TEMPLATES])
        embedding = F.normalize(model.encode_text(tokens).float(), dim=1).mean(0)
        classifiers.append(F.normalize(embedding, dim=0))
    return (features @ torch.stack(classifiers).t()).argmax(dim=1)


def evaluate(model_dir: str, train_data: str | None, test_data: str, knn_k: int = 200, knn_temperature: float = 0.1,
             linear: bool = False, zero_shot: bool = False, batch_size: int = 256, num_workers: int = 2,
             limit_train: int | None = None, limit_test: int | None = None) -> dict:
    """Compute the requested metrics; see the module docstring."""
    torch.manual_seed(0)
    model, saved = load_model(model_dir)
    test_urls = expand_patterns(test_data)
    result: dict = {"model": model_dir, "objective": saved.get("objective"), "steps": saved.get("steps")}
    started = time.perf_counter()
    test_x, test_y = extract_features(model, test_urls, batch_size, num_workers, limit_test, "test features")
    labelled = test_y >= 0
    num_classes = int(test_y.max().item()) + 1 if labelled.any() else 0
    if train_data:
        train_x, train_y = extract_features(model, expand_patterns(train_data), batch_size, num_workers, limit_train, "train features")
        num_classes = max(num_classes, int(train_y.max().item()) + 1)
        keep = train_y >= 0
        if keep.any() and labelled.any():
            predictions = knn_predict(train_x[keep], train_y[keep], test_x[labelled], num_classes, knn_k, knn_temperature)
            result["knn_top1"] = (predictions == test_y[labelled]).float().mean().item()
            result["knn_k"] = knn_k
            if linear:
                predictions = linear_probe(train_x[keep], train_y[keep], test_x[labelled], num_classes)
                result["linear_top1"] = (predictions == test_y[labelled]).float().mean().item()
        result["train_samples"] = int(train_x.shape[0])
    if zero_shot:
        if model.text is None:
            raise ValueError(f"--zero-shot needs an image-text model; {model_dir} has no text encoder")
        classes = read_manifest(test_urls).get("classes")
        if not classes:
            raise ValueError("--zero-shot needs class names: no manifest.json with 'classes' beside the test shards")
        predictions = zero_shot_predict(model, test_x[labelled], classes)
        result["zero_shot_top1"] = (predictions == test_y[labelled]).float().mean().item()
    result["test_samples"] = int(test_x.shape[0])
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="RUN/model directory")
    parser.add_argument("--train-data", help="shards for the kNN bank and linear-probe training")
    parser.add_argument("--test-data", required=True, help="shards to classify")
    parser.add_argument("--knn-k", type=int, default=200)
    parser.add_argument("--knn-temperature", type=float, default=0.1)
    parser.add_argument("--linear", action="store_true", help="add linear_top1 (logistic regression probe)")
    parser.add_argument("--zero-shot", action="store_true", help="add zero_shot_top1 (image-text models)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--limit-train", type=int, help="use at most N train samples")
    parser.add_argument("--limit-test", type=int, help="use at most N test samples")
    args = parser.parse_args(argv)
    if not args.train_data and not args.zero_shot:
        parser.error("give --train-data (kNN, linear probe) and/or --zero-shot")
    try:
        result = evaluate(args.model, args.train_data, args.test_data, args.knn_k, args.knn_temperature,
                          args.linear, args.zero_shot, args.batch_size, args.num_workers, args.limit_train, args.limit_test)
    except (FileNotFoundError, ShardPatternError, ValueError) as error:
        parser.error(str(error))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
