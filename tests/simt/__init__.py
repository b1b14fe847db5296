"""Host SIMT layer and the test-only extension that runs the CUDA kernel bodies on the CPU."""
