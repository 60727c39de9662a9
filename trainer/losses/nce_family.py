"""The InfoNCE family's alternatives: binary NCE, FlatNCE, debiased and hard-negative contrastive losses.

Every loss exists at two levels:

* a similarity-level core, ``contrastive_loss_from_similarities(kind, positive [N], negatives [N, K],
  temperature, **options)``, for objectives that build their own similarities (SimCLR's 2N-2 per-anchor
  negatives, memory banks, queues). Similarities are cosines in [-1, 1] (not yet divided by tau);
* an embedding-level function with ``info_nce``'s argument shape: ``query`` [N, D], ``positive_key`` [N, D],
  ``negative_keys`` None (the other rows of ``positive_key`` are query i's negatives, K = N - 1), [K, D]
  (shared by all queries: a queue or bank) or [N, K, D] (per-query negatives). Inputs are L2-normalised here.

Kinds (``CONTRASTIVE_LOSSES``), with s+ the positive and s_j the K negative similarities of one query,
all losses averaged over queries:

* ``infonce`` (van den Oord et al. 2018): log(e^{s+/t} + sum_j e^{s_j/t}) - s+/t.
* ``nce`` (Wu et al. 2018, InstDisc's binary NCE): P(s) = e^{s/t} / Z, h(s) = P / (P + m Pn) with m = K
  noise samples of probability Pn each; loss = -log h(s+) - sum_j log(1 - h(s_j)).
* ``flatnce`` (Chen et al. 2021): v = logsumexp_j((s_j - s+)/t); see ``flat_nce`` for the value/gradient.
* ``debiased`` (Chuang et al. 2020): the negative term N*g with g = max((mean_j e^{s_j/t} - tau+ e^{s+/t})
  / (1 - tau+), e^{-1/t}); loss = -log(e^{s+/t} / (e^{s+/t} + K g)).
* ``hcl`` (Robinson et al. 2021): as ``debiased`` with the negatives importance-weighted by
  w_j = e^{beta s_j/t} / mean_k e^{beta s_k/t} (hard negatives count more; beta = 0 is ``debiased``).

A query with no negatives (K = 0, e.g. an in-batch batch of one) has loss 0 under every kind, as InfoNCE's
softmax over a single logit does. Everything is computed in log space with a per-row shift, so small
temperatures (e^{1/t} beyond float32) give no inf/NaN.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .contrastive import info_nce

CONTRASTIVE_LOSSES: tuple[str, ...] = ("infonce", "nce", "flatnce", "debiased", "hcl")

# The keyword options each kind takes (objectives hold all of them; ``loss_options_for`` picks the right ones).
LOSS_OPTIONS: dict[str, tuple[str, ...]] = {
    "infonce": (),
    "nce": ("noise_probability", "normaliser"),
    "flatnce": (),
    "debiased": ("tau_plus",),
    "hcl": ("tau_plus", "beta"),
}


def _check_kind(kind: str) -> None:
    if kind not in CONTRASTIVE_LOSSES:
        raise ValueError(f"unknown contrastive loss {kind!r}; known: {', '.join(CONTRASTIVE_LOSSES)}")


def loss_options_for(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` (e.g. ``vars(objective_options)``) that loss ``kind`` takes."""
    _check_kind(kind)
    return {name: options[name] for name in LOSS_OPTIONS[kind] if name in options}


