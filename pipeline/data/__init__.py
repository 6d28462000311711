"""Caption sources, image/caption pairs, extraction of CLIP hidden states, Arrow shards."""
