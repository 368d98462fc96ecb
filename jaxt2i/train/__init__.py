"""Training one cascade stage (base or super-resolution); `python -m jaxt2i.train` runs it.

    python -m jaxt2i.train --config=configs/base.py:size=demo --workdir=runs/base

The same code runs on 1 CPU, simulated devices, a GPU node or a TPU pod: the mesh and the
logical-axis rules come from the config, the state is created sharded (`jax.eval_shape` +
jitted init with `out_shardings`), and one jitted `train_step` with donated state does
everything per step: frozen T5 on the token ids (or cached embeddings), condition dropout,
noise-conditioning augmentation (SR), the diffusion loss, gradient accumulation, the optimizer,
EMA, and skipping of non-finite updates. Orbax checkpoints hold the state, the data iterator
position and the config; SIGTERM saves at the next step boundary and exits 0.
"""

from jaxt2i.train.loop import Cadence, TrainingStopped, train
from jaxt2i.train.trainer import Trainer

__all__ = ["Cadence", "Trainer", "TrainingStopped", "train"]
