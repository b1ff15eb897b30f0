"""apexq tune without Ray: the space file and its checks, the objective worked out by hand, best.yaml."""

import math
from pathlib import Path

import pytest
import yaml

from apexq.cluster.cli import main
from apexq.cluster.config import ConfigError, load_config
from apexq.cluster.tune_objective import TIE_BREAK_S, TrialProgress, final_return, objective, rank_key, score
from apexq.cluster.tune_report import Row, TrialsFileError, best_row, rows_from_csv, table_line, write_best, write_csv
from apexq.cluster.tune_space import Param, load_space, load_start_point, parse_param, value_text
from apexq.cluster.tune_trial import TrialSettings, train_command

ROOT = Path(__file__).resolve().parents[2]


def space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


# -- the space file --------------------------------------------------------------------------------


def test_each_type_is_parsed_with_its_bounds():
    assert parse_param("learner.lr", {"type": "loguniform", "low": 1e-4, "high": 3e-3}) == Param(
        "learner.lr", "loguniform", 1e-4, 3e-3
    )
    assert parse_param("replay.samples_per_insert", {"type": "uniform", "low": 2, "high": 16}).high == 16
    assert parse_param("learner.batch_size", {"type": "choice", "values": [128, 256]}).choices == ("128", "256")


def test_randint_includes_both_ends():
    dist = parse_param("actors.n_step", {"type": "randint", "low": 1, "high": 5}).distribution()
    assert (dist.low, dist.high, dist.step) == (1, 5, 1)  # optuna's IntDistribution: high is drawn too


@pytest.mark.parametrize(
    "key, spec, message",
    [
        (
            "learner.lr",
            {"type": "logunif", "low": 1, "high": 2},
            "learner.lr: unknown type 'logunif' (one of choice, loguniform, randint, uniform)",
        ),
        ("learner.lr", {"type": "uniform", "low": 2, "high": 2}, "learner.lr: empty range: low 2 >= high 2"),
        (
            "learner.lr",
            {"type": "uniform", "low": 3e-3, "high": 1e-4},
            "learner.lr: empty range: low 0.003 >= high 0.0001",
        ),
        ("actors.n_step", {"type": "randint", "low": 3, "high": 1}, "actors.n_step: empty range: low 3 >= high 1"),
        ("learner.lr", {"type": "loguniform", "low": 0, "high": 1}, "learner.lr: loguniform needs low > 0, got 0"),
        (
            "actors.n_step",
            {"type": "randint", "low": 1.5, "high": 3},
            "actors.n_step: randint low must be an integer, got 1.5",
        ),
        ("learner.lr", {"type": "uniform", "low": "a", "high": 1}, "learner.lr: uniform low must be a number, got 'a'"),
        ("learner.lr", {"type": "uniform", "high": 1}, "learner.lr: uniform needs low"),
        ("learner.lr", {"type": "uniform", "low": 0.1, "hi": 1}, "learner.lr: unknown field 'hi' for uniform"),
        ("learner.lr", 0.001, "learner.lr: expected a mapping such as {type: loguniform"),
        (
            "learner.batch_size",
            {"type": "choice", "values": []},
            "learner.batch_size: choice values must be a non-empty list",
        ),
        ("learner.batch_size", {"type": "choice", "values": [128, 128]}, "learner.batch_size: choice values repeat"),
        ("seed", {"type": "randint", "low": 0, "high": 3}, "seed: set by apexq tune"),
        ("train.max_seconds", {"type": "uniform", "low": 5, "high": 9}, "train.max_seconds: set by apexq tune"),
    ],
)
def test_a_malformed_entry_is_one_line_naming_its_key(key, spec, message):
    with pytest.raises(ConfigError) as exc:
        parse_param(key, spec)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "learner.lrr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}",
            "learner.lrr: unknown key (did you mean learner.lr?)",
        ),
        ("learner: {type: uniform, low: 1, high: 2}", "learner: is a section, not a key"),
        ("foo.bar: {type: uniform, low: 1, high: 2}", "foo.bar: unknown key"),
        (
            "learner.batch_size: {type: uniform, low: 128, high: 512}",
            "learner.batch_size: uniform draws fractional values such as 128.5, which the config refuses "
            "(learner.batch_size: expected an integer, got 128.5); use randint or choice",
        ),
        (
            "train.max_env_steps: {type: loguniform, low: 1000, high: 100000}",
            "train.max_env_steps: loguniform draws fractional values such as 1000.5",
        ),
        (
            "learner.device: {type: choice, values: [cpu, gpu]}",
            "learner.device: choice value gpu is refused by the config (learner.device: must be one of auto, cpu, cuda",
        ),
        (
            "actors.gamma: {type: uniform, low: 0.9, high: 1.5}",
            "actors.gamma: uniform high 1.5 is refused by the config",
        ),
        (
            "learner.dueling: {type: randint, low: 0, high: 1}",
            "learner.dueling: randint low 0 is refused by the config (learner.dueling: expected true or false, got 0)",
        ),
        ("learner.lr: {type: uniform, low: 0, high: 0.1}", "learner.lr: uniform low 0 is refused by the config"),
    ],
)
def test_a_value_the_config_refuses_is_found_before_the_search(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load_space(space(tmp_path, text), None)
    assert str(exc.value).startswith(f"--space {tmp_path / 'space.yaml'}: {message}")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected a mapping"),
        ("[1, 2]", "expected a mapping"),
        ("a: [\nb: 1\n", "space.yaml:[0-9]+ is not valid YAML"),
    ],
)
def test_a_file_that_is_no_space_is_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(space(tmp_path, text), None)


