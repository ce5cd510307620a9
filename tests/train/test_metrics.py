import json

from diffjax.train.metrics import MetricsWriter


def steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_fresh_run_replaces_records_and_a_resumed_one_keeps_those_up_to_its_step(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (1, 2, 3, 4):
        writer.write("metrics", step, {"loss": float(step)})
    writer.write("eval", 4, {"eval_loss": 1.0})
    writer.close()

    resumed = MetricsWriter(tmp_path, resume_step=2)  # steps 3 and 4 are trained again
    assert steps(tmp_path / "metrics.jsonl") == [1, 2] and steps(tmp_path / "eval.jsonl") == []
    resumed.write("metrics", 3, {"loss": 3.0})
    resumed.close()
    assert steps(tmp_path / "metrics.jsonl") == [1, 2, 3]

    fresh = MetricsWriter(tmp_path)
    fresh.write("metrics", 1, {"loss": 1.0})
    fresh.close()
    assert steps(tmp_path / "metrics.jsonl") == [1]
