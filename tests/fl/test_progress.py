"""The coordinator's progress lines and time table, from the rows it writes to RUN/log.json."""

from __future__ import annotations

from fedqc.fl.progress import phase_table, round_line


def test_one_line_per_round_says_phase_round_sites_score_and_time():
    row = {"phase": "supervised", "round": 2, "seconds": 41.23, "val_score": 0.8123, "val_score_of_round": 1,
           "sites": {"A": {"metrics": {}}, "B": {"metrics": {}}}, "failed": {"C": "site C: WorkerLost ..."},
           "missing": []}
    assert round_line(row, 3) == ("[supervised] round 2/3: 2/3 sites answered, mean val Dice of round 1 0.812, "
                                  "failed: C, 41.2 s")
    refine = {"phase": "refine", "round": 1, "seconds": 9.0, "num_flagged": {"A": 3, "B": 4},
              "sites": {"A": {}, "B": {}}, "failed": {}, "missing": ["D"]}
    assert round_line(refine, 4) == "[refine] round 1/4: 2/3 sites answered, flagged 7 case(s), no reply: D, 9.0 s"
    sequential = {**refine, "missing": [], "supervised_half": {"aggregated_from": ["A"], "failed": {"B": "x"},
                                                               "missing": []}}
    assert round_line(sequential, 2) == ("[refine] round 1/2: 2/2 sites answered, flagged 7 case(s), then the "
                                         "supervised step of 1 labelled site(s), supervised step without: B, 9.0 s")
    ae = {"phase": "qc-autoencoder", "round": 1, "seconds": 2.0, "failed": {}, "missing": [],
          "sites": {"A": {"metrics": {"train-loss": 0.5, "num-examples": 1}},
                    "B": {"metrics": {"train-loss": 0.2, "num-examples": 3}}}}
    assert round_line(ae, 1) == "[qc-autoencoder] round 1/1: 2/2 sites answered, train loss 0.2750, 2.0 s"
    init = {"phase": "init", "round": 0, "seconds": 1.0, "sites": {"A": {}}, "failed": {}, "missing": []}
    assert round_line(init, 1) == "[init] round 1/1: 1/1 sites answered, 1.0 s"


def test_the_time_table_per_phase():
    table = phase_table({"seconds": 100.0, "phases": {"init": {"rounds": 1, "seconds": 10.0},
                                                      "supervised": {"rounds": 3, "seconds": 60.0}}})
    assert table.splitlines() == ["| phase | rounds | seconds | s/round | share |", "|---|---|---|---|---|",
                                  "| init | 1 | 10.0 | 10.0 | 10% |", "| supervised | 3 | 60.0 | 20.0 | 60% |",
                                  "| total | 4 | 100.0 |  | 100% |"]