def test_the_example_space_fits_the_example_base_config():
    params = load_space(ROOT / "configs/tune/mountaincar_space.yaml", ROOT / "configs/tune/mountaincar_base.yaml")
    keys = {p.key for p in params}
    assert {
        "learner.lr",
        "learner.batch_size",
        "replay.samples_per_insert",
        "actors.n_step",
        "learner.target_update_period",
        "actors.envs_per_actor",
    } <= keys
    assert load_config(ROOT / "configs/tune/mountaincar_base.yaml").train.stop_at_return is not None


def test_values_reach_the_run_as_the_config_reads_them():
    assert value_text(1e-05) == "1.0e-05"  # YAML 1.1 would read 1e-05 as a string
    assert yaml.safe_load(value_text(1e-05)) == 1e-05
    assert value_text([64, 64]) == "[64, 64]" and value_text("auto") == "auto" and value_text(None) == "null"
    hidden = parse_param("learner.hidden_sizes", {"type": "choice", "values": [[64, 64], [128]]})
    assert hidden.config_value("[64, 64]") == [64, 64]
    assert parse_param("actors.n_step", {"type": "randint", "low": 1, "high": 5}).set_text(4) == "4"
    settings = TrialSettings("/b.yaml", (hidden,), 2, 8.0, -200.0, "/runs")
    cmd = train_command(settings, {"learner.hidden_sizes": "[128]"}, Path("/runs/t/seed1"), 1)
    assert cmd[cmd.index("--config") + 1] == "/b.yaml"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"] == [
        "learner.hidden_sizes=[128]",
        "train.max_seconds=8.0",
        "seed=1",
    ]
    assert "--single-process" in cmd
    distributed = TrialSettings("/b.yaml", (hidden,), 2, 8.0, -200.0, "/runs", distributed=True)
    assert "--single-process" not in train_command(distributed, {"learner.hidden_sizes": "[128]"}, Path("/r"), 1)


def test_a_bad_space_exits_2_with_one_line_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.yaml"
    base.write_text("train: {stop_at_return: -110}\n")
    bad = space(tmp_path, "learner.lr: {type: uniform, low: 3, high: 1}")
    assert main(["tune", "--config", str(base), "--space", str(bad), "--trials", "2", "--id", "s"]) == 2
    err = capsys.readouterr().err
    assert err == f"apexq: error: --space {bad}: learner.lr: empty range: low 3 >= high 1\n"
    assert not (tmp_path / "tune").exists()


