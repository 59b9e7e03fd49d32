"""The reference for LiteMedSAM's batched decoder: SAM's mask decoder as published, run once per box prompt
on its own copy of the slice's embedding (what auvcore ran before issue 23), and an encoder that decodes with
it. Used as the oracle by tests/test_litemedsam.py and as the "before" of bench/bench_encoders.py
--litemedsam; not a product path."""
from __future__ import annotations

import torch

from auvcore.encoders import litemedsam as lm


def _block(b, q, k, qpe, kpe):
    """SAM's TwoWayAttentionBlock (skip_first_layer_pe on the first block)."""
    if b.first:
        q = b.self_attn(q, q, q)
    else:
        t = q + qpe
        q = q + b.self_attn(t, t, q)
    q = b.norm1(q)
    kk = k + kpe
    q = b.norm2(q + b.cross_attn_token_to_image(q + qpe, kk, k))
    q = b.norm3(q + b.mlp(q))
    k = b.norm4(k + b.cross_attn_image_to_token(kk, q + qpe, q))
    return q, k


def plain_decode(net: lm.LiteMedSAM, emb: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """SAM's mask decoder, single-mask output: ``emb [n, 256, 64, 64]`` (one per box), ``boxes [n, 4]`` →
    logits ``[n, 1, 256, 256]``."""
    n = boxes.shape[0]
    pe_enc, md = net.prompt_encoder, net.mask_decoder
    dt = emb.dtype
    sparse = pe_enc.boxes(boxes).to(dt)
    dense = pe_enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, lm.EMB, lm.EMB).to(dt)
    pe = pe_enc.dense_pe().to(dt)
    out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], 0).to(dt)
    tokens = torch.cat([out_tokens[None].expand(n, -1, -1), sparse], dim=1)
    src = emb + dense
    k = src.flatten(2).transpose(1, 2)
    kpe = pe.expand(n, -1, -1, -1).flatten(2).transpose(1, 2)
    tr = md.transformer
    q = tokens
    for b in tr.layers:
        q, k = _block(b, q, k, tokens, kpe)
    q = tr.norm_final_attn(q + tr.final_attn_token_to_image(q + tokens, k + kpe, k))
    up = md.output_upscaling(k.transpose(1, 2).reshape(n, -1, lm.EMB, lm.EMB))  # [n, 32, 256, 256]
    hyper = md.output_hypernetworks_mlps[0](q[:, 1])
    return (hyper[:, None] @ up.flatten(2)).view(n, 1, lm.IMG, lm.IMG)


class ReferenceLiteMedSAM(lm.LiteMedSAMEncoder):
    """LiteMedSAMEncoder with the decoder above: ``batch_size`` prompts at a time, each on a copy of its
    slice's embedding, and the image encoder's GELUs as separate operations (the code before issue 23).
    Shares the network of ``enc``."""

    _decode_all = False

    def __init__(self, enc: lm.LiteMedSAMEncoder, batch_size: int = 8):
        self.__dict__.update(enc.__dict__)
        self.batch_size, self.prompt_batch = int(batch_size), None

    def _embed(self, vol, zs, size):
        fuse, lm.FUSE_CPU = lm.FUSE_CPU, False
        try:
            return super()._embed(vol, zs, size)
        finally:
            lm.FUSE_CPU = fuse

    def _decode(self, emb, idx, boxes, size, shape):
        e = emb["emb"]
        logits = plain_decode(self.net, e[torch.tensor(idx, device=self.device)], boxes.to(self.device))
        logits = logits[:, :, :size[0], :size[1]]
        if tuple(size) != tuple(shape):
            logits = torch.nn.functional.interpolate(logits, size=shape, mode="bilinear", align_corners=False)
        return logits[:, 0].float().cpu()
