"""``rcx.correction``, kept for library users: the correction lives in :mod:`rcx.algos.correction`.

``from rcx.correction import compute_rollout_correction`` keeps working (string settings, as
``rcx validate`` accepts them); new code imports from :mod:`rcx.algos.correction`.
"""

from rcx.algos.correction import CorrectionResult, compute_rollout_correction

__all__ = ["CorrectionResult", "compute_rollout_correction"]
