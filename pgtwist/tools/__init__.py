"""Around the runtime, never in it: throwaway local clusters and certificates (demo, tests, benchmarks), the verifier tool."""