def test_the_base_config_must_say_what_solved_is(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = space(tmp_path, "learner.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}")
    base = tmp_path / "base.yaml"
    base.write_text("seed: 1\n")
    assert main(["tune", "--config", str(base), "--space", str(good), "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"apexq: error: --config {base}: train.stop_at_return is not set") and err.count("\n") == 1


def test_without_the_extra_one_line_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "optuna", None)  # import optuna now raises ImportError
    good = space(tmp_path, "learner.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-3}")
    base = tmp_path / "base.yaml"
    base.write_text("train: {stop_at_return: -110}\n")
    assert main(["tune", "--config", str(base), "--space", str(good), "--trials", "2", "--id", "s"]) == 2
    err = capsys.readouterr().err
    assert err.startswith('apexq: error: apexq tune needs the tune extra: pip install "apexq[tune]"')
    assert err.count("\n") == 1 and not (tmp_path / "tune").exists()


# -- --start-at and --grace -----------------------------------------------------------------------

START_SPACE = (
    "learner.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}\n"
    "actors.n_step: {type: randint, low: 1, high: 5}\n"
    "learner.hidden_sizes: {type: choice, values: [[64, 64], [128, 128]]}\n"
)


def test_a_start_point_takes_the_files_values_and_the_base_config_for_the_rest(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train: {stop_at_return: -110}\nactors: {n_step: 4}\nlearner: {lr: 0.001}\n")
    params = load_space(space(tmp_path, START_SPACE), str(base))
    point = tmp_path / "point.yaml"
    point.write_text("learner: {lr: 0.0005, hidden_sizes: [128, 128]}\n")
    # lr and hidden_sizes from the file, n_step from base.yaml; a choice as its --set text, as drawn
    assert load_start_point(point, params, str(base)) == {
        "learner.lr": 0.0005,
        "actors.n_step": 4,
        "learner.hidden_sizes": "[128, 128]",
    }
    # the base config itself is a start point: the packaged default's hidden sizes are [64, 64]
    assert load_start_point(base, params, str(base))["learner.hidden_sizes"] == "[64, 64]"
    # a key the space fixes (a one-value choice) that the file leaves out takes the fixed value,
    # not the base's; one the file sets must be that value
    fixed = load_space(space(tmp_path, START_SPACE + "eval.confirm_episodes: {type: choice, values: [7]}\n"), str(base))
    assert load_start_point(point, fixed, str(base))["eval.confirm_episodes"] == "7"
    point.write_text("eval: {confirm_episodes: 9}\n")
    with pytest.raises(ConfigError, match=r"eval.confirm_episodes: 9 is not one of the choices 7; the space cannot"):
        load_start_point(point, fixed, str(base))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "learner: {lr: 0.01}\n",
            "learner.lr: 0.01 is outside the loguniform range 0.0001 .. 0.003; the space cannot draw it",
        ),
        (
            "learner: {hidden_sizes: [32]}\n",
            "learner.hidden_sizes: [32] is not one of the choices [64, 64], [128, 128]",
        ),
        ("actors: {n_step: 7}\n", "actors.n_step: 7 is outside the randint range 1 .. 5"),
        (
            "learner: {batch_size: 64}\n",
            "learner.batch_size is 64 there but 256 in the base config, and the space does not search it",
        ),
        ("learner: {lrr: 0.001}\n", "learner.lrr"),
        ("- 1\n", "expected a config overlay"),
    ],
)
def test_a_start_point_the_space_cannot_draw_is_one_line_naming_file_and_key(tmp_path, text, message):
    base = tmp_path / "base.yaml"
    base.write_text("train: {stop_at_return: -110}\nlearner: {lr: 0.001}\n")
    params = load_space(space(tmp_path, START_SPACE), str(base))
    point = tmp_path / "point.yaml"
    point.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_start_point(point, params, str(base))
    assert str(err.value).startswith(f"--start-at {point}: ") and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_the_searcher_draws_the_start_points_first_and_a_resumed_one_only_those_not_yet_run(tmp_path):
    from apexq.cluster.tune_search import new_searcher

    base = tmp_path / "base.yaml"
    base.write_text("train: {stop_at_return: -110}\n")
    params = tuple(load_space(space(tmp_path, START_SPACE), str(base)))
    settings = TrialSettings(str(base), params, 1, 8.0, -110.0, "/runs")
    a = {"learner.lr": 0.0005, "actors.n_step": 2, "learner.hidden_sizes": "[128, 128]"}
    b = {"learner.lr": 0.002, "actors.n_step": 5, "learner.hidden_sizes": "[64, 64]"}
    searcher = new_searcher(settings, 4, [], [a, b])
    first = [searcher.suggest(f"t{i}") for i in range(3)]
    assert first[:2] == [a, b] and first[2] not in (a, b)  # then TPE's own draws
    resumed = new_searcher(settings, 4, [Row(1, "aaaa0001", a, "done", 6.0, 1, -100.0)], [a, b])
    assert resumed.suggest("t1") == b  # a ran before the resume
    # the sampler's seed (--id's CRC-32): the same seed draws the same trials, another seed others
    draws = {seed: [new_searcher(settings, 4, [], [], seed).suggest("t") for _ in range(2)] for seed in (7, 8)}
    assert draws[7][0] == draws[7][1] and draws[7][0] != draws[8][0]


