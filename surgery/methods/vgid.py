"""VGID: Visual-Noise Guided In-Context Distillation (Chen et al. 2026, arXiv 2606.00105; only its abstract is public).
The unlearning teacher is the frozen base model itself, steered away from the person by two interventions: Gaussian
noise on the forget image and an in-context unlearning instruction before the question. The student (the model being
trained) sees the clean input and is distilled toward that teacher; on retain rows it is held to the clean base model:

    L = α · KL(π_vanilla(· | noised image, instruction + question) ‖ π_θ(· | image, question))(forget)
        + KL(π_vanilla(· | image, question) ‖ π_θ(· | image, question))(retain)

Each KL is taken at the answer positions (matched in order: the teacher's prompt is longer) and averaged over them per
row. forget = fvqa (+ fqa, where the teacher gets the instruction only), retain = rvqa (+ rqa) when the scope reaches
the language model.

Our decisions (the abstract gives none of them; see README "Decisions"): the noise is added to the image's pixels in
[0, 1], x̃ = clip(x + σ·ε, 0, 1) with ε ~ N(0, I) and σ = --vgid-sigma (default 0.5), drawn afresh at every step from
a generator keyed by (seed, step, row), so a run is reproducible and the same at any world size; the instruction is
--vgid-instruction, followed by a space and the question; both KL terms have weight 1 (α, default 1, weighs the forget
term); the teacher is the vanilla model (ctx.vanilla_logits: the snapshot of the trainable weights taken before
training, never updated). Default scope `full`: the abstract does not say what trains; the MLLMU-Bench-style
baselines it reports against (forget/retain ROUGE-L) tune the language model, and every weight is the nearest scope.
"""
import numpy as np
from PIL import Image

from ..models import Example
from .loop import Context, Method, Term
from .losses import answer_kl


def noised(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """clip(x + σ·ε, 0, 1) on the pixels x ∈ [0, 1], back to 8 bits."""
    x = np.asarray(image, dtype=np.float64) / 255.0
    x = np.clip(x + sigma * rng.standard_normal(x.shape), 0.0, 1.0)
    return Image.fromarray(np.rint(x * 255.0).astype(np.uint8))


class VGID(Method):
    name = "vgid"
    reads = ("vgid_sigma", "vgid_instruction")
    paper = "VGID: Visual-Noise Guided In-Context Distillation (Chen et al. 2026, arXiv 2606.00105)"
    default_scope = "full"
    defaults = {"alpha": 1.0, "schedule": "combined"}
    needs_vanilla = True
    forget_splits = ("fvqa", "fqa")
    logs_forget_loss = False        # its forget terms are not the answer loss
    retain_splits = ("rvqa", "rqa")

    def prepare(self, ctx: Context) -> None:
        if not ctx.cfg.vgid_sigma >= 0:
            raise ValueError(f"--vgid-sigma must be >= 0, got {ctx.cfg.vgid_sigma}")
        if ctx.cfg.seed < 0:
            raise ValueError(f"vgid draws its noise from --seed, which must be >= 0 (got {ctx.cfg.seed})")
        self.step = {s: 0 for s in self.forget_splits}   # every rank asks for each forget split once per step

    def teacher_batch(self, ctx: Context, split: str, rows: list[int]):
        """The forget rows as the teacher sees them: instruction + question, image with fresh noise."""
        cfg, self.step[split] = ctx.cfg, self.step[split] + 1
        chunk = []
        for i in rows:
            row, image = ctx.splits[split][i], ctx.splits[split][i].load_image()
            if image is not None:
                image = noised(image, cfg.vgid_sigma, np.random.default_rng([cfg.seed, self.step[split], i]))
            chunk.append(Example(f"{cfg.vgid_instruction} {row.prompt()}", row.answer, image))
        return ctx.adapter.encode(chunk).to(ctx.adapter.device)

    def terms(self, ctx: Context, split: str, batch, rows: list[int]) -> dict[str, Term]:
        student = ctx.forward(batch)
        if split in self.forget_splits:
            teacher = self.teacher_batch(ctx, split, rows)
            kl = answer_kl(ctx.vanilla_logits(teacher), teacher.labels, student, batch.labels)
            return {f"kl_{split}": Term(kl, ctx.cfg.alpha)}
        return {f"kl_{split}": Term(answer_kl(ctx.vanilla_logits(batch), batch.labels, student, batch.labels))}


METHOD = VGID()
