"""Cross-entropy over chunked outputs that also measures the semantic and acoustic levels.

The paper's central trade-off (more Mimi levels: better acoustics, worse linguistics) shows in
how well the model predicts level 0 (semantic, distilled from WavLM) against levels 1..Q-1
(acoustic). ``LlamaMimiLoss`` is torchtune's token-mean cross-entropy (``forward`` returns that
one tensor, as any torchtune loss, so torchtune's own recipes can use it), and
``loss_and_level_stats`` returns it together with the summed loss and token count of each group,
from the same per-token losses: no second pass and no host sync per step. Our recipes call the
latter.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torchtune.modules.loss import CEWithChunkedOutputLoss

from llama_mimi_tt.vocab import LLAMA3_TEXT_VOCAB_SIZE, MimiVocab


class LlamaMimiLoss(CEWithChunkedOutputLoss):
    """``CEWithChunkedOutputLoss`` that also measures the levels: ``forward`` returns the loss
    (a tensor, as torchtune's recipes expect), ``loss_and_level_stats`` returns
    ``(loss, level_stats)``, where ``level_stats`` is
    ``[semantic_sum, semantic_tokens, acoustic_sum, acoustic_tokens]`` (detached; text and
    ``</audio>`` targets count in the loss only).

    In torchtune's own recipes prefer ``torchtune.modules.loss.CEWithChunkedOutputLoss`` (the
    same loss): they chunk the model's output only for a loss of exactly that class name, so
    with this one they compute the whole logits at once.

    The per-chunk work (upcast, cross-entropy, level sums) is ``compute_cross_entropy``, which is
    what ``torchtune.training.compile_loss`` compiles for a chunked loss.
    """

    def __init__(
        self,
        num_quantizers: int = 4,
        text_vocab_size: int = LLAMA3_TEXT_VOCAB_SIZE,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
    ):
        super().__init__(num_output_chunks=num_output_chunks, ignore_index=ignore_index)
        self.vocab = MimiVocab(text_vocab_size=text_vocab_size, num_quantizers=num_quantizers)

    def compute_cross_entropy(
        self, logits: torch.Tensor, labels: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """``[loss_sum, semantic_sum, semantic_tokens, acoustic_sum, acoustic_tokens]`` of one
        chunk (logits ``[N, V]``, labels ``[N]``)."""
        per_token = F.cross_entropy(
            logits.float(), labels, ignore_index=self.ignore_index, reduction="none"
        )
        audio = self.vocab.is_audio(labels)
        semantic = audio & (self.vocab.level_of(labels) == 0)
        acoustic = audio & ~semantic
        d = per_token.detach()
        return torch.stack(
            [
                per_token.sum(),
                (d * semantic).sum(),
                semantic.sum().to(d.dtype),
                (d * acoustic).sum(),
                acoustic.sum().to(d.dtype),
            ]
        )

    def loss_and_level_stats(
        self, logits: List[torch.Tensor] | torch.Tensor, labels: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(token-mean loss, level_stats)`` of output chunks ``[B, S / n, V]`` (or whole logits
        ``[B, S, V]`` / ``[N, V]``) against labels ``[B, S]`` (or ``[N]``)."""
        if not isinstance(logits, list):  # a model without output chunks: one chunk
            logits = [logits.reshape(labels.shape[0], -1, logits.shape[-1])]
            labels = labels.reshape(labels.shape[0], -1)
        total_tokens = (labels != self.ignore_index).sum()
        sums = sum(
            self.compute_cross_entropy(chunk.reshape(-1, chunk.size(-1)), target.reshape(-1))
            for chunk, target in zip(logits, labels.chunk(len(logits), dim=1))
        )
        return sums[0] / total_tokens.clamp(min=1), sums[1:].detach()

    def forward(
        self, logits: List[torch.Tensor] | torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The token-mean cross-entropy, as ``CEWithChunkedOutputLoss``."""
        return self.loss_and_level_stats(logits, labels)[0]
