"""`islands serve`: a finished run's ensemble behind an HTTP endpoint on Ray Serve.

options.py   ServeOptions: layout, limits, threads
schemas.py   request bodies (OpenAI's shape where one exists), errors as OpenAI shapes them
batcher.py   StepBatcher: requests join and leave between steps; one engine call per step
experts.py   ExpertReplica (an expert pinned to its island) and RemoteExperts (its calls,
             health and the degraded mode)
metrics.py   the Prometheus metrics of /metrics
app.py       the FastAPI ingress deployment and its routes; page.html at /
launch.py    Ray (embedded or a cluster), Serve, the application, until interrupted
"""
