"""Per-row losses on the answer tokens that several methods share (the cross-entropy is `models.answer_loss`).

The logits at position t predict token t+1, so the answer positions of a row are where `labels[:, 1:] != -100`.
Two inputs whose prompts differ (VGID's teacher prompt is longer) still share their answer tokens: their answer
positions are matched in order, row by row.
"""
import torch


def answer_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L, V], [B, L] -> the logits that predict each answer token ([N, V] fp32, row by row, in order), the token
    they predict ([N]) and the row each belongs to ([N])."""
    mask = labels[:, 1:] != -100
    return logits[:, :-1][mask].float(), labels[:, 1:][mask], mask.nonzero()[:, 0]


def per_row_mean(values: torch.Tensor, row: torch.Tensor, rows: int) -> torch.Tensor:
    """Mean of `values` [N] over the entries of each row: [rows] (0 for a row without entries)."""
    total = torch.zeros(rows, dtype=values.dtype, device=values.device).index_add(0, row, values)
    return total / torch.bincount(row, minlength=rows).clamp(min=1)


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y|x) of each row's answer: Σ_t log p(y_t | x, y_<t) over its answer tokens, [B, L, V] -> [B]."""
    logits, target, row = answer_positions(logits, labels)
    logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(labels.shape[0], dtype=logp.dtype, device=logp.device).index_add(0, row, logp)


def answer_kl(teacher: torch.Tensor, teacher_labels: torch.Tensor, student: torch.Tensor,
              student_labels: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) = Σ_v p_t(v)·(log p_t(v) − log p_s(v)) at each answer position, averaged over each
    row's answer positions: [B]. The two label tensors must hold the same answer tokens (the prompts may differ)."""
    t, t_target, t_row = answer_positions(teacher, teacher_labels)
    s, s_target, s_row = answer_positions(student, student_labels)
    if not (torch.equal(t_target, s_target) and torch.equal(t_row, s_row)):
        raise ValueError("teacher and student inputs do not hold the same answer tokens")
    log_t, log_s = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    return per_row_mean((log_t.exp() * (log_t - log_s)).sum(-1), s_row, student_labels.shape[0])
