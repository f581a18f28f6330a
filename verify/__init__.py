"""Judging: the verify stage (stage), its checks and metrics (metrics, integrity, forward),
thresholds, the runtimes that load an artifact (runtimes, llamacpp), the report that gates
publishing (report) and the independent Meta forward (meta_reference). It builds on pipeline.core
and imports nothing else of pipeline/."""
