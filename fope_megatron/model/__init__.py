"""megatron-core integration: FoPE self-attention, core attentions, layer specs, GPT builder."""
