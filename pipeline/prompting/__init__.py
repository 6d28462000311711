"""From any prompt (text, weights, comma parts, images, mixes) to the embedding and states."""
