"""Everything a backtest needs and the live tool does not: price series, prices CSV files, generated scenarios,
synthetic books, the replay through the planner and paper fills, and the policies it compares.

The live core (planner, costs, snapshot, executor) never imports this package; this package imports the live
core, so that what a backtest replays is exactly what `plan` and the daemon run.
"""
