"""The former name of :mod:`fastrm.advantages` (the RL building blocks: advantage estimators, KL controllers,
baselines, the curriculum sampler), kept so ``fastrm.rl.grpo_scores`` and ``from fastrm import rl`` go on working:
importing it gives that very module object, so a patch through either name is seen through both."""

import sys

from fastrm import advantages

sys.modules[__name__] = advantages
