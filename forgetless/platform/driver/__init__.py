"""The CLI/API side: the Ray cluster, fits and fan-out, the progress board, jobs, the watchdog."""
