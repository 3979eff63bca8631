"""GGML block types: size table, torch dequantizers, QTensor, QMatMul, GPU kernels."""
