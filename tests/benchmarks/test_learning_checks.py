"""Learning checks moved out of `make test` to keep it under 20 minutes on 2 cores (issue 16): each trains
cnn-small on 2,000 CIFAR-10 images and asserts kNN top-1 beats the same command's random-init floor
(`--max-steps 0`) by 2 points. Run on demand: `make benchmark`, or
`pytest -m benchmark tests/benchmarks/test_learning_checks.py`.

On the 2-core AVX2 EPYC of 2026-12-06 these 17 checks took about 15 minutes together (30-90 s each) inside
`make test`. The suite keeps simclr, clip (tests/test_learning.py), rotation and moco2 as its learning
signal, and a 3-step smoke run of every objective (tests/test_smoke_every_objective.py). The settings and
measured figures below are those the checks had in their old test modules (named per entry).
"""
import json

import pytest

from conftest import CIFAR_DIR, CIFAR_SKIP_REASON
from learning_helpers import assert_beats_floor

pytestmark = [pytest.mark.benchmark, pytest.mark.skipif(not CIFAR_DIR.exists(), reason=CIFAR_SKIP_REASON)]

ADAMW = ["--optimizer", "adamw", "--weight-decay", "1e-4"]
MARGIN = 0.02

LEARNING_CHECKS = [
    # -- from test_background_aug.py
    pytest.param("simclr+background", 80, ["--objective", "simclr", *ADAMW, "--lr", "2e-3", "--warmup-steps", "10",
                                           "--set", "projection_hidden_dim=256",
                                           "--set", "augment={background_prob: 0.5, background_mode: random}"],
                 id="simclr+background"),
    # -- from test_byol_simsiam_barlow.py. Measured (floor 0.285, kNN top-1 after the run, on a 2-core machine
    # shared with other jobs): barlow_twins 0.312 at 120 steps, 0.346 and 0.342 at 160. BYOL and SimSiam need
    # 600-800 steps: tests/benchmarks/test_noncontrastive_learning.py.
    pytest.param("barlow_twins", 160, ["--objective", "barlow_twins", *ADAMW, "--lr", "3e-3", "--warmup-steps", "10",
                                       "--set", "projection_dim=512", "--set", "projection_hidden_dim=512"],
                 id="barlow_twins"),
    # -- from test_cmc_simclr2.py
    pytest.param("cmc", 60, ["--objective", "cmc", *ADAMW, "--lr", "4e-3"], id="cmc"),
    pytest.param("simclr2", 60, ["--objective", "simclr2", *ADAMW, "--lr", "4e-3"], id="simclr2"),
    # -- from test_cpc.py. Smaller grids than the recipes, for time: 3 x 3 patches of 16 px at stride 8 (half
    # overlap; cpc2 keeps layer norm, four directions and per-patch augmentation), one context block, 64-d
    # targets, K = 2, prediction scale 1 and colour dropping on half the patches.
    pytest.param("cpc", 100, ["--objective", "cpc", *ADAMW, "--lr", "8e-3", "--set", "patch=16", "--set", "stride=8",
                              "--set", "prediction_steps=2", "--set", "context_layers=1",
                              "--set", "context_hidden_dim=64", "--set", "target_dim=64"], id="cpc"),
    pytest.param("cpc2", 100, ["--objective", "cpc2", *ADAMW, "--lr", "8e-3", "--set", "patch=16", "--set", "stride=8",
                               "--set", "prediction_steps=2", "--set", "skip_steps=0", "--set", "context_layers=1",
                               "--set", "context_hidden_dim=64", "--set", "target_dim=64",
                               "--set", "prediction_scale=1.0", "--set", "colour_drop=0.5"], id="cpc2"),
    # -- from test_dense_objectives.py. PixContrast with the batch's other cells as negatives (pixel-only PixPro
    # reached 0.288 vs the 0.285 floor in 120 steps: no image-level signal at this budget).
    pytest.param("pixpro", 120, ["--objective", "pixpro", *ADAMW, "--lr", "2e-3", "--warmup-steps", "10",
                                 "--set", "projection_hidden_dim=256", "--set", "mode=pixcontrast",
                                 "--set", "batch_negatives=true"], id="pixpro"),
    pytest.param("patchnce", 80, ["--objective", "patchnce", *ADAMW, "--lr", "2e-3", "--warmup-steps", "10",
                                  "--set", "batch_negatives=true", "--set", "layers=[-2, -1]",
                                  "--set", "num_patches=64"], id="patchnce"),
    # -- from test_instdisc_invaspread_curl.py. instdisc: one view per step, so 200 steps cost about what 100
    # two-view steps do (160 steps: 0.297 vs floor 0.278 once). Z is re-estimated per batch for the first epoch
    # (32 steps): fixed on the first batch's random bank it silences the positive term (see instdisc.py).
    pytest.param("invaspread", 80, ["--objective", "invaspread", *ADAMW, "--lr", "4e-3"], id="invaspread"),
    pytest.param("instdisc", 200, ["--objective", "instdisc", *ADAMW, "--lr", "4e-3", "--set", "proximal_weight=3",
                                   "--set", "normaliser_warmup_steps=32"], id="instdisc"),
    # -- from test_moco.py (moco2 stays in the suite)
    pytest.param("moco", 80, ["--objective", "moco", *ADAMW, "--lr", "4e-3", "--set", "queue_size=1024"], id="moco"),
    pytest.param("moco3", 80, ["--objective", "moco3", *ADAMW, "--lr", "4e-3", "--set", "projection_hidden_dim=256",
                               "--set", "predictor_hidden_dim=256"], id="moco3"),
    # -- from test_multitask.py. Measured (floor 0.285, kNN top-1 after 60 steps of the recipe's rotation +
    # simclr, cnn-small, batch 64, AdamW lr 3e-3): seed 0 0.384, seed 1 0.360, seed 2 0.350.
    pytest.param("multitask", 60, ["--objective", "multitask", *ADAMW, "--lr", "3e-3", "--warmup-steps", "10"],
                 id="multitask"),
    # -- from test_pretext_dense.py. L-only encoder: its random-init floor is 0.255 (RGB cnn-small: 0.285).
    # Measured at the default seed only: 120 steps lr 3e-3 -> 0.270 (0.257 without rebalancing); 160 steps lr
    # 5e-3 -> 0.279.
    pytest.param("colorization", 160, ["--objective", "colorization", "--lr", "5e-3", *ADAMW, "--warmup-steps", "10"],
                 id="colorization"),
    # -- from test_supcon_align.py. SupCon at --lr 1.6e-2 (4e-3 after the loop's batch-64/256 scaling): +0.07
    # over the floor in 60 steps once, +0.018 in another run, so 100 steps; 4e-3 gave only +0.04.
    pytest.param("supcon", 100, ["--objective", "supcon", *ADAMW, "--lr", "1.6e-2",
                                 "--set", "projection_hidden_dim=128"], id="supcon"),
    pytest.param("align_uniform", 80, ["--objective", "align_uniform", *ADAMW, "--lr", "4e-3",
                                       "--set", "projection_hidden_dim=128"], id="align_uniform"),
    # -- from test_swav_dino.py. --lr is per 256 images: 8e-3 is 2e-3 at batch 64; the recipes' 500-step
    # warm-up is cut to 10. Measured with the seeded data order at 2 threads (floor 0.285): 0.328 / 0.329 /
    # 0.316 at seeds 0 / 1 / 2; at --lr 1.6e-2 it was 0.314 at seed 0 and 0.304 with 1 thread, too close to the
    # margin. Local crops and the frozen prototypes of the recipe slow the first hundred steps down (0.274-0.278
    # with 2 local crops, K=30); unit tests cover them. DINO's check (800 steps) is in
    # test_noncontrastive_learning.py.
    pytest.param("swav", 160, ["--objective", "swav", *ADAMW, "--lr", "8e-3", "--warmup-steps", "10",
                               "--set", "num_prototypes=64", "--set", "projection_hidden_dim=256",
                               "--set", "num_local_crops=0", "--set", "freeze_prototypes_steps=0",
                               "--set", "queue_length=0", "--set", "global_crop_scale=[0.3, 1.0]"], id="swav"),
]
# Objectives whose runs log embedding_std: their checks also assert no logged step was flagged as collapsed.
COLLAPSE_CHECKED = {"barlow_twins"}


@pytest.mark.parametrize("name,steps,objective_args", LEARNING_CHECKS)
def test_short_run_beats_random_init_knn_floor(cifar_2k_shards, tmp_path, name, steps, objective_args):
    assert_beats_floor(cifar_2k_shards, tmp_path, name, steps, objective_args, MARGIN)
    if name in COLLAPSE_CHECKED:
        records = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
        assert records and all("embedding_std" in r and r["collapsed"] is False for r in records)
