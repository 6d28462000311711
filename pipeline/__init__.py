"""CLIP Text Deprojector: one CLIP embedding back to the 77 hidden states SD is conditioned on."""
