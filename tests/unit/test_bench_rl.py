"""`pipeline report` on an RL run's metrics.jsonl (hand-written): a return-vs-env-steps panel on top of
the usual panels and an episode-return line in the summary; other runs keep their panels. And the
return curve `pipeline bench rl` tables."""

import json

import matplotlib.image

from pipeline import report
from pipeline.bench import rl

STEPS_PER_LOG = 5120  # 10 rollouts of 512 env steps


def write_run(run_dir, rows):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.yaml").write_text("name: ppo-test\ntrain: {max_steps: 40}\ntask: {name: ppo}\n")


def rl_rows():
    rows = []
    for i, ret in enumerate([20.0, 80.0, 250.0, 500.0], start=1):
        rows.append(
            {
                "step": 10 * i,
                "time": 100.0 + i,
                "train/loss": 1.0 / i,
                "train/policy_loss": -0.01,
                "train/value_loss": 2.0 / i,
                "train/samples_per_s": 2000.0,
                "train/episode_return": ret,
                "train/env_steps": STEPS_PER_LOG * i,
                "train/lr": 2.5e-4 * (1 - i / 4),
            }
        )
        if i % 2 == 0:  # the eval row: the step, no env-step counter
            rows.append(
                {
                    "step": 10 * i,
                    "eval/return": ret,
                    "eval/return_std": 3.0,
                    "eval/length": ret,
                    "eval/episodes": 20.0,
                }
            )
    return rows


def png_height(path):
    return matplotlib.image.imread(path).shape[0]


def test_rl_run_gets_a_return_vs_env_steps_panel_and_summary_line(tmp_path):
    run_dir = tmp_path / "rl"
    write_run(run_dir, rl_rows())
    rows, events, config = report.load(run_dir)
    assert report.is_rl(rows)
    # eval rows carry no counter: their env steps come from the train rows at the same steps
    assert report.env_steps_of(rows, [20, 40, 25]) == [
        2 * STEPS_PER_LOG,
        4 * STEPS_PER_LOG,
        2.5 * STEPS_PER_LOG,
    ]
    png = report.plot(rows, "rl", run_dir / "report.png")
    # 4 step panels (loss, eval length, samples/s, lr) + the return panel, 2.6 inches each at 100 dpi
    assert png_height(png) == 5 * 260
    text = report.summary(run_dir, rows, events, config)
    assert "episode return train/episode_return 500.0 at 20,480 env steps (best 500.0)" in text
    assert "eval/return 500.0 +- 3.0 over 20 episodes at step 40" in text


def test_other_runs_keep_their_panels(tmp_path):
    run_dir = tmp_path / "sup"
    rows = [
        {"step": s, "time": float(s), "train/loss": 1.0 / s, "train/samples_per_s": 100.0, "train/lr": 0.1}
        for s in (1, 2, 3)
    ] + [{"step": 3, "eval/accuracy": 0.9, "eval/samples": 100}]
    write_run(run_dir, rows)
    rows, events, config = report.load(run_dir)
    assert not report.is_rl(rows)
    assert png_height(report.plot(rows, "sup", run_dir / "report.png")) == 4 * 260
    assert "episode return" not in report.summary(run_dir, rows, events, config)


def test_bench_return_curve_spreads_points_and_keeps_the_last():
    rows = [{"step": i, "train/env_steps": 512 * i, "train/episode_return": float(i)} for i in range(1, 101)]
    rows.append({"step": 100, "eval/return": 500.0})  # no counter: not a curve point
    curve = rl.return_curve(rows, points=5)
    assert curve[0] == (512, 1.0) and curve[-1] == (51200, 100.0) and len(curve) == 5
    assert [s for s, _ in curve] == sorted(s for s, _ in curve)
    assert rl.return_curve(rows[:3], points=5) == [(512, 1.0), (1024, 2.0), (1536, 3.0)]
