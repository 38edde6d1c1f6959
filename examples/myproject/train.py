"""Train this project from Python: `pipeline.train` returns a `Result` (as Ray Train's fit() does).

PYTHONPATH=examples/myproject python examples/myproject/train.py
"""

from __future__ import annotations

import pipeline


def main() -> None:
    try:
        result = pipeline.train(
            "configs/example-myproject.yaml",
            train={"max_steps": 200},  # nested overrides, validated like key=value on the CLI
            run_dir="runs/myproject-from-python",  # its own run dir: the CLI run's would be resumed
        )
    except pipeline.Preempted as stop:  # SIGTERM/SIGUSR1: a checkpoint was committed; run again to resume
        print(f"preempted at step {stop.result.metrics.get('step')}: run again to resume")
        return
    print(f"run {result.run_id} in {result.run_dir}")
    print(f"best {result.best}, last checkpoint {result.checkpoint}")
    print({k: v for k, v in result.metrics.items() if k.startswith("eval/")})


if __name__ == "__main__":
    main()
