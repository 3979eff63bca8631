"""The quantized Mixtral: modules, placement, tokenizer and generation."""
