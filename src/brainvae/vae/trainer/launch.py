"""Start a training on several processes (one per GPU, gloo processes on CPU) and wait for it.

:func:`train_vae_parallel` is what the workflow's ``train_vae`` rule calls: with one process it is
:func:`~brainvae.vae.trainer.loop.train_vae` itself; with more it writes the call's arguments next to the checkpoint,
runs ``python -m brainvae.vae.trainer.launch <arguments.json>`` under torchrun (and srun across SLURM nodes, see
:func:`~brainvae.vae.trainer.distributed.launch_command`), and returns rank 0's metrics.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .distributed import launch_command, run_launched, world_from_env

__all__ = ["train_vae_parallel"]

ARGUMENTS_NAME = "launch_arguments.json"


def train_vae_parallel(config: dict[str, Any] | None, array_path: str | os.PathLike[str],
                       mask_path: str | os.PathLike[str] | None, index: str | os.PathLike[str],
                       splits: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                       checkpoint_dir: str | os.PathLike[str], processes_per_node: int = 1, nodes: int = 1,
                       **options: Any) -> dict[str, Any]:
    """:func:`~brainvae.vae.trainer.loop.train_vae` on ``nodes`` x ``processes_per_node`` processes.

    ``index`` and ``splits`` must be files here (every process reads them); ``options``: the other keywords of
    train_vae (JSON values: device, deterministic, max_epochs, threads, model_name, keep_checkpoint, ...).
    """
    from .loop import train_vae

    if processes_per_node * nodes <= 1 or world_from_env().enabled:
        return train_vae(config, array_path, mask_path, index, splits, out_dir, checkpoint_dir=checkpoint_dir,
                         **options)
    arguments = {"config": config, "array_path": str(array_path),
                 "mask_path": None if mask_path is None else str(mask_path), "index": str(index),
                 "splits": str(splits), "out_dir": str(out_dir), "checkpoint_dir": str(checkpoint_dir),
                 "options": options}
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    request = Path(checkpoint_dir) / ARGUMENTS_NAME
    request.write_text(json.dumps(arguments, indent=1))
    threads = options.get("threads")
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    run_launched(launch_command(["brainvae.vae.trainer.launch", str(request)],
                                processes_per_node=processes_per_node, nodes=nodes), env=env)
    return json.loads((Path(out_dir) / "metrics.json").read_text())


def main(argv: Sequence[str]) -> None:
    """One process of a launched training (``python -m brainvae.vae.trainer.launch <arguments.json>``)."""
    import logging

    from .loop import train_vae

    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', 0)}] %(levelname)s %(message)s")
    arguments = json.loads(Path(argv[0]).read_text())
    options = arguments.pop("options")
    train_vae(arguments.pop("config"), arguments.pop("array_path"), arguments.pop("mask_path"),
              arguments.pop("index"), arguments.pop("splits"), arguments.pop("out_dir"),
              checkpoint_dir=arguments.pop("checkpoint_dir"), **options)


if __name__ == "__main__":
    main(sys.argv[1:])
