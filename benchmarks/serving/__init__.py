"""`tandem bench`: goodput and SLO attainment of OpenAI-compatible servers on ShareGPT
and long-prompt workloads, and a side-by-side comparison of tandem's modes with vLLM."""
