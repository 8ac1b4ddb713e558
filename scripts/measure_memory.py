"""Peak memory of PGL training steps on CPU for the encoder's memory options (figures in docs/production.md).

    python scripts/measure_memory.py --layers "[3,4,6,3]" --patch "[96,96,16]" --batch 2

Each setting runs in a fresh subprocess (`step` below): it builds the network of configs/pretrain.json, runs
``steps`` training steps (both views through both paths, loss, backward, Adam) and prints the peak resident set size
(``resource.getrusage``), the part of it above the RSS of the network with its gradients and Adam's state (the
activations, mostly), and the fastest step's seconds. Asserts nothing.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import fire
import torch
from monai.bundle import ConfigParser
from monai.data import list_data_collate
from pgl_bundle import ConsistencyLoss, RandPGLViewsd

SETTINGS = {
    "baseline": {},
    "activation checkpointing": {"activation_checkpointing": True},
    "channels-last": {"channels_last": True},
    "checkpointing + channels-last": {"activation_checkpointing": True, "channels_last": True},
    "bf16 autocast (CPU stand-in for AMP)": {"autocast": True},
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step(layers: list[int], patch: list[int], batch: int, options: dict, steps: int = 3) -> None:
    """One setting, in this process: print a JSON line with the peak RSS and the time per step."""
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config("configs/pretrain.json")
    parser.update(
        {
            "encoder_layers": list(layers),
            "patch_size": list(patch),
            "activation_checkpointing": options.get("activation_checkpointing", False),
            "channels_last": options.get("channels_last", False),
        }
    )
    network = parser.get_parsed_content("network_def").train()
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    views = RandPGLViewsd("image", roi_size=patch)
    volume = {"image": torch.rand(1, *(round(1.5 * s) for s in patch))}
    data = list_data_collate([views(volume) for _ in range(batch)])
    loss_function = ConsistencyLoss()
    for p in optimizer.param_groups[0]["params"]:  # allocate gradients and Adam's state: "built" holds them
        p.grad = torch.zeros_like(p)
    optimizer.step()
    built = _peak_mb()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=options.get("autocast", False)):
            predictions, targets = network(data["view1"], data["view2"], data["view1_geometry"], data["view2_geometry"])
            loss = loss_function((predictions, targets), None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"built_mb": built, "peak_mb": _peak_mb(), "s_per_step": min(times)}))


def main(layers: tuple = (3, 4, 6, 3), patch: tuple = (96, 96, 16), batch: int = 2, steps: int = 3) -> None:
    """Every setting of :data:`SETTINGS` in a fresh process; prints a Markdown table."""
    print(
        f"| setting (encoder {list(layers)}, patch {list(patch)}, batch {batch}) | peak RSS (MB) "
        "| above the built network (MB) | s / step |\n| --- | --- | --- | --- |"
    )
    for name, options in SETTINGS.items():
        cmd = [
            sys.executable,
            __file__,
            "step",
            json.dumps(list(layers)),
            json.dumps(list(patch)),
            str(batch),
            repr(options),
            f"--steps={steps}",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        above = r["peak_mb"] - r["built_mb"]
        print(f"| {name} | {r['peak_mb']:.0f} | {above:.0f} | {r['s_per_step']:.1f} |", flush=True)


if __name__ == "__main__":
    fire.Fire({"main": main, "step": step})