def _check_similarities(positive: torch.Tensor, negatives: torch.Tensor, temperature: float) -> None:
    if positive.dim() != 1 or negatives.dim() != 2 or negatives.shape[0] != positive.shape[0]:
        raise ValueError(f"expected positive [N] and negatives [N, K], "
                         f"got {tuple(positive.shape)} and {tuple(negatives.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _zero(positive: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Loss 0 that stays connected to the graph (backward gives zero gradients, never None)."""
    return positive.sum() * 0.0 + negatives.sum() * 0.0


def _info_nce_core(positive: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    # Same operations as info_nce's [K, D] branch: cross-entropy with the positive logit in column 0.
    logits = torch.cat([positive.unsqueeze(1), negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(positive.shape[0], dtype=torch.long, device=positive.device))


def _nce_core(positive: torch.Tensor, negatives: torch.Tensor, temperature: float,
              noise_probability: float | None = None, normaliser: float | torch.Tensor | None = None) -> torch.Tensor:
    m = negatives.shape[1]
    pn = 1.0 / (m + 1) if noise_probability is None else float(noise_probability)
    if not 0.0 < pn <= 1.0:
        raise ValueError(f"noise_probability must be in (0, 1], got {pn}")
    scores = torch.cat([positive.unsqueeze(1), negatives], dim=1) / temperature
    if normaliser is None:
        # InstDisc's Monte-Carlo estimate Z = n * E[e^{s/t}] with n = 1/Pn, from every score of this batch;
        # a constant (detached), as the paper fixes Z once rather than differentiating through it.
        log_z = (torch.logsumexp(scores.detach().flatten(), dim=0) - math.log(scores.numel()) - math.log(pn))
    else:
        log_z = torch.log(torch.as_tensor(normaliser, dtype=scores.dtype, device=scores.device))
    # h = P / (P + m Pn) = sigmoid(log P - log(m Pn)), log P = s/t - log Z: log-sigmoids never overflow.
    logit_h = scores - log_z - math.log(m * pn)
    loss = -(F.logsigmoid(logit_h[:, 0]) + F.logsigmoid(-logit_h[:, 1:]).sum(dim=1))
    return loss.mean()


def _flat_nce_core(positive: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    v = torch.logsumexp((negatives - positive.unsqueeze(1)) / temperature, dim=1)
    # Value: v (the FlatNCE objective). Gradient: that of the paper's exp(v - sg(v)), i.e. sum_j softmax_j grad.
    return (v.detach() + torch.exp(v - v.detach()) - 1.0).mean()


def _debiased_core(positive: torch.Tensor, negatives: torch.Tensor, temperature: float,
                   tau_plus: float = 0.1, beta: float = 0.0) -> torch.Tensor:
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    k = negatives.shape[1]
    pos, neg = positive / temperature, negatives / temperature
    shift = torch.maximum(pos, neg.max(dim=1).values).detach()  # every exp below is <= 1
    pos_exp = torch.exp(pos - shift)
    neg_exp = torch.exp(neg - shift.unsqueeze(1))
    if beta != 0.0:
        # HCL importance weights e^{beta s/t} / mean(e^{beta s/t}) = K * softmax(beta s/t): stable for any beta.
        weights = k * torch.softmax(beta * neg, dim=1)
        negative_sum = (weights * neg_exp).sum(dim=1)
    else:
        negative_sum = neg_exp.sum(dim=1)
    ng = (negative_sum - tau_plus * k * pos_exp) / (1.0 - tau_plus)
    # Chuang et al.'s clamp: the estimator may go negative; cosines >= -1 bound each term by e^{-1/t}.
    ng = torch.maximum(ng, k * torch.exp(-1.0 / temperature - shift))
    return (torch.log(pos_exp + ng) - (pos - shift)).mean()


def contrastive_loss_from_similarities(kind: str, positive: torch.Tensor, negatives: torch.Tensor,
                                       temperature: float = 0.07, **options) -> torch.Tensor:
    """One loss of ``CONTRASTIVE_LOSSES`` from cosine similarities, mean over the N queries.

    Args:
        kind: "infonce" | "nce" | "flatnce" | "debiased" | "hcl".
        positive: [N] cosine similarity of each query with its positive.
        negatives: [N, K] cosine similarities of each query with its K negatives.
        temperature: tau (> 0).
        options: the kind's options (``LOSS_OPTIONS``): nce -> noise_probability, normaliser;
            debiased -> tau_plus; hcl -> tau_plus, beta. Others are a ValueError.
    """
    _check_kind(kind)
    unknown = sorted(set(options) - set(LOSS_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"loss {kind!r} takes options {list(LOSS_OPTIONS[kind])}, got unknown {unknown}")
    _check_similarities(positive, negatives, temperature)
    if negatives.shape[1] == 0:
        return _zero(positive, negatives)
    if kind == "infonce":
        return _info_nce_core(positive, negatives, temperature)
    if kind == "nce":
        return _nce_core(positive, negatives, temperature, **options)
    if kind == "flatnce":
        return _flat_nce_core(positive, negatives, temperature)
    if kind == "debiased":
        return _debiased_core(positive, negatives, temperature, beta=0.0, **options)
    return _debiased_core(positive, negatives, temperature, tau_plus=options.get("tau_plus", 0.1),
                          beta=options.get("beta", 1.0))


def similarities(query: torch.Tensor, positive_key: torch.Tensor,
                 negative_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (positive [N], negatives [N, K]) in ``info_nce``'s argument convention.

    negative_keys: None -> the other rows of ``positive_key`` (K = N - 1); [K, D] shared; [N, K, D] per query.
    """
    if query.dim() != 2 or positive_key.shape != query.shape:
        raise ValueError(f"expected query and positive_key of one [N, D] shape, "
                         f"got {tuple(query.shape)} and {tuple(positive_key.shape)}")
    query = F.normalize(query, dim=1)
    positive_key = F.normalize(positive_key, dim=1)
    n = query.shape[0]
    if negative_keys is None:
        sim = query @ positive_key.t()
        positive = sim.diagonal()
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=sim.device)
        return positive, sim[off_diagonal].view(n, n - 1)
    positive = (query * positive_key).sum(dim=1)
    negative_keys = F.normalize(negative_keys, dim=-1)
    if negative_keys.dim() == 2 and negative_keys.shape[1] == query.shape[1]:
        return positive, query @ negative_keys.t()
    if negative_keys.dim() == 3 and negative_keys.shape[0] == n and negative_keys.shape[2] == query.shape[1]:
        return positive, torch.einsum("nd,nkd->nk", query, negative_keys)
    raise ValueError(f"negative_keys must be [K, D] or [N, K, D] with N={n}, D={query.shape[1]}, "
                     f"got {tuple(negative_keys.shape)}")


def two_view_similarities(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR/NT-Xent's pairs as similarities: for each of the 2N views (view-0 rows first), the cosine with its
    other view [2N] and with the 2N-2 views of the other samples [2N, 2N-2].

    Args: z1, z2: [N, D] embeddings of two views (row i of each: one sample); L2-normalised here.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t()
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    rows = torch.arange(2 * n, device=z.device)
    positive = sim[rows, partner]
    keep = torch.ones_like(sim, dtype=torch.bool)
    keep[rows, rows] = False
    keep[rows, partner] = False
    return positive, sim[keep].view(2 * n, 2 * n - 2)


def contrastive_loss(kind: str, query: torch.Tensor, positive_key: torch.Tensor,
                     negative_keys: torch.Tensor | None = None, temperature: float = 0.07, **options) -> torch.Tensor:
    """Dispatcher over ``CONTRASTIVE_LOSSES`` with ``info_nce``'s arguments (see ``similarities``).

    ``infonce`` with None or [K, D] negatives is ``trainer.losses.info_nce`` itself (bit-identical).
    """
    _check_kind(kind)
    if kind == "infonce" and not options and (negative_keys is None or negative_keys.dim() == 2):
        return info_nce(query, positive_key, negative_keys, temperature)
    positive, negatives = similarities(query, positive_key, negative_keys)
    return contrastive_loss_from_similarities(kind, positive, negatives, temperature, **options)


def nce(query: torch.Tensor, positive_key: torch.Tensor, negative_keys: torch.Tensor | None = None,
        temperature: float = 0.07, noise_probability: float | None = None,
        normaliser: float | torch.Tensor | None = None) -> torch.Tensor:
    """Binary NCE of InstDisc (Wu et al. 2018, eqs. 3-5), mean over queries.

    P(i|v) = exp(s/t) / Z; h(i, v) = P / (P + m Pn) with m = K negatives per query and Pn the noise
    probability of each (the paper: uniform 1/n over the n training samples).
    loss_q = -log h(s+) - sum_{j=1..m} log(1 - h(s_j)).

    Args:
        query, positive_key, negative_keys: as ``info_nce`` (see ``similarities``); [N, D], [N, D], None |
            [K, D] | [N, K, D].
        noise_probability: Pn; None -> 1/(m + 1) (the candidates of this batch are the noise universe).
        normaliser: Z; None -> estimated from this batch as mean(exp(s/t)) over all N (K + 1) scores
            (positives and negatives) divided by Pn, and detached (InstDisc's Z = n E[e^{s/t}], a constant).
    """
    return contrastive_loss("nce", query, positive_key, negative_keys, temperature,
                            noise_probability=noise_probability, normaliser=normaliser)


def flat_nce(query: torch.Tensor, positive_key: torch.Tensor, negative_keys: torch.Tensor | None = None,
             temperature: float = 0.07) -> torch.Tensor:
    """FlatNCE (Chen et al. 2021, "Simpler, Faster, Stronger: Breaking the log-K Curse"), mean over queries.

    v_q = logsumexp_j((s_j - s+) / t) over the negatives only (no positive in the denominator).
    The paper's loss is exp(v - sg(v)): value 1, gradient grad v = sum_j softmax_j(s/t) grad((s_j - s+)/t),
    which is InfoNCE's gradient divided by sigmoid(v) (InfoNCE = softplus(v)): the same direction per
    query, without the vanishing factor when InfoNCE is small. We return sg(v) + exp(v - sg(v)) - 1:
    exactly that gradient, and the value v (the seed note's -log e^{s+}/sum_j e^{s_j}) for logging.

    Args: as ``info_nce``: query [N, D], positive_key [N, D], negative_keys None | [K, D] | [N, K, D].
    """
    return contrastive_loss("flatnce", query, positive_key, negative_keys, temperature)


def debiased_nce(query: torch.Tensor, positive_key: torch.Tensor, negative_keys: torch.Tensor | None = None,
                 temperature: float = 0.07, tau_plus: float = 0.1) -> torch.Tensor:
    """Debiased contrastive loss (Chuang et al. 2020, eq. 6 with M = 1 positive), mean over queries.

    g = max((1/K sum_j e^{s_j/t} - tau+ e^{s+/t}) / (1 - tau+), e^{-1/t}) corrects for negatives that share
    the query's class (prior tau+); loss = -log(e^{s+/t} / (e^{s+/t} + K g)). tau+ = 0 is InfoNCE wherever
    the clamp is inactive.

    Args: as ``info_nce`` (query [N, D], positive_key [N, D], negative_keys None | [K, D] | [N, K, D]);
        tau_plus in [0, 1).
    """
    return contrastive_loss("debiased", query, positive_key, negative_keys, temperature, tau_plus=tau_plus)


def hard_negative_nce(query: torch.Tensor, positive_key: torch.Tensor, negative_keys: torch.Tensor | None = None,
                      temperature: float = 0.07, beta: float = 1.0, tau_plus: float = 0.1) -> torch.Tensor:
    """Hard-negative contrastive loss (Robinson et al. 2021, HCL), mean over queries.

    The debiased loss with negatives drawn from q_beta(x-) ∝ e^{beta s-/t} p(x-), estimated by importance
    weights w_j = e^{beta s_j/t} / mean_k e^{beta s_k/t}: K g = max((sum_j w_j e^{s_j/t} - tau+ K e^{s+/t})
    / (1 - tau+), K e^{-1/t}). As in the authors' code the weights are not detached. beta = 0 is
    ``debiased_nce``.

    Args: as ``info_nce`` (query [N, D], positive_key [N, D], negative_keys None | [K, D] | [N, K, D]);
        beta >= 0 concentration, tau_plus in [0, 1).
    """
    return contrastive_loss("hcl", query, positive_key, negative_keys, temperature, tau_plus=tau_plus, beta=beta)
