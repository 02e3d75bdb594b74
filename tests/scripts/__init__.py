"""Tests of the client-side tools: the load generator and the benchmark (bench/, scripts/)."""
