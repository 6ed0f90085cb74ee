"""Directory scoring: every image file under a folder classified once, into a Parquet, CSV or
JSON Lines table, resumable after a crash (`python -m service score DIR ...`).

- files.py: the walk (which files, in which order, their folder's class)
- decoding.py: files -> pixels (the service's decoding policy)
- engines.py / ray_engine.py: local onnxruntime, a remote server, Ray Data
- table.py: the rows and the output formats
- store.py: atomic chunks, resumption, the lock
- report.py: summary and bottleneck map
- job.py: the whole job; cli.py: its command line
"""
