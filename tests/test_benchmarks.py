"""Smoke test of the epoch-time benchmark's own arithmetic (the benchmark itself is not run in CI)."""

import json
import math

import pytest
from conftest import load_benchmark, write_tiny_chorales


@pytest.fixture(scope="module")
def epoch_time():
    return load_benchmark("epoch_time")


def test_flop_count_of_the_reference_architecture(epoch_time):
    # rnn 88*600 + 600*600, combiner 100*600 + 2*600*100, transition 2*(100*200 + 200*100)
    # + 2*100*100, emitter 100*100 + 100*100 + 100*88 multiply-adds, times 2.
    assert epoch_time.forward_flops_per_step() == 2 * (412_800 + 180_000 + 100_000 + 28_800)


def test_floor_counts_the_loops_matmuls_at_the_loop_rate_and_the_rest_at_the_large_rate(
    epoch_time,
):
    # Per loop step and sequence: rnn 600*600, combiner 100*600 + 600*200 multiply-adds, x 2
    # for FLOPs, x 2 for the forward and backward loops.
    assert epoch_time.loop_flops_per_step(batch=1) == 2 * 2 * (360_000 + 60_000 + 120_000)
    assert epoch_time.loop_flops_per_step(batch=20) == 20 * epoch_time.loop_flops_per_step(1)
    # 100 loop steps of a batch of 20 at 1 GFLOP/s; 1000 real steps' other FLOPs at 10 GFLOP/s.
    batched = 3 * epoch_time.forward_flops_per_step() - epoch_time.loop_flops_per_step(1)
    floor = epoch_time.floor_seconds(100, 1000, loop_gflops=1.0, matmul_gflops=10.0)
    assert floor == pytest.approx(100 * 20 * 2_160_000 / 1e9 + 1000 * batched / 10e9)


def test_loop_steps_of_an_epoch_sum_each_batchs_longest_sequence(epoch_time):
    lengths = [5] * 20 + [9] * 20
    # Grouped by length, one batch holds the 5s and one the 9s; shuffled, a batch without a 9
    # has probability 2 / C(40, 20) (about 1e-11) per epoch, and the keys are fixed.
    assert epoch_time.loop_steps_per_epoch(lengths, 20, length_grouped=True) == 14
    assert epoch_time.loop_steps_per_epoch(lengths, 20, length_grouped=False) == 18
    assert epoch_time.loop_steps_per_epoch(lengths, 40) == 9


