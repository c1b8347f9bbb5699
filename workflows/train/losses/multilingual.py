"""Multilingual knowledge distillation (Reimers & Gurevych 2020): sentence-transformers' ``MSELoss``.

For a parallel pair (source ``s``, translation ``t``) and the teacher's embedding ``T(s)``::

    loss = 1/2 * ( mean_d (S(s) - T(s))^2 + mean_d (S(t) - T(s))^2 )      (means over batch and dims)

The student ``S`` learns to place the translation where the teacher places the source, and keeps
the source where it was. This is exactly ``sentence_transformers...losses.MSELoss`` (the mean over
the input columns of ``torch.nn.functional.mse_loss``), the loss of sentence-transformers'
``make_multilingual`` example; the subclass only checks, before the loss runs, that the teacher's
width matches the student's, so a mismatch names the objective's ``teacher`` field instead of
failing inside a broadcast.

Inputs: features of the ``source_sentence`` and ``translation`` columns; labels (B, D) float32 =
the teacher's embeddings of the sources (:mod:`workflows.train.teacher`).

Example::

    from sentence_transformers import SentenceTransformer
    student = SentenceTransformer("all-MiniLM-L6-v2")
    loss = MultilingualDistillLoss(student)
    teacher = torch.from_numpy(student.encode(["A man plays."]))
    features = [student.preprocess(["A man plays."]), student.preprocess(["Ein Mann spielt."])]
    loss(features, teacher).backward()
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from sentence_transformers.sentence_transformer.losses import MSELoss


class MultilingualDistillLoss(MSELoss):
    """``MSELoss`` (student embeddings of every input column vs the teacher's embedding of the source)."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        if labels is not None and labels.dim() == 2:
            student_dim = self.model.get_embedding_dimension()
            if labels.shape[1] != student_dim:
                raise ValueError(f"multilingual_distill: the teacher's embeddings have {labels.shape[1]} dims but "
                                 f"the student's have {student_dim}; set objective.teacher to a model of the "
                                 f"student's width (or leave it unset: the base model)")
        return super().forward(sentence_features, labels)
