"""hetero.bench: measured vs predicted, calibration, sweep and reports.

    measure.measure_engine(engine, P, N, context, repeats) -> Measured   TTFT, tok/s, per-unit ms, footprint
    measure.compare(plan, measured) -> {"predicted", "measured", "error"}
    run.Config / run.run_config / run.run_in_subprocess                   one configuration, one process
    calibrate.fit(runs, hw, profile) -> Fit; calibrate.store(fit)         least squares into Profile.calibration
    sweep.sweep(model, memory, precisions, residencies, contexts)         grid under a budget vs the planner's pick
    peers.run_peers(["llama.cpp", "transformers", "accelerate"], ...)     each if installed, else a note
    report.render(result, dir)                                            report.md + PNG figures
"""
