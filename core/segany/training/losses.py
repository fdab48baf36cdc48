"""SAM's training losses: focal + dice on the mask (20:1), MSE on the predicted IoU.

From the paper (section 3, "Losses and training"): "We supervise mask prediction with the
linear combination of focal loss and dice loss used in [DETR], a 20:1 ratio of focal loss
to dice loss ... The IoU prediction head is trained with mean-square-error loss between the
IoU prediction and the predicted mask's IoU with the ground truth mask. It is added to the
mask loss with a constant scaling factor of 1.0." For ambiguous prompts the model returns
three candidates and "we only backpropagate the minimum loss over masks".

Choices the paper leaves open (documented here and in the training configuration):

* focal ``gamma = 2`` (the paper's reference) and ``alpha = 0.25`` (the default of the
  DETR / Detectron2 ``sigmoid_focal_loss`` the paper cites); ``alpha=None`` disables it;
* the focal loss is the mean over pixels, the dice loss is per mask (smoothing 1);
* with multimask output, the mask loss is back-propagated for the lowest-loss candidate
  only, but the IoU head is supervised for **all three** candidates: every candidate's IoU
  prediction must be right, since inference picks the best candidate by that score.

All losses return one value per mask and candidate (``M x C``), so that callers can choose
a candidate before averaging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "focal_loss",
    "dice_loss",
    "mask_iou",
    "LossWeights",
    "MaskLosses",
    "sam_losses",
]


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float | None = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss, averaged over the last two (pixel) dimensions.

    Args:
        logits: ``... x H x W`` mask logits.
        target: same shape, 0/1 (float or bool).
        alpha: weight of the positive class (``1 - alpha`` for the negatives), None for none.
        gamma: focusing exponent.

    Example:
        >>> t = torch.tensor([[1.0, 0.0]])
        >>> float(focal_loss(torch.tensor([[20.0, -20.0]]), t)) < 1e-6
        True
        >>> float(focal_loss(torch.tensor([[-2.0, 2.0]]), t)) > 0.1
        True
    """
    target = target.to(logits.dtype)
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss per mask, ``1 - (2|P.T| + s) / (|P| + |T| + s)`` on ``sigmoid(logits)``.

    Example:
        >>> t = torch.zeros(1, 4, 4); t[0, :2] = 1
        >>> round(float(dice_loss(torch.where(t > 0, 30.0, -30.0), t)), 6)
        0.0
        >>> float(dice_loss(torch.where(t > 0, -30.0, 30.0), t)) > 0.9
        True
    """
    target = target.to(logits.dtype)
    prob = torch.sigmoid(logits).flatten(-2)
    target = target.flatten(-2)
    inter = (prob * target).sum(-1)
    return 1 - (2 * inter + smooth) / (prob.sum(-1) + target.sum(-1) + smooth)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two dimensions (1 when both are empty).

    Example:
        >>> a = torch.zeros(1, 4, 4, dtype=torch.bool); a[0, :2] = True
        >>> b = torch.zeros(1, 4, 4, dtype=torch.bool); b[0, :1] = True
        >>> mask_iou(a, b).tolist()
        [0.5]
    """
    pred, target = pred.flatten(-2), target.flatten(-2)
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms and focal parameters (the paper's by default)."""

    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    focal_alpha: float | None = 0.25
    focal_gamma: float = 2.0
    # Not in the paper (0: off). The MSE fits each candidate's score on its own, and a small
    # model's head can stay right on average yet rank the 3 candidates wrongly (measured on
    # bright-field nuclei: the middle one ranked first in 142 of 143 training objects where
    # the smallest was best in 126); this term penalises exactly the wrong orders.
    rank: float = 0.0
    rank_margin: float = 0.05


@dataclass
class MaskLosses:
    """Losses of one decoder round, one value per mask (``M``).

    Attributes:
        total: ``focal * w_f + dice * w_d + iou * w_i`` of the chosen candidate (this is
            what is back-propagated; average it over masks and rounds).
        focal, dice, iou: the parts (unweighted), for logging.
        rank: the ranking part (unweighted; None when ``rank`` is off or ``C = 1``).
        chosen: ``M`` index of the candidate whose mask loss was used.
        iou_actual: ``M x C`` actual IoU of every thresholded candidate (no gradient).
    """

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    chosen: torch.Tensor
    iou_actual: torch.Tensor
    rank: torch.Tensor | None = None


def ranking_loss(iou_pred: torch.Tensor, iou_actual: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """``M`` pairwise hinge losses on the order of the predicted IoUs of ``C`` candidates.

    For every pair where candidate ``i`` is better than ``j`` by more than ``margin``,
    ``relu(margin - (pred_i - pred_j))``, averaged over those pairs (0 for a mask with none):
    zero once the predictions order the clearly different candidates correctly by at least
    the margin, whatever their absolute values (the MSE keeps those calibrated).

    Example:
        >>> actual = torch.tensor([[0.1, 0.3, 0.9]])
        >>> round(float(ranking_loss(torch.tensor([[0.1, 0.5, 0.2]]), actual)), 4)  # best below middle
        0.1167
        >>> ranking_loss(torch.tensor([[0.0, 0.2, 0.4]]), actual).tolist()  # right order, by >= margin
        [0.0]
    """
    pred, actual = iou_pred.float(), iou_actual.float()
    better = (actual[:, :, None] - actual[:, None, :]) > margin  # M x C x C: i clearly beats j
    hinge = torch.relu(margin - (pred[:, :, None] - pred[:, None, :]))
    pairs = better.sum(dim=(1, 2))
    return (hinge * better).sum(dim=(1, 2)) / pairs.clamp(min=1)


def sam_losses(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> MaskLosses:
    """Loss of ``M`` masks with ``C`` candidates each (``C = 3`` multimask, 1 otherwise).

    The mask loss (focal and dice) of the lowest-loss candidate is kept; the IoU MSE covers
    every candidate (mean over candidates).

    Args:
        logits: ``M x C x H x W`` mask logits.
        iou_pred: ``M x C`` predicted IoU.
        target: ``M x H x W`` ground truth (bool or 0/1).

    Example:
        >>> t = torch.zeros(1, 8, 8, dtype=torch.bool); t[0, 2:6, 2:6] = True
        >>> good = torch.where(t, 30.0, -30.0)
        >>> logits = torch.stack([-good, good, torch.zeros(1, 8, 8)], dim=1)   # 3 candidates
        >>> out = sam_losses(logits, torch.tensor([[0.0, 1.0, 0.0]]), t)
        >>> out.chosen.tolist(), float(out.total) < 1e-3
        ([1], True)
    """
    # Losses in float32 even under bf16/fp16 autocast: the focal term is tiny per pixel.
    logits, target = logits.float(), target.bool()
    target_c = target[:, None].expand_as(logits)
    focal = focal_loss(logits, target_c, weights.focal_alpha, weights.focal_gamma)
    dice = dice_loss(logits, target_c)
    mask_loss = weights.focal * focal + weights.dice * dice
    # The choice is made on the value, not differentiated through: argmin, then gather.
    chosen = mask_loss.detach().argmin(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    with torch.no_grad():
        iou_actual = mask_iou(logits > 0, target_c)
    iou_mse = ((iou_pred.float() - iou_actual) ** 2).mean(dim=1)
    total = mask_loss[rows, chosen] + weights.iou * iou_mse
    rank = None
    if weights.rank and logits.shape[1] > 1:
        rank = ranking_loss(iou_pred, iou_actual, weights.rank_margin)
        total = total + weights.rank * rank
    return MaskLosses(
        total=total,
        focal=focal[rows, chosen].detach(),
        dice=dice[rows, chosen].detach(),
        iou=iou_mse.detach(),
        chosen=chosen,
        iou_actual=iou_actual,
        rank=None if rank is None else rank.detach(),
    )
