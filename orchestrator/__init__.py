"""Runs the stages of an islands run: config, CLI, scheduling on Ray, router, ensemble, eval."""
