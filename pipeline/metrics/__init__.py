"""Losses, intervals, retrieval, states scores, picture adherence and paired comparisons."""
