"""The op's identity, shared by the graph that emits it and every registration that runs it
(ONNX Runtime's native kernel in ort_kernel.c spells the same two strings in C).

    y = ChannelGatherMatMul(x [B, S, in], bank [K, out, in], index [N, out] int32, expert_id [B])
    y[b, s, c] = sum_i x[b, s, i] * bank[index[expert_id[b], c], c, i]
"""

DOMAIN = "chmc"  # the ONNX domain, and TensorRT's plugin namespace
NAME = "ChannelGatherMatMul"
PLUGIN_ID = f"{DOMAIN}::{NAME}"  # how TensorRT's registry names it