def test_summary_and_table_from_saved_json(epoch_time, tmp_path, capsys):
    epochs = [
        {
            "seconds": s,
            "train_loss_per_step": 60.0 - i,
            "peak_rss_mib": 500.0,
            "compile_seconds": 9.0,
            "compiled_shapes": 3,
        }
        for i, s in enumerate([9, 2, 1, 3])
    ]
    info = {"device": "cpu", "platform": "cpu"}
    row = epoch_time.summarize(
        "dmm_jax", info, epochs, warmup=1, real_steps=1000, ceiling=100.0, floor=0.5
    )
    assert row["seconds_per_epoch"] == 2 and row["epochs_timed"] == 3
    assert row["useful_gflops_per_s"] == pytest.approx(
        3 * epoch_time.forward_flops_per_step() * 1000 / 2 / 1e9
    )
    row["speedup_vs_reference"] = 3.0
    out = tmp_path / "result.json"
    out.write_text(json.dumps({"rows": [row], "epochs": 4}))
    assert epoch_time.main(["--table-from", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| dmm_jax | cpu (cpu) | 2.000 | 9.0 | 3 |" in table and "3.00x" in table
    assert row["minutes_for_5000_epochs"] == pytest.approx(5000 * 2 / 60)
    # 5000 epochs at 2 s, in minutes; 2 s against a floor of 0.5 s.
    assert table.rstrip().endswith("| 3.00x | 166.7 | 0.500 (4.0x) |")
    # Runs saved before the floor was measured still print, with a dash there.
    del row["floor_seconds"]
    out.write_text(json.dumps({"rows": [row], "epochs": 4}))
    assert epoch_time.main(["--table-from", str(out)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("| 3.00x | 166.7 | - |")


def test_long_runs_resume_an_existing_run_and_report_its_figures(tmp_path, capsys):
    long_runs = load_benchmark("long_runs")
    train, evaluate = long_runs.commands("aug", tmp_path, 300, 1, 50)
    assert train[-2:] == ["--log-json", f"{tmp_path / 'aug'}.jsonl"]
    assert "--augmented" in train and "--resume" not in train
    assert evaluate[-4:] == ["--estimator", "is", "--samples", "50"]
    (tmp_path / "aug").mkdir()
    (tmp_path / "aug" / "checkpoint.msgpack").write_bytes(b"")
    assert long_runs.commands("aug", tmp_path, 300, 1, 50)[0][-1] == "--resume"

    records = [
        {"epoch": 249, "val_loss_per_step": 8.5, "test_loss_per_step": 8.6},
        {"epoch": 250, "train_loss_per_step": 8.0},
    ]
    (tmp_path / "aug.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = {"is_nll_per_step": 6.5, "num_samples": 50, "elbo_nll_per_step": 6.9}
    (tmp_path / "aug.eval.json").write_text(json.dumps(result))
    long_runs.main(["--runs-dir", str(tmp_path), "status"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("aug") and "epoch 250" in line
    assert "val/test bound 8.500/8.600 (epoch 249)" in line
    assert "test IS 6.500 (S=50), bound 6.900" in line


def test_long_runs_that_keep_the_best_state_also_evaluate_it(tmp_path, capsys):
    long_runs = load_benchmark("long_runs")
    name = "aug-analytic-kl-lr1e-3-cosine"
    train, last, best = long_runs.commands(name, tmp_path, 2500, 0, 2000)
    assert "--early-stopping-patience" in train and "--best" not in last
    assert best == [*last, "--best"]
    (tmp_path / f"{name}.jsonl").write_text(json.dumps({"epoch": 2499}) + "\n")
    for value, path in zip((6.30, 6.28), long_runs.result_files(name, tmp_path)):
        result = {"is_nll_per_step": value, "num_samples": 2000, "elbo_nll_per_step": 6.6}
        path.write_text(json.dumps(result))
    long_runs.main(["--runs-dir", str(tmp_path), "status"])
    line = capsys.readouterr().out.strip()
    assert "  test IS 6.300 (S=2000)" in line and "best test IS 6.280 (S=2000)" in line


def test_long_sequence_memory_worker_runs_one_microbatched_update():
    # The worker's code path on a tiny batch: 2 sequences of 8 steps in 2 micro-batches.
    result = load_benchmark("long_sequence_memory").worker(batch=2, steps=8, microbatch_steps=8)
    assert result["microbatches"] == 2
    assert result["xla_temp_mib"] > 0 and result["peak_rss_mib"] > 0
    assert result["loss_per_step"] > 0 and math.isfinite(result["loss_per_step"])


def test_long_sequence_epochs_worker_trains_micro_batches_on_their_real_steps():
    # One batch of 20 rows (6 sequences of 40 steps, 14 empty) padded to 48 steps, split at
    # 100 padded steps: 10 micro-batches of 2 rows, each on real-step slots of its own.
    bench = load_benchmark("long_sequence_epochs")
    result = bench.worker(True, 100, False, sequences=6, longest=40, epochs=1)
    (shape,) = result["compiled_shapes"]
    assert shape[:2] == [20, 48] and 0 < shape[3] <= 2 * 48
    assert math.isfinite(result["loss_per_step"]) and result["loss_per_step"] > 0


def test_lockstep_trains_both_implementations_alike_on_a_few_jsb_sequences(jsb_path, tmp_path):
    pytest.importorskip("torch", reason="needs the bench extra (torch)")
    pytest.importorskip("pyro", reason="needs the bench extra (pyro-ppl)")
    import dmm_jax.distributions

    own_noise = dmm_jax.distributions.step_noise
    lockstep = load_benchmark("lockstep")
    out = tmp_path / "lockstep.json"
    summary = lockstep.main(
        ["--epochs", "2", "--sequences", "6", "--data", str(jsb_path), "--out", str(out)]
    )
    assert summary["updates"] == 2 and summary["sequences"] == 6
    assert summary["agree_to_0.1%"] == 2 and summary["reference_error"] is None
    records = json.loads(out.read_text())["per_update"]
    assert records[1]["dmm_jax"] < records[0]["dmm_jax"]  # it trained
    assert dmm_jax.distributions.step_noise is own_noise  # the noise hook is undone


def test_early_training_counts_failed_spiked_and_finished_runs():
    bench = load_benchmark("early_training")
    runs = [
        {"seed": 0, "losses": [60.0, 50.0, 40.0], "error": None},
        {"seed": 1, "losses": [60.0, 2e5, 45.0], "error": None},  # spiked, recovered
        {"seed": 2, "losses": [60.0], "error": "epoch 1: Expected parameter loc ..."},
        {"seed": 3, "losses": [60.0, 55.0, 30.0], "error": None},
    ]
    summary = bench.summarize("impl", runs, epochs=3, spike=1e3)
    assert summary["failed"] == [2] and summary["spiked_and_recovered"] == [1]
    assert summary["finished"] == 3 and summary["median_final_loss"] == 40.0
    table = bench.format_table([summary], epochs=3, spike=1e3)
    assert "| impl | 4 | 1 [2] | 1 [1] | 3 | 40.00 |" in table.splitlines()


def test_quality_trains_scores_and_names_its_result_file(tmp_path, capsys):
    quality = load_benchmark("quality")
    assert quality.machine_tag("AMD EPYC 7B13 64-Core Processor") == "cpu_epyc"
    assert quality.machine_tag("Intel(R) Xeon(R) CPU @ 2.20GHz") == "cpu_xeon"
    data = write_tiny_chorales(
        tmp_path / "tiny.json", {"train": [6, 5], "valid": [4], "test": [5, 3]}
    )
    tiny = ["--z-dim", "2", "--emission-dim", "4", "--transition-dim", "4", "--rnn-dim", "4"]
    argv = ["--config", "tiny-nade", "--epochs", "2", "--samples", "3", "--out-dir", str(tmp_path)]
    argv += ["--filter-particles", "3"]
    argv += ["--", "--data", str(data), *tiny, "--emission", "nade", "--nade-hidden", "3"]
    assert quality.main(argv) == 0
    [path] = tmp_path.glob("quality_jsb_tiny-nade_cpu_*.json")
    result = json.loads(path.read_text())
    assert (result["model"], result["emission"], result["objective"]) == ("dmm", "nade", "elbo")
    assert result["epochs"] == 2 and result["samples"] == 3 and result["split"] == "test"
    # the compiling first epoch left out of the median
    assert result["median_epoch_seconds"] == result["history"][1]["seconds"] > 0
    assert result["is_nll_per_step"] <= result["bound_nll_per_step"]
    assert result["pf_nll_per_step"] < result["bound_nll_per_step"]
    assert result["command"].startswith("python benchmarks/quality.py --config tiny-nade")
    machine = result["machine"]
    assert 1 <= machine["cpu_count"] <= machine["cpus_on_machine"] and "cpu_signature" in machine


def test_ode_function_flops_counts_every_evaluation_of_the_chain():
    row = load_benchmark("ode_function_flops").measure(batch=4, z_dim=3, units=8, repeats=2)
    flops = 2 * 4 * (3 * 8 + 8 * 8 + 8 * 3)
    for name, passes in (("forward", 1), ("gradient", 3)):
        seconds = row[f"{name}_microseconds"] * 1e-6
        assert seconds > 0
        assert math.isclose(row[f"{name}_gflops_per_s"], passes * flops / seconds / 1e9)


def test_plot_quality_draws_result_files_and_names_a_file_without_history(tmp_path):
    plot_quality = load_benchmark("plot_quality")
    history = [
        {"epoch": 0, "train_loss_per_step": 9.0},
        {"epoch": 1, "train_loss_per_step": 7.0, "val_loss_per_step": 7.5},
    ]
    first = tmp_path / "quality_jsb_first_cpu_epyc_2026-12.json"
    provenance = {
        "machine": {"cpu_model": "AMD EPYC", "cpu_signature": "cpu family 26", "cpu_count": 1},
        "versions": {"jax": "0.10.2"},
        "date": "2026-12-07",
    }
    first.write_text(json.dumps({"history": history, **provenance}))
    empty = tmp_path / "quality_jsb_empty_cpu_epyc_2026-12.json"
    empty.write_text(json.dumps({"history": []}))
    out = tmp_path / "curves.png"
    assert plot_quality.main([str(first), f"{first}:again", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    items = [str(first), f"{first}:a label"]
    result = json.loads(first.read_text())
    older = {**result, "machine": {"cpu_model": "AMD EPYC"}}  # a file without the signature
    note = plot_quality.footnote(str(out), items, [older, result, result])
    command = f"python benchmarks/plot_quality.py --out {out} {first} '{first}:a label'"
    assert note.splitlines()[0] == command
    assert "; CPU AMD EPYC (cpu family 26); jax" in note  # once, though two runs name it
    assert note.endswith("jax 0.10.2; 2026-12-07")
    with pytest.raises(SystemExit, match="empty_cpu.*empty history"):
        plot_quality.main([str(first), str(empty), "--out", str(out)])
