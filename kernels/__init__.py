"""Triton kernels of the MAKE objective (SPEC section 4).

The objective's dense torch path (`make_dist.objective.column_logsumexp`
and `knowledge_embedding`) defines what the kernels compute; the kernels
land with the issue "Kernels".
"""
