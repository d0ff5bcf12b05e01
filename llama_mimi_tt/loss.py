"""Cross-entropy over chunked outputs that also measures the semantic and acoustic levels.

The paper's central trade-off (more Mimi levels: better acoustics, worse linguistics) shows in
how well the model predicts level 0 (semantic, distilled from WavLM) against levels 1..Q-1
(acoustic). This loss returns torchtune's token-mean cross-entropy and keeps, as a detached
tensor, the summed loss and the token count of each group from the same per-token losses, so the
recipes log both without a second pass and without a host sync per step.
"""

from typing import List

import torch
import torch.nn.functional as F
from torchtune.modules.loss import CEWithChunkedOutputLoss

from llama_mimi_tt.vocab import LLAMA3_TEXT_VOCAB_SIZE, MimiVocab


class LlamaMimiLoss(CEWithChunkedOutputLoss):
    """``CEWithChunkedOutputLoss`` plus ``level_stats``: ``[semantic_sum, semantic_tokens,
    acoustic_sum, acoustic_tokens]`` of the last call (text and ``</audio>`` targets count in
    the total only)."""

    def __init__(
        self,
        num_quantizers: int = 4,
        text_vocab_size: int = LLAMA3_TEXT_VOCAB_SIZE,
        num_output_chunks: int = 8,
        ignore_index: int = -100,
    ):
        super().__init__(num_output_chunks=num_output_chunks, ignore_index=ignore_index)
        self.vocab = MimiVocab(text_vocab_size=text_vocab_size, num_quantizers=num_quantizers)
        self.level_stats = torch.zeros(4)

    def forward(self, logits: List[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, list):  # a model without output chunks: one chunk
            logits = [logits.reshape(labels.shape[0], -1, logits.shape[-1])]
            labels = labels.reshape(labels.shape[0], -1)
        total_tokens = (labels != self.ignore_index).sum()
        stats = torch.zeros(4, device=labels.device)
        total = torch.zeros((), device=labels.device)
        for chunk, target in zip(logits, labels.chunk(len(logits), dim=1)):
            target = target.reshape(-1)
            per_token = F.cross_entropy(
                chunk.reshape(-1, chunk.size(-1)).float(),
                target,
                ignore_index=self.ignore_index,
                reduction="none",
            )
            total = total + per_token.sum()
            audio = self.vocab.is_audio(target)
            semantic = audio & (self.vocab.level_of(target) == 0)
            acoustic = audio & ~semantic
            d = per_token.detach()
            stats += torch.stack(
                [(d * semantic).sum(), semantic.sum(), (d * acoustic).sum(), acoustic.sum()]
            )
        self.level_stats = stats
        return total / total_tokens.clamp(min=1)
