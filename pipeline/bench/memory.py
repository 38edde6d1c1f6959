"""`pipeline bench memory`: what `model.activation_checkpointing` saves and costs. ResNet-50 at 224 px
(synthetic batches, SGD with momentum, fp32), built by the pipeline's own model registry and
checkpointed by its own `training.activations`, trained a few steps with and without it, each in a
fresh process (a process's peak RSS never goes down).

Activation memory = the peak RSS over the measured steps less the RSS after a warm-up step (weights,
gradients and momentum in place). glibc would keep freed activations in its heap and hide them from
RSS; the child fixes malloc's mmap threshold, so every large tensor is its own mapping and returns to
the system when freed. Rows: peak RSS per worker, activation memory (ratio = with / without, goal
<= 0.7) and s/step (ratio = with / without, goal <= 1.35), for `true` (every residual block) and for
the first two stages only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from pipeline.bench import BenchError, row

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from torch.nn import functional
    from pipeline import models
    from pipeline.training import activations

    model_name, setting = sys.argv[1], json.loads(sys.argv[5])
    side, batch, steps = (int(v) for v in sys.argv[2:5])
    torch.manual_seed(0)
    model = models.build(model_name, {}, [3, side, side], 10)
    blocks = activations.apply(model, setting)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, side, side), torch.randint(0, 10, (batch,))

    def step():
        loss = functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    step()  # warm-up: gradients and momentum allocated, kernels chosen
    static = rss_mb()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"static_mb": static, "peak_mb": peak, "s_per_step": seconds, "blocks": len(blocks)}))
    """
)


EARLY_STAGES = ["layer1.*", "layer2.*"]


def measure(model: str, side: int, batch: int, steps: int, setting: bool | list[str]) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(side), str(batch), str(steps), json.dumps(setting)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise BenchError(f"bench memory: the {model} run failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    model: str = "resnet50",
    side: int = 224,
    batch: int = 8,
    steps: int = 3,
    echo: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    results = {}
    for key, setting in (("off", False), ("on", True), ("early", EARLY_STAGES)):
        echo(f"memory: {model} {side}x{side}, batch {batch}, activation checkpointing {setting} ...")
        results[key] = measure(model, side, batch, steps, setting)
    off, on, early = results["off"], results["on"], results["early"]
    activation_off = off["peak_mb"] - off["static_mb"]
    activation_on = on["peak_mb"] - on["static_mb"]
    name = f"memory {model} activation checkpointing"  # this row's name is kept: ratio = peak with / without
    return [
        row(name, on["peak_mb"], "MiB", off["peak_mb"]),
        row(f"{name}: activation memory (goal ratio <= 0.7)", activation_on, "MiB", activation_off),
        row(f"{name}: s/step (goal ratio <= 1.35)", on["s_per_step"], "s", off["s_per_step"]),
        row(f"{name}: blocks checkpointed", on["blocks"], "blocks"),
        # the early stages hold most of the activations at 224 px (56x56 and 28x28 maps) but only about
        # half of the compute: the cheaper trade when step time matters more than the last MiB
        row(
            f"{name}: {' + '.join(EARLY_STAGES)} only, activation memory",
            early["peak_mb"] - early["static_mb"],
            "MiB",
            activation_off,
        ),
        row(f"{name}: {' + '.join(EARLY_STAGES)} only, s/step", early["s_per_step"], "s", off["s_per_step"]),
    ]