def test_asha_judges_no_trial_before_the_grace_seconds():
    """Two trials report after 10 and 25 s of runs, the second always worse; ASHA's first rung is
    --grace seconds, a quarter of --budget (here 10 s) by default."""
    from types import SimpleNamespace

    from apexq.cluster.tune import Search
    from apexq.cluster.tune_search import new_scheduler

    settings = TrialSettings("/b.yaml", (), 1, 40.0, -110.0, "/runs")
    for grace_s, stopped_at in ((None, 10), (25.0, 25)):
        grace = Search(1, 1, 40.0, -110.0, "apexq tune", grace_s=grace_s).grace
        scheduler = new_scheduler(settings, grace)
        good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
        scheduler.on_trial_add(None, good)
        scheduler.on_trial_add(None, bad)
        for t in (10, 25):
            assert scheduler.on_trial_result(None, good, {"budget_s": t, "score": 5.0}) == "CONTINUE"
            decision = scheduler.on_trial_result(None, bad, {"budget_s": t, "score": 50.0})
            assert decision == ("STOP" if t == stopped_at else "CONTINUE"), (grace_s, t)
            if decision == "STOP":
                break


def test_bad_start_points_and_grace_exit_2_with_one_line_and_start_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.yaml"
    base.write_text("train: {stop_at_return: -110}\nlearner: {lr: 0.001}\n")
    good = space(tmp_path, START_SPACE)
    args = ["tune", "--config", str(base), "--space", str(good), "--id", "s", "--budget", "10", "--seeds", "2"]
    for extra, message in [
        (["--trials", "1", "--start-at", "nothere.yaml"], "--start-at nothere.yaml: cannot read"),
        (
            ["--trials", "1", "--start-at", str(base), "--start-at", str(base)],
            "--start-at: 2 start points but --trials 1",
        ),
        (
            ["--trials", "2", "--grace", "21"],
            "--grace: at most --seeds x --budget (20 s, which turns early stopping off), got 21",
        ),
        (["--trials", "2", "--grace", "0"], "--grace: must be > 0, got 0"),
    ]:
        assert main(args + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(f"apexq: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "tune").exists()


# -- the objective -------------------------------------------------------------------------------


def test_the_objective_is_the_median_with_unsolved_runs_at_the_budget():
    assert objective([3.0, None, 5.0], 3, 8.0) == 5.0  # median of 3, 8, 5
    assert objective([3.0], 3, 8.0) == 8.0  # runs not made yet count at the budget: 3, 8, 8
    assert objective([3.0, 4.0], 3, 8.0) == 4.0  # 3, 4, 8
    assert objective([2.0, 4.0], 4, 10.0) == 7.0  # even count: (4 + 10) / 2
    assert objective([9.5], 1, 8.0) == 8.0  # a solve after the budget counts at it
    assert objective([None, None], 2, 8.0) == 8.0


def test_the_final_return_is_the_mean_of_the_runs_last_evaluations():
    assert final_return([-150.0, None, -120.0]) == -135.0
    assert final_return([None]) is None


def test_ties_go_to_the_higher_final_return_and_nothing_else_moves():
    assert score(8.0, -120.0) < score(8.0, -150.0) < score(8.0, None) == 8.0
    for r in (-1e9, -200.0, 0.0, 500.0, 1e9):
        assert 0.0 <= 8.0 - score(8.0, r) < TIE_BREAK_S
    assert score(7.998, -1e9) < score(8.0, 1e9)  # 2 ms apart: the objective decides
    rows = [(8.0, -150.0), (8.0, -120.0), (7.0, -200.0), (8.0, None)]
    assert sorted(rows, key=lambda r: rank_key(*r)) == [(7.0, -200.0), (8.0, -120.0), (8.0, -150.0), (8.0, None)]


def test_a_trial_reports_each_new_evaluation_with_the_objective_as_if_it_ended_now():
    p = TrialProgress(seeds=2, budget_s=10.0, target=-110.0)
    p.start_seed()
    assert not p.record({"time_s": 3.0, "eval_return": None, "eval_time_s": 0.0, "env_steps": 100})
    assert p.record(
        {
            "time_s": 4.0,
            "eval_return": -200.0,
            "eval_time_s": 0.5,
            "env_steps": 200,
            "final": True,
            "actor_weights_versions": [1, 2],
            "loss": None,
        }
    )
    rep = p.report()
    assert rep["objective"] == 10.0 and rep["budget_s"] == 4.0 and rep["final_return"] == -200.0
    assert (rep["solved_seeds"], rep["seeds_finished"], rep["seed"], rep["env_steps"]) == (0, 0, 0, 200)
    assert "final" not in rep and "actor_weights_versions" not in rep and "loss" not in rep
    assert not p.record({"time_s": 5.0, "eval_return": -200.0, "eval_time_s": 0.5})  # the same evaluation again
    # past the target but not confirmed on other episodes: not a solve
    assert p.record({"time_s": 5.5, "eval_return": -100.0, "eval_time_s": 0.8, "solved": False})
    assert p.report()["solved_seeds"] == 0
    assert p.record({"time_s": 6.0, "eval_return": -100.0, "eval_time_s": 1.0, "solved": True})
    rep = p.report()
    # solved 6.0 s after launch, 1.0 s of it evaluating: 5.0 s; median of (5.0, 10.0 for the seed to come)
    assert (rep["objective"], rep["solved_seeds"], rep["seeds_finished"], rep["budget_s"]) == (7.5, 1, 1, 6.0)
    p.end_seed(-105.0)  # the policy holds on fresh episodes: the solve stands
    rep = p.report()
    assert (rep["objective"], rep["budget_s"], rep["final_return"], rep["not_held"]) == (7.5, 6.0, -105.0, 0)
    p.start_seed()
    assert p.record({"time_s": 4.0, "eval_return": -150.0, "eval_time_s": 0.4})
    assert p.report()["final_return"] == -127.5 and p.report()["budget_s"] == 10.0
    p.end_seed(-160.0)  # ran out of budget; its policy's fresh return replaces its last evaluation's
    rep = p.report()
    assert (rep["objective"], rep["seeds_finished"], rep["budget_s"], rep["final_return"]) == (7.5, 2, 16.0, -132.5)
    assert rep["score"] == score(7.5, -132.5)


def test_a_solve_whose_policy_does_not_hold_on_fresh_episodes_counts_at_the_budget():
    p = TrialProgress(seeds=1, budget_s=10.0, target=-110.0)
    p.start_seed()
    assert p.record({"time_s": 3.0, "eval_return": -108.0, "eval_time_s": 0.2, "solved": True})
    assert p.report()["objective"] == 2.8
    p.end_seed(-115.0)
    rep = p.report()
    assert (rep["objective"], rep["solved_seeds"], rep["not_held"], rep["final_return"]) == (10.0, 0, 1, -115.0)
    assert rep["budget_s"] == 10.0  # it spent what an unsolved run spends
    p = TrialProgress(seeds=1, budget_s=10.0, target=-110.0)
    p.start_seed()
    assert p.record({"time_s": 3.0, "eval_return": -108.0, "eval_time_s": 0.2, "solved": True})
    p.end_seed(None)  # no policy to judge (say, killed before its export): not a solve either
    assert (p.report()["objective"], p.report()["not_held"], p.report()["final_return"]) == (10.0, 1, -108.0)


# -- the table and best.yaml ---------------------------------------------------------------------


def test_best_yaml_is_an_overlay_of_the_searched_keys_only(tmp_path):
    params = (
        parse_param("learner.lr", {"type": "loguniform", "low": 1e-4, "high": 3e-3}),
        parse_param("learner.hidden_sizes", {"type": "choice", "values": [[64, 64], [128]]}),
        parse_param("actors.n_step", {"type": "randint", "low": 1, "high": 5}),
    )
    settings = TrialSettings("/b.yaml", params, 3, 8.0, -200.0, "/runs")
    rows = [
        Row(
            1,
            "aaaa0001",
            {"learner.lr": 1e-3, "learner.hidden_sizes": "[128]", "actors.n_step": 2},
            "done",
            6.0,
            3,
            -150.0,
        ),
        Row(
            2,
            "aaaa0002",
            {"learner.lr": 2e-3, "learner.hidden_sizes": "[64, 64]", "actors.n_step": 4},
            "stopped early",
            6.0,
            2,
            -120.0,
        ),
        Row(3, "aaaa0003", {"learner.lr": 3e-4, "learner.hidden_sizes": "[128]", "actors.n_step": 1}, "error"),
    ]
    best = best_row(rows)
    assert best.number == 2  # tie on the objective: the higher final return
    assert table_line(best, 3).split() == [
        "2",
        "aaaa0002",
        "6.0",
        "2/3",
        "-120.0",
        "stopped",
        "early",
        "learner.lr=0.002",
        "learner.hidden_sizes=[64,",
        "64]",
        "actors.n_step=4",
    ]
    path = tmp_path / "best.yaml"
    write_best(best, rows, settings, "apexq tune --config b.yaml ...", "tune/x/base.yaml", path)
    text = path.read_text()
    assert text.startswith("# apexq tune: the best of 3 finished trials: trial 2 (aaaa0002)")
    assert "objective 6.0 s" in text and "apexq tune --config b.yaml ..." in text
    assert (
        "apexq train --config tune/x/base.yaml --set learner.lr=0.002 --set 'learner.hidden_sizes=[64, 64]' "
        "--set actors.n_step=4" in text
    )
    assert yaml.safe_load(text) == {"learner": {"lr": 0.002, "hidden_sizes": [64, 64]}, "actors": {"n_step": 4}}
    cfg = load_config(path)
    assert (cfg.learner.lr, cfg.learner.hidden_sizes, cfg.actors.n_step) == (0.002, [64, 64], 4)
    assert math.isinf(rank_key(6.0, None)[1])


def _csv_settings() -> TrialSettings:
    params = (
        parse_param("learner.lr", {"type": "loguniform", "low": 1e-4, "high": 3e-3}),
        parse_param("learner.hidden_sizes", {"type": "choice", "values": [[64, 64], [128]]}),
        parse_param("actors.n_step", {"type": "randint", "low": 1, "high": 5}),
    )
    return TrialSettings("/b.yaml", params, 3, 8.0, -200.0, "/runs")


def _csv_rows() -> list[Row]:
    return [
        Row(
            1,
            "0123abcd",
            {"learner.lr": 0.0012345678901234, "learner.hidden_sizes": "[128]", "actors.n_step": 2},
            "done",
            6.25,
            3,
            -150.5,
            18.75,
        ),
        Row(
            2,
            "89ef0a1b",
            {"learner.lr": 1e-4, "learner.hidden_sizes": "[64, 64]", "actors.n_step": 5},
            "stopped early",
            8.0,
            0,
            None,
            2.0,
        ),
        Row(3, "ffff0000", {"learner.lr": 3e-3, "learner.hidden_sizes": "[128]", "actors.n_step": 1}, "error"),
    ]


def test_a_resumed_search_reads_back_exactly_the_trials_it_wrote(tmp_path):
    settings = _csv_settings()
    rows = _csv_rows()
    path = tmp_path / "trials.csv"
    write_csv(rows, settings, path)
    back = rows_from_csv(path, settings)
    assert back == rows
    assert type(back[0].drawn["actors.n_step"]) is int and type(back[0].drawn["learner.lr"]) is float
    assert rows_from_csv(tmp_path / "none.csv", settings) == []


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("0123abcd", "../../etc"), "line 2: trial_id: expected 8 hex digits, got '../../etc'"),
        (lambda t: t.replace(",2,6.25", ",9,6.25"), "line 2: actors.n_step: 9 is outside 1 .. 5"),
        (lambda t: t.replace("[128]", "[256]", 1), "line 2: learner.hidden_sizes: '[256]' is not one of the choices"),
        (lambda t: t.replace("0.0012345678901234", "nan"), "line 2: learner.lr: nan is outside"),
        (lambda t: t.replace("6.25", "soon"), "line 2: objective_s: expected a number, got 'soon'"),
        (lambda t: t.replace(",done", ",finished"), "line 2: state: expected one of done, stopped early, error"),
        (lambda t: t.replace("learner.lr,", "learner.momentum,"), "header is ["),
        (lambda t: t.replace(",3,-150.5", ",4,-150.5"), "line 2: seeds: 4, but the search runs 3 per trial"),
        (lambda t: t.replace(",6.25,", ",,"), "line 2: objective_s: empty for a trial that did not fail"),
        (lambda t: t.replace("\n2,", "\n7,"), "trials are numbered [1, 7], expected 1 .. 2 in order"),
        (lambda t: t + "3,0123abcd\n", "line 4: 2 fields, expected 11"),
    ],
)
def test_a_trials_file_that_does_not_read_back_is_one_line_naming_row_and_field(tmp_path, edit, message):
    settings = _csv_settings()
    rows = _csv_rows()[:2]
    path = tmp_path / "trials.csv"
    write_csv(rows, settings, path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(TrialsFileError) as err:
        rows_from_csv(path, settings)
    assert message in str(err.value) and "\n" not in str(err.value)
