"""Child process for test_host_files.test_sigkill_during_a_save: boots the real host on the parent's work
dir, trains D2FTrain with save_every=1 and blocks inside one of its saves, with part of the temp file
written, until the parent SIGKILLs it.

    python kill_during_save.py <host dir> <work dir> <unet file name> <run_name> <block at write #> <marker>

The block is at the underlying writer (``d2f_core.storage.files.save_file``): writes go LoRA, state, LoRA, state,
… (one pair per saved step), so write 3 is step 2's LoRA and write 4 step 2's state. When blocked the
child writes the temp file's path into <marker> and sleeps.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_host  # noqa: E402


def main(host_dir, work_dir, unet_name, run_name, block_at, marker):
    host = comfy_host.boot_host(host_dir, work_dir)
    import safetensors.torch
    import torch

    from test_host_train import dataset, train

    train_node = sys.modules[host.node_class("D2FTrain").__module__]
    files = sys.modules[train_node.plain_name.__module__]
    real, calls = files.save_file, []

    def blocking(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == int(block_at):
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            with open(marker + ".part", "w") as f:
                f.write(path)
            os.replace(marker + ".part", marker)
            time.sleep(600)  # the parent kills us here
        return real(tensors, path, metadata=metadata)

    files.save_file = blocking
    torch.set_num_threads(1)
    model = host.run1("UNETLoader", unet_name=unet_name, weight_dtype="default")
    latents, positive = dataset(2, seed=11)
    train(host, model, latents, positive, steps=4, save_every=1, run_name=run_name)
    sys.exit("the save never blocked")


if __name__ == "__main__":
    main(*sys.argv[1:])
