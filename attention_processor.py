"""The [V*] cross-attention processor of DefectFill's attention loss (paper Eq. 6), under the name the
diffusers attention-processor convention gives it.

`VStarCrossAttnProcessor` replaces the processor of every decoder cross-attention layer (``up_blocks.*.attn2``)
and, while its `VStarAttentionStore` records, keeps the softmaxed attention of the [V*] token's columns
(averaged over heads, not detached: the loss trains the LoRA); otherwise it calls the processor it replaced
(SDPA or xformers). The implementation is `defectfill.attention`; this module is its public face:

    from attention_processor import VStarAttentionStore, install_vstar_capture
    store = VStarAttentionStore()
    install_vstar_capture(unet, store)
"""

from defectfill.attention import (
    StepAveragingStore,
    VStarAttentionStore,
    VStarCrossAttnProcessor,
    decoder_cross_attention_modules,
    install_vstar_capture,
    is_decoder_cross_attention,
    layer_spatial_size,
    remove_vstar_capture,
    token_piece_ids,
    token_weights,
)

__all__ = [
    "StepAveragingStore",
    "VStarAttentionStore",
    "VStarCrossAttnProcessor",
    "decoder_cross_attention_modules",
    "install_vstar_capture",
    "is_decoder_cross_attention",
    "layer_spatial_size",
    "remove_vstar_capture",
    "token_piece_ids",
    "token_weights",
]
