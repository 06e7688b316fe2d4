"""Running a plan: stages on torch.distributed.pipelining, the per-rank loop, data, checkpoints, report, launcher.

May import: everything; the only package that imports torch.distributed (pipelining only in ``stages``).
"""
