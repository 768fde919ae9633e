"""Ray Train / Tune drivers: quickstart, train a stage, evaluate, sweep. Thin: config → mmreason."""
