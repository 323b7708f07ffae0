"""The HTTP service over a catalog, as modules: `schemas` (what requests and answers look like), `service` (the
searcher, the writer, their locks and metrics), `routes` (the endpoints), `middleware` and `handlers` (the
edges: body limits, request counts, errors worded as statuses) and `app` (the factory that puts them together).

Only `python -m engine.serve` imports these, once it starts serving: its `--help` loads no FastAPI or torch.
"""
