"""Helpers of bench/run_gpu.sh (the staged GPU run): environment row, backend smoke, pytest row stream."""
