"""Hard samples (paper section 4.1, Table 11): the rules live in ``actgen_shared.selection``, shared
with the client API's Lightning callback, so the trainer and the callback pick alike."""

from actgen_shared.selection import Rule, hard_indices, sample_hard, select_guides, take_ranked

__all__ = ["Rule", "hard_indices", "sample_hard", "select_guides", "take_ranked"]
